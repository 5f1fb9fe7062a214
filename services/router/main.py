"""``flywheel run router``: filtered -> accepted.cpt / .sft / .rl, exactly once, with state."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from services.common.config import ServiceSettings
from services.common.policy import load_policy
from services.common.service import serve
from services.router.policy import RoutingPolicy
from services.router.stage import RouterStage, state_store


class RouterSettings(ServiceSettings):
    """Router settings, e.g. ``FLYWHEEL_POLICY_FILE=deploy/policies/router.yaml``."""

    service: str = "router"
    policy_file: Path | None = Field(default=None, description="Routing policy (YAML); the "
                                     "embedded default without it.")


def build_stage(settings: RouterSettings) -> RouterStage:
    policy, digest = load_policy(RoutingPolicy, settings.policy_file)
    topics = {s: settings.topic(f"accepted.{s}") for s in ("cpt", "sft", "rl")}
    return RouterStage(policy, digest, topics=topics,
                       state=state_store(settings.topic("router.state"), settings))


def run(settings: RouterSettings, *, input_topic: str | None = None) -> int:
    return serve(settings, build_stage(settings), [input_topic or settings.topic("filtered")])
