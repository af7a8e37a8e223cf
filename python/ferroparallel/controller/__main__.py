"""``python -m ferroparallel.controller``."""

import sys

from .app import main

sys.exit(main())
