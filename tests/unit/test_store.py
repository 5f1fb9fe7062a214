"""The checkpoint store: whole folders only, optimizer state without pickle, orphans removed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch  # the model extras: missing is a failure, never a skip

from schemas import CheckpointEvent
from services.models.manifest import PICKLE_SUFFIXES, verify
from services.trainer.store import CheckpointStore, folder_name, load_optimizer

pytestmark = pytest.mark.model


@pytest.fixture()
def trained(tmp_path: Path) -> tuple[object, object, torch.optim.Optimizer]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.models.tiny import tiny_model

    folder = tiny_model(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(folder)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]])).loss.backward()
    optimizer.step()
    return model, AutoTokenizer.from_pretrained(folder), optimizer


def test_a_written_checkpoint_verifies_loads_and_restores_the_optimizer(
        tmp_path: Path, trained: tuple[object, object, torch.optim.Optimizer]) -> None:
    from transformers import AutoModelForCausalLM

    model, tokenizer, optimizer = trained
    store = CheckpointStore(str(tmp_path / "store"))
    uri, manifest = store.write(3, model, tokenizer, optimizer,
                                record={"version": 3, "parent_version": 2})
    assert Path(uri).name == folder_name(3) and store.versions() == [3]
    import json

    from services.trainer.store import MANIFEST_FILE
    document = json.loads((Path(uri) / MANIFEST_FILE).read_text())
    assert document["parent_version"] == 2
    assert document["files"] == [f.model_dump() for f in manifest]
    event = CheckpointEvent(model="tiny", version=3, uri=uri, manifest=manifest,
                            status="candidate")
    folder = verify(event, tmp_path / "store")  # sha256 and sizes, no pickle anywhere
    assert not [p for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    loaded = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
    for a, b in zip(model.parameters(), loaded.parameters(), strict=True):  # type: ignore[attr-defined]
        assert torch.equal(a, b)
    fresh = torch.optim.AdamW(loaded.parameters(), lr=1e-3)
    assert load_optimizer(fresh, folder)
    before, after = optimizer.state_dict(), fresh.state_dict()
    assert before["param_groups"] == after["param_groups"]
    for index, entry in before["state"].items():
        assert torch.equal(entry["exp_avg"], after["state"][index]["exp_avg"])
        assert float(entry["step"]) == float(after["state"][index]["step"])


def test_cleanup_removes_staging_folders_and_uncommitted_versions(
        tmp_path: Path, trained: tuple[object, object, torch.optim.Optimizer]) -> None:
    model, tokenizer, _ = trained
    store = CheckpointStore(str(tmp_path / "store"))
    for v in (1, 2, 3):
        store.write(v, model, tokenizer, None)
    (tmp_path / "store" / ".v000004.tmp-dead").mkdir()  # a round killed while writing
    removed = store.cleanup(committed=2)
    assert sorted(removed) == [".v000004.tmp-dead", "v000003"]
    assert store.versions() == [1, 2]


def test_a_remote_store_goes_through_fsspec(
        trained: tuple[object, object, torch.optim.Optimizer]) -> None:
    import fsspec

    model, tokenizer, optimizer = trained
    store = CheckpointStore("memory://flywheel-test-store")
    uri, manifest = store.write(1, model, tokenizer, optimizer)
    assert uri == "memory://flywheel-test-store/v000001"
    fs = fsspec.filesystem("memory")
    top = "/flywheel-test-store/v000001"
    names = {p.removeprefix(top + "/") for p in fs.find(top)}
    from services.trainer.store import MANIFEST_FILE

    assert {m.path for m in manifest} | {MANIFEST_FILE} == names
    assert store.versions() == [1]
    assert not [p for p in fs.ls("/flywheel-test-store", detail=False) if ".tmp-" in p]


def test_a_checkpoint_with_optimizer_state_reloads_into_a_serving_engine(
        tmp_path: Path, trained: tuple[object, object, torch.optim.Optimizer]) -> None:
    """Weight loaders take every top-level *.safetensors file as weights: the optimizer's
    tensors must not be one of them (a generator refused every trained version)."""
    from services.models.engines import TransformersEngine
    from services.models.tiny import tiny_model

    model, tokenizer, optimizer = trained
    uri, _ = CheckpointStore(str(tmp_path / "store")).write(1, model, tokenizer, optimizer)
    engine = TransformersEngine(tiny_model(tmp_path / "serving", seed=9))
    engine.reload(Path(uri))
    served = engine.model.state_dict()
    assert all(torch.equal(served[k], v) for k, v in model.state_dict().items())  # type: ignore[attr-defined]


def test_retention_keeps_what_may_still_be_loaded_and_optimizer_state_of_latest_and_promoted(
        tmp_path: Path, trained: tuple[object, object, torch.optim.Optimizer]) -> None:
    from services.trainer.lineage import Decisions

    model, tokenizer, optimizer = trained
    store = CheckpointStore(str(tmp_path / "store"))
    manifests = {v: store.write(v, model, tokenizer, optimizer)[1] for v in range(0, 9)}
    full = store.size_bytes()
    decisions = Decisions("tiny")
    for version in range(1, 9):  # each candidate precedes its decision
        decisions.offer(CheckpointEvent(model="tiny", version=version, uri="x",
                                        manifest=manifests[version], status="candidate"))
    for version, status in [(1, "promoted"), (2, "rejected"), (3, "rejected"),
                            (4, "promoted"), (5, "rejected"), (6, "rejected")]:
        decisions.offer(CheckpointEvent(model="tiny", version=version, uri="x",
                                        manifest=manifests[version],
                                        status=status))  # type: ignore[arg-type]
    decisions.offer(CheckpointEvent(model="other", version=2, uri="x", manifest=manifests[2],
                                    status="promoted"))
    # 7 and 8 undecided (the gate may be evaluating them); keep the 2 newest whatever.
    keep = decisions.keep(store.versions(), base=0, latest=8, newest=2)
    assert keep == {0, 1, 4, 7, 8}
    # Optimizer state: the latest's (a restart), the latest promoted's and the undecided
    # ones' (a rollback continues from the promoted version).
    optimizers = decisions.optimizer_keep(store.versions(), base=0, latest=8)
    assert optimizers == {4, 7, 8}
    removed = store.prune(keep, optimizer_of=optimizers)
    assert sorted(removed) == ["v000000/optimizer", "v000001/optimizer", "v000002",
                               "v000003", "v000005", "v000006"]
    assert store.versions() == [0, 1, 4, 7, 8]
    assert store.size_bytes() < full / 2
    # What is left still verifies, optimizer state gone or not, and the latest resumes.
    for version in store.versions():
        event = CheckpointEvent(model="tiny", version=version, uri=store.uri(version),
                                manifest=manifests[version], status="candidate")
        verify(event, tmp_path / "store")
    assert load_optimizer(torch.optim.AdamW(model.parameters()), Path(store.uri(8)))
    assert not load_optimizer(torch.optim.AdamW(model.parameters()), Path(store.uri(1)))
    assert load_optimizer(torch.optim.AdamW(model.parameters()), Path(store.uri(4)))
    assert store.prune(keep, optimizer_of=optimizers) == []  # idempotent
