"""Training rounds across ranks on torch.distributed: DDP (replicated) and FSDP2 (sharded).

Launched by ``torchrun``: every rank runs the same round on the same samples in the same
order (``train.train_round`` shuffles with the round's seed), and each micro-batch is split
across the ranks. A rank's loss is divided by the micro-batch's global weight over the world
size, not by its own part's weight: after DDP or FSDP average the gradients, the step is
exactly the one-process step on the whole micro-batch, even when the parts are uneven. A
rank with no sample in a micro-batch (fewer samples than ranks) trains on a zero-weight copy
of one, so it still joins the collectives of the forward and backward passes.

Which process consumes Kafka is the caller's choice; this module only needs every rank to
hold the same samples. Tested on the CPU (gloo); the GPU path (NCCL for CUDA tensors, gloo for
CPU ones, one device per rank) is written but has not run here: this machine has no GPU.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, cast

import torch
import torch.distributed as dist

from services.trainer.objectives import Sample

Strategy = Literal["ddp", "fsdp"]


@dataclass(frozen=True)
class Parallel:
    """This process's place in the job: its rank, the world size and the strategy."""

    strategy: Strategy
    rank: int
    world: int

    @classmethod
    def launch(cls, strategy: Strategy, timeout: float | None = None) -> Parallel:
        """Join the process group ``torchrun`` describes in the environment (gloo on the
        CPU, NCCL on GPUs). ``timeout``: how long a collective waits for the other ranks
        (torch's default, 30 minutes for gloo, when None)."""
        if "WORLD_SIZE" not in os.environ:
            raise RuntimeError("not launched by torchrun: WORLD_SIZE is not set")
        if not dist.is_initialized():
            wait = timedelta(seconds=timeout) if timeout is not None else None
            if torch.cuda.is_available():  # one GPU per rank on each node; gloo for the
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # CPU tensors
                dist.init_process_group("cpu:gloo,cuda:nccl", timeout=wait)
            else:
                dist.init_process_group("gloo", timeout=wait)
        return cls(strategy, dist.get_rank(), dist.get_world_size())

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """Leave the process group once every rank is done: a rank tearing down while
        another still writes its results left the other hanging in gloo's teardown (seen
        once in ``bench trainer``)."""
        dist.barrier()
        dist.destroy_process_group()

    def wrap(self, model: Any) -> Any:
        """DDP: the model replicated, gradients all-reduced. FSDP2: every transformer block
        (the model's ``_no_split_modules``) and then the root sharded across the ranks. Build
        the optimizer after this: FSDP replaces the parameters. On GPUs DDP's replica moves to
        this rank's device; FSDP2 shards the model where it is (the CPU) and moves each rank's
        shards to its device, so no GPU ever holds the whole model."""
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            if torch.cuda.is_available():
                model = model.to(torch.device("cuda", torch.cuda.current_device()))
            return DistributedDataParallel(model)
        from torch.distributed.fsdp import fully_shard

        blocks = set(getattr(model, "_no_split_modules", None) or ())
        for module in model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module)
        fully_shard(model)
        return model

    def split(self, chunk: Sequence[Sample]) -> tuple[list[Sample], float]:
        """This rank's contiguous part of a micro-batch, and the denominator of its weighted
        loss: the micro-batch's total weight over the world size."""
        total = sum(s.weight for s in chunk)
        size, extra = divmod(len(chunk), self.world)
        start = self.rank * size + min(self.rank, extra)
        mine = list(chunk[start:start + size + (self.rank < extra)])
        if not mine:
            mine = [dataclasses.replace(chunk[0], weight=0.0)]
        return mine, total / self.world

    def mean(self, values: Sequence[float]) -> list[float]:
        """Each value averaged over the ranks (one all-reduce)."""
        t = torch.tensor(list(values), dtype=torch.float64)
        dist.all_reduce(t)
        return [float(x) / self.world for x in t]

    def full_state_dict(self, model: Any) -> dict[str, torch.Tensor]:
        """The whole model's weights on the CPU, on rank 0 (empty on the others); every rank
        must call it (FSDP gathers the shards)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        state = get_model_state_dict(self._inner(model), options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        return cast(dict[str, torch.Tensor], state) if self.leader else {}

    def optimizer_state(self, model: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's whole state in the one-process form (``Optimizer.state_dict()``:
        keyed by the index of each parameter in ``model.parameters()``), on rank 0 (empty on
        the others), so it resumes on any number of ranks; every rank must call it."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        full = cast(dict[str, Any], get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)))
        if not self.leader:
            return {}
        index = {name: i for i, name in enumerate(self._names(model))}
        return {"state": {index[name]: value for name, value in full["state"].items()},
                "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                                 for g in full["param_groups"]]}

    def load_optimizer_state(self, model: Any, optimizer: torch.optim.Optimizer,
                             state: dict[str, Any] | None) -> None:
        """Load a one-process optimizer state (``state`` read on rank 0; None on the others)
        into this job's optimizer: rank 0's copy is broadcast and each rank keeps its part."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        full: dict[str, Any] = {}
        if self.leader:
            if state is None:
                raise ValueError("rank 0 needs the optimizer state to load")
            names = self._names(model)
            full = {"state": {names[int(i)]: value for i, value in state["state"].items()},
                    "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]}
                                     for g in state["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, optim_state_dict=full, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True))

    def _names(self, model: Any) -> list[str]:
        """Parameter names in ``parameters()`` order, as the state-dict helpers write them."""
        return [name for name, _ in self._inner(model).named_parameters()]

    def _inner(self, model: Any) -> Any:
        """The model under its wrapper (DDP wraps; FSDP2 changes the model in place)."""
        return model.module if self.strategy == "ddp" else model
