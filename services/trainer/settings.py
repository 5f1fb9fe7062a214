"""Trainer settings."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from services.common.config import RuntimeSettings, ServiceSettings
from services.trainer.train import OptimSettings


class TrainerRuntimeSettings(RuntimeSettings):
    transaction_timeout_ms: int = Field(default=300_000, ge=1_000, le=900_000)


class RetentionSettings(BaseModel):
    """What the checkpoint store keeps. A 135M-parameter model writes about 0.5 GB of fp32
    weights and 1 GB of optimizer state per version; a long run would fill the disk."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="Off: keep every version whole.")
    keep_candidates: int = Field(default=3, ge=1, description="Newest versions kept whatever "
                                 "the gate decided. Promoted versions, the base and versions "
                                 "not yet decided are always kept.")


class RollbackSettings(BaseModel):
    """What the trainer does when the gate rejects its lineage as regressed."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="Off: keep building on rejected "
                          "versions (the gate still protects what generators serve).")
    after: int = Field(default=1, ge=1, description="Regressed candidates in the lineage "
                       "since its last promoted version, each also no better than that version "
                       "over the whole suite, that trigger a rollback (services/trainer/"
                       "lineage.py). 1 by measurement: see README, the gate and rollback.")
    lr_factor: float = Field(default=1.0, gt=0, le=1, description="Multiplies the learning "
                             "rate of the promoted version's optimizer state after a "
                             "rollback.")


class TrainerSettings(ServiceSettings):
    """E.g. ``FLYWHEEL_BASE_MODEL_PATH=models/tiny FLYWHEEL_QUOTAS='{"sft":64,"rl":32}'``."""

    service: str = "trainer"
    model_name: str = Field(default="policy", description="CheckpointEvent.model.")
    base_model_path: Path = Field(description="Hugging Face causal-LM folder to start from.")
    base_version: int = Field(default=0, ge=0, description="Version of base_model_path.")
    checkpoint_url: str = Field(default=".flywheel/checkpoints",
                                description="Checkpoint store: a folder or an fsspec URL.")
    quotas: dict[str, int] = Field(
        default_factory=lambda: {"sft": 64, "rl": 32, "cpt": 0},
        description="Samples per stage that make a round (the mix); 0 leaves a stage out of "
        "the trigger (its samples still train when present).")
    max_wait_seconds: float = Field(default=60.0, gt=0, description="A round runs this long "
                                    "after its first sample even if quotas are not met.")
    min_samples: int = Field(default=1, ge=1)
    max_round_seconds: float = Field(default=600.0, gt=0, description="Expected bound on a "
                                     "round: how long a stop waits for the ranks under "
                                     "torchrun. Not a limit: a round polls its consumer as it "
                                     "trains, so a longer one keeps its group.")
    optim: OptimSettings = Field(default_factory=OptimSettings)
    ranks: int = Field(default=1, ge=1, description="Processes (one per GPU) that train "
                       "each round: above 1, `flywheel run trainer` starts itself under "
                       "torchrun on this host. For several hosts, run torchrun yourself "
                       "(its world size is then the job's).")
    ranks_timeout_seconds: float = Field(
        default=3600.0, gt=0, description="How long a rank waits for the others in one step. "
        "The other ranks wait while rank 0 works alone: at start (reading checkpoints, "
        "fetching and loading a version), on a rollback, and writing each checkpoint.")
    strategy: Literal["ddp", "fsdp"] = Field(
        default="ddp", description="Under torchrun (several ranks): ddp replicates the model "
        "on every rank; fsdp (FSDP2) shards it, one transformer block at a time. Ignored in "
        "one process.")
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    rollback: RollbackSettings = Field(default_factory=RollbackSettings)
    runtime: TrainerRuntimeSettings = Field(default_factory=TrainerRuntimeSettings)
