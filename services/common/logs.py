"""Logging set-up shared by every service: one root logger, one line per event."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str = "INFO") -> None:
    """Configure the root logger once per process; later calls only change the level."""
    root = logging.getLogger()
    if not any(getattr(h, "_flywheel", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler._flywheel = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    # librdkafka logs connection churn at INFO; only its warnings and errors are news.
    logging.getLogger("librdkafka").setLevel(max(logging.WARNING, root.level))
