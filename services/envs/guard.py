"""What every writer of tasks or training data checks before it writes: is this task held out?

A task is held out when its id is a held-out task's id, or its prompt (a chat task's: its last
user message), normalized as duplicates are (:func:`services.common.text.normalize`), is a
held-out task's: the same question from an environment (``arithmetic:12+34``) and from a task
file (``name:...``) has ids of different forms. The held-out suite's guard is
:func:`services.envs.heldout.guard`; ``flywheel tasks split`` keeps its two files apart with
one too.
"""

from __future__ import annotations

from collections.abc import Iterable

from schemas import Task
from services.common.text import normalize


def question(task: Task) -> str:
    """What a task asks, normalized: a chat task's last user message (its ``prompt`` may be
    the first, or a rendering of the whole observation), else its prompt."""
    messages = (task.observation or {}).get("messages")
    if isinstance(messages, list):
        for m in reversed(messages):
            if isinstance(m, dict) and m.get("role") == "user" and isinstance(
                    m.get("content"), str):
                return normalize(m["content"])
    return normalize(task.prompt)


class Guard:
    def __init__(self, held: Iterable[Task]) -> None:
        tasks = list(held)
        self.ids = frozenset(t.task_id for t in tasks)
        self.prompts = frozenset(question(t) for t in tasks)

    def holds(self, task: Task) -> bool:
        return task.task_id in self.ids or question(task) in self.prompts

    def kept(self, tasks: Iterable[Task]) -> tuple[list[Task], int]:
        """The tasks that are not held out, and how many were."""
        given = list(tasks)
        out = [t for t in given if not self.holds(t)]
        return out, len(given) - len(out)


def distinct(tasks: list[Task]) -> tuple[list[Task], list[str]]:
    """``tasks`` without repeats (the same rule: by id or question), the first kept, and the
    repeats' ids."""
    ids: set[str] = set()
    questions: set[str] = set()
    out: list[Task] = []
    repeats: list[str] = []
    for t in tasks:
        asked = question(t)
        if t.task_id in ids or asked in questions:
            repeats.append(t.task_id)
            continue
        ids.add(t.task_id)
        questions.add(asked)
        out.append(t)
    return out, repeats
