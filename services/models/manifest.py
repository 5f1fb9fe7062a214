"""Checking a checkpoint before any byte of it is loaded.

A checkpoint is loaded only if (1) its folder, after resolving symlinks, lies inside the
configured checkpoint root; (2) every file of its manifest exists there, inside the folder,
with the declared size and sha256; (3) its weights are safetensors and nothing in the folder
is a pickle-based format (``.bin``, ``.pt``, ``.pth``, ``.pkl``, ``.ckpt``): those can execute
code when loaded, so their mere presence refuses the checkpoint; (4) its ``config.json``, if
any, is a JSON object whose model dimensions are plausible (a forged config could otherwise make
the loader allocate without bound before any weight is read).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from schemas import CheckpointEvent, FileDigest
from services.common.errors import FlywheelError

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"}


class CheckpointRefused(FlywheelError):
    """A checkpoint failed verification; ``reason`` is a metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"checkpoint refused ({reason}): {detail}")
        self.reason = reason


def local_path(uri: str) -> Path:
    """The folder a checkpoint URI names; only local paths are loaded by engines."""
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        raise CheckpointRefused("not_local", f"{uri!r}: engines load from local folders only")
    return Path(uri)


MANIFEST_FILE = "flywheel-manifest.json"
"""The store's own record of a version's files, written beside them (not in the manifest)."""
OPTIONAL_PREFIX = "optimizer/"
"""Manifest entries under this folder may be absent: optimizer state, which the store keeps
for the latest version only (``CheckpointStore.prune``). Present, they must match."""


def verify(event: CheckpointEvent, root: Path) -> Path:
    """The verified, resolved checkpoint folder; raises CheckpointRefused with a reason."""
    folder = local_path(event.uri).resolve()
    root = root.resolve()
    if not folder.is_relative_to(root):
        raise CheckpointRefused("outside_root", f"{folder} is not inside {root}")
    if not folder.is_dir():
        raise CheckpointRefused("missing", f"{folder} does not exist")
    pickles = sorted(p.name for p in folder.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointRefused("pickle", f"pickle-format files present: {', '.join(pickles)}")
    if not event.manifest:
        raise CheckpointRefused("manifest", "the manifest lists no files")
    if not any(f.path.endswith(".safetensors") for f in event.manifest):
        raise CheckpointRefused("no_safetensors", "no safetensors weights in the manifest")
    listed = {entry.path for entry in event.manifest} | {MANIFEST_FILE}
    unlisted = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                      if p.is_file() and str(p.relative_to(folder)) not in listed)
    if unlisted:  # a loader reads what it finds (an index, a config): nothing unverified
        raise CheckpointRefused("unlisted", f"files the manifest does not list: "
                                f"{', '.join(unlisted[:5])}{' ...' if len(unlisted) > 5 else ''}")
    for entry in event.manifest:
        path = (folder / entry.path).resolve()
        if not path.is_relative_to(folder):
            raise CheckpointRefused("outside_root", f"manifest entry {entry.path!r} escapes")
        if not path.is_file():
            if entry.path.startswith(OPTIONAL_PREFIX):
                continue  # the store's retention dropped it; serving never needs it
            raise CheckpointRefused("missing", f"{entry.path} is missing")
        if path.stat().st_size != entry.size_bytes:
            raise CheckpointRefused("size", f"{entry.path}: size differs from the manifest")
        if sha256_file(path) != entry.sha256:
            raise CheckpointRefused("sha256", f"{entry.path}: sha256 differs from the manifest")
    _check_config(folder / "config.json")
    return folder


DIMENSIONS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings")
MAX_DIMENSION = 1 << 24
"""Above every released model's (vocabularies of 256k, contexts of a few million tokens)."""


def _check_config(path: Path) -> None:
    if not path.is_file():
        return
    try:
        config = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise CheckpointRefused("config", f"config.json is not JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointRefused("config", "config.json is not a JSON object")
    for key in DIMENSIONS:
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) \
                or not 0 < value <= MAX_DIMENSION:
            raise CheckpointRefused("config", f"config.json: {key} = {value!r} is not a "
                                    f"dimension in 1..{MAX_DIMENSION}")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def build_manifest(folder: Path) -> list[FileDigest]:
    """Every file under ``folder`` with its size and sha256, paths relative to it."""
    return [
        FileDigest(path=str(p.relative_to(folder)), sha256=sha256_file(p),
                   size_bytes=p.stat().st_size)
        for p in sorted(folder.rglob("*")) if p.is_file()
    ]
