"""Task sets: a user's own tasks, read from JSONL or Parquet, cycled forever.

A :class:`TaskSetSpec` names a file, how its fields map onto a :class:`~schemas.Task` (id,
prompt or chat messages, answer, unit tests, difficulty, metadata) and how answers are checked
(one verifier for the whole set). ``load`` reads and validates every row up front, so a bad
file is refused before anything is published, with the file and the line (or row) named.

:class:`Cycle` walks a loaded set in shuffled epochs: epoch ``e`` is the permutation drawn
from ``(seed, set name, e)``, so the order is reproducible and a restarted feeder resumes at
the position it had reached (the feeder reads that position back from the ``tasks`` topic,
where every task it published carries ``metadata.source``).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from schemas import Task, VerifierSpec
from services.common.errors import ConfigError
from services.envs.guard import Guard
from services.envs.verify import RULES

VerifierKind = Literal["exact", "numeric", "regex", "math", "unit_tests", "none"]
ROLES = ("system", "user", "assistant", "tool")
SOURCE = "source"
"""Key of ``Task.metadata`` under which the feeder records where a task came from."""


class FieldMap(BaseModel):
    """Which column (JSONL key, Parquet column) holds each part of a task. ``None``: absent."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(default="id", description="Task id column; missing or None: a "
                           "hash of the prompt (the same question always gets the same id).")
    prompt: str | None = Field(default="prompt", description="The user's question.")
    messages: str | None = Field(default=None, description="Chat messages instead of a "
                                 "prompt: a list of {role, content}.")
    answer: str | None = Field(default="answer", description="Reference answer.")
    tests: str | None = Field(default=None, description="Unit tests (Python source).")
    difficulty: str | None = Field(default=None, description="A number >= 0.")
    metadata: list[str] = Field(default_factory=list, description="Columns copied into "
                                "Task.metadata as they are.")


class TaskSetSpec(BaseModel):
    """One task file and how to read and check it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$",
                      description="Short name: ids, metrics, the feeder's resume position.")
    path: Path
    format: Literal["auto", "jsonl", "parquet"] = Field(
        default="auto", description="auto: by the file's suffix (.jsonl/.json, .parquet).")
    fields: FieldMap = Field(default_factory=FieldMap)
    verifier: VerifierKind = Field(default="math", description="How answers are checked; "
                                   "'none': a reward model scores them.")
    verifier_params: dict[str, Any] = Field(default_factory=dict, description="Kind-specific: "
                                            "extract rules, tolerance, pattern, ...")
    env: str = Field(default="reference", description="Environment that runs the episodes.")
    weight: float = Field(default=1.0, gt=0, description="Share of draws, relative to the "
                          "other sets.")

    @model_validator(mode="after")
    def _consistent(self) -> TaskSetSpec:
        f = self.fields
        if (f.prompt is None) == (f.messages is None):
            raise ValueError(f"task set {self.name}: map exactly one of fields.prompt and "
                             "fields.messages")
        if self.verifier == "unit_tests" and f.tests is None:
            raise ValueError(f"task set {self.name}: a unit_tests verifier needs fields.tests")
        if self.verifier in ("exact", "numeric", "math") and f.answer is None:
            raise ValueError(f"task set {self.name}: a {self.verifier} verifier needs "
                             "fields.answer")
        extract = self.verifier_params.get("extract")
        if extract is not None:
            rules = [extract] if isinstance(extract, str) else extract
            if not isinstance(rules, list) or any(r not in RULES for r in rules):
                raise ValueError(f"task set {self.name}: verifier_params.extract must list "
                                 f"rules from {RULES}")
        return self

    @property
    def file_format(self) -> str:
        if self.format != "auto":
            return self.format
        suffix = self.path.suffix.lower()
        if suffix in (".jsonl", ".json", ".ndjson"):
            return "jsonl"
        if suffix in (".parquet", ".pq"):
            return "parquet"
        raise ConfigError(f"task set {self.name}: cannot tell the format of {self.path} from "
                          "its suffix; set format: jsonl or parquet")


def rows(spec: TaskSetSpec) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` for each row of the file; ``where`` names file and line or row."""
    path = spec.path
    if spec.file_format == "jsonl":
        try:
            handle = path.open(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read task file {path}: {exc}") from exc
        with handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{path}:{number}: not JSON: {exc.msg}") from exc
                if not isinstance(row, dict):
                    raise ConfigError(f"{path}:{number}: a line must be a JSON object")
                yield f"{path}:{number}", row
        return
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
        raise ConfigError(f"cannot read task file {path}: {exc}") from exc
    for number, row in enumerate(table.to_pylist()):
        yield f"{path}: row {number}", row


def to_task(spec: TaskSetSpec, row: dict[str, Any]) -> Task:
    """The task in ``row``; ValueError naming the field when it does not fit ``spec``."""
    f = spec.fields

    def need(column: str) -> Any:
        if column not in row or row[column] is None:
            raise ValueError(f"missing field {column!r}")
        return row[column]

    observation = None
    if f.messages is not None:
        messages = need(f.messages)
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and m.get("role") in ROLES
                and isinstance(m.get("content"), str) for m in messages):
            raise ValueError(f"field {f.messages!r} must be a list of {{role, content}}, "
                             f"roles among {ROLES}")
        if messages[-1]["role"] != "user":
            raise ValueError(f"field {f.messages!r} must end with a user message")
        observation = {"messages": [{"role": m["role"], "content": m["content"]}
                                    for m in messages]}
        prompt = messages[-1]["content"]
    else:
        prompt = need(str(f.prompt))
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"field {f.prompt!r} must be a non-empty string")
    answer = None
    if f.answer is not None and spec.verifier != "none":
        raw = need(f.answer)
        answer = raw if isinstance(raw, str) else json.dumps(raw)
    verifier = None
    if spec.verifier == "unit_tests":
        tests = need(str(f.tests))
        if not isinstance(tests, str) or not tests.strip():
            raise ValueError(f"field {f.tests!r} must be Python source")
        verifier = VerifierSpec(kind="unit_tests", answer=answer,
                                params={**spec.verifier_params, "tests": tests})
    elif spec.verifier != "none":
        verifier = VerifierSpec(kind=spec.verifier, answer=answer, params=spec.verifier_params)
    if spec.verifier == "numeric" and answer is not None:
        try:
            float(answer)
        except ValueError:
            raise ValueError(f"answer {answer!r} is not a number (numeric verifier)") from None
    difficulty = 0.0
    if f.difficulty is not None and row.get(f.difficulty) is not None:
        try:
            difficulty = float(row[f.difficulty])
        except (TypeError, ValueError):
            raise ValueError(f"field {f.difficulty!r} must be a number") from None
        if difficulty < 0:
            raise ValueError(f"field {f.difficulty!r} must be >= 0")
    task_id = row.get(f.id) if f.id is not None else None
    if task_id is None:
        content = json.dumps(observation) if observation else prompt
        task_id = hashlib.sha256(content.encode()).hexdigest()[:16]
    metadata = {column: row[column] for column in f.metadata if column in row}
    return Task(task_id=f"{spec.name}:{task_id}", env=spec.env, prompt=prompt,
                observation=observation, verifier=verifier, difficulty=difficulty,
                metadata=json.loads(json.dumps(metadata, default=str)))


def load(spec: TaskSetSpec) -> list[Task]:
    """Every task of the set, validated; ConfigError naming the file and line of the first
    bad row, or of a repeated task id."""
    tasks: list[Task] = []
    seen: dict[str, str] = {}
    for where, row in rows(spec):
        try:
            task = to_task(spec, row)
        except (ValueError, ValidationError) as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        if task.task_id in seen:
            raise ConfigError(f"{where}: task id {task.task_id!r} repeats {seen[task.task_id]}")
        seen[task.task_id] = where
        tasks.append(task)
    if not tasks:
        raise ConfigError(f"task set {spec.name}: {spec.path} holds no tasks")
    return tasks


class Cycle:
    """A task set's tasks in seeded, shuffled epochs, forever, from a given position."""

    def __init__(self, name: str, tasks: Sequence[Task], seed: int,
                 epoch: int = 0, position: int = 0) -> None:
        self.name, self.tasks, self.seed = name, list(tasks), seed
        self.epoch, self.position = epoch, position
        self._order = self._permutation(epoch)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.tasks)))
        random.Random(f"{self.seed}:{self.name}:{epoch}").shuffle(order)
        return order

    def next(self) -> tuple[Task, dict[str, Any]]:
        """The next task, and where it sits (``{"taskset", "epoch", "position"}``)."""
        if self.position >= len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        where = {"taskset": self.name, "epoch": self.epoch, "position": self.position}
        task = self.tasks[self._order[self.position]]
        self.position += 1
        return task, where


def split(spec: TaskSetSpec, held_out: int, seed: int
          ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The file's rows as ``(train, held_out)``: a seeded random ``held_out`` rows, and the
    rest minus any whose id or prompt repeats a held-out one's (so they are disjoint both
    ways the feeder checks)."""
    pairs = []
    for where, row in rows(spec):
        try:
            pairs.append((row, to_task(spec, row)))
        except (ValueError, ValidationError) as exc:
            raise ConfigError(f"{where}: {exc}") from exc
    if not 0 < held_out < len(pairs):
        raise ConfigError(f"--held-out must be between 1 and {len(pairs) - 1}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    chosen = set(order[:held_out])
    held = Guard(pairs[i][1] for i in chosen)
    test = [pairs[i][0] for i in sorted(chosen)]
    train = [row for i, (row, task) in enumerate(pairs) if i not in chosen
             and not held.holds(task)]
    return train, test


def write_rows(path: Path, rows_: Sequence[dict[str, Any]], file_format: str) -> None:
    """``rows_`` to ``path`` as JSONL or Parquet."""
    if file_format == "jsonl":
        with path.open("w", encoding="utf-8") as out:
            for row in rows_:
                out.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(list(rows_)), path)
