"""Environments: where tasks come from, how an episode unfolds, how an answer is checked.

Shared by the generator (episodes), the scorer (verifiers) and the gate (held-out evaluation).
Environments are stateless: every decision is derived from the task and the turns so far, so an
episode is deterministic, replayable, and many can be interleaved in one engine batch.
"""

from services.envs.base import Environment, StepResult, Verification, get, names, register

__all__ = ["Environment", "StepResult", "Verification", "get", "names", "register"]

# The built-in environments.
from services.envs.arithmetic import Addition, Arithmetic, PaddedAddition
from services.envs.declared import Declared
from services.envs.guess import NumberGuess
from services.envs.words import WordProblems

register(Arithmetic)
register(Addition)
register(PaddedAddition)
register(NumberGuess)
register(Declared)
register(WordProblems)
