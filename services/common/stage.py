"""What a stage is, and the pure part of handling a batch: decode, process, isolate failures.

A stage is plain Python over typed records: it never imports ``confluent_kafka``, never sees an
offset and never commits. :class:`~services.common.runtime.StreamRuntime` feeds it batches and
owns everything Kafka. Unit tests call ``stage.process`` directly.

Stages must be pure with respect to the batch: calling ``process`` twice on the same records
yields the same outputs. The runtime relies on that when it re-runs a failed batch record by
record to find the one that raised, and when an aborted transaction replays a batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, runtime_checkable

from pydantic import ValidationError

from schemas import Message, fast
from services.common.errors import DependencyError, Interrupted

if TYPE_CHECKING:
    from services.common.state import PartitionState, StateStore

log = logging.getLogger(__name__)

In = TypeVar("In", bound=Message)
In_contra = TypeVar("In_contra", bound=Message, contravariant=True)


class Output:
    """One record to produce: the full topic name, the message, and optionally its key.

    Without a key, the message's own ``partition_key()`` is used (a hot-path output,
    :class:`schemas.fast.Output`, has none: give the key). ``forward=True`` declares
    that ``value`` is one of the batch's input records, unchanged: the runtime then writes the
    exact bytes it read (no re-encoding; fields unknown to this version survive byte for byte).

    A plain slotted class rather than a frozen dataclass: one is built per output record, and
    a frozen dataclass's ``__init__`` costs several times more.
    """

    __slots__ = ("forward", "key", "topic", "value")

    def __init__(
        self, topic: str, value: Message | fast.Output, key: str | None = None,
        forward: bool = False,
    ) -> None:
        self.topic = topic
        self.value = value
        self.key = key
        self.forward = forward

    def __repr__(self) -> str:
        return f"Output({self.topic!r}, {type(self.value).__name__}, key={self.key!r})"


class Stage(Protocol[In_contra]):
    """A transformation from a batch of input messages to output records."""

    @property
    def input_type(self) -> type[Message] | type[fast.Received]:
        """The message type of every input topic; records that fail it are dead-lettered. A
        pydantic model, or a hot-path type of :mod:`schemas.fast` (decoded with the same
        constraints in a fraction of the time, each record keeping its bytes)."""
        ...

    def process(self, batch: Sequence[In_contra]) -> list[Output]:
        """Outputs for the whole batch. Raise to reject; see :func:`apply_stage`."""
        ...

    # Optional: ``admit(record)``, raising ValueError for a record the stage cannot take
    # (dead-lettered with that message before ``process`` sees the batch).
    # Optional, for either kind of stage: ``commit_at_once = True`` (see COMMIT_AT_ONCE),
    # ``interrupt()`` (see INTERRUPT).


COMMIT_AT_ONCE = "commit_at_once"
"""A stage attribute: when true, the runtime commits each batch's transaction as soon as its
outputs are produced, instead of when the next batch has been processed (its pipeline,
:meth:`services.common.runtime.StreamRuntime._transact`). For a stage whose processing
takes minutes (the gate's evaluation): its outputs are visible when made, not one
processing later, and no transaction is open while it processes, so a processing longer
than the transaction timeout cannot have the broker abort it."""

INTERRUPT = "interrupt"
"""A stage method, called (from any thread) when the service is asked to stop: the stage cuts
its work in flight short and raises :class:`~services.common.errors.Interrupted` from it; the
runtime then stops without committing that batch, which is processed again after the restart.
For a stage whose processing outlasts a stop's grace (the gate's evaluation): without it the
stop waits for the processing to end, or the process is killed."""


@runtime_checkable
class StatefulStage(Protocol[In_contra]):
    """A stage with keyed state per input partition (see :mod:`services.common.state`).

    The runtime hands it one input partition's records at a time, with that partition's
    state; every change it makes is committed with the batch's outputs, or undone. Given the
    same state and the same records it must produce the same outputs and the same changes.
    Requires exactly-once delivery and a single input topic.
    """

    @property
    def input_type(self) -> type[Message] | type[fast.Received]: ...

    @property
    def state(self) -> StateStore:
        """The store the runtime restores, journals and writes to the changelog."""
        ...

    tick_seconds: float
    """How often :meth:`tick` runs for every owned partition, even with no input."""

    def process_partition(self, state: PartitionState, batch: Sequence[In_contra]
                          ) -> list[Output]: ...

    def tick(self, state: PartitionState, now: float) -> list[Output]:
        """Outputs due by time alone (timeouts); ``now`` is ``time.time()``."""
        ...

    # Optional: ``restored(state)``, called for each partition after its state was restored
    # (on assignment, after an abort), for gauges that show what the state holds.


class DecodeFailure(Exception):
    """A record value that is not a valid message; ``kind`` is 'decode' or 'schema'."""

    def __init__(self, kind: str, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.cause = cause


def decode(model: type[Any], value: bytes | None) -> Any:
    """Parse one record value, telling undecodable bytes ('decode') from a bad shape ('schema').

    ``model`` is a pydantic message type, or a hot-path type of :mod:`schemas.fast`."""
    if value is None:
        raise DecodeFailure("decode", "record has no value (tombstone)")
    parse = fast.decoder(model) if fast.is_fast(model) else model.from_bytes
    try:
        return parse(value)
    except fast.Unrepresentable as exc:
        raise DecodeFailure("schema", str(exc), exc) from exc
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        bad_bytes = bool(errors) and errors[0]["type"] in {"json_invalid", "json_type"}
        kind = "decode" if bad_bytes else "schema"
        raise DecodeFailure(kind, _summary(exc), exc) from exc


def _summary(exc: ValidationError, limit: int = 5) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:limit]:
        where = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{where}: {err['msg']}")
    more = exc.error_count() - limit
    return f"{exc.title}: " + "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


@dataclass(slots=True)
class StageResult(Generic[In]):
    outputs: list[Output]
    failed: list[tuple[int, BaseException]]
    """Index into the batch, and what the stage raised on that record alone."""


def apply_stage(stage: Stage[In], batch: Sequence[In]) -> StageResult[In]:
    """Run ``stage`` on ``batch``; if it raises, run it record by record to isolate the culprits.

    A record that raises when processed alone is reported in ``failed`` (it goes to the DLQ);
    the others' outputs are kept. Batch-level stages (group assembly, batched model calls) see
    the whole batch in the common case and single records only after a failure.
    :class:`~services.common.errors.DependencyError` is not about records: it propagates.
    """
    return apply_process(stage.process, batch)


def apply_process(
    process: Callable[[Sequence[In]], list[Output]], batch: Sequence[In],
    state: StateStore | None = None,
) -> StageResult[In]:
    """:func:`apply_stage` for any process function; with ``state``, the changes a raising
    call made are undone before the next call, so each record is processed exactly once
    against the state."""
    if not batch:
        return StageResult([], [])
    mark = state.mark() if state is not None else 0
    try:
        return StageResult(process(batch), [])
    except (DependencyError, Interrupted):
        raise
    except Exception as exc:
        if state is not None:
            state.undo(mark)
        log.warning("stage failed on a batch of %d (%s: %s); retrying record by record",
                    len(batch), type(exc).__name__, exc)
    outputs: list[Output] = []
    failed: list[tuple[int, BaseException]] = []
    for i, record in enumerate(batch):
        mark = state.mark() if state is not None else 0
        try:
            outputs.extend(process([record]))
        except (DependencyError, Interrupted):
            raise
        except Exception as exc:
            if state is not None:
                state.undo(mark)
            failed.append((i, exc))
    return StageResult(outputs, failed)
