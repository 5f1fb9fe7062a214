"""Feeder: keeps the ``tasks`` topic topped up with a bounded backlog for the generators."""
