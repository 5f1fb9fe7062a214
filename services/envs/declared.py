"""Tasks that declare their own verifier (a ``VerifierSpec``): single-turn tasks from task
sets (``services.envs.tasksets``) and from JSONL task files, checked by what they declare.
The environment's name on the wire is ``reference``, as in every task published since the
first task sets: history keeps its meaning.
A task with chat messages (``observation.messages``) starts from them, system prompt and
few-shot turns included; otherwise from its prompt as the user's message."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from schemas import Task, Turn, VerifierSpec
from services.common.errors import ConfigError
from services.envs.base import Environment, Verification, last_assistant
from services.envs.verify import check


class Declared(Environment):
    name = "reference"

    def tasks(self, count: int, *, rng: random.Random, difficulty: float | None = None
              ) -> list[Task]:
        raise ConfigError("reference tasks come from task sets (the feeder's tasksets "
                          "setting) or a file (`flywheel tasks seed --file F`)")

    def initial_turns(self, task: Task) -> list[Turn]:
        messages = (task.observation or {}).get("messages")
        if messages:
            return [Turn(role=m["role"], content=m["content"]) for m in messages]
        return [Turn(role="user", content=task.prompt)]

    def reference_answer(self, task: Task) -> str | None:
        """None: a task file's label is a final answer (``3/4``), not an answer as the model
        gives one, with its working; trained to utter bare labels, a chat model got worse.
        The supervised bound uses the model's own verified answers instead."""
        return None

    def verify(self, task: Task, turns: Sequence[Turn]) -> Verification:
        if task.verifier is None:
            return Verification(passed=None, score=0.0, details={"reason": "no verifier"})
        if task.verifier.kind == "unit_tests":  # run in the scorer's sandbox, not here
            return Verification(passed=None, score=0.0, details={"reason": "unit tests"})
        passed, details = check(task.verifier, last_assistant(turns))
        return Verification(passed=passed, score=1.0 if passed else 0.0, details=details)


def load_task_file(path: Path) -> list[Task]:
    """Tasks from JSONL: one object per line with ``prompt`` and ``answer`` or ``verifier``;
    optional ``env`` (default ``reference``), ``task_id`` (default: a hash of env and prompt),
    ``difficulty``, ``metadata``. Blank lines are skipped; a bad line is an error naming it."""
    tasks = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read task file {path}: {exc}") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or "prompt" not in row:
                raise ValueError("each line must be an object with a 'prompt'")
            env = row.get("env", "reference")
            verifier = row.get("verifier")
            if verifier is None and "answer" in row:
                verifier = {"kind": "exact", "answer": str(row["answer"])}
            digest = hashlib.sha256(f"{env}\n{row['prompt']}".encode()).hexdigest()[:16]
            tasks.append(Task(
                task_id=str(row.get("task_id") or f"{env}:{digest}"),
                env=env,
                prompt=row["prompt"],
                verifier=VerifierSpec.model_validate(verifier) if verifier else None,
                difficulty=float(row.get("difficulty", 0)),
                metadata=row.get("metadata", {}),
            ))
        except (ValueError, ValidationError) as exc:
            raise ConfigError(f"{path}:{number}: {exc}") from exc
    return tasks
