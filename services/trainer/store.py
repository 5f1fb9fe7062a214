"""The checkpoint store: Hugging Face folders (safetensors) with their optimizer state,
written so that no reader ever sees a partial checkpoint.

A checkpoint of version N is written to a staging folder (``.v<N>.tmp-<random>``) next to
its final place and renamed to ``v<N>`` when complete: a rename within one filesystem is
atomic, so a folder named ``v<N>`` is always whole. For remote stores (any fsspec URL, e.g.
``s3://bucket/flywheel``) the folder is built locally, uploaded under the staging name and
then moved; readers only ever look at names that a committed ``candidate`` event announced.

What a round leaves behind when it dies before its Kafka transaction commits (a staging
folder, or a ``v<N>`` no event names) is an orphan; :meth:`CheckpointStore.cleanup` removes
everything newer than the last committed version at start.

Optimizer state is saved with safetensors too (tensors) plus JSON (hyper-parameters and
step counts): nothing in a checkpoint is ever unpickled.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import fsspec
import torch
from safetensors.torch import load_file, save_file

from schemas import FileDigest
from services.models.manifest import MANIFEST_FILE, build_manifest

# In a folder of their own: weight loaders (transformers, vLLM's reload) take every
# *.safetensors file at a checkpoint's top level as model weights.
OPTIMIZER_TENSORS = "optimizer/state.safetensors"
OPTIMIZER_META = "optimizer/meta.json"
"""Beside the files it lists (it cannot list itself): their sha256 and sizes, plus the record
the trainer passes (version, parent, metrics, offset ranges trained on)."""
_VERSION = re.compile(r"^v(\d+)$")


def folder_name(version: int) -> str:
    return f"v{version:06d}"


class CheckpointStore:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple)
                                else (self.fs.protocol,))
        self.fs.makedirs(self.root, exist_ok=True)

    def uri(self, version: int) -> str:
        if self.local:
            return str(Path(self.root) / folder_name(version))
        return f"{self.url}/{folder_name(version)}"

    def write(self, version: int, model: Any, tokenizer: Any,
              optimizer: torch.optim.Optimizer | Mapping[str, Any] | None,
              record: dict[str, Any] | None = None, *,
              state_dict: Mapping[str, torch.Tensor] | None = None
              ) -> tuple[str, list[FileDigest]]:
        """Write checkpoint ``version``; returns its URI and manifest (every file with its
        sha256 and size). ``record`` (metrics, parent, offset ranges...) is written beside
        the files as ``MANIFEST_FILE`` together with that manifest. ``optimizer``: the
        optimizer, or its state in ``Optimizer.state_dict()`` form (``Parallel.
        optimizer_state`` gathers it from several ranks). ``state_dict``: the weights to save
        instead of ``model``'s own (gathered from the ranks of a sharded model)."""
        final = folder_name(version)
        staging = f".{final}.tmp-{uuid.uuid4().hex[:8]}"
        if self.local:
            work = Path(self.root) / staging
            work.mkdir()
            try:
                manifest = _fill(work, model, tokenizer, optimizer, record, state_dict)
                work.rename(Path(self.root) / final)
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
            return self.uri(version), manifest
        with tempfile.TemporaryDirectory(prefix="flywheel-ckpt-") as tmp:
            manifest = _fill(Path(tmp), model, tokenizer, optimizer, record,
                             state_dict)
            remote, target = f"{self.root}/{staging}", f"{self.root}/{final}"
            if self.fs.exists(target):
                raise FileExistsError(f"checkpoint {target} exists already")
            self.fs.put(tmp, remote, recursive=True)
            self.fs.mv(remote, target, recursive=True)
        return self.uri(version), manifest

    def fetch(self, version: int) -> Path:
        """A local folder holding checkpoint ``version``: itself for a local store, else a
        download into a fresh temporary folder (verify it against its manifest)."""
        if self.local:
            return Path(self.root) / folder_name(version)
        target = Path(tempfile.mkdtemp(prefix="flywheel-fetch-")) / folder_name(version)
        self.fs.get(f"{self.root}/{folder_name(version)}", str(target), recursive=True)
        return target

    def versions(self) -> list[int]:
        """Versions present as complete folders."""
        out = []
        for entry in self.fs.ls(self.root, detail=False):
            m = _VERSION.match(Path(str(entry)).name)
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def cleanup(self, committed: int | None) -> list[str]:
        """Remove staging folders and versions newer than ``committed`` (None: all)."""
        removed = []
        for entry in self.fs.ls(self.root, detail=False):
            name = Path(str(entry)).name
            m = _VERSION.match(name)
            orphan = name.startswith(".v") and ".tmp-" in name
            if m and (committed is None or int(m.group(1)) > committed):
                orphan = True
            if orphan:
                self.fs.rm(str(entry), recursive=True)
                removed.append(name)
        return removed


    def prune(self, keep: set[int], optimizer_of: set[int]) -> list[str]:
        """Delete every version folder not in ``keep``, and the optimizer state of every
        kept version not in ``optimizer_of`` (those a resuming or rolling-back trainer
        loads). Returns what it removed, as ``v000012`` or ``v000012/optimizer``."""
        removed = []
        for entry in self.fs.ls(self.root, detail=False):
            m = _VERSION.match(Path(str(entry)).name)
            if not m:
                continue
            version, name = int(m.group(1)), Path(str(entry)).name
            if version not in keep:
                self.fs.rm(str(entry), recursive=True)
                removed.append(name)
                continue
            optimizer = f"{entry}/{Path(OPTIMIZER_TENSORS).parent}"
            if version not in optimizer_of and self.fs.exists(optimizer):
                self.fs.rm(optimizer, recursive=True)
                removed.append(f"{name}/optimizer")
        return removed

    def size_bytes(self) -> int:
        """Bytes the store holds."""
        return int(self.fs.du(self.root, total=True))


def _fill(folder: Path, model: Any, tokenizer: Any,
          optimizer: torch.optim.Optimizer | Mapping[str, Any] | None,
          record: dict[str, Any] | None,
          state_dict: Mapping[str, torch.Tensor] | None = None) -> list[FileDigest]:
    model.save_pretrained(folder, safe_serialization=True,
                          state_dict=dict(state_dict) if state_dict is not None else None)
    tokenizer.save_pretrained(folder)
    if optimizer is not None:
        tensors, meta = _optimizer_state(optimizer if isinstance(optimizer, Mapping)
                                         else optimizer.state_dict())
        (folder / OPTIMIZER_TENSORS).parent.mkdir(exist_ok=True)
        save_file(tensors, str(folder / OPTIMIZER_TENSORS))
        (folder / OPTIMIZER_META).write_text(json.dumps(meta), encoding="utf-8")
    manifest = build_manifest(folder)
    document = {**(record or {}), "files": [f.model_dump() for f in manifest]}
    (folder / MANIFEST_FILE).write_text(json.dumps(document, indent=1), encoding="utf-8")
    return manifest


def _optimizer_state(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor],
                                                       dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> bool:
    """Restore optimizer state saved by :meth:`CheckpointStore.write`; False if absent."""
    state = read_optimizer(folder)
    if state is None:
        return False
    optimizer.load_state_dict(state)
    return True


def read_optimizer(folder: Path) -> dict[str, Any] | None:
    """Optimizer state saved by :meth:`CheckpointStore.write`, in ``Optimizer.state_dict()``
    form (for a job on several ranks: ``Parallel.load_optimizer_state``); None if absent."""
    tensors_file, meta_file = folder / OPTIMIZER_TENSORS, folder / OPTIMIZER_META
    if not tensors_file.exists() or not meta_file.exists():
        return None
    tensors = load_file(str(tensors_file))
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()}  # JSON made a list
              for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}
