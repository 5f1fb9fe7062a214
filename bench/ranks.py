"""Training throughput on 1 and 2 ranks, for ``bench trainer``: the same model, samples and
micro-batches in one process and under ``torchrun`` with DDP and FSDP2 (gloo on the CPU).

``measure(model)`` runs each as its own job and returns samples per second (median of timed
rounds after a warm-up). On 2 ranks a round is the trainer service's (``services.trainer.
ranks``): rank 0 sends the samples, every rank trains its part, and the whole weights and
optimizer state are gathered on rank 0, as before each checkpoint. On a 2-core CPU two ranks
cannot be faster than one process using both cores; the figures show what the collectives and
the sharding cost.

Run under ``torchrun`` by ``measure``: ``python -m bench.ranks MODEL STRATEGY THREADS OUT``.
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def measure(model: Path) -> dict[str, Any]:
    """Samples per second of SFT rounds: one process with 2 threads and with 1, and 2 ranks
    of 1 thread each with DDP and with FSDP2."""
    jobs = {"one_process_2_threads": ("single", 2, 1), "one_process_1_thread": ("single", 1, 1),
            "ddp_2_ranks": ("ddp", 1, 2), "fsdp_2_ranks": ("fsdp", 1, 2)}
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-ranks-") as tmp:
        for name, (strategy, threads, ranks) in jobs.items():
            result = Path(tmp) / f"{name}.json"
            launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", "--standalone",
                                              f"--nproc-per-node={ranks}"]
            subprocess.run([sys.executable, *launcher, "-m", "bench.ranks", str(model),
                            strategy, str(threads), str(result)], check=True,
                           capture_output=True, timeout=1800, cwd=ROOT)
            out[name] = json.loads(result.read_text())["samples_per_second"]
    base = out["one_process_2_threads"]
    out["ratios_to_one_process"] = {k: round(v / base, 3) for k, v in out.items()
                                    if k != "one_process_2_threads"}
    return out


def main(model: str, strategy: str, threads: str, out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench import workload
    from services.trainer.parallel import Parallel
    from services.trainer.ranks import Leader, follow
    from services.trainer.train import OptimSettings, make_optimizer, train_round

    torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    s = OptimSettings(lr=1e-4, micro_batch=workload.MICRO_BATCH, dtype="float32")
    parallel = None if strategy == "single" else Parallel.launch(strategy)  # type: ignore[arg-type]
    if parallel is not None and not parallel.leader:  # as the trainer service's ranks
        raise SystemExit(follow(s, parallel))
    tokenizer = AutoTokenizer.from_pretrained(model)
    net = AutoModelForCausalLM.from_pretrained(model)
    # the same samples as bench trainer's
    samples = {"sft": workload.samples(tokenizer, None, "sft", random.Random(0))}
    pad = tokenizer.pad_token_id
    if parallel is None:
        optimizer = make_optimizer(net, s)

        def round_(seed: int) -> None:
            train_round(net, optimizer, samples, s, pad, seed=seed)
    else:  # the service's round: the samples sent, trained, weights and optimizer gathered
        leader = Leader(parallel, s)
        leader.load(net, None, False, 1.0)

        def round_(seed: int) -> None:
            leader.train(samples, pad, seed)
    round_(0)  # warm-up
    times = []
    for r in range(workload.ROUNDS):
        started = time.perf_counter()
        round_(r)
        times.append(time.perf_counter() - started)
    Path(out).write_text(json.dumps(
        {"samples_per_second": round(workload.SAMPLES / statistics.median(times), 1)}))
    if parallel is not None:
        leader.stop()


if __name__ == "__main__":
    main(*sys.argv[1:5])
