"""``flywheel run scorer``: raw -> scored, exactly once."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from services.common.config import ServiceSettings
from services.common.service import serve
from services.scorer.stage import ScorerStage, ScoringConfig


class ScorerSettings(ServiceSettings):
    """Scorer settings, e.g. ``FLYWHEEL_CONFIG_FILE=deploy/policies/scorer.yaml``."""

    service: str = "scorer"
    config_file: Path | None = Field(
        default=None, description="Scorer config (YAML); the embedded default without it.")


def run(settings: ScorerSettings, *, input_topic: str | None = None) -> int:
    config = ScoringConfig.load(settings.config_file)
    stage = ScorerStage(config, settings.topic("scored"))
    return serve(settings, stage, [input_topic or settings.topic("raw")])
