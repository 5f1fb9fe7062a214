"""Hostile records for every topic a service consumes, drawn with hypothesis.

Each is what a broken or malicious producer could write: bytes that are not JSON, JSON cut
short, nesting deeper than any parser should follow, a required field of the wrong type (huge
strings among them), a schema version from the future, negative versions, NaN or infinite
rewards, tombstones, and tasks or trajectories of an environment no one registered. All but the
last are invalid under the topic's message type (checked here); the last are valid messages a
stage must refuse. Every one of them must end on ``dlq`` with its reason.

:func:`records` draws a fixed corpus (hypothesis, derandomized) for a test on the broker;
:func:`hostile` is the strategy for property tests.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from schemas import SCHEMA_VERSION, CheckpointEvent, ScoredTrajectory, Task, Trajectory
from schemas.messages import FilterDecision, RoutedSample
from tests import factories

TYPES: dict[str, type[BaseModel]] = {
    "tasks": Task, "raw": Trajectory, "scored": ScoredTrajectory, "filtered": FilterDecision,
    "accepted.cpt": RoutedSample, "accepted.sft": RoutedSample, "accepted.rl": RoutedSample,
    "checkpoints": CheckpointEvent,
}
"""Every consumed topic and its message type."""

CONSUMER = {"tasks": "generator", "raw": "scorer", "scored": "filter", "filtered": "router",
            "accepted.cpt": "trainer", "accepted.sft": "trainer", "accepted.rl": "trainer",
            "checkpoints": "gate"}
"""The service that dead-letters a topic's bad records."""


def _valid(topic: str) -> dict[str, Any]:
    stage = topic.split(".", 1)[1] if topic.startswith("accepted.") else "sft"
    message: BaseModel = {
        "tasks": lambda: factories.task(1), "raw": lambda: factories.trajectory(1),
        "scored": lambda: factories.scored(1), "filtered": lambda: factories.decision(1),
        "checkpoints": lambda: factories.checkpoint(3).model_copy(update={"model": "policy"}),
    }.get(topic, lambda: factories.routed(1).model_copy(update={"stage": stage}))()
    return json.loads(message.model_dump_json())


# Where each type keeps the fields a rule is about.
VERSIONS: dict[str, list[tuple[str | int, ...]]] = {
    "raw": [("policy_version",)], "scored": [("trajectory", "policy_version")],
    "filtered": [("scored", "trajectory", "policy_version"), ("latest_version",)],
    "accepted": [("samples", 0, "trajectory", "policy_version")],
    "checkpoints": [("version",), ("parent_version",)],
}
REWARDS: dict[str, list[tuple[str | int, ...]]] = {
    "scored": [("reward",), ("scores", 0, "value")],
    "filtered": [("scored", "reward")],
    "accepted": [("samples", 0, "reward"), ("weight",)],
}
ENVS: dict[str, tuple[str | int, ...]] = {"tasks": ("env",), "raw": ("task", "env")}
DEEP = "\u2063deep\u2063"


def _family(topic: str) -> str:
    return "accepted" if topic.startswith("accepted.") else topic


def _set(doc: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(doc))
    node: Any = out
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return out


def _dumps(doc: Any) -> bytes:
    text = json.dumps(doc, allow_nan=True)  # NaN and Infinity as the tokens a forger writes
    return text.encode()


def invalid(topic: str, value: bytes | None) -> bool:
    if value is None:
        return True
    try:
        TYPES[topic].model_validate_json(value)
    except (ValidationError, ValueError):
        return True
    return False


def hostile(topic: str) -> st.SearchStrategy[tuple[str, bytes | None]]:
    """(kind, record value) pairs for ``topic``."""
    valid = _valid(topic)
    family = _family(topic)
    required = list(TYPES[topic].model_json_schema().get("required", []))
    good = _dumps(valid)
    wrong = st.one_of(
        st.integers(), st.lists(st.integers(), max_size=3),
        st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
        st.text(max_size=40), st.booleans(),
    )
    huge = st.integers(100_000, 400_000).map(lambda n: {"junk": "A" * n})

    def replaced(value: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
        return st.tuples(st.sampled_from(required), value).map(
            lambda fv: _dumps(_set(valid, (fv[0],), fv[1])))

    kinds: list[st.SearchStrategy[tuple[str, bytes | None]]] = [
        st.binary(max_size=60).map(lambda b: ("not_json", b"\xff" + b)),
        st.integers(1, len(good) - 1).map(lambda cut: ("truncated", good[:cut])),
        st.tuples(st.sampled_from(required), st.integers(300, 20_000)).map(
            lambda fd: ("deep", _dumps(_set(valid, (fd[0],), DEEP)).replace(
                json.dumps(DEEP).encode(), b"[" * fd[1] + b"]" * fd[1]))),
        replaced(wrong).map(lambda v: ("wrong_type", v)),
        replaced(huge).map(lambda v: ("huge", v)),
        st.integers(1, 10**9).map(lambda n: ("future_version", _dumps(
            _set(valid, ("schema_version",), SCHEMA_VERSION + n)))),
        st.just(("tombstone", None)),
    ]
    if family in VERSIONS:
        kinds.append(st.tuples(st.sampled_from(VERSIONS[family]), st.integers(-10**9, -1)).map(
            lambda pv: ("negative_version", _dumps(_set(valid, pv[0], pv[1])))))
    if family in REWARDS:
        kinds.append(st.tuples(st.sampled_from(REWARDS[family]),
                               st.sampled_from([math.nan, math.inf, -math.inf])).map(
            lambda pr: ("nan_reward", _dumps(_set(valid, pr[0], pr[1])))))
    bad = st.one_of(kinds).filter(lambda kv: invalid(topic, kv[1]))
    if topic not in ENVS:
        return bad
    unknown = st.text("abcdefghijklmnopqrstuvwxyz-", min_size=3, max_size=20).map(
        lambda name: ("unknown_env", _dumps(_set(valid, ENVS[topic], f"hostile-{name}"))))
    return st.one_of(bad, unknown)


def records(topic: str, count: int) -> list[tuple[str, bytes | None]]:
    """``count`` hostile records for ``topic``, the same on every run."""
    found: list[tuple[str, bytes | None]] = []
    collect: Callable[[], None]

    @settings(max_examples=count, database=None, derandomize=True, deadline=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(hostile(topic))
    def collect(kv: tuple[str, bytes | None]) -> None:
        found.append(kv)

    collect()
    return found
