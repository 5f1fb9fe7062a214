"""Checkpoint verification: each way a checkpoint can be bad is refused with its reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas import CheckpointEvent
from services.models.manifest import CheckpointRefused, build_manifest, verify


def _checkpoint(folder: Path) -> CheckpointEvent:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    (folder / "config.json").write_text("{}")
    return CheckpointEvent(model="tiny", version=1, uri=str(folder),
                           manifest=build_manifest(folder), status="promoted")


def _refused(event: CheckpointEvent, root: Path) -> str:
    with pytest.raises(CheckpointRefused) as info:
        verify(event, root)
    return info.value.reason


def test_a_good_checkpoint_verifies(tmp_path: Path) -> None:
    event = _checkpoint(tmp_path / "ckpt" / "v1")
    assert verify(event, tmp_path / "ckpt") == (tmp_path / "ckpt" / "v1").resolve()
    file_uri = event.model_copy(update={"uri": f"file://{tmp_path / 'ckpt' / 'v1'}"})
    assert verify(file_uri, tmp_path / "ckpt")


def test_tampered_missing_or_resized_files_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    event = _checkpoint(root / "v1")
    weights = root / "v1" / "model.safetensors"
    weights.write_bytes(b"\x01" * 64)  # same size, other bytes
    assert _refused(event, root) == "sha256"
    weights.write_bytes(b"\x00" * 65)
    assert _refused(event, root) == "size"
    weights.unlink()
    assert _refused(event, root) == "missing"


def test_pickles_are_refused_even_beside_safetensors(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    event = _checkpoint(root / "v1")
    (root / "v1" / "pytorch_model.bin").write_bytes(b"pickle")
    assert _refused(event, root) == "pickle"


def test_a_manifest_without_safetensors_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    event = _checkpoint(root / "v1")
    only_config = event.model_copy(update={
        "manifest": [f for f in event.manifest if f.path == "config.json"]})
    assert _refused(only_config, root) == "no_safetensors"


def test_paths_outside_the_root_are_refused_also_through_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    root.mkdir()
    elsewhere = _checkpoint(tmp_path / "elsewhere" / "v1")
    assert _refused(elsewhere, root) == "outside_root"
    (root / "link").symlink_to(tmp_path / "elsewhere" / "v1")
    linked = elsewhere.model_copy(update={"uri": str(root / "link")})
    assert _refused(linked, root) == "outside_root"
    event = _checkpoint(root / "v2")
    escape = event.model_copy(update={"manifest": [
        *event.manifest, event.manifest[0].model_copy(update={"path": "../v1/x.safetensors"})]})
    assert _refused(escape, root) == "outside_root"
    remote = event.model_copy(update={"uri": "s3://bucket/v2"})
    assert _refused(remote, root) == "not_local"
    missing = event.model_copy(update={"uri": str(root / "v9")})
    assert _refused(missing, root) == "missing"


@pytest.mark.parametrize("config", ['{"hidden_size": 1000000000}', '{"vocab_size": -1}',
                                    '{"num_hidden_layers": "12"}', '[1, 2]', '{"a": ',
                                    '[' * 100_000])
def test_an_absurd_or_unreadable_config_is_refused_with_hashes_that_match(
        tmp_path: Path, config: str) -> None:
    # The hashes are the forger's own: only the content can refuse it, before a loader
    # allocates for a billion-wide layer.
    root = tmp_path / "ckpt"
    folder = root / "v1"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    (folder / "config.json").write_text(config)
    event = CheckpointEvent(model="tiny", version=1, uri=str(folder),
                            manifest=build_manifest(folder), status="promoted")
    assert _refused(event, root) == "config"
    (folder / "config.json").write_text('{"hidden_size": 64, "vocab_size": 49152}')
    assert verify(event.model_copy(update={"manifest": build_manifest(folder)}), root)


def test_files_the_manifest_does_not_list_are_refused(tmp_path: Path) -> None:
    """A loader reads what it finds in the folder: an unlisted shard index would make it load
    other weights, an unlisted tokenizer file other tokens. Only the store's own record of the
    files may sit beside them."""
    from services.models.manifest import MANIFEST_FILE

    root = tmp_path / "ckpt"
    event = _checkpoint(root / "v1")
    (root / "v1" / MANIFEST_FILE).write_text("{}")
    assert verify(event, root)
    (root / "v1" / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    assert _refused(event, root) == "unlisted"
