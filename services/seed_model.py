"""``flywheel seed-model``: a seed model for a flywheel that has none.

A tiny Llama (``services.models.tiny``) is trained on the CPU for a fixed number of samples
(about a minute on a 2-core CPU) of easy seed data of an arithmetic environment: sums whose
operands have up to ``target_difficulty`` digits but are not both that long (plus
``target_share`` of full-length ones). It learns the format and the digit-by-digit rule, so its
pass rate at the target difficulty is low but not zero: enough for sampling and verification to
find correct answers there, which is what the flywheel then learns from. The budget is a sample
count, not a time, so the same settings give the same seed model on a fast machine and on a
busy one. It is written to the checkpoint store as version 0 (safetensors, manifest) and
published on ``checkpoints`` as ``promoted``, so the gate, the generators and the trainer all
start from it. ``flywheel up`` skips it when version 0 exists (and publishes it if the topic
does not have it yet).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas import CheckpointEvent, ProducerInfo, Task
from services import envs
from services.common.config import KafkaSettings
from services.common.errors import ConfigError
from services.common.signing import Signer
from services.envs.arithmetic import Arithmetic
from services.envs.guard import Guard

log = logging.getLogger(__name__)


class SeedModelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    env: str = Field(default="addition", description="An arithmetic environment.")
    target_difficulty: int = Field(default=3, ge=2, description="Digits the flywheel aims at.")
    samples: int = Field(default=150_000, ge=1, description="Training budget: seed samples "
                         "trained on (with repeats). A count, so the seed model does not depend "
                         "on the machine's speed; 150,000 take about a minute on 2 cores.")
    seed_examples: int = Field(default=4000, ge=100, description="Size of the seed data set.")
    target_share: float = Field(default=0.03, ge=0, le=1, description="Share of seed examples "
                                "at the target difficulty (both operands full length).")
    hidden: int = Field(default=128, ge=64)
    layers: int = Field(default=2, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    micro_batch: int = Field(default=64, ge=1)
    round_samples: int = Field(default=512, ge=1)
    seed: int = 0
    threads: int = Field(default=2, ge=1, description="torch threads while training.")

    @model_validator(mode="before")
    @classmethod
    def _no_time_budget(cls, data: Any) -> Any:
        if isinstance(data, dict) and "seconds" in data:
            raise ValueError("seed_model.seconds is gone: the budget is seed_model.samples "
                             "(150,000 take about a minute on 2 cores), so the seed model "
                             "does not depend on the machine's speed")
        return data


def seed_tasks(s: SeedModelSettings, held_out: Guard | None = None) -> list[Task]:
    """The seed data set: fixed by ``s.seed``, without what ``held_out`` holds (the gate's
    suite, by id and by prompt: the seed model must not have learned the answers it is
    measured on)."""
    env = envs.get(s.env)
    if not isinstance(env, Arithmetic):
        raise ConfigError(f"the seed model trains on an arithmetic environment, not {s.env!r}; "
                          "give the profile a model folder instead")
    rng = random.Random(s.seed)
    top = s.target_difficulty
    out: list[Task] = []
    while len(out) < s.seed_examples:
        la, lb = rng.randint(1, top), rng.randint(1, top)
        if la == lb == top and rng.random() >= s.target_share:
            continue
        task = env.task(env.operand(la, rng), rng.choice(env.operators), env.operand(lb, rng))
        if held_out is None or not held_out.holds(task):
            out.append(task)
    return out


def sft_samples(tokenizer: Any, tasks: list[Task]) -> list[Any]:
    """Prompt as the generator renders it, target the verified answer and EOS."""
    from services.models.engines import render
    from services.trainer.objectives import Sample

    out = []
    for t in tasks:
        prompt = render(tokenizer, envs.get(t.env).initial_turns(t))
        assert t.verifier is not None and t.verifier.answer is not None
        answer = list(tokenizer(t.verifier.answer, add_special_tokens=False)["input_ids"])
        out.append(Sample(prompt, [*answer, tokenizer.eos_token_id], 1.0))
    return out


def train_on_seed(model: Any, tokenizer: Any, pad: int, s: SeedModelSettings, *,
                  samples: int | None = None, optimizer: Any = None,
                  lr: float | None = None, held_out: Guard | None = None
                  ) -> tuple[int, float]:
    """SFT on the seed data for ``samples`` samples (default ``s.samples``); returns the
    samples trained and the seconds taken. Used by the bootstrap and by the one-shot
    baseline of ``bench flywheel``."""
    from services.trainer.train import OptimSettings, make_optimizer, train_round

    data = sft_samples(tokenizer, seed_tasks(s, held_out))
    # float32 on every machine: the seed model is the same on every CPU family.
    optim = OptimSettings(lr=lr or s.lr, micro_batch=s.micro_batch, dtype="float32")
    optimizer = optimizer or make_optimizer(model, optim)
    rng = random.Random(s.seed + 1)
    budget = s.samples if samples is None else samples
    done, rounds, started = 0, 0, time.perf_counter()
    while done < budget:
        n = min(s.round_samples, budget - done)
        train_round(model, optimizer, {"sft": rng.choices(data, k=n)}, optim, pad,
                    seed=rounds)
        done, rounds = done + n, rounds + 1
    return done, time.perf_counter() - started


def make_seed_model(s: SeedModelSettings, store_url: str, model_name: str,
                    evaluate: Callable[[Path], dict[str, float]] | None = None,
                    held_out: Guard | None = None
                    ) -> tuple[str, list[Any], dict[str, float]]:
    """Train the seed model and write it as version 0; returns its URI, manifest, metrics.
    ``evaluate`` (the gate's held-out evaluation) adds the held-out metrics; what
    ``held_out`` holds (the held-out suite's guard) never appears in the seed data."""
    import tempfile

    import torch

    from services.models.engines import TransformersEngine
    from services.models.tiny import tiny_model
    from services.trainer.store import CheckpointStore

    store = CheckpointStore(store_url)
    if 0 in store.versions():
        raise FileExistsError(f"{store.uri(0)} exists already")
    torch.set_num_threads(s.threads)
    with tempfile.TemporaryDirectory(prefix="flywheel-seed-model-") as tmp:
        folder = tiny_model(Path(tmp) / "init", seed=s.seed, hidden=s.hidden, layers=s.layers)
        engine = TransformersEngine(folder)
        samples, seconds = train_on_seed(engine.model, engine.tokenizer, engine.pad, s,
                                         held_out=held_out)
        log.info("seed model: %d seed samples trained in %.1f s", samples, seconds)
        metrics = {"seed_model_samples": float(samples), "seed_model_seconds": seconds}
        record = {"seed_model": s.model_dump(mode="json"), "metrics": metrics}
        uri, manifest = store.write(0, engine.model, engine.tokenizer, None, record)
    if evaluate is not None:
        metrics.update(evaluate(Path(uri)))
    return uri, manifest, metrics


def publish_promoted(kafka: KafkaSettings, topic: str, model_name: str, uri: str,
                     manifest: list[Any], metrics: dict[str, float],
                     signer: Signer) -> CheckpointEvent:
    """Announce version 0 as promoted: the gate's reference, the generators' weights. Signed
    with the gate's key (``signer``), as only the gate's decisions are trusted."""
    from confluent_kafka import Producer

    event = CheckpointEvent(model=model_name, version=0, uri=uri, manifest=manifest,
                            status="promoted", metrics=metrics, reason="seed model",
                            producer=ProducerInfo(service="seed-model", instance="seed-model"))
    event = signer.sign(event)
    producer = Producer({**kafka.client_config(), "enable.idempotence": True})
    errors: list[str] = []
    producer.produce(topic, key=event.partition_key().encode(),
                     value=event.model_dump_json().encode(),
                     on_delivery=lambda err, _msg: errors.append(str(err)) if err else None)
    if producer.flush(30) or errors:
        raise ConnectionError(f"could not publish the seed model: {errors or 'timed out'}")
    return event
