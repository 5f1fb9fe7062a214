"""`flywheel up`: the whole flywheel on one machine, as supervised processes."""
