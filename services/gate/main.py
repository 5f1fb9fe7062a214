"""``flywheel run gate``."""

from __future__ import annotations

import threading
from pathlib import Path

from pydantic import Field, model_validator

from services.common.config import RuntimeSettings, ServiceSettings
from services.common.service import serve
from services.common.signing import Signer, Verifier
from services.common.state import StateStore
from services.envs.heldout import Suite, suite
from services.gate.evaluate import evaluate_suite
from services.gate.stage import GateStage
from services.models import precision
from services.models.engines import HFDtype
from services.models.fetch import CheckpointSource, CheckpointSourceSettings


class GateRuntimeSettings(RuntimeSettings):
    # Evaluating a candidate may take minutes on a real model: of the candidates waiting in a
    # batch, only the newest of each model is evaluated (the others are superseded). 1: each
    # candidate is evaluated, in a transaction of its own.
    batch_max_records: int = Field(default=64, ge=1, le=100_000)
    transaction_timeout_ms: int = Field(default=900_000, ge=1_000, le=900_000)
    max_poll_interval_ms: int = Field(default=1_800_000, ge=10_000)


class GateSettings(ServiceSettings):
    service: str = "gate"
    model_name: str = Field(default="policy")
    base_model_path: Path = Field(description="The base model: the reference before any "
                                  "promotion.")
    base_version: int = Field(default=0, ge=0)
    checkpoint_root: Path = Field(default=Path(".flywheel/checkpoints"),
                                  description="Candidates are loaded only from inside it.")
    checkpoint_source: CheckpointSourceSettings = Field(
        default_factory=CheckpointSourceSettings, description="A host that does not mount "
        "the store fetches versions from its URL into a local cache.")
    held_out: Suite = Field(default_factory=lambda: suite(None), description="The held-out "
                            "suite: one set, or a list of named sets (per environment, "
                            "difficulty or task file).")
    headline: str | None = Field(default=None, description="The set reported as plain "
                                 "`pass_rate`/`mean_score`; none: the first.")
    tracked: list[str] = Field(default_factory=lambda: ["pass_rate"], min_length=1,
                               description="Metrics no set may regress on.")
    tolerance: float = Field(default=0.02, ge=0, description="Allowed drop per metric and "
                             "set below the best a promoted version reached (a set's own "
                             "`tolerance` overrides it).")
    alpha: float = Field(default=0.05, gt=0, le=1, description="Improvement beyond noise: the "
                         "one-sided paired sign test's level, Bonferroni-split over the sets "
                         "and the pooled suite.")
    dtype: HFDtype = Field(default="auto", description="The evaluation engine's weights. "
                           "auto: bfloat16 where the CPU runs it natively (twice float32's "
                           "speed with AVX-512 BF16), float32 elsewhere. Every version, the "
                           "base included, is evaluated alike.")
    runtime: GateRuntimeSettings = Field(default_factory=GateRuntimeSettings)

    @model_validator(mode="after")
    def _headline_is_a_set(self) -> GateSettings:
        names = [s.name for s in self.held_out]
        if self.headline is not None and self.headline not in names:
            raise ValueError(f"headline {self.headline!r} is not a held-out set: {names}")
        return self


def build_stage(settings: GateSettings) -> GateStage:
    sets = settings.held_out
    tasks = [s.tasks() for s in sets]
    dtype = precision.choose(settings.dtype, "cpu", role="gate's evaluations").dtype
    precision.export(dtype)
    stopping = threading.Event()  # set by the stage's interrupt(): a stop cuts evaluations
    return GateStage(
        state=StateStore(settings.topic("gate.state")), output_topic=settings.topic("checkpoints"),
        root=settings.checkpoint_root,
        source=CheckpointSource(settings.checkpoint_root, settings.checkpoint_source,
                         settings.instance_id),
        evaluate=lambda folder: evaluate_suite(folder, sets, tasks, dtype=dtype,
                                               interrupt=stopping),
        interrupted=stopping,
        digests={s.name: s.digest(t) for s, t in zip(sets, tasks, strict=True)},
        base={settings.model_name: (settings.base_version, settings.base_model_path)},
        signer=Signer.load(settings.decisions.signing_key),
        verifier=Verifier.load(settings.decisions.public_key),
        sets=sets, headline=settings.headline, tracked=settings.tracked,
        tolerance=settings.tolerance, alpha=settings.alpha, service=settings.service)


def run(settings: GateSettings) -> int:
    return serve(settings, build_stage(settings), [settings.topic("checkpoints")])
