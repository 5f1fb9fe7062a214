"""``arithmetic``: verifiable integer arithmetic; difficulty is the number of digits."""

from __future__ import annotations

import random
from collections.abc import Sequence

from schemas import Task, Turn, VerifierSpec
from services.envs.base import Environment, Verification, last_assistant
from services.envs.verify import first_integer

OPERATORS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


class Arithmetic(Environment):
    """``a<op>b=``; the answer is the first integer in the completion, checked exactly.

    The prompt is terse on purpose: small models learn it from a few examples, and the same
    format serves character-level tokenizers and real ones.
    """

    name = "arithmetic"

    def __init__(self, operators: str = "+", min_digits: int = 1, max_digits: int = 3) -> None:
        unknown = set(operators) - set(OPERATORS)
        if unknown or not operators:
            raise ValueError(f"operators must be drawn from {''.join(OPERATORS)}")
        if not 1 <= min_digits <= max_digits:
            raise ValueError("need 1 <= min_digits <= max_digits")
        self.operators, self.min_digits, self.max_digits = operators, min_digits, max_digits

    def tasks(self, count: int, *, rng: random.Random, difficulty: float | None = None
              ) -> list[Task]:
        out = []
        for _ in range(count):
            digits = int(difficulty) if difficulty else rng.randint(self.min_digits,
                                                                    self.max_digits)
            low = 10 ** (digits - 1) if digits > 1 else 0
            a, b = rng.randint(low, 10**digits - 1), rng.randint(low, 10**digits - 1)
            op = rng.choice(self.operators)
            out.append(self.task(a, op, b))
        return out

    def task(self, a: int, op: str, b: int) -> Task:
        expression = f"{a}{op}{b}"
        digits = max(len(str(a)), len(str(b)))
        return Task(
            task_id=f"arithmetic:{expression}",  # the same question always has the same id
            env=self.name,
            prompt=f"{expression}=",
            verifier=VerifierSpec(kind="env", answer=str(OPERATORS[op](a, b))),
            difficulty=digits,
            metadata={"digits": digits, "operator": op},
        )

    def verify(self, task: Task, turns: Sequence[Turn]) -> Verification:
        got = first_integer(last_assistant(turns))
        want = int(task.verifier.answer) if task.verifier and task.verifier.answer else None
        passed = got is not None and got == want
        return Verification(passed=passed, score=1.0 if passed else 0.0,
                            details={"extracted": got, "expected": want})
