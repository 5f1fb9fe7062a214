"""Event time for stages that wait for more input (groups assembling in the filter and the
router): when a timeout is due, from the records' own times, with the wall clock as a
fallback when a partition goes quiet."""

from __future__ import annotations

import time

from services.common.state import PartitionState


class EventClock:
    """When a timeout is due, in event time, for stages that wait for more input (groups).

    Each partition keeps its *stream time*, the latest event time (a record's ``created_at``)
    it has seen, in its state: a group waiting since event time ``t`` times out when the
    stream has moved ``timeout`` past ``t``, so a consumer catching up on a backlog, or a
    replay of old history, does not time out groups whose members are merely further down
    the log. When a partition receives nothing for ``timeout`` of wall time (counted from
    its last record or from when this instance took it, whichever is later), the wall clock
    takes over, so the last groups before a pause are not held forever.
    """

    KEY = "clock"

    SWEEP_SECONDS = 60.0

    def __init__(self) -> None:
        self._last_input: dict[int, float] = {}
        self._next_sweep: dict[tuple[int, str], float] = {}

    def observe(self, state: PartitionState, event_times: list[float]) -> float:
        """Advance the partition's stream time past ``event_times``; returns it."""
        stream = float(state.get(self.KEY, 0.0))
        latest = max(event_times, default=stream)
        if latest > stream:
            state.put(self.KEY, latest)
            stream = latest
        if event_times:
            self._last_input[state.partition] = time.time()
        return stream

    def stream_time(self, state: PartitionState) -> float:
        return float(state.get(self.KEY, 0.0))

    def due(self, state: PartitionState, since: float, timeout: float, now: float) -> bool:
        """Whether something waiting since event time ``since`` has waited ``timeout``."""
        if self.stream_time(state) - since >= timeout:
            return True
        quiet_since = max(self._last_input.get(state.partition, 0.0), state.assigned_at)
        return now - quiet_since >= timeout and now - since >= timeout

    def forget(self, state: PartitionState, prefix: str, keep_seconds: float, now: float
               ) -> None:
        """Delete the entries under ``prefix`` (values: event times, or objects with the event
        time under ``at``) older than ``keep_seconds`` of stream time; at most once a minute
        per partition and prefix."""
        key = (state.partition, prefix)
        if now < self._next_sweep.get(key, 0.0):
            return
        self._next_sweep[key] = now + self.SWEEP_SECONDS
        horizon = self.stream_time(state) - keep_seconds
        for entry, value in state.scan(prefix):  # a day of decided groups: never a list
            if (value["at"] if isinstance(value, dict) else value) < horizon:
                state.delete(entry)
