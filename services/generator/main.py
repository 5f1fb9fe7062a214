"""``flywheel run generator``: settings, engine, catch-up on checkpoints, then serve."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from schemas import SamplingParams
from services.common.checkpoints import CheckpointFollower
from services.common.config import RuntimeSettings, ServiceSettings
from services.common.logs import setup_logging
from services.common.service import serve
from services.common.signing import Verifier
from services.generator.metrics import RELOAD_REFUSALS
from services.generator.reload import Reloader
from services.generator.stage import GeneratorStage
from services.models import precision
from services.models.engines import (
    Engine,
    HFDtype,
    TransformersEngine,
    VLLMDtype,
    VLLMEngine,
)
from services.models.episodes import ModelVersion
from services.models.fetch import CheckpointSource, CheckpointSourceSettings

log = logging.getLogger(__name__)


class SamplingSettings(BaseModel):
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=-1, ge=-1)
    max_tokens: int = Field(default=32, ge=1)


class VLLMSettings(BaseModel):
    dtype: VLLMDtype = Field(default="auto", description="auto: on a CPU, bfloat16 where it "
                             "runs natively and float32 elsewhere; on a GPU, vLLM's own choice "
                             "(the model's dtype, float16 where bfloat16 is not supported).")
    max_model_len: int | None = Field(default=None, ge=16)
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0, le=1, description="On CPU: the fraction of host memory."
    )
    kv_cache_gib: int = Field(default=1, ge=1, description="VLLM_CPU_KVCACHE_SPACE on CPU.")
    in_process: bool | None = Field(
        default=None, description="vLLM's engine inside the generator's process rather than "
        "in two of its own (see VLLMEngine). None: in-process on a CPU build of vLLM, where it "
        "starts about a minute sooner on 2 cores at the same throughput; vLLM's own "
        "multiprocess engine on GPUs, where it overlaps scheduling with the model.")


class TransformersSettings(BaseModel):
    dtype: HFDtype = Field(default="auto", description="The weights' dtype. auto: bfloat16 "
                           "where the CPU runs it natively (AVX-512 BF16, AMX; twice float32's "
                           "speed), float32 elsewhere (bfloat16 is emulated there, many times "
                           "slower).")


class GeneratorRuntimeSettings(RuntimeSettings):
    """The generator's runtime defaults, kept when only some FLYWHEEL_RUNTIME__ are set.

    At-least-once: DESIGN has the generator's producer idempotent and repeats dropped by id
    downstream (trajectory ids are deterministic). Batches are tasks, each worth n episodes.
    """

    delivery: Literal["exactly_once", "at_least_once"] = "at_least_once"
    batch_max_records: int = Field(default=64, ge=1, le=100_000)


class GeneratorSettings(ServiceSettings):
    service: str = "generator"
    model_path: Path = Field(description="Hugging Face causal-LM folder served at start.")
    model_name: str = Field(default="policy", description="CheckpointEvent.model to follow.")
    base_version: int = Field(default=0, ge=0, description="Version of model_path.")
    checkpoint_root: Path = Field(
        default=Path(".flywheel/checkpoints"),
        description="Checkpoints are loaded only from inside this folder.",
    )
    checkpoint_source: CheckpointSourceSettings = Field(
        default_factory=CheckpointSourceSettings, description="A host that does not mount "
        "the store fetches versions from its URL into a local cache.")
    backend: Literal["vllm", "transformers"] = "vllm"
    samples_per_task: int = Field(default=4, ge=1, description="Group size n; RL needs n > 1.")
    max_turns: int = Field(default=8, ge=1)
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)
    vllm: VLLMSettings = Field(default_factory=VLLMSettings)
    transformers: TransformersSettings = Field(default_factory=TransformersSettings)
    runtime: GeneratorRuntimeSettings = Field(default_factory=GeneratorRuntimeSettings)


def build_engine(settings: GeneratorSettings) -> tuple[Engine, object]:
    if settings.backend == "vllm":
        from vllm.platforms import current_platform

        v = settings.vllm
        in_process = v.in_process
        if in_process is None:
            in_process = current_platform.is_cpu()
        dtype = v.dtype
        if current_platform.is_cpu() and (dtype == "auto" or dtype == "bfloat16"):
            # auto chosen by the CPU; a set bfloat16 kept, with a warning where it is emulated
            dtype = precision.choose(dtype, "cpu", role="generator's weights (vLLM)").dtype
        engine = VLLMEngine(settings.model_path, dtype=dtype, max_model_len=v.max_model_len,
                            gpu_memory_utilization=v.gpu_memory_utilization,
                            kv_cache_gib=v.kv_cache_gib, in_process=in_process)
        precision.export(engine.dtype)
        log.info("vLLM engine %s, weights in %s",
                 "in this process" if in_process else "in processes of its own", engine.dtype)
        return engine, engine.tokenizer
    choice = precision.choose(settings.transformers.dtype, "cpu", role="generator's weights")
    precision.export(choice.dtype)
    hf = TransformersEngine(settings.model_path, dtype=choice.dtype)
    return hf, hf.tokenizer


def run(settings: GeneratorSettings) -> int:
    setup_logging(settings.log_level)
    log.info("config: %s", json.dumps(settings.redacted(), sort_keys=True))
    engine, tokenizer = build_engine(settings)
    reloader = Reloader(engine, settings.checkpoint_root,
                        ModelVersion(settings.model_name, settings.base_version),
                        settings.model_path,
                        CheckpointSource(settings.checkpoint_root, settings.checkpoint_source,
                         settings.instance_id))
    follower = CheckpointFollower(
        settings.kafka, settings.topic("checkpoints"), reloader,
        verifier=Verifier.load(settings.decisions.public_key),
        on_invalid=lambda reason: RELOAD_REFUSALS.labels(reason).inc())
    follower.catch_up()  # a generator that starts late serves the latest promoted version
    reloader.apply_pending()
    follower.start()
    s = settings.sampling
    stage = GeneratorStage(
        engine, tokenizer, reloader, settings.topic("raw"), samples=settings.samples_per_task,
        sampling=SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                max_tokens=s.max_tokens),
        max_turns=settings.max_turns,
    )
    try:
        return serve(settings, stage, [settings.topic("tasks")])
    finally:
        follower.stop()
        engine.close()
