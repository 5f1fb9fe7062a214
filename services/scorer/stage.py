"""The scorer's stage: every scorer over the batch, then the reward rule, per trajectory.

It reads trajectories as the hot path's Structs (:class:`~schemas.fast.TrajectoryRecord`) and
writes each scored trajectory once, embedding the trajectory's bytes as they came
(:class:`~schemas.fast.ScoredTrajectoryOut`). A score or reward that is not finite (a reward
model's NaN) fails the batch with a clear error, as the model's validation did: JSON has no
NaN, and a null where a number belongs is read by no one."""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from collections.abc import Sequence
from pathlib import Path

import yaml
from msgspec import Raw
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from schemas.fast import ScoredTrajectoryOut, TrajectoryRecord, uuid5
from services.common.errors import ConfigError
from services.common.metrics import Tally
from services.common.stage import Output
from services.scorer import metrics as m
from services.scorer.scorers import (
    LengthConfig,
    RepetitionConfig,
    RewardRule,
    Scorer,
    ScorerConfig,
    VerifierConfig,
    build,
)

NAMESPACE = uuid.UUID("6f0c3f5e-7a51-4a36-9a0e-2b1f3d9c8e41")
"""uuid5 namespace of scored-trajectory ids: the same trajectory under the same config always
gets the same id, so a replay or a retried transaction is recognisable downstream."""


def _default_scorers() -> list[ScorerConfig]:
    """The embedded default: verifiable tasks and heuristics. The code verifier is opt-in (it
    needs root to isolate solutions; see CodeConfig.require_isolation)."""
    return [VerifierConfig(), LengthConfig(unit="tokens"), RepetitionConfig()]


class ScoringConfig(BaseModel):
    """The scorer config file (YAML): which scorers, and the reward rule."""

    model_config = ConfigDict(extra="forbid")

    scorers: list[ScorerConfig] = Field(default_factory=_default_scorers, min_length=1)
    reward: RewardRule = Field(default_factory=RewardRule)

    @model_validator(mode="after")
    def _unique_names(self) -> ScoringConfig:
        names = [s.name for s in self.scorers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"scorer names must be unique; repeated: {dupes}")
        return self

    def digest(self) -> str:
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    @classmethod
    def load(cls, path: Path | None) -> ScoringConfig:
        if path is None:
            return cls()
        try:
            return cls.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
        except (OSError, yaml.YAMLError, ValidationError) as exc:
            raise ConfigError(f"scorer config {path}: {exc}") from exc


class ScorerStage:
    input_type = TrajectoryRecord

    def __init__(self, config: ScoringConfig, output_topic: str,
                 scorers: Sequence[Scorer] | None = None) -> None:
        self.config = config
        self.output_topic = output_topic
        self.scorers = list(scorers) if scorers is not None else [build(c) for c in
                                                                   config.scorers]
        self.rule = config.reward
        self.rule_text = config.reward.text()
        self._digest = config.digest()
        self._tally = Tally()

    def process(self, batch: Sequence[TrajectoryRecord]) -> list[Output]:
        with self._tally.batch():
            return self._process(batch)

    def _process(self, batch: Sequence[TrajectoryRecord]) -> list[Output]:
        per_scorer = [scorer.score(batch) for scorer in self.scorers]
        outputs = []
        tally = self._tally
        for i, traj in enumerate(batch):
            scores = [score for s in per_scorer if (score := s[i]) is not None]
            reward, verdict = self.rule.apply(scores)
            for value, what in [*((s.value, f"scorer {s.scorer!r}") for s in scores),
                                (reward, "the reward rule")]:
                if not math.isfinite(value):
                    raise ValueError(f"{what} gave {value} for trajectory {traj.event_id}: "
                                     "scores and rewards must be finite numbers")
            task = traj.task
            scored = ScoredTrajectoryOut(
                event_id=uuid5(NAMESPACE, f"{traj.event_id}:{self._digest}"),
                trajectory=Raw(traj.raw), scores=scores, reward=reward, verdict=verdict,
                reward_rule=self.rule_text)
            outputs.append(Output(self.output_topic, scored, key=task.task_id))
            for score in scores:
                tally.observe(m.SCORES, score.scorer, value=score.value)
            level = m.difficulty_label(task.difficulty)
            tally.observe(m.REWARD, task.env, level, value=reward)
            tally.inc(m.REWARD_POSITIVE, task.env, level, amount=max(0.0, reward))
            tally.inc(m.REWARD_NEGATIVE, task.env, level, amount=max(0.0, -reward))
            tally.inc(m.VERDICTS, verdict, task.env, level)
        return outputs
