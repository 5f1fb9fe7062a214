"""The reloader's decisions: which events it takes, what it refuses, and what a failed load does.

The engine here only records reload calls: the real engines' in-place reload is exercised on a
real model in tests/integration/test_engines.py and test_generator.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from schemas import CheckpointEvent
from services.generator.metrics import RELOAD_REFUSALS, RELOAD_SKIPPED
from services.generator.reload import Reloader
from services.models.episodes import ModelVersion
from services.models.manifest import build_manifest


class RecordingEngine:
    name = "recording"

    def __init__(self, fail_on: Path | None = None) -> None:
        self.loaded: list[Path] = []
        self.fail_on = fail_on

    def reload(self, folder: Path) -> None:
        self.loaded.append(folder)
        if folder == self.fail_on:
            raise RuntimeError("shape mismatch while loading")

    def generate(self, *args: object) -> list[object]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _checkpoint(root: Path, version: int, *, hidden: int = 128, status: str = "promoted",
                model: str = "tiny") -> CheckpointEvent:
    folder = root / f"v{version}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(bytes([version]) * 32)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": hidden}))
    return CheckpointEvent(model=model, version=version, uri=str(folder),
                           manifest=build_manifest(folder), status=status)  # type: ignore[arg-type]


def _refusals(reason: str) -> float:
    return RELOAD_REFUSALS.labels(reason)._value.get()


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Reloader, RecordingEngine, Path]:
    root = tmp_path / "ckpt"
    base = _checkpoint(root, 0)
    engine = RecordingEngine()
    return Reloader(engine, root, ModelVersion("tiny", 0), Path(base.uri)), engine, root


def test_only_newer_promoted_checkpoints_of_its_model_are_taken(
    setup: tuple[Reloader, RecordingEngine, Path],
) -> None:
    reloader, engine, root = setup
    reloader.offer(_checkpoint(root, 1, status="candidate"))
    reloader.offer(_checkpoint(root, 2, model="other"))
    assert not reloader.apply_pending() and engine.loaded == []
    skipped = RELOAD_SKIPPED._value.get()
    reloader.offer(_checkpoint(root, 3))
    reloader.offer(_checkpoint(root, 5))  # both promoted within one batch: v3 is never served
    reloader.offer(_checkpoint(root, 4))  # older than the pending v5
    assert RELOAD_SKIPPED._value.get() == skipped + 1
    assert reloader.apply_pending()
    assert engine.loaded == [(root / "v5").resolve()] and reloader.serving.version == 5
    reloader.offer(CheckpointEvent.model_validate(
        _checkpoint(root, 6).model_dump() | {"version": 5}))  # not newer than what it serves
    assert not reloader.apply_pending()


def test_tampered_and_incompatible_checkpoints_are_refused(
    setup: tuple[Reloader, RecordingEngine, Path],
) -> None:
    reloader, engine, root = setup
    sha, arch = _refusals("sha256"), _refusals("incompatible")
    tampered = _checkpoint(root, 1)
    (root / "v1" / "model.safetensors").write_bytes(b"\xff" * 32)
    reloader.offer(tampered)
    reloader.offer(_checkpoint(root, 2, hidden=256))
    assert not reloader.apply_pending() and engine.loaded == []
    assert reloader.serving.version == 0
    assert _refusals("sha256") == sha + 1 and _refusals("incompatible") == arch + 1


def test_a_failed_load_restores_the_served_weights(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    base = _checkpoint(root, 0)
    engine = RecordingEngine(fail_on=(root / "v1").resolve())
    reloader = Reloader(engine, root, ModelVersion("tiny", 0), Path(base.uri))
    failed = _refusals("load_failed")
    reloader.offer(_checkpoint(root, 1))
    assert not reloader.apply_pending()
    assert engine.loaded == [(root / "v1").resolve(), Path(base.uri)]
    assert reloader.serving.version == 0 and _refusals("load_failed") == failed + 1


def test_a_checkpoint_changed_after_its_offer_is_refused_when_it_is_to_be_loaded(
    setup: tuple[Reloader, RecordingEngine, Path],
) -> None:
    """Verified when offered, loaded between batches later: the files are verified again as
    they are loaded, so a change in between (a mounted store written by another host) is
    refused and the served version stays."""
    reloader, engine, root = setup
    sha = _refusals("sha256")
    reloader.offer(_checkpoint(root, 1))
    (root / "v1" / "model.safetensors").write_bytes(b"\xfe" * 32)  # after the offer
    assert not reloader.apply_pending() and engine.loaded == []
    assert reloader.serving.version == 0 and _refusals("sha256") == sha + 1
