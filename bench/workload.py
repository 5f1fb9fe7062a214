"""The training benchmarks' workload, shared by ``bench trainer`` and the ranks it starts
(``bench.ranks``): rounds of arithmetic samples per stage, as the trainer sees them."""

from __future__ import annotations

import random
from typing import Any

ROUNDS = 3
SAMPLES = 256
MICRO_BATCH = 32


def samples(tokenizer: Any, model: Any, stage: str, rng: random.Random) -> list[Any]:
    import torch

    from services.trainer.objectives import Sample, collate, token_logprobs

    eos = tokenizer.eos_token_id
    out = []
    for _ in range(SAMPLES):
        a, b = rng.randrange(10, 100), rng.randrange(10, 100)
        prompt = list(tokenizer(f"{a}+{b}=", add_special_tokens=False)["input_ids"])
        answer = [*tokenizer(str(a + b), add_special_tokens=False)["input_ids"], eos]
        if stage == "cpt":
            out.append(Sample([], prompt + answer))
        elif stage == "sft":
            out.append(Sample(prompt, answer))
        else:
            with torch.no_grad():
                lp = token_logprobs(model, collate([Sample(prompt, answer)], 0))[0]
            start = len(prompt) - 1
            out.append(Sample(prompt, answer, behaviour_logprobs=lp[start:start + len(answer)]
                              .tolist(), advantage=rng.choice([-1.0, 1.0])))
    return out
