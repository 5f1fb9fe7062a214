"""What `flywheel up` prints: its step lines only; libraries' noise goes to its log file."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.logs import to_file


@pytest.fixture
def restored(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's logging as it was, after the test."""
    from transformers.utils import logging as hf_logging

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)
    hf_logging.enable_default_handler()
    hf_logging.disable_propagation()
    hf_logging.enable_progress_bar()


def test_library_noise_goes_to_the_file_not_the_console(
        restored: None, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from transformers.utils import logging as hf_logging

    path = tmp_path / "logs" / "up.log"
    to_file(path)
    logging.getLogger("librdkafka").warning("FAIL|rdkafka#producer-1| NOT_LEADER_OR_FOLLOWER")
    hf_logging.get_logger("transformers.modeling_utils").warning("Loading weights: 21 tensors")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a library's deprecation", DeprecationWarning, stacklevel=1)
    list(hf_logging.tqdm(range(3), desc="Writing shards"))
    console = capfd.readouterr()
    assert console.out == "" and console.err == "", console
    text = path.read_text(encoding="utf-8")
    for line in ("NOT_LEADER_OR_FOLLOWER", "Loading weights", "a library's deprecation"):
        assert line in text, text
    assert "Writing shards" not in text  # progress bars are off, not redirected
    assert not hf_logging.is_progress_bar_enabled()
