"""The environment interface and the registry of environments by name."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from schemas import Task, Turn
from services.common.errors import ConfigError


@dataclass(frozen=True)
class StepResult:
    """What the environment answers to the policy's latest action."""

    done: bool
    reply: Turn | None = None
    """The next observation (a user or tool turn) when the episode goes on."""


@dataclass(frozen=True)
class Verification:
    """An environment's judgement of a finished episode."""

    passed: bool | None
    """True or False when the answer could be checked; None when there is nothing to check."""
    score: float
    details: dict[str, Any] = field(default_factory=dict)


class Environment(ABC):
    """A task family. Subclasses set ``name`` and implement the three methods below."""

    name: ClassVar[str]
    max_turns: ClassVar[int] = 1
    """Assistant turns an episode may take before it is cut off."""

    @abstractmethod
    def tasks(self, count: int, *, rng: random.Random, difficulty: float | None = None
              ) -> list[Task]:
        """``count`` new tasks; ``difficulty`` None means the environment's default mix."""

    def initial_turns(self, task: Task) -> list[Turn]:
        """The conversation the policy sees first."""
        return [Turn(role="user", content=task.prompt)]

    def step(self, task: Task, turns: Sequence[Turn]) -> StepResult:
        """The answer to the last (assistant) turn. Single-turn environments end at once."""
        return StepResult(done=True)

    @abstractmethod
    def verify(self, task: Task, turns: Sequence[Turn]) -> Verification:
        """Judge a finished episode. The scorer passes the hot path's Structs
        (:mod:`schemas.fast`): read the fields, which are the models', not pydantic's
        methods."""

    @property
    def levels(self) -> list[float]:
        """The difficulty levels a curriculum steps through, easiest first; empty when the
        environment has none (a profile then names them)."""
        return []

    def reference_answer(self, task: Task) -> str | None:
        """The answer written as a model should give it, for supervised training on labels
        (the benchmark's supervised bound); None when the task has no reference answer."""
        return task.verifier.answer if task.verifier is not None else None


_REGISTRY: dict[str, Callable[[], Environment]] = {}


def register(factory: Callable[[], Environment], name: str | None = None) -> None:
    """Make an environment available by name (``Task.env``)."""
    key = name or factory().name
    _REGISTRY[key] = factory


def get(name: str) -> Environment:
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise ConfigError(f"unknown environment {name!r}; known: {', '.join(names())}") from None


def names() -> list[str]:
    return sorted(_REGISTRY)


def last_assistant(turns: Sequence[Turn]) -> str:
    """The content of the last assistant turn, or '' if there is none."""
    for turn in reversed(turns):
        if turn.role == "assistant":
            return turn.content
    return ""
