"""The gate's decision rules, with evaluation scores given per folder (the real evaluation
runs in tests/integration/test_gate.py)."""

from __future__ import annotations

from pathlib import Path

from schemas import CheckpointEvent, FileDigest
from schemas import Producer as ProducerInfo
from services.common.state import StateStore
from services.gate.stage import GateStage
from services.generator.checkpoint import build_manifest


def _gate(tmp_path: Path, scores: dict[str, float]) -> GateStage:
    store = StateStore("gate.state")
    store.adopt(0)
    (tmp_path / "base").mkdir(exist_ok=True)
    return GateStage(state=store, output_topic="checkpoints", root=tmp_path,
                     evaluate=lambda folder: {"pass_rate": scores[folder.name]},
                     base={"tiny": (0, tmp_path / "base")}, tolerance=0.05)


def _candidate(tmp_path: Path, version: int, status: str = "candidate") -> CheckpointEvent:
    folder = tmp_path / f"v{version}"
    folder.mkdir(exist_ok=True)
    (folder / "model.safetensors").write_bytes(b"weights %d" % version)
    return CheckpointEvent(model="tiny", version=version, uri=str(folder),
                           manifest=build_manifest(folder), status=status)  # type: ignore[arg-type]


def _run(gate: GateStage, *events: CheckpointEvent) -> list[CheckpointEvent]:
    gate.state.begin()
    out = gate.process_partition(gate.state.partition(0), list(events))
    return [o.value for o in out]  # type: ignore[misc]


def test_promotion_needs_to_beat_the_base_then_not_to_regress(tmp_path: Path) -> None:
    scores = {"base": 0.30, "v1": 0.30, "v2": 0.50, "v3": 0.47, "v4": 0.40}
    gate = _gate(tmp_path, scores)
    decided = _run(gate, *(_candidate(tmp_path, v) for v in (1, 2, 3, 4)))
    assert [(d.version, d.status) for d in decided] == [
        (1, "rejected"), (2, "promoted"), (3, "promoted"), (4, "rejected")]
    assert "does not beat the base" in (decided[0].reason or "")
    assert "regressed" in (decided[3].reason or "")
    assert gate.state.partition(0).get("promoted/tiny")["version"] == 3


def test_a_candidate_failing_verification_is_rejected_unevaluated(tmp_path: Path) -> None:
    gate = _gate(tmp_path, {"base": 0.1})
    bad = _candidate(tmp_path, 1)
    bad = bad.model_copy(update={"manifest": [FileDigest(path="model.safetensors",
                                                         sha256="0" * 64, size_bytes=9)]})
    [decision] = _run(gate, bad)
    assert decision.status == "rejected" and "refused" in (decision.reason or "")


def test_the_gate_skips_its_own_decisions_and_follows_outside_promotions(
        tmp_path: Path) -> None:
    gate = _gate(tmp_path, {"base": 0.1, "v5": 0.6, "v6": 0.58, "v7": 0.65, "v8": 0.62})
    own = _candidate(tmp_path, 1, "promoted").model_copy(
        update={"producer": ProducerInfo(service="gate", instance="g0")})
    outside = _candidate(tmp_path, 5, "promoted")  # e.g. the bootstrap's version
    assert _run(gate, own, outside) == []
    assert gate.state.partition(0).get("promoted/tiny")["version"] == 5
    # Like the base model, an outside promotion must be beaten first; then the tolerance holds.
    decided = _run(gate, *(_candidate(tmp_path, v) for v in (6, 7, 8)))
    assert [d.status for d in decided] == ["rejected", "promoted", "promoted"]


def test_small_tolerated_drops_cannot_ratchet_quality_down(tmp_path: Path) -> None:
    scores = {"base": 0.1, "v1": 0.50, "v2": 0.46, "v3": 0.44}
    decided = _run(_gate(tmp_path, scores), *(_candidate(tmp_path, v) for v in (1, 2, 3)))
    # v3 is within tolerance of v2 (0.46 - 0.05) but not of the best promoted, v1 (0.50).
    assert [d.status for d in decided] == ["promoted", "promoted", "rejected"]


def test_unknown_models_old_versions_and_broken_candidates_are_rejected(
        tmp_path: Path) -> None:
    def evaluate(folder: Path) -> dict[str, float]:
        if folder.name == "v3":
            raise RuntimeError("weights do not load")
        return {"pass_rate": {"base": 0.1, "v2": 0.5}[folder.name]}

    store = StateStore("gate.state")
    store.adopt(0)
    (tmp_path / "base").mkdir()
    gate = GateStage(state=store, output_topic="checkpoints", root=tmp_path, evaluate=evaluate,
                     base={"tiny": (0, tmp_path / "base")})
    other = _candidate(tmp_path, 1).model_copy(update={"model": "other"})
    decided = _run(gate, other, _candidate(tmp_path, 2), _candidate(tmp_path, 2),
                   _candidate(tmp_path, 3))
    assert [d.status for d in decided] == ["rejected", "promoted", "rejected", "rejected"]
    assert "no base model" in (decided[0].reason or "")
    assert "not newer" in (decided[2].reason or "")
    assert "evaluation failed" in (decided[3].reason or "")
