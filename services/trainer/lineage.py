"""The trainer's view of the gate's decisions: which versions were promoted, which regressed,
each candidate's parent, and when to roll back.

A rollback is due when the lineage the trainer holds (its weights' version, then parents, back
to the first promoted ancestor) contains at least ``after`` candidates that regressed and also
lost ground overall: rejected as ``regressed`` with no more tasks won than lost against the
promoted version in the gate's paired comparison, summed over the suite's sets (the pooled
test's count), or rejected as ``invalid``. Its target is the latest promoted version. The
same rule runs live (before each round) and at start, so a trainer restarted during a rollback
resumes from the promoted version, not the rejected one.

A ``not_better`` or ``superseded`` rejection does not count: such a candidate did not regress
(or was not evaluated), and its successors are tested again. Nor does a regression with more
tasks won than lost overall: a lineage that trades a set for gains elsewhere (a mastered level
drifting while the frontier rises) is a better start than the promoted version, and the gate
promotes none of it until the set is back within its tolerance. On the embedded benchmark,
such drift on the 20 one-digit sums, rolled back every time, kept a seed from ever reaching
0.8, which the same seed reached without rollback (see ``RollbackSettings.after``); a
poisoned lineage loses overall and is rolled back.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from schemas import CheckpointEvent
from services.envs.heldout import overall


@dataclass(frozen=True)
class Rollback:
    target: int
    """The promoted version to continue from."""
    discarded: list[int]
    """The lineage left behind, newest first."""
    regressed: list[int]


class Decisions:
    """Listener on ``checkpoints`` for one model: candidates' parents, the gate's decisions."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.promoted: dict[int, CheckpointEvent] = {}
        self.rejected: dict[int, str] = {}
        """Version -> rejection kind (``regressed`` for decisions written before kinds)."""
        self.net: dict[int, int] = {}
        """Version -> tasks won minus tasks lost against the promoted version, over the
        suite, for decisions that carry the paired comparison."""
        self.parents: dict[int, int | None] = {}
        self.latest: CheckpointEvent | None = None
        """The newest candidate."""
        self._lock = threading.Lock()

    def offer(self, event: CheckpointEvent) -> None:
        if event.model != self.model:
            return
        with self._lock:
            if event.status == "candidate":
                self.parents[event.version] = event.parent_version
                if self.latest is None or event.version > self.latest.version:
                    self.latest = event
            elif event.version not in self.parents:
                # A decision about no candidate of this model (each candidate precedes its
                # decision on the model's partition): forged or foreign, never a rollback
                # target. The base version needs no event.
                return
            elif event.status == "promoted":
                self.promoted[event.version] = event
            else:
                self.rejected[event.version] = event.rejection or "regressed"
                net = overall(event.metrics)
                if net is not None:
                    self.net[event.version] = net

    def keep(self, versions: list[int], base: int, latest: int, newest: int) -> set[int]:
        """Of the store's ``versions``: the base, the latest, the promoted, the undecided
        (the gate may be loading one; a decision not read yet counts as none) and the
        ``newest`` most recent."""
        with self._lock:
            decided = set(self.promoted) | set(self.rejected)
            return ({base, latest} | set(self.promoted)
                    | {v for v in versions if v not in decided}
                    | set(sorted(versions)[-newest:]))

    def optimizer_keep(self, versions: list[int], base: int, latest: int) -> set[int]:
        """Whose optimizer state the store keeps: the latest version's (a restart), the
        latest promoted one's and the undecided ones' (one may be promoted next: a rollback
        continues from it)."""
        with self._lock:
            decided = set(self.promoted) | set(self.rejected)
            return ({latest, max(self.promoted, default=base)}
                    | {v for v in versions if v not in decided and v != base})

    def latest_promoted(self, base: int) -> int:
        with self._lock:
            return max(self.promoted, default=base)

    def _counts(self, version: int) -> bool:
        """Whether a rejection counts towards a rollback (the rule above)."""
        kind = self.rejected.get(version)
        return kind == "invalid" or (kind == "regressed" and self.net.get(version, 0) <= 0)

    def rollback(self, head: int, base: int, after: int) -> Rollback | None:
        """The rollback due for a trainer holding version ``head``, if any."""
        with self._lock:
            discarded: list[int] = []
            regressed: list[int] = []
            v: int | None = head
            while v is not None and v not in self.promoted and v != base \
                    and v not in discarded:
                discarded.append(v)
                if self._counts(v):
                    regressed.append(v)
                v = self.parents.get(v)
            if len(regressed) < after:
                return None
            target = max(self.promoted, default=base)
            return Rollback(target, discarded, regressed)
