"""The routing policy file: which accepted samples feed which training stage.

The default follows the UI-TARS-2 data flywheel: verified-correct samples go to SFT; clean
samples that failed or could not be verified go to continual pre-training rather than being
thrown away; groups whose rewards vary go to RL whole, as GRPO needs. A sample may go to
several stages.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas import Verdict


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SampleRoute(_Strict):
    """A per-sample stage (SFT, CPT)."""

    enabled: bool = True
    verdicts: list[Verdict]
    min_reward: float | None = None
    skip_flags: list[str] = Field(default_factory=list,
                                  description="Samples carrying any of these flags are skipped.")
    weight: float = Field(default=1.0, ge=0, description="Sample weight for the trainer.")
    max_share: float | None = Field(default=None, gt=0, le=1, description="Mix cap: at most "
                                    "this share of all routed samples (per partition).")


class RLRoute(_Strict):
    enabled: bool = True
    min_group_size: int = Field(default=2, ge=2)
    require_signal: bool = Field(default=True, description="Skip groups flagged "
                                 "'no_rl_signal' by the filter.")
    weight: float = Field(default=1.0, ge=0)
    max_share: float | None = Field(default=None, gt=0, le=1)
    timeout_seconds: float = Field(default=120.0, gt=0, description="A group still missing "
                                   "members this long after its first is handled per "
                                   "on_timeout.")
    remember_seconds: float = Field(default=86400.0, gt=0, description="A routed or timed-out "
                                    "group is remembered this long (event time): stragglers "
                                    "never open it again.")
    on_timeout: Literal["drop", "emit"] = Field(
        default="drop", description="drop: an incomplete group never reaches RL; emit: send "
        "what arrived if it still has min_group_size samples.")


class RoutingPolicy(_Strict):
    name: str = "default"
    sft: SampleRoute = Field(default_factory=lambda: SampleRoute(
        verdicts=["correct"], skip_flags=["duplicate_in_group"]))
    cpt: SampleRoute = Field(default_factory=lambda: SampleRoute(
        verdicts=["incorrect", "unverified"], skip_flags=["duplicate_in_group"]))
    rl: RLRoute = Field(default_factory=RLRoute)
    cap_warmup: int = Field(default=100, ge=0, description="Mix caps apply once a partition "
                            "has routed this many samples.")
