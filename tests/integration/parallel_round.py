"""Two training rounds of SFT and RL samples, in one process or under ``torchrun`` (DDP or
FSDP2): the final weights to a safetensors file, the rounds' losses to a JSON file beside it.
Run by ``test_parallel.py``: ``parallel_round.py MODEL OUT single|ddp|fsdp [ORDER_SEED]``."""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from services.bootstrap import BootstrapSettings, seed_tasks, sft_samples
from services.models.engines import TransformersEngine
from services.trainer.objectives import Sample
from services.trainer.parallel import Parallel
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


def main(folder: str, out: str, strategy: str, order_seed: int = 0) -> None:
    torch.set_num_threads(1)
    engine = TransformersEngine(Path(folder))
    parallel = None if strategy == "single" else Parallel.launch(strategy)  # type: ignore[arg-type]
    model = engine.model if parallel is None else parallel.wrap(engine.model)
    optimizer = make_optimizer(model, OPTIM)
    losses = []
    for seed, samples in enumerate(rounds(engine.tokenizer)):
        stats = train_round(model, optimizer, samples, OPTIM, engine.pad,
                            seed=seed + order_seed, parallel=parallel)
        losses.append(stats.loss)
    state = model.state_dict() if parallel is None else parallel.full_state_dict(model)
    if parallel is None or parallel.leader:
        save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, out)
        Path(out).with_suffix(".json").write_text(json.dumps(losses))
    if parallel is not None:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], *(int(x) for x in sys.argv[4:]))
