"""The gate's stage: every candidate evaluated on the held-out suite, compared with the
promoted version, decided.

It reads ``checkpoints`` and writes its decisions there too, exactly once (the runtime's
transactions), keeping in its state (changelog ``gate.state``) the promoted version of each
model with its metrics per set and per-task outcomes. A candidate is promoted only if it
passes verification (manifest, safetensors, inside the checkpoint root) and the rule of
``services.gate.rule`` holds: no set regresses beyond its tolerance, and one improves beyond
noise. Rejections carry their kind (``regressed``, ``not_better``, ``invalid``,
``superseded``), which the trainer's rollback reads. Events the gate wrote itself are
skipped; a ``promoted`` event from elsewhere (the bootstrap publishing version 0) becomes the
reference, evaluated once.

A gate slower than the trainer (minutes per evaluation of a real model on a CPU) finds several
candidates waiting when it polls: it evaluates the newest of each model in the batch and
rejects the older ones unevaluated as ``superseded`` (the trainer builds on them, as on
``not_better``), so promotions follow the trainer's newest weights instead of an ever longer
queue. ``runtime.batch_max_records: 1`` evaluates every candidate instead.

A base model not yet evaluated (its partition's state holds no reference) is evaluated as soon
as the partition is restored, on a thread of its own, while the trainer prepares its first
candidate: on a real model on a CPU that evaluation takes minutes, and the first decision
would otherwise wait for it. It becomes the reference in the transaction of the first event
that needs it.

Repeated regressions from the same data are counted by where the candidates' samples came
from (``provenance``: environment, router and filter policy hashes, scorer versions), so an
alert can name the source.

A failure is the candidate's only when the gate shows it can evaluate: a candidate whose
evaluation raises is tried again, then the reference is evaluated; if that fails too, the
gate stops without a decision (nothing counted against the lineage), else the candidate is
``invalid``. A stop interrupts the evaluation in flight (``interrupt``).

Over 300 lines: the decision and the upkeep of its reference (the base's early evaluation,
outside promotions, re-evaluation on a changed set, telling the gate's failures from the
candidate's) share the state entry and the evaluation, and read best as one flow.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from tenacity import RetryCallState, Retrying, retry_if_not_exception_type, stop_after_attempt

from schemas import CheckpointEvent
from services.common.errors import DependencyError, Interrupted
from services.common.metrics import CHECKPOINT_EVENTS_REFUSED
from services.common.signing import KeyMissing, Signer, Unsigned, Verifier
from services.common.stage import Output
from services.common.state import PartitionState, StateStore
from services.envs.heldout import HeldOut
from services.gate import metrics as m
from services.gate import rule
from services.gate.evaluate import SetResult
from services.gate.streaks import SourceStreaks
from services.models.fetch import CheckpointSource
from services.models.manifest import CheckpointRefused

log = logging.getLogger(__name__)

NAMESPACE = uuid.UUID("c4a2e7d1-6b3f-4f0e-8a9d-1e2b3c4d5f60")
Evaluate = Callable[[Path], dict[str, SetResult]]
"""A checkpoint folder to every set's result, by set name."""


class GateStage:
    input_type = CheckpointEvent
    tick_seconds = 3600.0
    commit_at_once = True
    """A decision is committed when it is made: an evaluation takes minutes, and the runtime's
    pipeline would otherwise hold each decision back, invisible to generators and trainer,
    until the next evaluation ended (and past the transaction timeout, have it aborted)."""

    def __init__(self, *, state: StateStore, output_topic: str, root: Path,
                 evaluate: Evaluate, base: dict[str, tuple[int, Path]],
                 signer: Signer, verifier: Verifier,
                 sets: Sequence[HeldOut] = (HeldOut(),), headline: str | None = None,
                 tracked: Sequence[str] = ("pass_rate",), tolerance: float = 0.02,
                 alpha: float = 0.05, service: str = "gate",
                 source: CheckpointSource | None = None,
                 digests: dict[str, str] | None = None,
                 interrupted: threading.Event | None = None, attempts: int = 2) -> None:
        self.state = state
        self.output_topic = output_topic
        self.source = source or CheckpointSource(root)
        """Candidates in place inside ``root``, or fetched from the store's URL."""
        self.evaluate = evaluate
        self.signer, self.verifier = signer, verifier
        """Its decisions are signed; the promotions it reads must be (by a trusted key)."""
        if signer.key_id not in verifier.key_ids:
            raise KeyMissing(f"the gate's signing key ({signer.key_id}) is not among the "
                             "trusted public keys: its own decisions would be dropped")
        self.base = base
        """Per model: the base version and its folder, the reference before any promotion."""
        self.sets = list(sets)
        self.headline = headline or self.sets[0].name
        self.attempts = attempts
        """Evaluations of a candidate before the gate asks whether the fault is its own."""
        self.interrupted = interrupted or threading.Event()
        """Set by :meth:`interrupt`; ``evaluate`` (built with it) stops and raises Interrupted."""
        self.digests = digests or {s.name: s.digest(s.tasks()) for s in self.sets}
        """Per set: the digest of its tasks, what a reference's outcomes pair on."""
        self.tracked = list(tracked)
        self.tolerance, self.alpha = tolerance, alpha
        self.service = service
        self.streaks = SourceStreaks()
        self._early: dict[str, Future[dict[str, SetResult]]] = {}
        """Per model: the base's evaluation, started when its partition was restored."""

    def admit(self, event: CheckpointEvent) -> None:
        """A decision the gate's key did not sign (written by another principal) is
        dead-lettered with the reason: it moves neither the reference nor the floor."""
        try:
            self.verifier.check(event)
        except Unsigned:
            CHECKPOINT_EVENTS_REFUSED.labels("unsigned").inc()
            raise

    def process_partition(self, state: PartitionState, batch: Sequence[CheckpointEvent]
                          ) -> list[Output]:
        outputs: list[Output] = []
        events = [e for e in batch  # not our own decisions, read back
                  if e.producer is None or e.producer.service != self.service]
        newest: dict[str, int] = {}
        for e in events:
            if e.status == "candidate":
                newest[e.model] = max(newest.get(e.model, e.version), e.version)
        for event in events:
            if event.status == "promoted":
                self._external_promotion(state, event)
            elif event.status == "candidate" and event.version < newest[event.model]:
                outputs.append(self._out(
                    event, "rejected", event.metrics, f"superseded by v{newest[event.model]}, "
                    "a newer candidate that came in the same batch: the gate evaluates the "
                    "newest when it falls behind the trainer", "superseded"))
            elif event.status == "candidate":
                outputs.append(self._decide(state, event))
        return outputs

    def tick(self, state: PartitionState, now: float) -> list[Output]:
        return []

    def interrupt(self) -> None:
        """The service is stopping: the evaluation in flight stops at its next token, and
        nothing of its batch is committed (:data:`services.common.stage.INTERRUPT`)."""
        self.interrupted.set()

    def restored(self, state: PartitionState) -> None:
        """After a (re)start: the gauges show the promoted versions the state holds, not 0
        until the next decision."""
        for key in state.keys("promoted/"):
            self._show(state.get(key))
        for model, (_, folder) in self.base.items():
            if state.get(f"promoted/{model}") is None and model not in self._early:
                self._early[model] = self._evaluate_early(folder)

    def _evaluate_early(self, folder: Path) -> Future[dict[str, SetResult]]:
        """``folder``'s evaluation on a daemon thread (a stopping gate does not wait for it)."""
        future: Future[dict[str, SetResult]] = Future()

        def run() -> None:
            try:
                future.set_result(self._results(folder))
            except BaseException as exc:  # raised where the result is used
                future.set_exception(exc)

        threading.Thread(target=run, name="gate-base-evaluation", daemon=True).start()
        log.info("evaluating the base model %s meanwhile", folder)
        return future

    @staticmethod
    def _show(ref: dict[str, Any]) -> None:
        m.GATE_PROMOTED_VERSION.set(ref["version"])
        for key, value in ref["metrics"].items():
            if "/" in key:  # ``<set>/<metric>``; the plain names repeat the headline set's
                name, metric = key.split("/", 1)
                m.GATE_PROMOTED_SCORE.labels(name, metric).set(value)

    def _results(self, folder: Path) -> dict[str, SetResult]:
        results = self.evaluate(folder)
        missing = [s.name for s in self.sets if s.name not in results]
        if missing:
            raise ValueError(f"the evaluation has no result for sets {missing}")
        return results

    def _reference(self, state: PartitionState, model: str) -> dict[str, Any] | None:
        key = f"promoted/{model}"
        current = state.get(key)
        if current is None and model in self.base:
            version, folder = self.base[model]
            early = self._early.pop(model, None)
            try:
                results = early.result() if early is not None else self._results(folder)
            except Interrupted:
                raise
            except Exception as exc:  # not the candidate's fault: stop, visibly
                raise DependencyError(f"cannot evaluate the base model {folder}: {exc}") from exc
            current = rule.reference(results, self.headline, version, base=True,
                                     digests=self.digests, uri=str(folder))
            state.put(key, current)
            self._show(current)
            log.info("base %s v%d: %s", model, version, current["metrics"])
        return current

    def _external_promotion(self, state: PartitionState, event: CheckpointEvent) -> None:
        current = self._reference(state, event.model)
        if current is not None and (event.version < int(current["version"]) or (
                event.version == int(current["version"]) and "event" in current)):
            return  # known; the same version again restores an older gate's state
        # A promotion this gate cannot check is the event's fault (a forged or broken
        # checkpoint), not a dependency's: it is dead-lettered with the reason, and the gate
        # keeps its reference.
        try:
            folder = self.source.resolve(event)
            results = self._results(folder)
        except (DependencyError, Interrupted):  # the store did not answer, or stopping
            raise
        except CheckpointRefused as exc:
            raise ValueError(f"{event.model} v{event.version} was promoted elsewhere but is "
                             f"refused here: {exc}") from exc
        except Exception as exc:
            raise ValueError(f"{event.model} v{event.version} was promoted elsewhere but does "
                             f"not evaluate here: {exc}") from exc
        ref = rule.reference(results, self.headline, event.version, base=True,
                             digests=self.digests, uri=event.uri,
                             event=event.model_dump(mode="json"))
        if current is not None:  # the floor is the best ever, whoever promoted
            ref = rule.promote(current, results, self.headline, event.version, event.uri,
                               self.digests, event.model_dump(mode="json")) | {"base": True}
            below = {k: v for k, v in ref["metrics"].items()
                     if "/" in k and v < ref["best"].get(k, v)}
            if below:
                log.warning("%s v%d was promoted elsewhere below the best a version reached "
                            "(%s); it is the reference, and the best stays the floor",
                            event.model, event.version,
                            ", ".join(f"{k} {v:.3f} < {ref['best'][k]:.3f}"
                                      for k, v in below.items()))
        state.put(f"promoted/{event.model}", ref)
        self._show(ref)

    def _decide(self, state: PartitionState, cand: CheckpointEvent) -> Output:
        current = self._reference(state, cand.model)
        if current is None:
            return self._out(cand, "rejected", cand.metrics,
                             f"no base model configured for {cand.model!r}: nothing to "
                             "compare with", "invalid")
        if cand.version <= current["version"]:
            return self._out(cand, "rejected", cand.metrics, f"not newer than the promoted "
                             f"v{current['version']}", "invalid")
        try:
            folder = self.source.resolve(cand)
        except CheckpointRefused as exc:
            return self._out(cand, "rejected", cand.metrics, f"refused: {exc}", "invalid")
        except (DependencyError, Interrupted):
            raise
        except Exception as exc:  # a disk, a permission: the gate's, not the candidate's
            m.GATE_EVALUATION_FAILURES.labels("resolve").inc()
            raise DependencyError(f"reading {cand.model} v{cand.version} failed: {exc}; no "
                                  "decision until it can be read") from exc
        try:
            results = self._evaluate_candidate(cand, folder)
        except (DependencyError, Interrupted):  # a sandbox pool down, or stopping: decided
            raise                                 # after a restart
        except Exception as exc:
            return self._out(cand, "rejected", cand.metrics, self._blame(cand, current, exc),
                             "invalid")
        for name, r in results.items():
            for k, v in r.metrics.items():
                m.GATE_SCORE.labels(name, k).set(v)
        current = self._paired(state, cand.model, current)
        j = rule.judge(results, current, self.sets, tracked=self.tracked,
                       tolerance=self.tolerance, alpha=self.alpha, headline=self.headline)
        if not j.promoted:
            return self._out(cand, "rejected", j.metrics, j.reason, j.rejection)
        promoted = rule.promote(current, results, self.headline, cand.version, cand.uri,
                                self.digests, cand.model_dump(mode="json"))
        state.put(f"promoted/{cand.model}", promoted)
        self._show(promoted)
        return self._out(cand, "promoted", j.metrics, j.reason, None)

    def _evaluate_candidate(self, cand: CheckpointEvent, folder: Path
                            ) -> dict[str, SetResult]:
        """The candidate's evaluation, tried ``attempts`` times: a failure may be the gate's
        and passing (memory taken by another process, a file system's hiccup)."""
        def failed(state: RetryCallState) -> None:
            m.GATE_EVALUATION_FAILURES.labels("candidate").inc()
            log.warning("evaluating %s v%d failed (%s); trying again", cand.model,
                        cand.version, state.outcome.exception() if state.outcome else None)

        retrying = Retrying(stop=stop_after_attempt(self.attempts), reraise=True,
                            retry=retry_if_not_exception_type((DependencyError, Interrupted)),
                            before_sleep=failed)
        return retrying(self._results, folder)

    def _blame(self, cand: CheckpointEvent, ref: dict[str, Any], exc: Exception) -> str:
        """The reason for rejecting a candidate whose evaluation kept failing, once the
        reference has been evaluated by the same gate: if it cannot be either, the gate is at
        fault, and it raises instead (no decision, nothing counted against the model's
        lineage: only a candidate the gate shows it can evaluate others is judged)."""
        m.GATE_EVALUATION_FAILURES.labels("candidate").inc()
        try:
            self._results(self._folder(cand.model, ref))
        except Interrupted:
            raise
        except Exception as ref_exc:
            m.GATE_EVALUATION_FAILURES.labels("reference").inc()
            raise DependencyError(
                f"the gate cannot evaluate: {cand.model} v{cand.version} failed ({exc}) and "
                f"so does the reference v{ref['version']} ({ref_exc}); no decision") from exc
        return (f"evaluation failed {self.attempts} times, while the reference "
                f"v{ref['version']} evaluates: {exc}")

    def _paired(self, state: PartitionState, model: str, ref: dict[str, Any]
                ) -> dict[str, Any]:
        """``ref`` with outcomes on every set of the suite as it is now: a set it has none
        for (added to the suite, or a state from before outcomes were kept) or that changed
        content is evaluated for the reference first, and becomes its floor. A reference that
        cannot be evaluated stops the gate (no decision without a paired test)."""
        names = rule.stale(ref, self.digests)
        if not names:
            return ref
        try:
            folder = self._folder(model, ref)
            results = self._results(folder)
        except Interrupted:
            raise
        except Exception as exc:
            raise DependencyError(
                f"{model} v{ref['version']}, the reference, has no outcomes on the held-out "
                f"sets {names} (new or changed) and cannot be evaluated on them: {exc}"
            ) from exc
        ref = rule.refresh(ref, results, self.headline, self.digests, names)
        state.put(f"promoted/{model}", ref)
        self._show(ref)
        log.info("%s v%d, the reference, evaluated on the new or changed sets %s: %s", model,
                 ref["version"], names, {n: results[n].metrics for n in names})
        return ref

    def _folder(self, model: str, ref: dict[str, Any]) -> Path:
        """The reference's folder: verified again from its event; the base model's; or, for
        a state from an older gate (no event kept), its folder in the checkpoint root, which
        was verified when it was promoted."""
        if ref.get("event"):
            return self.source.resolve(CheckpointEvent.model_validate(ref["event"]))
        base = self.base.get(model)
        if base is not None and base[0] == ref["version"]:
            return base[1]
        uri = ref.get("uri") or ""
        folder = Path(uri.removeprefix("file://"))
        if uri and "://" not in uri.removeprefix("file://") and folder.is_dir() \
                and folder.resolve().is_relative_to(self.source.root.resolve()):
            return folder
        raise DependencyError(f"a state from an older gate keeps no checkpoint event and no "
                              f"folder for v{ref['version']} (uri {uri or None}): publish it "
                              f"as promoted again")

    def _out(self, cand: CheckpointEvent, status: str, scores: dict[str, float], reason: str,
             rejection: str | None) -> Output:
        m.GATE_DECISIONS.labels(rejection or status).inc()
        self.streaks.count(cand, rejection, scores)
        log.info("%s v%d %s: %s", cand.model, cand.version, rejection or status, reason)
        fields = cand.model_dump(exclude={"event_id", "status", "metrics", "reason",
                                          "producer", "created_at", "rejection"})
        decision = CheckpointEvent(
            **fields, event_id=uuid.uuid5(NAMESPACE, f"{cand.event_id}:{status}"),
            status=status, metrics={**cand.metrics, **scores}, reason=reason,
            rejection=rejection)
        return Output(self.output_topic, self.signer.sign(decision))
