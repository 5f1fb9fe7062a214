"""The pure half of the runtime: decoding, failure isolation, the relay stage."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from schemas import Task
from services.common.errors import DependencyError
from services.common.stage import DecodeFailure, Output, apply_stage, decode
from services.relay.stage import RelayStage
from tests import factories


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (b"\xff\xfe not utf-8", "decode"),
        (b"{not json", "decode"),
        (None, "decode"),
        (b'"just a string"', "schema"),
        (b'{"task_id": "t"}', "schema"),
        (b'{"task_id": "t", "env": "arithmetic", "prompt": "1+1", "difficulty": -1}', "schema"),
    ],
)
def test_decode_tells_bad_bytes_from_bad_shape(value: bytes | None, kind: str) -> None:
    with pytest.raises(DecodeFailure) as info:
        decode(Task, value)
    assert info.value.kind == kind
    assert str(info.value)


def test_decode_names_the_failing_fields() -> None:
    with pytest.raises(DecodeFailure, match="env: Field required"):
        decode(Task, b'{"task_id": "t", "prompt": "p"}')


class Fussy:
    """Raises on any batch holding a task whose prompt says 'boom'; counts calls."""

    input_type = Task

    def __init__(self) -> None:
        self.calls: list[int] = []

    def process(self, batch: Sequence[Task]) -> list[Output]:
        self.calls.append(len(batch))
        if any("boom" in t.prompt for t in batch):
            raise ValueError("boom in prompt")
        return [Output("out", t) for t in batch]


def test_apply_stage_runs_the_whole_batch_when_nothing_fails() -> None:
    stage = Fussy()
    batch = [factories.task(i) for i in range(5)]
    result = apply_stage(stage, batch)
    assert [o.value for o in result.outputs] == batch
    assert result.failed == []
    assert stage.calls == [5]


def test_apply_stage_isolates_the_records_that_raise() -> None:
    stage = Fussy()
    batch = [factories.task(i) for i in range(6)]
    batch[1].prompt = "boom"
    batch[4].prompt = "boom again"
    result = apply_stage(stage, batch)
    assert [o.value.task_id for o in result.outputs] == ["arith-0", "arith-2", "arith-3", "arith-5"]
    assert [i for i, _ in result.failed] == [1, 4]
    assert all(isinstance(e, ValueError) for _, e in result.failed)
    assert stage.calls == [6, 1, 1, 1, 1, 1, 1]


def test_apply_stage_on_empty_batch_does_not_call_the_stage() -> None:
    stage = Fussy()
    assert apply_stage(stage, []).outputs == []
    assert stage.calls == []


def test_relay_forwards_each_record_unchanged() -> None:
    batch = [factories.task(i) for i in range(3)]
    outputs = RelayStage(Task, "copy").process(batch)
    assert [(o.topic, o.value) for o in outputs] == [("copy", t) for t in batch]
    assert all(o.key is None and o.forward for o in outputs)


def test_forwarded_outputs_resolve_to_the_exact_input_bytes() -> None:
    from services.common.batches import Sources

    raw = [factories.task(i).to_bytes() + b" " for i in range(4)]  # trailing space: not re-encoded
    records = [Task.from_bytes(r) for r in raw]
    sources = Sources(records, list(raw))
    assert [sources.raw(r) for r in records] == raw  # in order: the cheap path
    sources = Sources(records, list(raw))
    assert [sources.raw(r) for r in reversed(records)] == raw[::-1]  # any order
    with pytest.raises(ValueError, match="not an input"):
        sources.raw(factories.task(9))


class Down:
    """A stage whose dependency is down: every call fails, for reasons not about the record."""

    input_type = Task

    def process(self, batch: Sequence[Task]) -> list[Output]:
        raise DependencyError("reward model server unreachable")


def test_dependency_errors_propagate_instead_of_dead_lettering_the_batch() -> None:
    with pytest.raises(DependencyError, match="unreachable"):
        apply_stage(Down(), [factories.task(i) for i in range(3)])


class _At:
    """A consumed record's coordinates (what the runtime reads off a Kafka message)."""

    def __init__(self, topic: str, partition: int, offset: int) -> None:
        self._where = (topic, partition, offset)

    def topic(self) -> str:
        return self._where[0]

    def partition(self) -> int:
        return self._where[1]

    def offset(self) -> int:
        return self._where[2]


def test_rewind_targets_the_lowest_uncommitted_offset_of_every_partition() -> None:
    """The open batch (offsets 0-4 of p0) and the one processed after it (5-9 of p0, 3 of p1)
    are rewound together: p0 must go back to 0, not to 5."""
    from services.common.batches import first_offsets

    open_batch = [_At("t", 0, o) for o in range(5)]
    next_batch = [_At("t", 0, o) for o in range(5, 10)] + [_At("t", 1, 3)]
    for records in (open_batch + next_batch, next_batch + open_batch):
        assert first_offsets(records) == {("t", 0): 0, ("t", 1): 3}  # type: ignore[arg-type]
