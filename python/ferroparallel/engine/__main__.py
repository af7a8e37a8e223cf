"""``python -m ferroparallel.engine``: run one engine."""

from __future__ import annotations

import sys

from .app import main

if __name__ == "__main__":
    sys.exit(main())
