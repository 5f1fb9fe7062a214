"""The gate's decision rules, with per-task outcomes given per folder (the real evaluation
runs in tests/integration/test_gate.py)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from schemas import CheckpointEvent, FileDigest, ProducerInfo
from services.common.errors import DependencyError
from services.common.signing import Signer, Unsigned, Verifier
from services.common.state import StateStore
from services.envs.heldout import HeldOut
from services.gate.evaluate import SetResult
from services.gate.rule import sign_test
from services.gate.stage import GateStage
from services.models.manifest import build_manifest

N = 100


def _outcomes(passed: int, offset: int = 0) -> str:
    """``passed`` of N tasks passed: tasks offset .. offset + passed - 1 (cyclic)."""
    bits = ["0"] * N
    for i in range(passed):
        bits[(offset + i) % N] = "1"
    return "".join(bits)


def _result(bits: str) -> SetResult:
    outcomes = [int(b) for b in bits]
    return SetResult({"pass_rate": sum(outcomes) / len(outcomes)}, outcomes)


def _gate(tmp_path: Path, table: dict[str, dict[str, str]], sets: list[str] | None = None,
          **kwargs: object) -> GateStage:
    """``table``: folder name -> set name -> outcome bits."""
    store = StateStore("gate.state")
    store.adopt(0)
    (tmp_path / "base").mkdir(exist_ok=True)
    names = sets or ["held_out"]
    return GateStage(state=store, output_topic="checkpoints", root=tmp_path,
                     evaluate=lambda folder: {s: _result(b) for s, b in table[folder.name].items()},
                     base={"tiny": (0, tmp_path / "base")}, signer=SIGNER, verifier=VERIFIER,
                     sets=[HeldOut(name=n) for n in names], **kwargs)  # type: ignore[arg-type]


_KEY = Ed25519PrivateKey.generate()
SIGNER, VERIFIER = Signer(_KEY), Verifier([_KEY.public_key()])


def _one(**rates: str) -> dict[str, dict[str, str]]:
    return {k: {"held_out": v} for k, v in rates.items()}


def _candidate(tmp_path: Path, version: int, status: str = "candidate") -> CheckpointEvent:
    folder = tmp_path / f"v{version}"
    folder.mkdir(exist_ok=True)
    (folder / "model.safetensors").write_bytes(b"weights %d" % version)
    return SIGNER.sign(CheckpointEvent(  # a promotion: as the bootstrap signs it
        model="tiny", version=version, uri=str(folder), manifest=build_manifest(folder),
        status=status))  # type: ignore[arg-type]


def _run(gate: GateStage, *events: CheckpointEvent) -> list[CheckpointEvent]:
    """Each event in a batch of its own (a gate keeping up with the trainer)."""
    return [d for e in events for d in _batch(gate, e)]


def _batch(gate: GateStage, *events: CheckpointEvent) -> list[CheckpointEvent]:
    """The events in one batch (what piled up while the gate evaluated)."""
    gate.state.begin()
    out = gate.process_partition(gate.state.partition(0), list(events))
    return [o.value for o in out]  # type: ignore[misc]


def test_the_sign_test_matches_the_binomial_tail() -> None:
    assert sign_test(0, 0) == 1.0
    assert sign_test(5, 0) == pytest.approx(1 / 32)
    assert sign_test(0, 5) == 1.0
    assert sign_test(3, 3) == pytest.approx(42 / 64)  # P(X >= 3), n = 6
    assert sign_test(20, 10) == pytest.approx(0.0494, abs=1e-4)


@given(st.integers(0, 60), st.integers(0, 60))
def test_more_wins_is_never_weaker_evidence(wins: int, losses: int) -> None:
    assert 0.0 < sign_test(wins, losses) <= 1.0
    assert sign_test(wins + 1, losses) <= sign_test(wins, losses)
    assert sign_test(wins, losses + 1) >= sign_test(wins, losses)


def test_promotion_needs_an_improvement_beyond_noise_then_no_regression(
        tmp_path: Path) -> None:
    gate = _gate(tmp_path, _one(
        base=_outcomes(30),
        v1=_outcomes(33),           # +3 of 100: noise
        v2=_outcomes(50),           # +20 wins, 0 losses
        v3=_outcomes(49, offset=2), # within tolerance, but not better than noise
        v4=_outcomes(60),           # better than v2
        v5=_outcomes(40)),          # 20 below the best: regressed
        tolerance=0.05)
    decided = _run(gate, *(_candidate(tmp_path, v) for v in (1, 2, 3, 4, 5)))
    assert [(d.version, d.status, d.rejection) for d in decided] == [
        (1, "rejected", "not_better"), (2, "promoted", None), (3, "rejected", "not_better"),
        (4, "promoted", None), (5, "rejected", "regressed")]
    assert "not better than noise vs v0 (base)" in (decided[0].reason or "")
    assert decided[1].metrics["held_out/wins"] == 20 and decided[1].metrics["held_out/losses"] == 0
    assert decided[1].metrics["held_out/p"] < 1e-5
    assert "regressed" in (decided[4].reason or "")
    assert gate.state.partition(0).get("promoted/tiny")["version"] == 4


def test_a_suite_promotes_on_the_levels_that_improve_and_rejects_any_level_that_falls(
        tmp_path: Path) -> None:
    # The top level stays at zero (no model here solves it yet): it must not block the loop.
    sets = ["level1", "level2", "level3"]
    table = {
        "base": {"level1": _outcomes(70), "level2": _outcomes(20), "level3": _outcomes(0)},
        "v1": {"level1": _outcomes(90), "level2": _outcomes(24), "level3": _outcomes(0)},
        "v2": {"level1": _outcomes(92), "level2": _outcomes(60), "level3": _outcomes(3)},
        "v3": {"level1": _outcomes(60), "level2": _outcomes(80), "level3": _outcomes(10)},
    }
    gate = _gate(tmp_path, table, sets, headline="level3", tolerance=0.05)
    decided = _run(gate, *(_candidate(tmp_path, v) for v in (1, 2, 3)))
    assert [(d.status, d.rejection) for d in decided] == [
        ("promoted", None), ("promoted", None), ("rejected", "regressed")]
    assert "improved vs v0 (base) on level1" in (decided[0].reason or "")
    # v3 is much better on two levels, but level1 fell 0.32 below its best.
    assert "level1/pass_rate 0.600 < best 0.920" in (decided[2].reason or "")
    # Every set's metrics are on the decision; the headline set's also under plain names.
    for d in decided:
        assert {f"{s}/pass_rate" for s in sets} <= set(d.metrics)
        assert d.metrics["pass_rate"] == d.metrics["level3/pass_rate"]
        assert {"level1/p", "level2/p", "level3/p", "suite/p"} <= set(d.metrics)


def test_pooled_evidence_promotes_when_no_single_set_is_conclusive(tmp_path: Path) -> None:
    # +5 of 100 on each of four sets: p = 1/32 each, above 0.05 / 5; pooled +20: p < 1e-6.
    sets = ["a", "b", "c", "d"]
    table = {"base": dict.fromkeys(sets, _outcomes(50)), "v1": dict.fromkeys(sets, _outcomes(55))}
    [decision] = _run(_gate(tmp_path, table, sets), _candidate(tmp_path, 1))
    assert decision.status == "promoted" and "on suite" in (decision.reason or "")


def test_a_candidate_failing_verification_is_rejected_unevaluated(tmp_path: Path) -> None:
    gate = _gate(tmp_path, _one(base=_outcomes(10)))
    bad = _candidate(tmp_path, 1)
    bad = bad.model_copy(update={"manifest": [FileDigest(path="model.safetensors",
                                                         sha256="0" * 64, size_bytes=9)]})
    [decision] = _run(gate, bad)
    assert decision.status == "rejected" and "refused" in (decision.reason or "")
    assert decision.rejection == "invalid"


def test_the_gate_skips_its_own_decisions_and_follows_outside_promotions(
        tmp_path: Path) -> None:
    table = _one(base=_outcomes(10), v5=_outcomes(60), v6=_outcomes(58), v7=_outcomes(75),
                 v8=_outcomes(72))
    gate = _gate(tmp_path, table, tolerance=0.05)
    own = _candidate(tmp_path, 1, "promoted").model_copy(
        update={"producer": ProducerInfo(service="gate", instance="g0")})
    outside = _candidate(tmp_path, 5, "promoted")  # e.g. the bootstrap's version
    assert _run(gate, own, outside) == []
    assert gate.state.partition(0).get("promoted/tiny")["version"] == 5
    # Like the base model, an outside promotion must be beaten first; then v8 is within
    # tolerance of v7 but not better than noise.
    decided = _run(gate, *(_candidate(tmp_path, v) for v in (6, 7, 8)))
    assert [d.status for d in decided] == ["rejected", "promoted", "rejected"]
    assert [d.rejection for d in decided] == ["not_better", None, "not_better"]
    # A weaker version promoted from outside is the reference, but the floor stays the best
    # ever (0.75): v10 beats v9 task by task yet is 0.15 below it. It used to be promoted.
    table.update(v9={"held_out": _outcomes(40)}, v10={"held_out": _outcomes(60)})
    assert _run(gate, _candidate(tmp_path, 9, "promoted")) == []
    ref = gate.state.partition(0).get("promoted/tiny")
    assert ref["version"] == 9 and ref["best"]["held_out/pass_rate"] == 0.75
    [v10] = _run(gate, _candidate(tmp_path, 10))
    assert (v10.status, v10.rejection) == ("rejected", "regressed")


def test_a_decision_without_the_gates_signature_is_refused_before_it_moves_anything(
        tmp_path: Path) -> None:
    """The runtime dead-letters what ``admit`` refuses: an unsigned promotion, one signed by
    another key, one whose signed statement was altered (another folder, other files, a
    rejection turned into a promotion). Candidates carry no signature and pass."""
    gate = _gate(tmp_path, _one(base=_outcomes(10), v5=_outcomes(60)))
    gate.admit(_candidate(tmp_path, 4))
    signed = _candidate(tmp_path, 5, "promoted")
    gate.admit(signed)
    other = Signer(Ed25519PrivateKey.generate())
    unsigned = signed.model_copy(update={"signature": None})
    forged = {
        "unsigned": unsigned,
        "another key": other.sign(unsigned),
        "another folder": signed.model_copy(update={"uri": str(tmp_path / "base")}),
        "other files": signed.model_copy(update={"manifest": build_manifest(tmp_path / "v4")}),
        "another status": SIGNER.sign(signed.model_copy(update={"status": "rejected"}))
        .model_copy(update={"status": "promoted"}),
    }
    for what, event in forged.items():
        with pytest.raises(Unsigned):
            gate.admit(event)
        assert not VERIFIER.trusted(event), what
    # What is signed does not depend on how the event was serialized on its way.
    assert VERIFIER.trusted(CheckpointEvent.from_bytes(signed.to_bytes()))
    assert VERIFIER.trusted(CheckpointEvent.model_validate_json(
        signed.model_dump_json(exclude_none=True)))


def test_small_tolerated_drops_cannot_ratchet_quality_down(tmp_path: Path) -> None:
    table = _one(base=_outcomes(10), v1=_outcomes(50), v2=_outcomes(46), v3=_outcomes(44))
    decided = _run(_gate(tmp_path, table, tolerance=0.05),
                   *(_candidate(tmp_path, v) for v in (1, 2, 3)))
    # v2 and v3 are within tolerance of the previous candidate, not of the best (v1, 0.50).
    assert [(d.status, d.rejection) for d in decided] == [
        ("promoted", None), ("rejected", "not_better"), ("rejected", "regressed")]


def test_a_state_from_before_suites_is_evaluated_again_before_it_is_a_reference(
        tmp_path: Path) -> None:
    """A state without per-task outcomes used to let a candidate through on any increase of
    the headline: now the reference is evaluated (from its folder in the root, as the older
    gate kept no event) and the paired test decides. v3 wins 5 tasks of 100 (p = 1/32)."""
    evaluated: list[str] = []
    table = _one(v2=_outcomes(40), v3=_outcomes(45), v4=_outcomes(30))
    gate = _gate(tmp_path, table, tolerance=0.05)
    inner = gate.evaluate
    gate.evaluate = lambda folder: evaluated.append(folder.name) or inner(folder)  # type: ignore[func-returns-value]
    gate.state.begin()
    gate.state.partition(0).put("promoted/tiny", {  # written by the single-set gate
        "version": 2, "metrics": {"pass_rate": 0.40}, "best": {"pass_rate": 0.42},
        "base": False, "uri": str(_candidate(tmp_path, 2).uri)})
    decided = _run(gate, _candidate(tmp_path, 3), _candidate(tmp_path, 4))
    assert [(d.status, d.rejection) for d in decided] == [
        ("promoted", None), ("rejected", "regressed")]
    assert evaluated == ["v3", "v2", "v4"] and decided[0].metrics["held_out/wins"] == 5
    # Without a folder to evaluate, no decision is made: the gate stops and says why.
    gate.state.partition(0).put("promoted/tiny", {
        "version": 4, "metrics": {"pass_rate": 0.40}, "best": {"pass_rate": 0.42},
        "base": False})
    table["v5"] = {"held_out": _outcomes(90)}
    with pytest.raises(DependencyError, match="publish it as promoted again"):
        _run(gate, _candidate(tmp_path, 5))


def test_a_set_that_changed_is_a_new_set_evaluated_for_the_reference_first(
        tmp_path: Path) -> None:
    """The same name, other tasks (a file edited, a count changed, repeats dropped): pairing
    the old outcomes with the new would be noise, and the old best no floor. The reference
    (here the base) is evaluated on the new content once; the paired test then decides."""
    evaluated: list[str] = []
    table = _one(base=_outcomes(50), v1=_outcomes(52), v2=_outcomes(30), v3=_outcomes(20))
    gate = _gate(tmp_path, table, tolerance=0.05)
    inner = gate.evaluate
    gate.evaluate = lambda folder: evaluated.append(folder.name) or inner(folder)  # type: ignore[func-returns-value]
    assert _run(gate, _candidate(tmp_path, 1))[0].rejection == "not_better"
    gate.digests = {"held_out": "another content"}  # a restart with the set changed
    table["base"] = {"held_out": _outcomes(20)}  # the base on the new tasks
    decided = _run(gate, _candidate(tmp_path, 2), _candidate(tmp_path, 3))
    # v2, 0.30, was below the old content's best (0.50) but beats the base on the new one.
    assert [(d.status, d.rejection) for d in decided] == [("promoted", None),
                                                          ("rejected", "regressed")]
    assert evaluated == ["base", "v1", "v2", "base", "v3"]
    ref = gate.state.partition(0).get("promoted/tiny")
    assert ref["version"] == 2 and ref["sets"] == {"held_out": "another content"}


def test_unknown_models_old_versions_and_broken_candidates_are_rejected(
        tmp_path: Path) -> None:
    def evaluate(folder: Path) -> dict[str, SetResult]:
        if folder.name == "v3":
            raise RuntimeError("weights do not load")
        return {"held_out": _result({"base": _outcomes(10), "v2": _outcomes(50)}[folder.name])}

    store = StateStore("gate.state")
    store.adopt(0)
    (tmp_path / "base").mkdir()
    gate = GateStage(state=store, output_topic="checkpoints", root=tmp_path, evaluate=evaluate,
                     base={"tiny": (0, tmp_path / "base")}, signer=SIGNER, verifier=VERIFIER)
    other = _candidate(tmp_path, 1).model_copy(update={"model": "other"})
    decided = _run(gate, other, _candidate(tmp_path, 2), _candidate(tmp_path, 2),
                   _candidate(tmp_path, 3))
    assert [d.status for d in decided] == ["rejected", "promoted", "rejected", "rejected"]
    assert [d.rejection for d in decided] == ["invalid", None, "invalid", "invalid"]
    assert "no base model" in (decided[0].reason or "")
    assert "not newer" in (decided[2].reason or "")
    assert "evaluation failed" in (decided[3].reason or "")


def _streak(kind: str, value: str) -> float | None:
    """The gate's ``flywheel_gate_regression_streak`` of one source; None once removed."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("flywheel_gate_regression_streak",
                                     {"kind": kind, "value": value})


def test_repeated_regressions_from_one_source_raise_its_streak(tmp_path: Path) -> None:
    def streak(value: str) -> float | None:
        return _streak("router_policy", value)

    table = _one(base=_outcomes(10), v1=_outcomes(50), v2=_outcomes(20), v3=_outcomes(21),
                 v4=_outcomes(70))
    gate = _gate(tmp_path, table, tolerance=0.05)
    mix = {"bad": {"router_policy": {"p-bad": 3, "p-ok": 5}}, "ok": {"router_policy": {"p-ok": 8}}}
    sources = {1: "ok", 2: "bad", 3: "bad", 4: "ok"}
    decided = _run(gate, *(_candidate(tmp_path, v).model_copy(
        update={"provenance": mix[sources[v]]}) for v in (1, 2, 3)))
    assert [d.rejection for d in decided] == [None, "regressed", "regressed"]
    assert streak("p-bad") == 2 and streak("p-ok") == 2
    # The provenance goes onto the decision, and a promotion holding a source resets it.
    assert decided[1].provenance == mix["bad"]
    [promoted] = _run(gate, _candidate(tmp_path, 4).model_copy(update={"provenance": mix["ok"]}))
    assert promoted.status == "promoted"
    assert streak("p-ok") == 0 and streak("p-bad") == 2


def test_a_regression_that_wins_overall_leaves_the_streak_as_it_was(tmp_path: Path) -> None:
    """Drift of a small set while another rises (what a healthy run does) is no sign of bad
    data: the streak counts only regressions that lose ground over the whole suite, as the
    trainer's rollback does."""
    def streak() -> float | None:
        return _streak("env", "drift")

    table = {"base": {"easy": _outcomes(90), "hard": _outcomes(10)},
             "v1": {"easy": _outcomes(95), "hard": _outcomes(30)},
             "v2": {"easy": _outcomes(60), "hard": _outcomes(20)},   # loses on both
             "v3": {"easy": _outcomes(80), "hard": _outcomes(60)},   # easy -15, hard +30
             "v4": {"easy": _outcomes(60), "hard": _outcomes(20)}}   # loses on both
    gate = _gate(tmp_path, table, sets=["easy", "hard"], tolerance=0.05)
    source = {"provenance": {"env": {"drift": 4}}}
    decided = _run(gate, *(_candidate(tmp_path, v).model_copy(update=source)
                           for v in (1, 2)))
    assert [d.rejection for d in decided] == [None, "regressed"]
    assert streak() == 1
    [won] = _run(gate, _candidate(tmp_path, 3).model_copy(update=source))
    assert won.rejection == "regressed" and streak() == 1  # neither raised nor reset
    [lost] = _run(gate, _candidate(tmp_path, 4).model_copy(update=source))
    assert lost.rejection == "regressed" and streak() == 2


def test_a_source_gone_from_the_data_leaves_the_streak_gauge(tmp_path: Path) -> None:
    """A replaced policy's last streak is no reference for its successor: once three decided
    candidates in a row hold none of its data, its series is removed."""
    def streak(value: str) -> float | None:
        return _streak("router_policy", value)

    table = _one(base=_outcomes(10), v1=_outcomes(50), v2=_outcomes(20), v3=_outcomes(21),
                 v4=_outcomes(22))
    gate = _gate(tmp_path, table, tolerance=0.05)
    old, new = {"router_policy": {"p-old": 8}}, {"router_policy": {"p-new": 8}}
    [promoted] = _run(gate, _candidate(tmp_path, 1).model_copy(update={"provenance": old}))
    assert promoted.status == "promoted" and streak("p-old") == 0
    for v, expected in ((2, 0.0), (3, 0.0), (4, None)):
        [d] = _run(gate, _candidate(tmp_path, v).model_copy(update={"provenance": new}))
        assert d.rejection == "regressed"
        assert (streak("p-old"), streak("p-new")) == (expected, v - 1)


def test_a_store_that_does_not_answer_stops_the_gate_instead_of_rejecting(
        tmp_path: Path) -> None:
    """A candidate the gate cannot fetch (the store's URL refuses connections) is not the
    candidate's fault: DependencyError (the runtime stops the service, and the candidate is
    decided after the restart), not a rejection; the same for an outside promotion."""
    from services.cluster.local_broker import free_port
    from services.common.errors import DependencyError
    from services.models.fetch import CheckpointSource, CheckpointSourceSettings

    source = CheckpointSource(tmp_path, CheckpointSourceSettings(
        url=f"http://127.0.0.1:{free_port()}", cache_dir=tmp_path / "cache", attempts=1))
    gate = _gate(tmp_path, _one(base="1" * 10, v000001="1" * 10), source=source)
    for status in ("candidate", "promoted"):
        event = _candidate(tmp_path, 1, status).model_copy(
            update={"uri": str(tmp_path / "v000001")})
        with pytest.raises(DependencyError, match="could not fetch"):
            _run(gate, event)


def test_an_evaluation_whose_dependency_is_down_stops_the_gate_instead_of_rejecting(
        tmp_path: Path) -> None:
    """A DependencyError raised while evaluating (a sandbox pool or reward model down) is not
    the candidate's fault either: it propagates instead of becoming an "evaluation failed"
    rejection."""
    from services.common.errors import DependencyError

    gate = _gate(tmp_path, _one(base="1" * 10, v1="1" * 10))
    base = gate.evaluate

    def evaluate(folder: Path) -> dict[str, SetResult]:
        if folder.name == "v1":
            raise DependencyError("the sandbox pool is down")
        return base(folder)

    gate.evaluate = evaluate
    with pytest.raises(DependencyError, match="sandbox pool"):
        _run(gate, _candidate(tmp_path, 1))


def test_the_base_is_evaluated_as_soon_as_its_partition_is_restored(tmp_path: Path) -> None:
    """While the trainer prepares its first candidate, not after it arrives; a state that
    holds the reference already evaluates nothing; a failed early evaluation stops the gate
    at the first event, as a failed evaluation then would."""
    from services.common.errors import DependencyError

    gate = _gate(tmp_path, _one(base=_outcomes(30), v1=_outcomes(50)))
    table = gate.evaluate
    calls: list[tuple[str, str]] = []
    base_done = threading.Event()

    def evaluate(folder: Path) -> dict[str, SetResult]:
        calls.append((folder.name, threading.current_thread().name))
        if folder.name == "base":
            base_done.set()
        return table(folder)

    gate.evaluate = evaluate
    gate.restored(gate.state.partition(0))
    assert base_done.wait(10), "the base was not evaluated at restore"
    decided = _run(gate, _candidate(tmp_path, 1))
    assert [(d.version, d.status) for d in decided] == [(1, "promoted")]
    assert calls == [("base", "gate-base-evaluation"), ("v1", threading.current_thread().name)]
    gate.restored(gate.state.partition(0))  # the reference is kept: nothing to evaluate
    assert len(calls) == 2

    (tmp_path / "broken").mkdir()
    broken = _gate(tmp_path / "broken", _one(base=_outcomes(30), v1=_outcomes(50)))

    def fails(folder: Path) -> dict[str, SetResult]:
        raise OSError("no such model")

    broken.evaluate = fails
    broken.restored(broken.state.partition(0))
    with pytest.raises(DependencyError, match=r"cannot evaluate the base model.*no such model"):
        _run(broken, _candidate(tmp_path / "broken", 1))


def test_a_gate_behind_the_trainer_evaluates_the_newest_candidate_of_a_batch(
        tmp_path: Path) -> None:
    """Candidates that piled up while the gate evaluated: the newest is evaluated, the older
    ones are rejected unevaluated as superseded (no rollback counts them); one at a time,
    each is evaluated."""
    table = _one(base=_outcomes(30), v1=_outcomes(20), v2=_outcomes(31), v3=_outcomes(50))
    gate = _gate(tmp_path, table)
    evaluated: list[str] = []
    inner = gate.evaluate
    gate.evaluate = lambda folder: evaluated.append(folder.name) or inner(folder)
    decided = _batch(gate, *(_candidate(tmp_path, v) for v in (1, 2, 3)))
    assert [(d.version, d.status, d.rejection) for d in decided] == [
        (1, "rejected", "superseded"), (2, "rejected", "superseded"), (3, "promoted", None)]
    assert "superseded by v3" in (decided[0].reason or "")
    assert evaluated == ["base", "v3"]

    one_by_one = _gate(tmp_path, table)
    decided = _run(one_by_one, *(_candidate(tmp_path, v) for v in (1, 2, 3)))
    assert [(d.version, d.rejection) for d in decided] == [
        (1, "regressed"), (2, "not_better"), (3, None)]


def test_a_gate_failure_is_retried_and_never_judged_against_the_candidate(
        tmp_path: Path) -> None:
    """One failure of the gate's own (memory, a file system) used to reject the candidate as
    `invalid`, which counts toward a rollback: now it is tried again; a candidate that keeps
    failing while the reference evaluates is `invalid`; when the reference fails too, the gate
    is at fault: no decision, the service stops (DependencyError) and decides after the
    restart. Reading a candidate failing other than by refusal is no decision either."""
    from services.gate import metrics as m

    table = _one(base=_outcomes(10), v1=_outcomes(60), v2=_outcomes(70), v3=_outcomes(80))
    failing: dict[str, int] = {"v1": 1, "v2": 10}  # folder -> failures left
    gate_broken = threading.Event()

    def evaluate(folder: Path) -> dict[str, SetResult]:
        if gate_broken.is_set() or failing.get(folder.name, 0) > 0:
            failing[folder.name] = failing.get(folder.name, 0) - 1
            raise MemoryError("out of memory")
        return {"held_out": _result(table[folder.name]["held_out"])}

    gate = _gate(tmp_path, table)
    gate.evaluate = evaluate

    def failures(of: str) -> float:
        return m.GATE_EVALUATION_FAILURES.labels(of)._value.get()

    before = {of: failures(of) for of in ("candidate", "reference", "resolve")}
    decided = _run(gate, _candidate(tmp_path, 1), _candidate(tmp_path, 2))
    assert [(d.version, d.status, d.rejection) for d in decided] == [
        (1, "promoted", None), (2, "rejected", "invalid")]
    assert "while the reference v1 evaluates" in (decided[1].reason or "")
    gate_broken.set()
    with pytest.raises(DependencyError, match="the gate cannot evaluate"):
        _run(gate, _candidate(tmp_path, 3))
    assert gate.state.partition(0).get("promoted/tiny")["version"] == 1
    gate_broken.clear()

    def unreadable(event: CheckpointEvent, in_use: object = ()) -> Path:
        raise PermissionError("permission denied")

    gate.source.resolve = unreadable  # type: ignore[method-assign]
    with pytest.raises(DependencyError, match="permission denied"):
        _run(gate, _candidate(tmp_path, 3))
    after = {of: failures(of) - before[of] for of in before}
    # v1 once; v2 twice and then the blame; v3 twice and then the blame, whose reference failed
    assert after == {"candidate": 1 + 2 + 2, "reference": 1, "resolve": 1}
