"""Training rounds of SFT and RL samples in one process or under ``torchrun`` (DDP or FSDP2),
for ``test_parallel.py``. The final weights go to a safetensors file, the rounds' losses to a
JSON file beside it.

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

from services.bootstrap import BootstrapSettings, seed_tasks, sft_samples
from services.models.engines import TransformersEngine
from services.trainer.objectives import Sample
from services.trainer.parallel import Parallel
from services.trainer.store import CheckpointStore, load_optimizer, read_optimizer
from services.trainer.train import OptimSettings, make_optimizer, train_round

OPTIM = OptimSettings(lr=1e-3, micro_batch=5)
"""Micro-batches of 5 over 11 SFT and 7 RL samples: parts of 3 and 2 on two ranks, and
micro-batches of 1 and 2 (one rank's part empty, or of one sample)."""


def rounds(tokenizer: object) -> list[dict[str, list[Sample]]]:
    """Two rounds; samples of unequal weights, RL ones with advantages and behaviour
    log-probs, so a wrong denominator or a skipped part changes the result."""
    rng = random.Random(7)
    base = sft_samples(tokenizer, seed_tasks(BootstrapSettings(seed_examples=100))[:36])
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
    a = args.parse_args()
    torch.set_num_threads(1)
    store = CheckpointStore(str(a.store)) if a.store else None
    resume = store is not None and 1 in store.versions()
    engine = TransformersEngine(Path(store.uri(1)) if store and resume else a.model)
    parallel = None if a.strategy == "single" else Parallel.launch(a.strategy)
    model = engine.model if parallel is None else parallel.wrap(engine.model)
    optimizer = make_optimizer(model, OPTIM)
    if store is not None and resume:
        folder = Path(store.uri(1))
        if parallel is None:
            assert load_optimizer(optimizer, folder)
        else:
            parallel.load_optimizer_state(
                model, optimizer, read_optimizer(folder) if parallel.leader else None)
    losses = []
    samples = rounds(engine.tokenizer)
    for r in (int(x) for x in a.rounds.split(",")):
        stats = train_round(model, optimizer, samples[r], OPTIM, engine.pad, seed=r,
                            parallel=parallel)
        losses.append(stats.loss)
    weights = model.state_dict() if parallel is None else parallel.full_state_dict(model)
    optim: dict[str, Any] = optimizer.state_dict() if parallel is None \
        else parallel.optimizer_state(model, optimizer)
    if parallel is None or parallel.leader:
        save_file({k: v.detach().clone().contiguous() for k, v in weights.items()}, a.out)
        a.out.with_suffix(".json").write_text(json.dumps(losses))
        if store is not None and not resume:
            plain = TransformersEngine(a.model)  # one process's model, to save whole
            plain.model.load_state_dict(weights)
            store.write(1, plain.model, plain.tokenizer, optim)
    if parallel is not None:
        parallel.close()


if __name__ == "__main__":
    main()
