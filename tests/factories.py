"""Small, valid example messages for tests: one builder per message type."""

from __future__ import annotations

import uuid

from schemas import (
    CheckpointEvent,
    FileDigest,
    FilterDecision,
    OffsetRange,
    ProducerInfo,
    RoutedSample,
    SamplingParams,
    Score,
    ScoredTrajectory,
    Task,
    Trajectory,
    Turn,
    VerifierSpec,
)

PRODUCER = ProducerInfo(service="test", instance="test-0")


def task(i: int = 0, *, pad: int = 0) -> Task:
    """An arithmetic task; ``pad`` grows the prompt to make records of a chosen size."""
    a, b = 17 + i, 25 + 2 * i
    return Task(
        task_id=f"arith-{i}",
        env="arithmetic",
        prompt=f"What is {a} + {b}?" + (" " * pad),
        verifier=VerifierSpec(kind="exact", answer=str(a + b)),
        difficulty=2,
        metadata={"digits": 2},
        producer=PRODUCER,
    )


def trajectory(i: int = 0, *, group_size: int = 2, sample_index: int = 0) -> Trajectory:
    t = task(i)
    return Trajectory(
        task=t,
        group_id=f"g-{i}",
        sample_index=sample_index,
        group_size=group_size,
        turns=[Turn(role="user", content=t.prompt),
               Turn(role="assistant", content="42", token_ids=[52, 50], logprobs=[-0.1, -0.2])],
        completion="42",
        prompt_token_ids=[1, 2, 3],
        completion_token_ids=[52, 50],
        completion_logprobs=[-0.1, -0.2],
        finish_reason="stop",
        policy_version=3,
        model="tiny",
        sampling=SamplingParams(temperature=0.8, n=group_size, max_tokens=16),
        producer=PRODUCER,
    )


def scored(i: int = 0) -> ScoredTrajectory:
    return ScoredTrajectory(
        trajectory=trajectory(i),
        scores=[Score(scorer="verifier", version="1", value=1.0, passed=True)],
        reward=1.0,
        verdict="correct",
        reward_rule="verifier",
        producer=PRODUCER,
    )


def decision(i: int = 0) -> FilterDecision:
    return FilterDecision(
        scored=scored(i), accepted=True, policy_name="default", policy_hash="ab" * 32,
        producer=PRODUCER,
    )


def routed(i: int = 0) -> RoutedSample:
    d = decision(i)
    return RoutedSample(
        stage="sft", group_id=d.scored.trajectory.group_id, samples=[d.scored],
        decision_ids=[d.event_id], reason="verified_correct", policy_name="default",
        policy_hash="cd" * 32, producer=PRODUCER,
    )


def checkpoint(version: int = 1) -> CheckpointEvent:
    return CheckpointEvent(
        model="tiny",
        version=version,
        parent_version=version - 1 if version else None,
        uri=f"/checkpoints/tiny/v{version}",
        manifest=[FileDigest(path="model.safetensors", sha256="ef" * 32, size_bytes=1024)],
        status="candidate",
        trained_on=[OffsetRange(topic="flywheel.accepted.sft", partition=0, start=0, end=64)],
        metrics={"loss": 1.25},
        step=100,
        stage_mix={"sft": 64},
        producer=PRODUCER,
    )


EXAMPLES = {
    "Task": task,
    "Trajectory": trajectory,
    "ScoredTrajectory": scored,
    "FilterDecision": decision,
    "RoutedSample": routed,
    "CheckpointEvent": checkpoint,
}


def new_id() -> str:
    return uuid.uuid4().hex[:12]
