"""Groups assembling in partition state: what the filter and the router share.

Both decide a group of samples at once (the filter its rules and duplicate memory, the router
an RL group), and both wait in partition state until the members they expect have arrived or
a timeout passes in event time (:class:`~services.common.event_time.EventClock`). The state
is laid out the same way in both:

- ``group/<group id>``: a group assembling, ``{first_at, size, indexes}`` (event time of its
  first member, members expected, sample indexes arrived);
- ``member/<group id>/<sample index>``: an arrived member, the record as it was read;
- ``decided/<group id>``: a group decided, with the stream time it was decided at (a bare
  number, or an object with it under ``at``), forgotten after a while
  (:meth:`Groups.forget`), so that a straggler does not open the group again.

What a stage decides, and what it keeps beside the time in ``decided/``, stays its own.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from schemas import fast
from services.common.event_time import EventClock
from services.common.state import PartitionState, as_record

GROUP = "group/"
MEMBER = "member/"
DECIDED = "decided/"

R = TypeVar("R", bound=fast.Received)


class Groups(Generic[R]):
    """The groups of one stage, whose members are records of ``record_type``."""

    def __init__(self, record_type: type[R], clock: EventClock) -> None:
        self.record_type, self.clock = record_type, clock

    @staticmethod
    def new(first_at: float, size: int) -> dict[str, Any]:
        """A group whose first member has event time ``first_at``, expecting ``size``."""
        return {"first_at": first_at, "size": size, "indexes": []}

    @staticmethod
    def assembling(state: PartitionState, group_id: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = state.get(f"{GROUP}{group_id}")
        return found

    @staticmethod
    def decided(state: PartitionState, group_id: str) -> Any:
        """What was kept of the group when it was decided; None while it never was (or was
        forgotten)."""
        return state.get(f"{DECIDED}{group_id}")

    @staticmethod
    def mark_decided(state: PartitionState, group_id: str, value: Any) -> None:
        state.put(f"{DECIDED}{group_id}", value)

    @staticmethod
    def add(state: PartitionState, group_id: str, group: dict[str, Any], index: int,
            record: R) -> dict[str, Any] | None:
        """Member ``index`` arrives: the group with it, or None when it had arrived already
        (a repeat, not stored). A group that is still waiting is stored; a complete one is
        left for the caller to :meth:`take`."""
        if index in group["indexes"]:
            return None
        group = {**group, "indexes": [*group["indexes"], index]}
        state.put(f"{MEMBER}{group_id}/{index}", record)
        if len(group["indexes"]) < group["size"]:
            state.put(f"{GROUP}{group_id}", group)
        return group

    @staticmethod
    def complete(group: dict[str, Any]) -> bool:
        return len(group["indexes"]) >= group["size"]

    def take(self, state: PartitionState, group_id: str, group: dict[str, Any],
             decided: Any) -> list[R]:
        """The group's members in sample order, removed with the group; ``decided`` (holding
        the stream time) is kept under ``decided/`` instead."""
        members = []
        for index in sorted(group["indexes"]):
            key = f"{MEMBER}{group_id}/{index}"
            members.append(as_record(self.record_type, state.get(key)))
            state.delete(key)
        state.delete(f"{GROUP}{group_id}")
        self.mark_decided(state, group_id, decided)
        return members

    def due(self, state: PartitionState, timeout_seconds: float, now: float
            ) -> list[tuple[str, dict[str, Any]]]:
        """The groups that have waited ``timeout_seconds`` (event time, or the wall clock when
        the partition is quiet), with their ids."""
        out = []
        for gkey in state.keys(GROUP):
            group = state.get(gkey)
            if self.clock.due(state, group["first_at"], timeout_seconds, now):
                out.append((gkey[len(GROUP):], group))
        return out

    @staticmethod
    def pending(state: PartitionState) -> int:
        """Groups assembling in the partition."""
        return len(state.keys(GROUP))

    def forget(self, state: PartitionState, keep_seconds: float, now: float) -> None:
        """Forget the groups decided more than ``keep_seconds`` of stream time ago."""
        self.clock.forget(state, DECIDED, keep_seconds, now)
