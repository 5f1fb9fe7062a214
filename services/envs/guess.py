"""``guess``: a multi-turn game. Find a secret number with higher/lower feedback."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from schemas import Task, Turn, VerifierSpec
from services.envs.base import Environment, StepResult, Verification, last_assistant
from services.envs.verify import first_integer


class NumberGuess(Environment):
    """Difficulty is the number of bits of the range (1..2**bits). Binary search needs ``bits``
    guesses; the episode allows ``bits + 2`` before it is cut off."""

    name = "guess"
    max_turns = 20

    def tasks(self, count: int, *, rng: random.Random, difficulty: float | None = None
              ) -> list[Task]:
        out = []
        for _ in range(count):
            bits = int(difficulty) if difficulty else rng.randint(2, 6)
            top = 2**bits
            secret = rng.randint(1, top)
            out.append(Task(
                task_id=f"guess:{top}:{secret}",
                env=self.name,
                prompt=f"Guess my number from 1 to {top}. Reply with one number.",
                verifier=VerifierSpec(kind="env", answer=str(secret)),
                difficulty=bits,
                metadata={"top": top, "max_turns": min(self.max_turns, bits + 2)},
            ))
        return out

    def step(self, task: Task, turns: Sequence[Turn]) -> StepResult:
        secret = _secret(task)
        guess = first_integer(last_assistant(turns))
        used = sum(1 for t in turns if t.role == "assistant")
        if guess == secret or used >= _max_turns(task):
            return StepResult(done=True)
        if guess is None:
            hint = "Reply with one number."
        else:
            hint = "higher" if guess < secret else "lower"
        return StepResult(done=False, reply=Turn(role="user", content=hint))

    def verify(self, task: Task, turns: Sequence[Turn]) -> Verification:
        guesses = [first_integer(t.content) for t in turns if t.role == "assistant"]
        passed = bool(guesses) and guesses[-1] == _secret(task)
        # Fewer guesses is better; binary search (log2 of the range) earns the full score.
        optimal = max(1, math.ceil(math.log2(int(task.metadata.get("top", 2)))))
        score = min(1.0, optimal / len(guesses)) if passed else 0.0
        return Verification(passed=passed, score=score,
                            details={"guesses": guesses, "secret": _secret(task)})


def _secret(task: Task) -> int:
    assert task.verifier is not None and task.verifier.answer is not None
    return int(task.verifier.answer)


def _max_turns(task: Task) -> int:
    return int(task.metadata.get("max_turns", NumberGuess.max_turns))
