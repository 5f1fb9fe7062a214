"""``bench generator``: tokens per second of the vLLM and transformers backends, and reload
latency.

Both backends serve the same model on the same batch: 64 arithmetic tasks x 4 samples,
temperature 1.0, up to 16 new tokens, after one untimed warm-up batch; three timed batches each,
median reported. Two sizes of ``services.models.tiny`` (character-level tokenizer, random
weights): the embedded 0.35 M parameter model and a 13 M parameter one (hidden 512, 4 layers).
Then 20 in-place reloads alternating two checkpoints, per backend and size: p50 / p95.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from schemas import SamplingParams, Turn
from services import envs
from services.models.engines import Engine, TransformersEngine, VLLMEngine, render
from services.models.tiny import tiny_model

TASKS, SAMPLES, MAX_TOKENS, BATCHES, RELOADS = 64, 4, 16, 3, 20


def _throughput(engine: Engine, tokenizer: Any) -> dict[str, Any]:
    tasks = envs.get("arithmetic").tasks(TASKS, rng=random.Random(0), difficulty=2)
    prompts = [render(tokenizer, [Turn(role="user", content=t.prompt)])
               for t in tasks for _ in range(SAMPLES)]
    sampling = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS)
    seeds = list(range(len(prompts)))
    engine.generate(prompts, sampling, seeds)  # warm-up
    rates, tokens = [], 0
    for _ in range(BATCHES):
        started = time.perf_counter()
        out = engine.generate(prompts, sampling, seeds)
        took = time.perf_counter() - started
        tokens = sum(len(c.token_ids) for c in out)
        rates.append(tokens / took)
    return {"tokens_per_batch": tokens, "tokens_per_second": [round(r) for r in rates],
            "median_tokens_per_second": round(statistics.median(rates))}


def _reloads(engine: Engine, folders: tuple[Path, Path]) -> dict[str, float]:
    ms = []
    for i in range(RELOADS):
        started = time.perf_counter()
        engine.reload(folders[(i + 1) % 2])
        ms.append(1e3 * (time.perf_counter() - started))
    ms.sort()
    return {"p50_ms": round(statistics.median(ms), 2),
            "p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 2)}


SIZES = {"tiny": {"hidden": 128, "layers": 2}, "small": {"hidden": 512, "layers": 4}}


def _compare(folder: Path, hidden: int, layers: int) -> dict[str, Any]:
    folders = (tiny_model(folder / "v0", seed=0, hidden=hidden, layers=layers),
               tiny_model(folder / "v1", seed=1, hidden=hidden, layers=layers))
    results: dict[str, Any] = {"hidden": hidden, "layers": layers}
    started = time.perf_counter()
    vllm = VLLMEngine(folders[0], dtype="float32", max_model_len=256,
                      gpu_memory_utilization=0.05)
    vllm_start = time.perf_counter() - started
    try:
        results["vllm"] = _throughput(vllm, vllm.tokenizer) | {
            "engine_start_seconds": round(vllm_start, 1), "reload": _reloads(vllm, folders)}
    finally:
        vllm.close()
    hf = TransformersEngine(folders[0])
    results["transformers"] = _throughput(hf, hf.tokenizer) | {"reload": _reloads(hf, folders)}
    results["vllm_over_transformers"] = round(
        results["vllm"]["median_tokens_per_second"]
        / results["transformers"]["median_tokens_per_second"], 2)
    return results


def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-generator-") as tmp:
        sizes = {name: _compare(Path(tmp) / name, **shape) for name, shape in SIZES.items()}
    summary: dict[str, Any] = {}
    for name, r in sizes.items():
        summary |= {
            f"{name}_vllm_tokens_per_second": r["vllm"]["median_tokens_per_second"],
            f"{name}_transformers_tokens_per_second":
                r["transformers"]["median_tokens_per_second"],
            f"{name}_vllm_over_transformers": r["vllm_over_transformers"],
            f"{name}_vllm_reload_p50_ms": r["vllm"]["reload"]["p50_ms"],
            f"{name}_vllm_reload_p95_ms": r["vllm"]["reload"]["p95_ms"],
        }
    return {"batch": {"tasks": TASKS, "samples": SAMPLES, "max_tokens": MAX_TOKENS},
            "sizes": sizes, "summary": summary}
