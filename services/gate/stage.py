"""The gate's stage: every candidate evaluated, compared with the promoted version, decided.

It reads ``checkpoints`` and writes its decisions there too, exactly once (the runtime's
transactions), keeping in its state (changelog ``gate.state``) the promoted version of each
model with its held-out metrics. A candidate is promoted only if it passes verification
(manifest, safetensors, inside the checkpoint root) and no tracked metric falls more than
``tolerance`` below the promoted version's; while the promoted version is still the base
model, the candidate must beat it (by more than ``min_improvement``). Events the gate wrote
itself are skipped; a ``promoted`` event from elsewhere (the bootstrap publishing version 0)
becomes the reference, evaluated once.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from schemas import CheckpointEvent
from services.common.errors import DependencyError
from services.common.stage import Output
from services.common.state import PartitionState, StateStore
from services.generator.checkpoint import CheckpointRefused, verify
from services.trainer import metrics as m

log = logging.getLogger(__name__)

NAMESPACE = uuid.UUID("c4a2e7d1-6b3f-4f0e-8a9d-1e2b3c4d5f60")
Evaluate = Callable[[Path], dict[str, float]]


class GateStage:
    input_type = CheckpointEvent
    tick_seconds = 3600.0

    def __init__(self, *, state: StateStore, output_topic: str, root: Path,
                 evaluate: Evaluate, base: dict[str, tuple[int, Path]],
                 tracked: Sequence[str] = ("pass_rate",), tolerance: float = 0.02,
                 min_improvement: float = 0.0, service: str = "gate") -> None:
        self.state = state
        self.output_topic = output_topic
        self.root = root
        self.evaluate = evaluate
        self.base = base
        """Per model: the base version and its folder, the reference before any promotion."""
        self.tracked = list(tracked)
        self.tolerance, self.min_improvement = tolerance, min_improvement
        self.service = service

    def process_partition(self, state: PartitionState, batch: Sequence[CheckpointEvent]
                          ) -> list[Output]:
        outputs: list[Output] = []
        for event in batch:
            if event.producer is not None and event.producer.service == self.service:
                continue  # our own decision, read back
            if event.status == "promoted":
                self._external_promotion(state, event)
            elif event.status == "candidate":
                outputs.append(self._decide(state, event))
        return outputs

    def tick(self, state: PartitionState, now: float) -> list[Output]:
        return []

    def _reference(self, state: PartitionState, model: str) -> dict[str, Any] | None:
        key = f"promoted/{model}"
        current = state.get(key)
        if current is None and model in self.base:
            version, folder = self.base[model]
            try:
                scores = self.evaluate(folder)
            except Exception as exc:  # not the candidate's fault: stop, visibly
                raise DependencyError(f"cannot evaluate the base model {folder}: {exc}") from exc
            current = {"version": version, "metrics": scores, "best": scores, "base": True}
            state.put(key, current)
            log.info("base %s v%d: %s", model, version, scores)
        return current

    def _external_promotion(self, state: PartitionState, event: CheckpointEvent) -> None:
        current = self._reference(state, event.model)
        if current is not None and event.version <= int(current["version"]):
            return
        try:
            folder = verify(event, self.root)
        except CheckpointRefused as exc:
            log.error("%s v%d was promoted elsewhere but cannot be evaluated here: %s",
                      event.model, event.version, exc)
            return
        try:
            scores = self.evaluate(folder)
        except Exception as exc:
            raise DependencyError(f"cannot evaluate promoted {event.model} v{event.version}: "
                                  f"{exc}") from exc
        state.put(f"promoted/{event.model}",
                  {"version": event.version, "metrics": scores, "best": scores, "base": True})
        m.GATE_PROMOTED_VERSION.set(event.version)

    def _decide(self, state: PartitionState, cand: CheckpointEvent) -> Output:
        current = self._reference(state, cand.model)
        if current is None:
            return self._out(cand, "rejected", cand.metrics,
                             f"no base model configured for {cand.model!r}: nothing to "
                             "compare with")
        if cand.version <= current["version"]:
            return self._out(cand, "rejected", cand.metrics, f"not newer than the promoted "
                             f"v{current['version']}")
        try:
            folder = verify(cand, self.root)
        except CheckpointRefused as exc:
            return self._out(cand, "rejected", cand.metrics, f"refused: {exc}")
        try:
            scores = self.evaluate(folder)
        except Exception as exc:  # the candidate does not load or run: it is not promotable
            return self._out(cand, "rejected", cand.metrics, f"evaluation failed: {exc}")
        for k, v in scores.items():
            m.GATE_SCORE.labels(k).set(v)
        # Against the best each metric has been among promoted versions, so a series of
        # small, tolerated drops cannot ratchet quality down.
        ref: dict[str, float] = current.get("best") or current["metrics"]
        if current.get("base"):
            primary = self.tracked[0]
            got, base = scores.get(primary, 0.0), ref.get(primary, 0.0)
            if got <= base + self.min_improvement:
                return self._out(cand, "rejected", scores, f"{primary} {got:.3f} does not "
                                 f"beat the base's {base:.3f}")
        worse = [f"{k} {scores.get(k, 0.0):.3f} < {ref[k]:.3f} - {self.tolerance:g}"
                 for k in self.tracked if k in ref
                 and scores.get(k, 0.0) < ref[k] - self.tolerance]
        if worse:
            return self._out(cand, "rejected", scores, "regressed: " + "; ".join(worse))
        return self._promote(state, cand, scores,
                             f"vs v{current['version']}: " + ", ".join(
                                 f"{k} {scores.get(k, 0.0):.3f} (was {ref.get(k, 0.0):.3f})"
                                 for k in self.tracked))

    def _promote(self, state: PartitionState, cand: CheckpointEvent, scores: dict[str, float],
                 reason: str) -> Output:
        current = state.get(f"promoted/{cand.model}") or {}
        previous = {} if current.get("base") else (current.get("best") or {})
        best = {k: max(v, previous.get(k, v)) for k, v in scores.items()}
        state.put(f"promoted/{cand.model}", {"version": cand.version, "metrics": scores,
                                             "best": best, "base": False})
        m.GATE_PROMOTED_VERSION.set(cand.version)
        return self._out(cand, "promoted", scores, reason)

    def _out(self, cand: CheckpointEvent, status: str, scores: dict[str, float], reason: str
             ) -> Output:
        m.GATE_DECISIONS.labels(status).inc()
        log.info("%s v%d %s: %s", cand.model, cand.version, status, reason)
        fields = cand.model_dump(exclude={"event_id", "status", "metrics", "reason",
                                          "producer", "created_at"})
        decision = CheckpointEvent(
            **fields, event_id=uuid.uuid5(NAMESPACE, f"{cand.event_id}:{status}"),
            status=status, metrics={**cand.metrics, **scores}, reason=reason)
        return Output(self.output_topic, decision)
