"""The gate's count of regressions per source of a candidate's data (its provenance), and the
streak gauge an alert compares across sources."""

from __future__ import annotations

from schemas import CheckpointEvent
from services.envs.heldout import overall
from services.gate import metrics as m

STALE_AFTER = 3
"""Decided candidates in a row without a source's data after which its streak series is
removed: a source no longer in the data (a replaced policy, scorer, environment) is no
reference for the alert that compares a source with the others of its kind."""


class SourceStreaks:
    def __init__(self) -> None:
        self._streaks: dict[tuple[str, str], int] = {}
        self._absent: dict[tuple[str, str], int] = {}

    def count(self, cand: CheckpointEvent, rejection: str | None,
              scores: dict[str, float]) -> None:
        """Per source of the candidate's data (its provenance): regressions counted, and the
        streak of consecutive regressed candidates that held data from it and lost ground
        over the whole suite (what the trainer's rollback counts: a candidate that trades a
        small set's drift for gains elsewhere is no sign of bad data); reset when a
        candidate holding it is promoted; removed once STALE_AFTER such candidates in a row
        held none of its data. Kept in memory: a restart starts streaks at 0."""
        if rejection not in (None, "regressed"):
            return
        net = overall(scores)
        losing = rejection == "regressed" and (net is None or net <= 0)
        present = {(kind, value) for kind, values in cand.provenance.items() for value in values}
        for key in present:
            self._absent.pop(key, None)
            if rejection == "regressed":
                m.GATE_REGRESSIONS.labels(*key).inc()
            if losing:
                self._streaks[key] = self._streaks.get(key, 0) + 1
            elif rejection is None:
                self._streaks[key] = 0
            m.GATE_REGRESSION_STREAK.labels(*key).set(self._streaks.get(key, 0))
        for key in [k for k in self._streaks if k not in present]:
            self._absent[key] = self._absent.get(key, 0) + 1
            if self._absent[key] >= STALE_AFTER:
                del self._streaks[key], self._absent[key]
                m.GATE_REGRESSION_STREAK.remove(*key)
