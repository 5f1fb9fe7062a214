"""The trainer's rollback rule over the gate's decisions (the trainer itself rolls back on a
real broker in tests/integration/test_rollback.py)."""

from __future__ import annotations

from schemas import CheckpointEvent
from services.trainer.lineage import Decisions


def _event(version: int, status: str, parent: int | None = None,
           rejection: str | None = None) -> CheckpointEvent:
    return CheckpointEvent(model="m", version=version, parent_version=parent, uri="x",
                           manifest=[], status=status, rejection=rejection)  # type: ignore[arg-type]


def _decisions(*events: CheckpointEvent) -> Decisions:
    d = Decisions("m")
    for e in events:
        d.offer(e)
    return d


def test_a_regressed_candidate_in_the_lineage_rolls_back_to_the_latest_promoted() -> None:
    d = _decisions(_event(0, "promoted"), *(_event(v, "candidate", v - 1) for v in (1, 2, 3, 4)),
                   _event(1, "promoted"), _event(2, "rejected", rejection="not_better"))
    assert d.rollback(4, base=0, after=1) is None  # not_better is no regression
    d.offer(_event(3, "rejected", rejection="regressed"))
    due = d.rollback(4, base=0, after=1)
    assert due is not None and due.target == 1
    assert due.discarded == [4, 3, 2] and due.regressed == [3]
    # After the rollback the trainer holds v1: nothing more is due, whatever v4 becomes.
    d.offer(_event(4, "rejected", rejection="regressed"))
    assert d.rollback(1, base=0, after=1) is None
    # The next candidate descends from v1; its own regression counts from there.
    d.offer(_event(5, "candidate", 1))
    d.offer(_event(5, "rejected", rejection="regressed"))
    rolled = d.rollback(5, base=0, after=1)
    assert rolled is not None and rolled.discarded == [5]


def test_after_counts_regressions_and_old_rejections_count_as_regressed() -> None:
    d = _decisions(*(_event(v, "candidate", v - 1) for v in (1, 2, 3)),
                   _event(1, "rejected"),  # written before rejection kinds
                   _event(2, "rejected", rejection="invalid"))
    assert d.rollback(3, base=0, after=3) is None
    due = d.rollback(3, base=0, after=2)
    assert due is not None and due.target == 0 and due.regressed == [2, 1]


def test_the_target_is_the_latest_promoted_even_from_another_lineage() -> None:
    d = _decisions(_event(0, "promoted"), _event(1, "candidate", 0), _event(2, "candidate", 1),
                   _event(3, "candidate", 0), _event(1, "rejected", rejection="regressed"),
                   _event(2, "promoted"), _event(3, "rejected", rejection="regressed"))
    due = d.rollback(3, base=0, after=1)
    assert due is not None and due.target == 2 and due.discarded == [3]
    assert d.latest_promoted(0) == 2
    assert d.latest is not None and d.latest.version == 3


def test_a_decision_about_no_candidate_is_never_a_rollback_target() -> None:
    # A forged "promoted v999" (no trainer wrote a v999) would otherwise be the target of the
    # next rollback, which would load whatever its uri names.
    d = _decisions(_event(1, "candidate", 0), _event(2, "candidate", 1),
                   _event(999, "promoted"), _event(2, "rejected", rejection="regressed"))
    assert d.latest_promoted(0) == 0
    due = d.rollback(2, base=0, after=1)
    assert due is not None and due.target == 0
    d.offer(_event(1, "promoted"))
    assert d.latest_promoted(0) == 1


def _judged(version: int, rates: dict[str, tuple[int, int]]) -> CheckpointEvent:
    """The gate's real decision on a candidate against a promoted v1, per set (tasks, passed
    by v1 -> passed by the candidate, the first ones of each set)."""
    from services.envs.heldout import HeldOut
    from services.gate.evaluate import SetResult
    from services.gate.rule import judge, reference

    def result(n: int, passed: int) -> SetResult:
        return SetResult({"pass_rate": passed / n}, [1] * passed + [0] * (n - passed))

    sizes = {"digits1": 20, "digits3": 200}
    ref = reference({s: result(sizes[s], old) for s, (old, _) in rates.items()}, "digits3", 1,
                    base=False, digests=dict.fromkeys(sizes, "same"))
    j = judge({s: result(sizes[s], new) for s, (_, new) in rates.items()}, ref,
              [HeldOut(name="digits1", tolerance=0.3), HeldOut(name="digits3")],
              tracked=["pass_rate"], tolerance=0.05, alpha=0.05, headline="digits3")
    return CheckpointEvent(model="m", version=version, parent_version=version - 1, uri="x",
                           manifest=[], status="rejected", rejection=j.rejection,  # type: ignore[arg-type]
                           metrics=j.metrics)


def test_a_regression_that_gains_overall_does_not_roll_back_one_that_loses_does() -> None:
    # A mastered level drifting (1-digit sums 20 -> 10 of 20) while the frontier rises
    # (3-digit sums 110 -> 130 of 200): regressed, but the lineage is ahead of v1 overall.
    drift = _judged(2, {"digits1": (20, 10), "digits3": (110, 130)})
    assert drift.rejection == "regressed" and drift.metrics["suite/wins"] == 20
    # Poisoned: worse everywhere.
    poison = _judged(3, {"digits1": (20, 10), "digits3": (110, 40)})
    assert poison.rejection == "regressed"
    d = _decisions(_event(1, "candidate", 0), _event(1, "promoted"), _event(2, "candidate", 1),
                   _event(3, "candidate", 2), drift)
    assert d.rollback(2, base=0, after=1) is None
    d.offer(poison)
    due = d.rollback(3, base=0, after=1)
    assert due is not None and due.target == 1 and due.regressed == [3]
    assert due.discarded == [3, 2]
    assert d.rollback(3, base=0, after=2) is None  # only one of the two counts
