"""The scorer's stage: every scorer over the batch, then the reward rule, per trajectory."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from schemas import ScoredTrajectory, Trajectory
from services.common.errors import ConfigError
from services.common.metrics import labelled
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
    input_type = Trajectory

    def __init__(self, config: ScoringConfig, output_topic: str,
                 scorers: Sequence[Scorer] | None = None) -> None:
        self.config = config
        self.output_topic = output_topic
        self.scorers = list(scorers) if scorers is not None else [build(c) for c in
                                                                   config.scorers]
        self.rule = config.reward
        self.rule_text = config.reward.text()
        self._digest = config.digest()

    def process(self, batch: Sequence[Trajectory]) -> list[Output]:
        per_scorer = [scorer.score(batch) for scorer in self.scorers]
        outputs = []
        for i, traj in enumerate(batch):
            scores = [s[i] for s in per_scorer if s[i] is not None]
            reward, verdict = self.rule.apply(scores)  # type: ignore[arg-type]
            scored = ScoredTrajectory(
                event_id=uuid.uuid5(NAMESPACE, f"{traj.event_id}:{self._digest}"),
                trajectory=traj, scores=scores, reward=reward, verdict=verdict,
                reward_rule=self.rule_text,
            )
            outputs.append(Output(self.output_topic, scored))
        for score_list in per_scorer:
            for score in score_list:
                if score is not None:
                    labelled(m.SCORES, score.scorer).observe(score.value)
        for out in outputs:
            value = out.value
            assert isinstance(value, ScoredTrajectory)
            task = value.trajectory.task
            level = m.difficulty_label(task.difficulty)
            labelled(m.REWARD, task.env, level).observe(value.reward)
            labelled(m.REWARD_POSITIVE, task.env, level).inc(max(0.0, value.reward))
            labelled(m.REWARD_NEGATIVE, task.env, level).inc(max(0.0, -value.reward))
            labelled(m.VERDICTS, value.verdict, task.env, level).inc()
        return outputs
