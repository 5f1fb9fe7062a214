"""``flywheel run filter``: scored -> filtered | rejected, exactly once, with state."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from services.common.checkpoints import CheckpointFollower, LatestPromoted
from services.common.config import ServiceSettings
from services.common.policy import load_policy
from services.common.service import serve
from services.common.signing import Verifier
from services.filter.policy import FilterPolicy
from services.filter.stage import FilterStage, state_store


class FilterSettings(ServiceSettings):
    """Filter settings, e.g. ``FLYWHEEL_POLICY_FILE=deploy/policies/filter.yaml``."""

    service: str = "filter"
    policy_file: Path | None = Field(default=None, description="Filter policy (YAML); the "
                                     "embedded default without it.")


def build_stage(settings: FilterSettings, latest: LatestPromoted | None = None) -> FilterStage:
    policy, digest = load_policy(FilterPolicy, settings.policy_file)
    return FilterStage(
        policy, digest, accepted_topic=settings.topic("filtered"),
        rejected_topic=settings.topic("rejected"),
        state=state_store(settings.topic("filter.state"), settings),
        latest_version=(latest or LatestPromoted()).get,
    )


def run(settings: FilterSettings, *, input_topic: str | None = None,
        checkpoints_topic: str | None = None) -> int:
    """Serve the filter; a replay reads ``input_topic`` and ``checkpoints_topic`` of the live
    deployment while writing under its own prefix."""
    latest = LatestPromoted()
    stage = build_stage(settings, latest)
    follower = None
    if stage.policy.max_staleness is not None:
        follower = CheckpointFollower(
            settings.kafka, checkpoints_topic or settings.topic("checkpoints"), latest,
            verifier=Verifier.load(settings.decisions.public_key))
        follower.catch_up()
        follower.start()
    try:
        return serve(settings, stage, [input_topic or settings.topic("scored")])
    finally:
        if follower is not None:
            follower.stop()
