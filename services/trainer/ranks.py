"""The trainer service across ranks (``torchrun``): rank 0 runs the Kafka loop, the others
follow its commands.

Why rank 0 reads and the others are sent their samples, rather than each rank reading its own
share: a round's content is decided by the consumer (quotas, held partitions, rebalances) and
its offsets are committed in the candidate's transaction, which one producer owns. With one
consumer the lineage stays what it is on one process, and a round is tiny next to the weights
(a few hundred samples of token ids). Rank 0 therefore:

1. consumes ``accepted.*`` and forms the round exactly as the one-process trainer does;
2. sends every rank the round's samples, seed and pad id (one broadcast, JSON);
3. trains its part of every micro-batch, like every other rank (``train.train_round``);
4. gathers the whole weights and optimizer state (every rank takes part, so when it returns
   every rank has finished the round), writes the checkpoint and only then commits the
   candidate and the consumed offsets in one transaction.

A rank that dies fails the round on every other rank (its collectives raise), and ``torchrun``
ends the job; nothing of the round is committed, so the job launched again (by its
supervisor) resumes from the last committed candidate and trains the round's samples again.
A step that fails on rank 0 alone ends the job the same way (:class:`Leader`). The followers
need no Kafka, no store and no model files: the model's config, the optimizer settings, the
weights and the optimizer state come from rank 0 over the process group. They ignore SIGTERM
and SIGINT: on a stop, rank 0 finishes the round in flight (within torchrun's shutdown
timeout and its supervisor's grace period) and then tells them to leave.

Commands (rank 0 to all, JSON): ``load`` (weights, then the optimizer state if kept; torch's
own broadcast of that state pickles its non-tensor part between the ranks, in memory),
``reference`` (the KL reference's weights), ``round``, ``idle`` (sent every ``IDLE_SECONDS``
while rank 0 waits for samples, so a rank's death is seen while idle too), ``stop``. While
rank 0 works alone (at start, on a rollback, writing a checkpoint) the others wait in a
broadcast for up to the process group's timeout (``ranks_timeout_seconds``).

Memory: every rank builds the whole model in host memory before FSDP2 shards it, and the KL
reference (``kl_coef`` > 0) is whole on every rank.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from services.common.errors import FatalRuntimeError
from services.trainer.objectives import Sample
from services.trainer.parallel import Parallel
from services.trainer.train import (
    OptimSettings,
    RoundStats,
    make_optimizer,
    scale_lr,
    train_round,
)

log = logging.getLogger(__name__)

IDLE_SECONDS = 30.0


@dataclass
class Gathered:
    """A round's result on rank 0: its statistics, the whole weights and optimizer state."""

    stats: RoundStats
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]


class Replica:
    """What every rank holds, and the steps every rank takes together."""

    def __init__(self, parallel: Parallel, optim: OptimSettings) -> None:
        self.parallel = parallel
        self.optim = optim
        self.model: Any = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.reference: Any = None

    def load(self, plain: Any, optimizer_state: Mapping[str, Any] | None, restore: bool,
             lr_factor: float) -> None:
        """``plain`` (its weights broadcast from rank 0) becomes the wrapped model, with a new
        optimizer; with ``restore``, rank 0's ``optimizer_state`` is loaded into it."""
        self.model = self.optimizer = None
        if self.parallel.strategy != "ddp":  # DDP's constructor broadcasts rank 0's itself
            _broadcast_weights(plain)
        self.model = self.parallel.wrap(plain)
        self.optimizer = make_optimizer(self.model, self.optim)
        if restore:
            self.parallel.load_optimizer_state(
                self.model, self.optimizer,
                dict(optimizer_state) if optimizer_state is not None else None)
        scale_lr(self.optimizer, lr_factor)

    def load_reference(self, plain: Any) -> None:
        _broadcast_weights(plain)
        self.reference = plain.to(self.optim.device).eval()

    def train(self, samples: Mapping[str, Sequence[Sample]], pad: int, seed: int,
              between: Callable[[], None] | None = None) -> Gathered:
        assert self.optimizer is not None
        stats = train_round(self.model, self.optimizer, samples, self.optim, pad, seed=seed,
                            reference=self.reference, parallel=self.parallel, between=between)
        weights = self.parallel.full_state_dict(self.model)
        optimizer = self.parallel.optimizer_state(self.model, self.optimizer)
        return Gathered(stats, weights, optimizer)

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.optim.dtype == "bfloat16" else torch.float32

    @property
    def plain(self) -> Any:
        """The model as Hugging Face saves it (under DDP's wrapper; FSDP2 keeps the class)."""
        return self.parallel._inner(self.model)


class Leader(Replica):
    """Rank 0's side: each step is announced to the followers before it is taken.

    A step that fails on rank 0 (a rank gone, or an error of its own: an out-of-memory, a
    state that does not load) leaves the ranks out of step, the others possibly still inside
    its collectives. The leader is then ``broken``: no further step or stop message is sent
    (it could pair with a collective the others are still in), and the job ends; the other
    ranks see rank 0's connections close and leave too.
    """

    def __init__(self, parallel: Parallel, optim: OptimSettings) -> None:
        super().__init__(parallel, optim)
        self._sent_at = time.monotonic()
        self.broken: str | None = None
        """Why the ranks are out of step, once a step failed."""

    def load(self, plain: Any, optimizer_state: Mapping[str, Any] | None, restore: bool,
             lr_factor: float) -> None:
        restore = restore and optimizer_state is not None
        with self._step("load", {"config": plain.config.to_json_string(), "restore": restore,
                                 "lr_factor": lr_factor, "strategy": self.parallel.strategy,
                                 "optim": self.optim.model_dump(mode="json")}):
            super().load(plain, optimizer_state, restore, lr_factor)

    def load_reference(self, plain: Any) -> None:
        with self._step("reference", {"config": plain.config.to_json_string()}):
            super().load_reference(plain)

    def train(self, samples: Mapping[str, Sequence[Sample]], pad: int, seed: int,
              between: Callable[[], None] | None = None) -> Gathered:
        with self._step("round", {"pad": pad, "seed": seed,
                                  "samples": {st: [dataclasses.asdict(s) for s in items]
                                              for st, items in samples.items()}}):
            return super().train(samples, pad, seed, between)

    def idle(self) -> None:
        """Between rounds, at most every ``IDLE_SECONDS``: a rank that died is seen here."""
        if time.monotonic() - self._sent_at >= IDLE_SECONDS:
            with self._step("idle", {}):
                pass

    def stop(self) -> None:
        """The followers leave; after a failed step, nothing is sent (see the class)."""
        if self.broken is not None:
            log.error("not stopping the other ranks in step: %s; they leave when this "
                      "process ends", self.broken)
            return
        try:
            with self._step("stop", {}):
                self.parallel.close()
        except FatalRuntimeError as exc:
            log.warning("the other ranks were not told to stop: %s", exc)

    @contextmanager
    def _step(self, op: str, command: dict[str, Any]) -> Iterator[None]:
        """``command`` sent to every rank, then the block, which every rank runs with it. A
        failure of either breaks the leader; a failed collective (gloo and NCCL raise
        RuntimeError when a peer's connection closes) is a fatal error."""
        if self.broken is not None:
            raise FatalRuntimeError(f"the ranks are out of step: {self.broken}")
        try:
            _broadcast_json({"op": op, **command})
            self._sent_at = time.monotonic()
            yield
        except BaseException as exc:
            self.broken = f"the {op!r} step failed on rank 0: {type(exc).__name__}: {exc}"
            if isinstance(exc, RuntimeError):
                raise FatalRuntimeError(f"the ranks' {op!r} step failed (a rank that left "
                                        f"the job, or rank 0's own error): {exc}") from exc
            raise


def follow(optim: OptimSettings, parallel: Parallel) -> int:
    """A rank other than 0: take rank 0's commands until it says stop. Returns the exit code."""
    for sig in (signal.SIGTERM, signal.SIGINT):  # rank 0 decides when this rank leaves
        signal.signal(sig, signal.SIG_IGN)
    replica = Replica(parallel, optim)
    log.info("rank %d of %d (%s) following rank 0", parallel.rank, parallel.world,
             parallel.strategy)
    try:
        while True:
            command = _broadcast_json(None)
            op = command["op"]
            if op == "load":
                if command["strategy"] != parallel.strategy:
                    raise ValueError(f"rank 0 runs {command['strategy']}, this rank "
                                     f"{parallel.strategy}: give every rank the same settings")
                replica.optim = OptimSettings.model_validate(command["optim"])  # rank 0's
                replica.load(_empty_model(command["config"], replica.dtype), None,
                             command["restore"], command["lr_factor"])
            elif op == "reference":
                replica.load_reference(_empty_model(command["config"], replica.dtype))
            elif op == "round":
                samples = {st: [Sample(**s) for s in items]
                           for st, items in command["samples"].items()}
                replica.train(samples, command["pad"], command["seed"])
            elif op == "stop":
                parallel.close()
                log.info("rank %d stopped by rank 0", parallel.rank)
                return 0
    except RuntimeError as exc:  # rank 0 (or another) is gone: torchrun ends the job
        log.error("rank %d: the job lost a rank: %s", parallel.rank, exc)
        return 1


def _empty_model(config_json: str, dtype: torch.dtype) -> Any:
    """The model rank 0 loaded, built from its config; its weights come by broadcast."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = json.loads(config_json)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _broadcast_weights(model: Any) -> None:
    """Rank 0's weights and persistent buffers into every rank's copy of ``model``."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, 0)


def _broadcast_json(value: dict[str, Any] | None) -> dict[str, Any]:
    """Rank 0's ``value`` on every rank (the others pass None): its length, then its bytes."""
    data = json.dumps(value).encode() if value is not None else b""
    size = torch.tensor([len(data)], dtype=torch.int64)
    dist.broadcast(size, 0)
    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8) if value is not None \
        else torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(buffer, 0)
    return value if value is not None else dict(json.loads(buffer.numpy().tobytes()))
