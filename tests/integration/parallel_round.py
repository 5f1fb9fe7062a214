"""Training rounds of SFT and RL samples in one process or under ``torchrun`` (DDP or FSDP2),
for ``test_parallel.py``. The final weights go to a safetensors file, the rounds' losses to a
JSON file beside it. Across ranks the rounds go the trainer service's way
(:mod:`services.trainer.ranks`): rank 0 loads the model and sends it, the optimizer state and
each round's samples to the others, which start from a model built from its config alone.

    parallel_round.py MODEL OUT single|ddp|fsdp [--rounds 0,1] [--store DIR]

``--store``: before the first round, resume from version 1 of that checkpoint store if it has
one (weights and optimizer state); after it, write version 1 there if it has none. So one job
can train round 0 and another, on another number of ranks, resume for round 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from services.models.engines import TransformersEngine
from services.seed_model import SeedModelSettings, seed_tasks, sft_samples
from services.trainer.objectives import Sample
from services.trainer.parallel import Parallel
from services.trainer.ranks import Leader, follow
from services.trainer.store import CheckpointStore, load_optimizer, read_optimizer
from services.trainer.train import OptimSettings, make_optimizer, train_round

OPTIM = OptimSettings(lr=1e-3, micro_batch=5, dtype="float32")
"""Micro-batches of 5 over 11 SFT and 7 RL samples: parts of 3 and 2 on two ranks, and
micro-batches of 1 and 2 (one rank's part empty, or of one sample)."""


def rounds(tokenizer: object) -> list[dict[str, list[Sample]]]:
    """Two rounds; samples of unequal weights, RL ones with advantages and behaviour
    log-probs, so a wrong denominator or a skipped part changes the result."""
    rng = random.Random(7)
    base = sft_samples(tokenizer, seed_tasks(SeedModelSettings(seed_examples=100))[:36])
    out = []
    for r in range(2):
        part = base[r * 18:(r + 1) * 18]
        sft = [dataclasses.replace(s, weight=rng.choice([0.5, 1.0, 2.0])) for s in part[:11]]
        rl = [dataclasses.replace(s, weight=rng.choice([0.5, 1.0]),
                                  advantage=rng.uniform(-1.5, 1.5), temperature=1.0,
                                  behaviour_logprobs=[rng.uniform(-2.0, -0.1) for _ in s.target])
              for s in part[11:]]
        out.append({"sft": sft, "rl": rl})
    return out


def main() -> None:
    args = argparse.ArgumentParser()
    args.add_argument("model", type=Path)
    args.add_argument("out", type=Path)
    args.add_argument("strategy", choices=["single", "ddp", "fsdp"])
    args.add_argument("--rounds", default="0,1")
    args.add_argument("--store", type=Path)
    args.add_argument("--corrupt-optimizer", action="store_true",
                      help="rank 0 resumes from a state naming a parameter the model lacks")
    a = args.parse_args()
    torch.set_num_threads(1)
    store = CheckpointStore(str(a.store)) if a.store else None
    resume = store is not None and 1 in store.versions()
    folder = Path(store.uri(1)) if store is not None and resume else a.model
    parallel = None if a.strategy == "single" else Parallel.launch(a.strategy)
    if parallel is not None and not parallel.leader:
        raise SystemExit(follow(OPTIM, parallel))
    engine = TransformersEngine(folder)
    samples = rounds(engine.tokenizer)
    numbers = [int(x) for x in a.rounds.split(",")]
    losses = []
    if parallel is None:
        model = engine.model
        optimizer = make_optimizer(model, OPTIM)
        if resume:
            assert load_optimizer(optimizer, folder)
        for r in numbers:
            losses.append(train_round(model, optimizer, samples[r], OPTIM, engine.pad,
                                      seed=r).loss)
        weights: dict[str, torch.Tensor] = model.state_dict()
        optim: dict[str, Any] = optimizer.state_dict()
    else:
        leader = Leader(parallel, OPTIM)
        state = read_optimizer(folder) if resume else None
        assert state is not None or not resume
        if state is not None and a.corrupt_optimizer:
            state["state"][10**6] = state["state"][0]
        try:  # as the trainer service's main: stop() sends nothing after a failed step
            leader.load(engine.model, state, resume, 1.0)
            for r in numbers:
                gathered = leader.train(samples[r], engine.pad, r)
                losses.append(gathered.stats.loss)
            weights, optim = gathered.weights, gathered.optimizer
            if store is not None and not resume:  # as the trainer writes it: the gathered
                # weights, through the wrapped (DDP) or sharded (FSDP2) model
                store.write(1, leader.plain, engine.tokenizer, optim, state_dict=weights)
        finally:
            leader.stop()
    save_file({k: v.detach().clone().contiguous() for k, v in weights.items()}, a.out)
    a.out.with_suffix(".json").write_text(json.dumps(losses))
    if parallel is None and store is not None and not resume:
        store.write(1, model, engine.tokenizer, optim)


if __name__ == "__main__":
    main()
