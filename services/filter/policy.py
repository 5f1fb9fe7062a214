"""The filter policy file: what is accepted, and why not."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas import Verdict
from services.filter.dedup import MINHASH


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LengthRule(_Strict):
    unit: Literal["tokens", "chars"] = Field(
        default="tokens", description="Sampled completion tokens (chars when a trajectory has "
        "no token ids), or characters.")
    min: int = Field(default=1, ge=0, description="Below: rejected as 'too_short'.")
    max: int | None = Field(default=None, ge=1, description="Above: rejected as 'too_long'.")


class RepetitionRule(_Strict):
    ngram: int = Field(default=3, ge=1)
    max_ratio: float = Field(default=0.5, ge=0, le=1,
                             description="Above: rejected as 'repetitive'.")


class DedupRule(_Strict):
    """Duplicates of samples accepted earlier for the same task (see docs/architecture.md)."""

    exact: bool = Field(default=True, description="Same normalized completion: 'duplicate'.")
    near: bool = Field(default=True, description="MinHash Jaccard >= threshold: "
                                                 "'near_duplicate'.")
    threshold: float = Field(default=0.9, gt=0, le=1)
    num_perm: int = Field(default=64, ge=16, le=512)
    shingle: int = Field(default=5, ge=1, description="Character shingle length.")
    memory_per_task: int = Field(default=64, ge=1, description="Accepted samples remembered "
                                 "per task; the oldest are forgotten first.")
    horizon_seconds: float | None = Field(
        default=None, gt=0, description="A sample is a duplicate only of samples of its task "
        "accepted less than this long before it (event time: the samples' `created_at`); "
        "none: of any remembered sample. With a horizon a task keeps being learned from, one "
        "copy per horizon at most, so a model that can forget it keeps rehearsing it.")


class GroupRule(_Strict):
    timeout_seconds: float = Field(default=120.0, gt=0, description="A group still incomplete "
                                   "this long after its first sample is decided as it is.")
    min_reward_spread: float = Field(default=1e-6, ge=0, description="Accepted rewards of a "
                                     "group within this spread carry no RL signal.")
    remember_seconds: float = Field(default=86400.0, gt=0, description="A decided group is "
                                    "remembered this long (event time): a late member is "
                                    "decided alone instead of opening the group again.")


class FilterPolicy(_Strict):
    IMPLEMENTATION: ClassVar[str] = MINHASH
    """The code a decision also depends on: the MinHash (part of the policy's hash)."""

    name: str = "default"
    min_reward: float | None = Field(default=None, description="Below: 'low_reward'.")
    verdicts: list[Verdict] = Field(
        default=["correct", "incorrect", "unverified"],
        description="Verdicts allowed through; others: 'verdict'.")
    length: LengthRule = Field(default_factory=LengthRule)
    repetition: RepetitionRule | None = Field(default_factory=RepetitionRule)
    reject_truncated: bool = Field(default=False, description="finish_reason 'length': "
                                   "'truncated'.")
    max_staleness: int | None = Field(
        default=None, ge=0, description="Versions behind the latest promoted one; more: "
        "'stale'. None: no limit.")
    dedup: DedupRule = Field(default_factory=DedupRule)
    groups: GroupRule = Field(default_factory=GroupRule)

    @model_validator(mode="after")
    def _lengths(self) -> FilterPolicy:
        if self.length.max is not None and self.length.max < self.length.min:
            raise ValueError("length.max must be >= length.min")
        return self
