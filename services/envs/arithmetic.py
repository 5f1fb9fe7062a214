"""``arithmetic``: verifiable integer arithmetic; difficulty is the number of digits."""

from __future__ import annotations

import random
import re
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

    reverse = False
    """Numbers written least-significant digit first (operands and answer)."""

    width: int | None = None
    """Operands zero-padded to this many digits, answers to one more; none: no padding."""

    def __init__(self, operators: str = "+", min_digits: int = 1, max_digits: int = 3) -> None:
        unknown = set(operators) - set(OPERATORS)
        if unknown or not operators:
            raise ValueError(f"operators must be drawn from {''.join(OPERATORS)}")
        if not 1 <= min_digits <= max_digits:
            raise ValueError("need 1 <= min_digits <= max_digits")
        if self.reverse and set(operators) != {"+"}:
            raise ValueError("reversed numbers are defined for addition only")
        self.operators, self.min_digits, self.max_digits = operators, min_digits, max_digits

    @property
    def levels(self) -> list[float]:
        return [float(d) for d in range(self.min_digits, self.max_digits + 1)]

    def write(self, n: int, digits: int | None = None) -> str:
        """``n`` as the task writes it, zero-padded to ``digits`` first when given."""
        text = str(n).zfill(digits) if digits else str(n)
        return text[::-1] if self.reverse else text

    def operand(self, digits: int, rng: random.Random) -> int:
        """A number of exactly ``digits`` digits (0-9 for one digit)."""
        return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)

    def tasks(self, count: int, *, rng: random.Random, difficulty: float | None = None
              ) -> list[Task]:
        out = []
        for _ in range(count):
            digits = int(difficulty) if difficulty else rng.randint(self.min_digits,
                                                                    self.max_digits)
            a, b = self.operand(digits, rng), self.operand(digits, rng)
            out.append(self.task(a, rng.choice(self.operators), b))
        return out

    def task(self, a: int, op: str, b: int) -> Task:
        """The task ``a op b``; its difficulty is the longer operand's number of digits."""
        digits = max(len(str(a)), len(str(b)))
        if self.width is not None and digits > self.width:
            raise ValueError(f"{self.name} writes numbers of up to {self.width} digits, not "
                             f"{digits}")
        w = self.width
        expression = f"{self.write(a, w)}{op}{self.write(b, w)}"
        return Task(
            task_id=f"{self.name}:{expression}",  # the same question always has the same id
            env=self.name,
            prompt=f"{expression}=",
            verifier=VerifierSpec(kind="env", answer=self.write(OPERATORS[op](a, b),
                                                                w + 1 if w else None)),
            difficulty=digits,
            metadata={"digits": digits, "operator": op},
        )

    def verify(self, task: Task, turns: Sequence[Turn]) -> Verification:
        text = last_assistant(turns)
        want = task.verifier.answer if task.verifier and task.verifier.answer else None
        if self.reverse:  # leading zeros are digits here: compare the digit string
            match = _DIGITS.search(text)
            got: int | str | None = match.group() if match else None
            passed = got is not None and got == want
        else:
            got = first_integer(text)
            passed = got is not None and want is not None and got == int(want)
        return Verification(passed=passed, score=1.0 if passed else 0.0,
                            details={"extracted": got, "expected": want})


_DIGITS = re.compile(r"\d+")


class Addition(Arithmetic):
    """``addition``: sums with every number written least-significant digit first, the
    format in which small transformers learn addition and extend it digit by digit (Lee et
    al. 2025, "Self-Improving Transformers Overcome Easy-to-Hard and Length Generalization
    Challenges"). ``321+654=975`` is 123 + 456 = 579. The embedded profile's environment."""

    name = "addition"
    reverse = True


class PaddedAddition(Addition):
    """``addition_padded``: ``addition`` with every operand zero-padded to four digits and
    every answer to five, so sums of one to four digits all use the same positions
    (``321+854=`` becomes ``3210+8540=``, answer ``18500``). A model trained on sums of up to
    three digits has then seen every position a 4-digit sum uses, only never a digit other
    than 0 in the fourth: it samples some 4-digit sums right, which the flywheel can learn
    from. Unpadded, the tiny seed model sampled none right in 1,600 tries, so the
    ``four-levels`` profile uses this one."""

    name = "addition_padded"
    width = 4

    def __init__(self, operators: str = "+", min_digits: int = 1, max_digits: int = 4) -> None:
        if max_digits > self.width:
            raise ValueError(f"{self.name} has at most {self.width} digits")
        super().__init__(operators, min_digits, max_digits)
