"""``python -m bench NAME``: same as ``flywheel bench NAME``."""

import sys

from bench.runner import main

raise SystemExit(main(sys.argv[1:]))
