"""``bench trainer``: training throughput by stage on CPU, and checkpoint write + announce.

For two model sizes (the tiny embedded model and a 4-layer one), 256 arithmetic samples per
stage go through ``train_round`` (micro-batches of 32, AdamW): samples and target tokens per
second for SFT, CPT and RL (GRPO, with behaviour log-probs from the model itself). Baseline in
the same run: the plain Hugging Face way to do SFT on the same samples (``model(input_ids,
labels=...)`` with prompt tokens masked, AdamW), so ``sft_ratio_to_hf`` shows what the
trainer's own loss code costs. Then the checkpoint path: ``CheckpointStore.write`` (HF folder,
optimizer state, manifest hashes, rename) and the announce (a candidate event and offsets in
one Kafka transaction on a local broker), 3 times each; medians. Last, SFT on the small model
across ranks (``bench.ranks``): one process, and 2 ranks under ``torchrun`` with DDP and FSDP2.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench import workload
from bench.runtime import broker

SIZES = {"tiny": {"hidden": 128, "layers": 2}, "small": {"hidden": 256, "layers": 4}}


def _hf_sft(model: Any, samples: list[Any], pad: int) -> float:
    """Seconds for one pass of plain HF SFT (labels with the prompt masked)."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    started = time.perf_counter()
    for i in range(0, len(samples), workload.MICRO_BATCH):
        chunk = samples[i:i + workload.MICRO_BATCH]
        width = max(len(s.prompt) + len(s.target) for s in chunk)
        ids = torch.full((len(chunk), width), pad)
        labels = torch.full((len(chunk), width), -100)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, s in enumerate(chunk):
            seq = s.prompt + s.target
            ids[r, :len(seq)] = torch.tensor(seq)
            labels[r, len(s.prompt):len(seq)] = torch.tensor(s.target)
            mask[r, :len(seq)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return time.perf_counter() - started


def _size(name: str, dims: dict[str, int], folder: Path, bootstrap: str) -> dict[str, Any]:
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from schemas import CheckpointEvent
    from services.models.tiny import tiny_model
    from services.trainer.store import CheckpointStore
    from services.trainer.train import OptimSettings, make_optimizer, train_round

    base = tiny_model(folder / name, hidden=dims["hidden"], layers=dims["layers"])
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    params = sum(p.numel() for p in model.parameters())
    s = OptimSettings(lr=1e-4, micro_batch=workload.MICRO_BATCH, dtype="float32")
    optimizer = make_optimizer(model, s)
    rng = random.Random(0)
    pad = tokenizer.pad_token_id
    result: dict[str, Any] = {"parameters": params}
    for stage in ("sft", "cpt", "rl"):
        samples = workload.samples(tokenizer, model, stage, rng)
        tokens = sum(len(x.target) for x in samples)
        train_round(model, optimizer, {stage: samples}, s, pad)  # warm-up
        times = []
        for r in range(workload.ROUNDS):
            started = time.perf_counter()
            train_round(model, optimizer, {stage: samples}, s, pad, seed=r)
            times.append(time.perf_counter() - started)
        med = statistics.median(times)
        result[stage] = {"samples_per_second": round(len(samples) / med, 1),
                         "tokens_per_second": round(tokens / med, 1)}
    sft = workload.samples(tokenizer, model, "sft", rng)
    _hf_sft(model, sft, pad)
    hf = statistics.median(_hf_sft(model, sft, pad) for _ in range(workload.ROUNDS))
    result["hf_sft_samples_per_second"] = round(len(sft) / hf, 1)
    result["sft_ratio_to_hf"] = round(result["sft"]["samples_per_second"] / (len(sft) / hf), 3)

    store = CheckpointStore(str(folder / f"{name}-store"))
    topic = f"bench-trainer-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.create_topics([NewTopic(topic, 1, 1)]).values():
        fut.result()
    producer = Producer({"bootstrap.servers": bootstrap,
                         "transactional.id": f"bench-{uuid.uuid4().hex[:8]}"})
    producer.init_transactions(30)
    writes, announces, sizes = [], [], []
    for v in range(1, workload.ROUNDS + 1):
        started = time.perf_counter()
        uri, manifest = store.write(v, model, tokenizer, optimizer)
        writes.append(time.perf_counter() - started)
        sizes.append(sum(f.size_bytes for f in manifest))
        event = CheckpointEvent(model=name, version=v, uri=uri, manifest=manifest,
                                status="candidate")
        started = time.perf_counter()
        producer.begin_transaction()
        producer.produce(topic, event.to_bytes(), name)
        producer.commit_transaction(30)
        announces.append(time.perf_counter() - started)
    for fut in admin.delete_topics([topic]).values():
        fut.result()
    result["checkpoint_bytes"] = sizes[-1]
    result["checkpoint_write_seconds"] = round(statistics.median(writes), 3)
    result["announce_seconds"] = round(statistics.median(announces), 4)
    return result


def run() -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    from bench.ranks import measure

    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        with broker() as bootstrap:
            sizes = {name: _size(name, dims, Path(tmp), bootstrap)
                     for name, dims in SIZES.items()}
        ranks = measure(Path(tmp) / "small")  # the broker stopped: it would take a core
    return {
        "samples_per_stage": workload.SAMPLES, "rounds": workload.ROUNDS,
        "micro_batch": workload.MICRO_BATCH,
        "threads": torch.get_num_threads(), "sizes": sizes, "ranks_small_sft": ranks,
        "summary": {f"{n}_{k}": (v[k]["samples_per_second"] if isinstance(v.get(k), dict)
                                 else v[k])
                    for n, v in sizes.items()
                    for k in ("sft", "cpt", "rl", "sft_ratio_to_hf",
                              "checkpoint_write_seconds", "announce_seconds")}
        | {f"small_sft_{k}_ratio": v for k, v in ranks["ratios_to_one_process"].items()},
    }
