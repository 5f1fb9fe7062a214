"""``python -m services ...`` is the ``flywheel`` command."""

from services.cli import main

main()
