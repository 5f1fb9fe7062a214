"""``python -m bench NAME``: same as ``flywheel bench NAME``."""

import sys

from bench.runner import main

# Guarded: model engines may start worker processes that re-import the main module.
if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
