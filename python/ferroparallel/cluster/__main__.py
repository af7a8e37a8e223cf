"""``python -m ferroparallel.cluster``."""

import sys

from .app import main

sys.exit(main())
