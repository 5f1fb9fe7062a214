"""Logging set-up shared by every service: one root logger, one line per event."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

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


def to_file(path: Path, level: str = "INFO") -> None:
    """Everything logged goes to ``path`` instead of the console: for ``flywheel up``, whose
    console shows one line per step and the live view. Libraries' own output goes there too:
    librdkafka's retries (``NOT_LEADER``, ``GETPID``) through the ``librdkafka`` logger,
    Python warnings, and transformers' messages (its own stderr handler removed); progress
    bars (weight loading, shard writing) are turned off, here and in child processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_flywheel", False)]:
        root.removeHandler(handler)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT))
    handler._flywheel = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when huggingface_hub is imported
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # the stream-only install: nothing of it to quiet
        return
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.disable_progress_bar()
