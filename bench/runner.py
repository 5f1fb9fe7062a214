"""Benchmark runner: ``python -m bench NAME [--out DIR]`` or ``flywheel bench NAME``.

A benchmark is a module ``bench/<name>.py`` with ``run() -> dict``; the runner adds the machine
and the code version and writes ``<out>/<name>.json``. Names with dots are not allowed, so the
module name is the benchmark name.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.common.logs import setup_logging

BENCHMARKS = ("runtime", "generator", "quality", "trainer", "flywheel", "replay", "state",
              "rollback", "precision", "restart")
"""Registered benchmarks; later issues add theirs."""


def environment() -> dict[str, Any]:
    from importlib.metadata import version

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    from services.models.precision import detect

    cpu = detect("cpu")
    return {
        "commit": commit,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": cpu.name,
        "cpu_flags": list(cpu.flags),
        "native_bfloat16": cpu.native_bfloat16,
        "cpus": os.cpu_count(),
        "confluent_kafka": version("confluent-kafka"),
        "pydantic": version("pydantic"),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench")
    parser.add_argument("name", choices=[*BENCHMARKS, "list"])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("FLYWHEEL_BENCH_OUT",
                                                                        "results")),
                        help="Folder for NAME.json and any figure [default: "
                        "FLYWHEEL_BENCH_OUT, else results]")
    parser.add_argument("--profile", type=Path, default=None,
                        help="flywheel only: a profile file instead of the embedded one")
    args = parser.parse_args(argv)
    if args.profile is not None and args.name != "flywheel":
        parser.error("--profile is for the flywheel benchmark")
    if args.name == "list":
        print("\n".join(BENCHMARKS))
        return 0
    setup_logging("INFO")
    module = importlib.import_module(f"bench.{args.name}")
    started = time.time()
    os.environ["FLYWHEEL_BENCH_OUT"] = str(args.out)  # figures go beside the JSON
    figures = module.run(args.profile) if args.profile is not None else module.run()
    result = {
        "benchmark": args.name,
        "finished_at": datetime.now(UTC).isoformat(),
        "seconds": round(time.time() - started, 1),
        "environment": environment(),
        **figures,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = args.name if args.profile is None else f"{args.name}-{figures['profile']}"
    path = args.out / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(figures.get("summary", figures), indent=2))
    print(f"wrote {path}")
    return 0
