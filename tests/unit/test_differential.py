"""The hot path (issue 39) decides as the path before it did, over 20,000 varied records.

The old path's outcomes are in ``tests/data`` (``python -m tests.differential`` wrote them by
running commit ``OLD``'s filter and router, pydantic models and datasketch's MinHash, over the
same records): every dead letter with its kind and message, every decision (acceptance,
reasons, flags, group count, ids, the JSON it embeds) and every routed sample.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest

from services.common.text import normalize
from tests import differential

THRESHOLD = 0.9  # the near-duplicate rule's default
MARGIN = 0.15
"""How far from the threshold a declared MinHash disagreement may be: four standard errors
of a 64-permutation estimate there (sqrt(0.9 * 0.1 / 64) = 0.0375)."""


@pytest.fixture(scope="module")
def inputs() -> tuple[list[bytes | None], dict[str, Any]]:
    hostile, old = differential.golden()
    return differential.records(hostile), old


def _first_difference(old: list[Any], new: list[Any]) -> str:
    for i, (a, b) in enumerate(zip(old, new, strict=False)):
        if a != b:
            return f"first at {i}: old {a}, new {b}"
    return f"lengths {len(old)} and {len(new)}"


def test_without_the_near_duplicate_rule_every_outcome_is_the_old_paths(
        inputs: tuple[list[bytes | None], dict[str, Any]]) -> None:
    values, old = inputs
    new = differential.compact(differential.run(values, near=False), near=False)
    expected = old["exact"]
    # Not vacuous: most hostile records are dead letters, most others decided and routed.
    assert sum(d is not None for d in new["dead"]) > differential.HOSTILE // 2
    assert len(new["decisions"]) > 0.9 * len(values) and len(new["routed"]) > 10_000
    for part in ("dead", "decisions", "routed", "dead_router"):
        assert new[part] == expected[part], f"{part}: " + \
            _first_difference(expected[part], new[part])


def _shingles(text: str) -> set[str]:
    norm = normalize(text)
    return {norm[i:i + 5] for i in range(max(1, len(norm) - 4))}


def test_with_it_the_decisions_differ_only_by_the_declared_minhash_change_near_the_threshold(
        inputs: tuple[list[bytes | None], dict[str, Any]]) -> None:
    values, old = inputs
    full = differential.run(values, near=True)
    new, expected = differential.compact(full, near=True), old["near"]
    assert new["dead"] == expected["dead"], _first_difference(expected["dead"], new["dead"])
    assert new["dead_router"] == expected["dead_router"]
    assert len(new["decisions"]) == len(expected["decisions"])  # one per record, same order

    # Each decoded record's group and completion, by its id (as the rows cut it).
    docs = {}
    for value in values:
        try:
            doc = json.loads(value) if value is not None else None
            docs[differential._id(doc["event_id"])] = doc["trajectory"]
        except (ValueError, TypeError, KeyError, RecursionError):
            continue  # a hostile record
    disagreeing: set[str] = set()  # groups with a member whose duplicate reason differs
    near: list[float] = []
    moved = Counter()
    for row, was, now in zip(full["decisions"], expected["decisions"], new["decisions"],
                             strict=True):
        if was[1] == now[1]:
            continue
        changed = set(was[1]) ^ set(now[1])
        assert changed <= {"near_duplicate", "duplicate"} and "near_duplicate" in changed, \
            (was, now)
        traj = docs[row[2]]
        disagreeing.add(traj["group_id"])
        moved[("old" if "near_duplicate" in was[1] else "new") + " only"] += 1
        mine = _shingles(traj["completion"])
        earlier = [t["completion"] for t in docs.values()
                   if t["task"]["task_id"] == traj["task"]["task_id"]
                   and t["created_at"] < traj["created_at"]]
        near.append(max((len(mine & _shingles(e)) / len(mine | _shingles(e))
                         for e in earlier), default=0.0))
    for row, was, now in zip(full["decisions"], expected["decisions"], new["decisions"],
                             strict=True):
        if was != now:  # the rest: the group count and flags of a group that moved
            assert docs[row[2]]["group_id"] in disagreeing, (was, now)
    old_routed = Counter(tuple(r) for r in expected["routed"] if r[1] not in disagreeing)
    new_routed = Counter(tuple(r) for r in new["routed"] if r[1] not in disagreeing)
    assert new_routed == old_routed
    print(f"near-duplicate disagreements: {len(near)} of {len(values)} records "
          f"({dict(moved)}), in {len(disagreeing)} groups; true Jaccard to the closest earlier "
          f"completion of the task: min {min(near, default=1):.3f}, "
          f"max {max(near, default=1):.3f}")
    assert all(j >= THRESHOLD - MARGIN for j in near), sorted(near)[:5]
    assert len(near) < 0.02 * len(values)
