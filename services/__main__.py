"""``python -m services ...`` is the ``flywheel`` command."""

from services.cli import main

# Guarded: model engines may start worker processes that re-import the main module.
if __name__ == "__main__":
    main()
