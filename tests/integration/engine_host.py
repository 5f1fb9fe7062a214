"""A vLLM engine for a test, in a process of its own and in-process there: as the generator
service runs it on a CPU build of vLLM (``vllm.in_process``).

In-process, vLLM takes over its host (it binds OpenMP threads, replaces
``torch.set_num_threads`` and starts a one-rank process group), so it cannot run inside the
pytest process; vLLM's own multiprocess engine spawns two processes that each import vLLM and
torch, about a minute on 2 cores. One spawned process is half that. Calls and answers cross the
pipe as JSON."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import traceback
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from schemas import SamplingParams
from services.models.engines import Completion

TIMEOUT = 900.0
"""Seconds an answer may take (the engine's start included) before the test fails."""


def _serve(conn: Connection, model: str, options: dict[str, Any]) -> None:
    from services.models.engines import VLLMEngine

    try:
        engine = VLLMEngine(Path(model), in_process=True, **options)
        conn.send_bytes(json.dumps({"ok": None}).encode())
        while True:
            call = json.loads(conn.recv_bytes())
            if call["op"] == "close":
                engine.close()
                conn.send_bytes(json.dumps({"ok": None}).encode())
                return
            if call["op"] == "reload":
                engine.reload(Path(call["folder"]))
                conn.send_bytes(json.dumps({"ok": None}).encode())
                continue
            out = engine.generate(call["prompts"], SamplingParams(**call["sampling"]),
                                  call["seeds"])
            conn.send_bytes(json.dumps({"ok": [dataclasses.asdict(c) for c in out]}).encode())
    except BaseException:
        conn.send_bytes(json.dumps({"error": traceback.format_exc()}).encode())


class EngineHost:
    """``VLLMEngine``'s interface (generate, reload, close, tokenizer) over a spawned process
    that holds the engine. The tokenizer is loaded here from the same folder, as vLLM loads
    its own (``get_tokenizer``), so prompts are rendered without a round trip."""

    name = "vllm"

    def __init__(self, model: Path, **options: Any) -> None:
        from transformers import AutoTokenizer

        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, str(model), options),
                                        daemon=True)
        self._process.start()
        child.close()
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self._answer()

    def _answer(self) -> Any:
        if not self._conn.poll(TIMEOUT):
            raise TimeoutError(f"the engine process did not answer in {TIMEOUT:.0f} s")
        try:
            answer = json.loads(self._conn.recv_bytes())
        except EOFError:
            raise RuntimeError(f"the engine process died (exit code "
                               f"{self._process.exitcode})") from None
        if "error" in answer:
            raise RuntimeError(f"in the engine process:\n{answer['error']}")
        return answer["ok"]

    def _call(self, **call: Any) -> Any:
        self._conn.send_bytes(json.dumps(call).encode())
        return self._answer()

    def generate(self, prompts: Sequence[list[int]], sampling: SamplingParams,
                 seeds: Sequence[int | None]) -> list[Completion]:
        out = self._call(op="generate", prompts=[list(p) for p in prompts],
                         sampling=sampling.model_dump(mode="json"), seeds=list(seeds))
        return [Completion(**c) for c in out]

    def reload(self, folder: Path) -> None:
        self._call(op="reload", folder=str(folder))

    def close(self) -> None:
        if self._process.is_alive():
            self._call(op="close")
        self._process.join(30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
