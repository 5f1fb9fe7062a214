"""The trainer's long-running loop: accepted samples in, candidate checkpoints out, each
sample trained into exactly one committed checkpoint.

The loop consumes ``accepted.cpt``, ``accepted.sft`` and ``accepted.rl`` (read_committed, one
consumer group) into per-stage buffers with quotas (:mod:`services.trainer.intake`); when a
round is due, it:

1. trains on everything buffered (``train.train_round``);
2. writes checkpoint ``v<N+1>`` to the store (staged, then renamed: never seen partial);
3. in ONE Kafka transaction, publishes the ``candidate`` event, whose ``trained_on`` lists
   for every input partition the offsets ``[committed, next)`` the round consumed, and
   commits ``next`` as the group's offsets (``send_offsets_to_transaction``).

A crash before step 3 commits leaves the offsets where they were: the samples are trained
again into the next checkpoint, and the folder of the dead round is an orphan that the next
start removes. After it, they are never trained again. Consecutive candidates' ranges
therefore tile each partition: no overlap, no gap. At start the trainer reads ``checkpoints``
to its end and resumes from its model's latest candidate (weights and optimizer state);
without one, from the base model.

Over 300 lines: the round loop and the lineage rules (resume, rollback, the candidate's
transaction, retention) all read and move the same three numbers, the newest version, the
head the weights are at and the committed offsets; they stay together so that each move of
one is seen beside the others.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, get_args

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from schemas import CheckpointEvent, OffsetRange, ProducerInfo, TrainingStage
from services.common.checkpoints import CheckpointFollower
from services.common.clients import consumer_config, producer_config, transactional_producer
from services.common.errors import FatalRuntimeError
from services.common.health import BrokerHealth
from services.common.metrics import RECORDS_DEAD_LETTERED
from services.common.outputs import produce_dead_letters
from services.common.signing import Verifier
from services.common.transactions import Transactions
from services.models.manifest import verify
from services.trainer import metrics as m
from services.trainer.intake import STAGES, Intake, Round
from services.trainer.lineage import Decisions, Rollback
from services.trainer.ranks import Leader
from services.trainer.settings import TrainerSettings
from services.trainer.store import CheckpointStore, load_optimizer, read_optimizer
from services.trainer.train import RoundInterrupted, make_optimizer, scale_lr, train_round

log = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 5.0
"""How often a round in training polls its consumer (``TrainerLoop._mid_round``): well
inside the shortest ``max.poll.interval.ms`` allowed (10 s)."""

NAMESPACE = uuid.UUID("5e0c1d7a-2b7f-4c55-9a1e-8d3f6b2c4e90")


class Trainer:
    """The loop of one process, or of rank 0 of a job on several (``ranks``: it announces
    every load and round to the other ranks, which train their part of it; see
    :mod:`services.trainer.ranks`)."""

    def __init__(self, settings: TrainerSettings, ranks: Leader | None = None) -> None:
        self.s = settings
        self.ranks = ranks
        self.topics = {settings.topic(f"accepted.{st}"): st for st in STAGES}
        self.store = CheckpointStore(settings.checkpoint_url)
        self._stop = threading.Event()
        self._alive = False
        self._health = BrokerHealth(settings)
        self.intake = Intake(settings, self.topics, self._health)
        self.version = settings.base_version
        """The newest version this model's trainer wrote (the next is one more)."""
        self.head = settings.base_version
        """The version of the weights held: the next candidate's parent."""
        self.step = 0
        self.model: Any = None
        self.tokenizer: Any = None
        self.optimizer: Any = None
        self.reference: Any = None
        self._consumer: Consumer | None = None
        self._transactions: Transactions | None = None
        self._kept_at = time.monotonic()
        self.decisions = Decisions(settings.model_name)
        self.verifier = Verifier.load(settings.decisions.public_key)
        """Only the gate's signed decisions count (a forged rejection would roll back)."""
        self._decisions: CheckpointFollower | None = None

    @property
    def alive(self) -> bool:
        return self._alive

    @property
    def ready(self) -> bool:
        return self._alive and self._health.connected and bool(self.intake.members.owned)

    @property
    def health(self) -> BrokerHealth:
        return self._health

    def stop(self) -> None:
        self._stop.set()

    # -- start ------------------------------------------------------------------------------

    def _resume(self) -> None:
        """Weights and optimizer of this model's latest committed candidate, or the base; or,
        when the gate's decisions call for a rollback of that lineage, of the latest promoted
        version (a restart during a rollback resumes from the promoted version)."""
        import torch
        from transformers import AutoTokenizer

        _read_decisions(self.s, self.decisions, self.verifier)
        latest = self.decisions.latest
        if latest is not None:
            self.version, self.step = latest.version, latest.step or 0
        removed = self.store.cleanup(self.version)  # the base version's folder stays
        if removed:
            log.info("removed orphaned checkpoint folders: %s", ", ".join(removed))
        o = self.s.optim
        self._dtype = torch.bfloat16 if o.dtype == "bfloat16" else torch.float32
        head = latest.version if latest is not None else self.s.base_version
        due = self._rollback_due(head)
        if due is not None:
            self._log_rollback(head, due)
            head = due.target
        folder = self._load(head, restore_optimizer=head != self.s.base_version,
                            rolled_back=due is not None)
        self.tokenizer = self.intake.tokenizer = AutoTokenizer.from_pretrained(folder)
        if o.kl_coef > 0:
            from transformers import AutoModelForCausalLM

            reference: Any = AutoModelForCausalLM.from_pretrained(
                self.s.base_model_path, dtype=self._dtype, use_safetensors=True)
            if self.ranks is None:
                self.reference = reference.to(o.device).eval()
            else:
                self.ranks.load_reference(reference)
                self.reference = self.ranks.reference
        m.CANDIDATE_VERSION.set(self.version)
        m.RANKS.set(self.ranks.parallel.world if self.ranks is not None else 1)
        for stage in get_args(TrainingStage):  # every stage's series from the start, at 0
            m.SAMPLES.labels(stage)
            m.TOKENS.labels(stage)
        log.info("resuming %s at version %d (step %d) from v%d in %s", self.s.model_name,
                 self.version, self.step, self.head, folder)

    def _folder(self, version: int) -> Path:
        """A verified local folder of ``version``: the base model, or a store version whose
        candidate or promotion event gives its manifest."""
        if version == self.s.base_version:
            return self.s.base_model_path
        event = self.decisions.promoted.get(version)
        if event is None and self.decisions.latest is not None \
                and self.decisions.latest.version == version:
            event = self.decisions.latest
        if event is None:
            raise FatalRuntimeError(f"no checkpoint event for v{version} to load it from")
        local = self.store.fetch(version)
        return verify(event.model_copy(update={"uri": str(local)}), local.parent)

    def _load(self, version: int, *, restore_optimizer: bool, rolled_back: bool) -> Path:
        """Weights (and optimizer state, when kept) of ``version`` become the trainer's."""
        from transformers import AutoModelForCausalLM

        folder = self._folder(version)
        loaded: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=self._dtype,
                                                           use_safetensors=True)
        lr_factor = self.s.rollback.lr_factor if rolled_back else 1.0
        if self.ranks is not None:  # every rank loads it, the optimizer state from rank 0's
            self.model = self.optimizer = None  # the old ones go first
            state = read_optimizer(Path(folder)) if restore_optimizer else None
            self.ranks.load(loaded, state, restore_optimizer, lr_factor)
            self.model, self.optimizer = self.ranks.model, self.ranks.optimizer
            restored = state is not None
            log.info("v%d loaded on %d ranks (%s)", version, self.ranks.parallel.world,
                     self.ranks.parallel.strategy)
        else:
            self.model = loaded.to(self.s.optim.device)
            self.optimizer = make_optimizer(self.model, self.s.optim)
            restored = restore_optimizer and load_optimizer(self.optimizer, Path(folder))
            scale_lr(self.optimizer, lr_factor)
        if restored:
            log.info("optimizer state restored from %s", folder)
        elif restore_optimizer:
            log.info("no optimizer state kept for v%d: a fresh optimizer", version)
        if lr_factor != 1.0:
            log.info("learning rate after the rollback: %g",
                     self.optimizer.param_groups[0]["lr"])
        self.head = version
        return folder

    def _rollback_due(self, head: int) -> Rollback | None:
        r = self.s.rollback
        return self.decisions.rollback(head, self.s.base_version, r.after) if r.enabled \
            else None

    def _log_rollback(self, head: int, due: Rollback) -> None:
        log.warning("rollback: the gate rejected v%s as regressed; continuing from promoted "
                    "v%d, leaving v%s behind (head was v%d)",
                    ", v".join(map(str, due.regressed)), due.target,
                    ", v".join(map(str, due.discarded)), head)
        m.ROLLBACKS.inc()
        m.DISCARDED.inc(len(due.discarded))

    def _maybe_roll_back(self) -> None:
        """Between rounds: when the gate's decisions read so far call for it, the weights and
        optimizer state of the latest promoted version replace the trainer's. Buffered
        samples stay: they train into the next candidate, whose parent is that version."""
        if not self.s.rollback.enabled:
            return
        assert self._decisions is not None
        if not self._decisions.current(timeout=10):
            log.warning("checkpoints not read to its end in 10 s: deciding on a rollback "
                        "with the decisions read so far")
        due = self._rollback_due(self.head)
        if due is None:
            return
        self._log_rollback(self.head, due)
        self._load(due.target, restore_optimizer=due.target != self.s.base_version,
                   rolled_back=True)

    def _fence(self) -> None:
        """One transactional id per model, whatever the instance: a second trainer of the
        same model (a rolling deploy, a mistake) fences the first instead of racing it for
        version numbers. Also settles (aborts) what a dead predecessor left open, before
        the resume reads ``checkpoints``."""
        s = self.s
        producer = transactional_producer(
            producer_config(s, transactional_id=f"{s.group_id}.{s.model_name}",
                            error_cb=self._health.on_error),
            s.runtime.transaction_timeout_ms / 1000)
        # No stop event: a trained round's commit is not cut short by a stop (a round cut
        # short is trained again after the restart); it retries for COMMIT_PATIENCE_SECONDS.
        self._transactions = Transactions(producer, s.runtime, s.service)

    def _open(self) -> None:
        s = self.s
        # A round polls as it trains (_mid_round): the runtime's poll interval holds.
        self._consumer = Consumer(consumer_config(
            s, transactional=True, error_cb=self._health.on_error))
        self.intake.subscribe(self._consumer)

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._fence()
            self._resume()
            self._open()
            self._decisions = CheckpointFollower(self.s.kafka, self.s.topic("checkpoints"),
                                                 self.decisions, verifier=self.verifier)
            self._decisions.start()
            self._alive = True
            self._health.connected = True
            assert self._consumer is not None and self._transactions is not None
            while not self._stop.is_set():
                self._health.raise_if_fatal()
                # /readyz follows the broker; no broker for broker_down_seconds is fatal.
                self._health.check(self._transactions.producer, self._consumer,
                                   next(iter(self.topics)), self.intake.members.owned)
                for msg in self._consumer.consume(500, timeout=0.5):
                    err = msg.error()
                    if err is not None:
                        if err.code() != KafkaError._PARTITION_EOF:
                            log.warning("consumer error: %s", err)
                        continue
                    self.intake.take(msg)
                if self.ranks is not None:
                    self.ranks.idle()
                self.intake.settle()
                if self.intake.due():
                    self._maybe_roll_back()
                    self._train_and_commit()
        except KafkaException as exc:
            raise FatalRuntimeError(f"Kafka client error: {exc.args[0]}") from exc
        finally:
            self._alive = False
            if self._decisions is not None:
                self._decisions.stop()
            if self._consumer is not None:
                self._consumer.close()
            if self._transactions is not None:
                self._transactions.close()
                if not self._transactions.wedged:  # a wedged producer is left alone
                    self._transactions.producer.flush(5)

    # -- a round ----------------------------------------------------------------------------

    def _train_and_commit(self) -> None:
        r = self.intake.round
        o = self.s.optim
        samples = r.samples
        log.info("training round for v%d: %s", self.version + 1,
                 {st: len(v) for st, v in samples.items() if v})
        started = time.perf_counter()
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        weights: dict[str, Any] | None = None
        optimizer: Any = self.optimizer
        if self.ranks is None:
            try:
                stats = train_round(self.model, self.optimizer, samples, o, pad,
                                    seed=self.version, reference=self.reference,
                                    stopping=self._stop.is_set, between=self._mid_round)
            except RoundInterrupted as exc:  # nothing written, nothing committed: the round's
                # samples are read again after the restart, and trained then
                log.info("stopping mid-round (%s): v%d is not written; its %d samples stay "
                         "uncommitted", exc, self.version + 1,
                         sum(len(v) for v in samples.values()))
                return
        else:  # every rank trains its part; the whole weights and optimizer state come back
            gathered = self.ranks.train(samples, pad, seed=self.version,
                                        between=self._mid_round)
            stats, weights, optimizer = gathered.stats, gathered.weights, gathered.optimizer
        train_seconds = time.perf_counter() - started
        if self.intake.round is not r:  # a rebalance during the round revoked partitions
            raise FatalRuntimeError(
                f"partitions were revoked while v{self.version + 1} trained; its offsets can "
                "no longer be committed: restarting from the last candidate")
        self.step += stats.steps
        version = self.version + 1
        written = time.perf_counter()
        trained_on = [OffsetRange(topic=t, partition=p, start=a, end=b)
                      for (t, p), (a, b) in sorted(r.ranges.items())]
        metrics = {**stats.metrics(), "train_seconds": round(train_seconds, 3)}
        stage_mix = {st: len(v) for st, v in samples.items() if v}
        uri, manifest = self.store.write(
            version, self.model if self.ranks is None else self.ranks.plain, self.tokenizer,
            optimizer, state_dict=weights, record={"model": self.s.model_name, "version": version,
                    "parent_version": self.head, "step": self.step,
                    "metrics": metrics, "stage_mix": stage_mix,
                    "trained_on": [x.model_dump() for x in trained_on]})
        event = CheckpointEvent(
            event_id=uuid.uuid5(NAMESPACE, f"{self.s.model_name}:{version}:candidate"),
            model=self.s.model_name, version=version, parent_version=self.head, uri=uri,
            manifest=manifest, status="candidate", trained_on=trained_on,
            metrics=metrics, step=self.step, stage_mix=stage_mix, provenance=r.provenance,
            producer=ProducerInfo(service=self.s.service, instance=self.s.instance_id),
        )
        self._commit(event, r)
        for (topic, kind), n in Counter((d.topic, d.kind) for d in r.dead).items():
            RECORDS_DEAD_LETTERED.labels(self.s.service, topic, kind).inc(n)
        m.CHECKPOINT_SECONDS.observe(time.perf_counter() - written)
        m.CHECKPOINT_BYTES.set(sum(f.size_bytes for f in manifest))
        m.ROUND_SECONDS.observe(train_seconds)
        m.CANDIDATE_VERSION.set(version)
        for st, items in samples.items():
            if items:
                m.SAMPLES.labels(st).inc(len(items))
                m.TOKENS.labels(st).inc(stats.tokens[st])
                m.LOSS.labels(st).set(stats.loss[st])
        self.version = self.head = version
        self.intake.committed_round()
        self._prune()
        log.info("candidate v%d committed: %s", version, {k: round(v, 4) for k, v in
                                                           event.metrics.items()})

    def _prune(self) -> None:
        """Retention, after a commit (a version is only ever deleted once announced and
        decided, so nothing a generator or the gate may still load goes)."""
        if not self.s.retention.enabled:
            return
        keep = self.decisions.keep(self.store.versions(), self.s.base_version, self.version,
                                   self.s.retention.keep_candidates)
        versions = self.store.versions()
        removed = self.store.prune(keep, optimizer_of=self.decisions.optimizer_keep(
            versions, self.s.base_version, self.version))
        for name in removed:
            m.PRUNED.labels("optimizer" if name.endswith("/optimizer") else "version").inc()
        if removed:
            log.info("retention removed %s", ", ".join(removed))
        m.STORE_BYTES.set(self.store.size_bytes())

    def _mid_round(self) -> None:
        """Before each micro-batch, at most every ``KEEPALIVE_SECONDS``: a poll that takes no
        record (:meth:`Intake.keep_membership`). A round has no bound (a real model's on a CPU
        takes many minutes); without it, one longer than ``max.poll.interval.ms`` had this
        member dropped from its group and its commit refused, and the round, trained again
        after the restart, was as long again."""
        now = time.monotonic()
        if now - self._kept_at >= KEEPALIVE_SECONDS:
            self._kept_at = now
            self.intake.keep_membership()

    def _commit(self, event: CheckpointEvent, r: Round) -> None:
        """The candidate event and the consumed offsets, in one transaction
        (:mod:`services.common.transactions`)."""
        assert self._transactions is not None and self._consumer is not None
        transactions = self._transactions
        offsets = [TopicPartition(t, p, end) for (t, p), (_, end) in sorted(r.ranges.items())]
        try:
            transactions.begin()
            transactions.producer.produce(self.s.topic("checkpoints"), event.to_bytes(),
                                          event.model)
            produce_dead_letters(transactions.producer, self.s, self.s.topic("dlq"), r.dead)
            transactions.commit(offsets, self._consumer)
        except KafkaException as exc:
            # The outcome may be unknown (a commit that timed out may still complete): exit.
            # The restart fences this producer, reads checkpoints to its true end and
            # resumes from whichever candidate did commit; the samples of a round that did
            # not are trained again, and its folder is removed as an orphan.
            raise FatalRuntimeError(f"could not commit candidate v{event.version}: "
                                    f"{exc.args[0]}") from exc


def _read_decisions(s: TrainerSettings, decisions: Decisions, verifier: Verifier) -> None:
    """``checkpoints`` read to its true end into ``decisions``: another producer's open
    transaction (the gate evaluating, up to its transaction timeout) is waited for, since
    missing a committed candidate would reuse its version."""
    follower = CheckpointFollower(s.kafka, s.topic("checkpoints"), decisions,
                                  verifier=verifier)
    try:
        follower.catch_up(timeout=900 + 60, true_end=True)
    finally:
        follower.stop()
