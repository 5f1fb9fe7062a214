"""Every message on a flywheel topic.

| topic                    | message            | key         |
| ------------------------ | ------------------ | ----------- |
| tasks                    | Task               | task_id     |
| raw                      | Trajectory         | task_id     |
| scored                   | ScoredTrajectory   | task_id     |
| filtered, rejected       | FilterDecision     | task_id     |
| accepted.cpt / .sft / .rl| RoutedSample       | group_id    |
| checkpoints              | CheckpointEvent    | model       |

Keys put every sample ever drawn for one task in one partition from ``raw`` to ``filtered``:
a group (the samples drawn for a task at one time) never has to be assembled across
partitions, and the filter's duplicate memory of a task is complete on whichever instance owns
its partition. Checkpoint events of one model stay in order. ``dlq`` carries the original
record bytes with error headers, not a message type.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from schemas.envelope import Message, WireModel

Role = Literal["system", "user", "assistant", "tool"]
Verdict = Literal["correct", "incorrect", "unverified"]
TrainingStage = Literal["cpt", "sft", "rl"]
Finite = Annotated[float, Field(allow_inf_nan=False)]
"""A float JSON can carry. A NaN or an infinity would be written as null, which no reader
takes: refused where it is read first."""
CheckpointStatus = Literal["candidate", "promoted", "rejected"]
Rejection = Literal["regressed", "not_better", "invalid", "superseded"]


# The checks across fields, written once: the models call them, and so do the hot path's
# types (schemas/fast.py), with the token lists they keep as JSON decoded. Each raises
# ValueError.


def check_tokens(ids: list[int] | None, ids_name: str, lps: list[float] | None,
                 lps_name: str) -> None:
    if ids is not None and lps is not None and len(ids) != len(lps):
        raise ValueError(f"{ids_name} ({len(ids)}) and {lps_name} ({len(lps)}) must have the "
                         "same length")


def check_turn(turn: Any) -> None:
    check_tokens(turn.token_ids, "token_ids", turn.logprobs, "logprobs")


def check_sample_index(index: int, size: int) -> None:
    if index >= size:
        raise ValueError(f"sample_index {index} >= group_size {size}")


def check_trajectory(traj: Any) -> None:
    check_sample_index(traj.sample_index, traj.group_size)
    check_tokens(traj.completion_token_ids, "completion_token_ids", traj.completion_logprobs,
                 "completion_logprobs")


def check_decision(decision: Any) -> None:
    if not decision.accepted and not decision.reasons:
        raise ValueError("a rejected decision must list at least one reason")


class VerifierSpec(WireModel):
    """How to check an answer: the environment's own check, or a declared one."""

    kind: str = Field(
        description="'env' (the environment decides), 'exact', 'numeric', 'regex', "
        "'json_schema', 'unit_tests', or a registered custom kind."
    )
    answer: str | None = Field(default=None, description="Reference answer, if there is one.")
    params: dict[str, Any] = Field(
        default_factory=dict, description="Kind-specific settings (tolerance, pattern, tests)."
    )


class Task(Message):
    """One unit of work for a generator: an environment and where the episode starts."""

    task_id: str = Field(description="Stable identity of the task content (not of this record).")
    env: str = Field(description="Registered environment name, e.g. 'arithmetic'.")
    prompt: str = Field(description="The first user message, or a rendering of the observation.")
    observation: dict[str, Any] | None = Field(
        default=None, description="Structured initial observation for environments that use one."
    )
    verifier: VerifierSpec | None = Field(default=None)
    difficulty: Finite = Field(default=0.0, ge=0, description="Environment-defined difficulty.")
    metadata: dict[str, Any] = Field(default_factory=dict)

    def partition_key(self) -> str:
        return self.task_id


class Turn(WireModel):
    """One message of an episode. Assistant turns carry the sampler's tokens and log-probs."""

    role: Role
    content: str
    token_ids: list[int] | None = Field(default=None, description="Tokens the policy sampled.")
    logprobs: list[Finite] | None = Field(
        default=None, description="Sampler log-prob of each token in token_ids."
    )

    @model_validator(mode="after")
    def _aligned(self) -> Turn:
        check_turn(self)
        return self


class SamplingParams(WireModel):
    """The sampling parameters a trajectory was drawn with."""

    temperature: Finite = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=-1, ge=-1, description="-1 disables top-k.")
    max_tokens: int = Field(default=256, ge=1)
    n: int = Field(default=1, ge=1, description="Samples drawn per task (the group size).")
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)


class Timings(WireModel):
    """Where an episode's time went, in seconds."""

    started_at: datetime | None = None
    finished_at: datetime | None = None
    queue_seconds: Finite | None = Field(default=None, ge=0, description="Task created to taken.")
    generation_seconds: Finite = Field(default=0.0, ge=0, description="Time inside the engine.")
    env_seconds: Finite = Field(default=0.0, ge=0, description="Time inside the environment.")


class Trajectory(Message):
    """One sampled episode on one task. Its ``event_id`` is the trajectory id."""

    task: Task
    group_id: str = Field(description="Shared by the samples drawn for one task at one time.")
    sample_index: int = Field(ge=0, description="Position of this sample in its group.")
    group_size: int = Field(ge=1)
    turns: list[Turn] = Field(description="The whole episode, prompt turns included.")
    completion: str = Field(description="The final assistant output, the one that is scored.")
    prompt_token_ids: list[int] | None = None
    completion_token_ids: list[int] | None = None
    completion_logprobs: list[Finite] | None = Field(
        default=None, description="Behaviour-policy log-probs, for off-policy correction in RL."
    )
    finish_reason: str | None = Field(default=None, description="'stop', 'length', ...")
    policy_version: int = Field(ge=0, description="Promoted checkpoint version that sampled it.")
    model: str = Field(description="Model name, as in CheckpointEvent.model.")
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    timings: Timings = Field(default_factory=Timings)

    @model_validator(mode="after")
    def _consistent(self) -> Trajectory:
        check_trajectory(self)
        return self

    def partition_key(self) -> str:
        return self.task.task_id


class Score(WireModel):
    """One scorer's opinion of a trajectory."""

    scorer: str = Field(description="Scorer name, e.g. 'verifier', 'reward_model', 'length'.")
    version: str = Field(description="Scorer version: code version, model hash or config hash.")
    value: float = Field(allow_inf_nan=False, description="Finite: JSON has no NaN.")
    passed: bool | None = Field(default=None, description="For checks with a yes/no outcome.")
    details: dict[str, Any] = Field(default_factory=dict)


class ScoredTrajectory(Message):
    """A trajectory with every score, the scalar reward and the verdict derived from them."""

    trajectory: Trajectory
    scores: list[Score]
    reward: float = Field(allow_inf_nan=False, description="Finite: JSON has no NaN.")
    verdict: Verdict
    reward_rule: str = Field(description="The declared rule that combined scores into reward.")

    def partition_key(self) -> str:
        return self.trajectory.task.task_id


class FilterDecision(Message):
    """The filter's accept or reject, with every reason and the policy that decided."""

    scored: ScoredTrajectory
    accepted: bool
    reasons: list[str] = Field(
        default_factory=list, description="Reason codes; a rejection has at least one."
    )
    flags: list[str] = Field(
        default_factory=list,
        description="Annotations that do not reject, e.g. 'no_rl_signal' for all-equal groups.",
    )
    policy_name: str
    policy_hash: str = Field(description="sha256 of the policy file content (and of the "
                             "version of the code it depends on, such as the MinHash).")
    group_accepted: int | None = Field(
        default=None, ge=0,
        description="How many samples of this group the filter accepted; the router's RL "
        "group assembly waits for that many.",
    )
    latest_version: int | None = Field(
        default=None, ge=0, description="Latest promoted version known to the filter when it "
        "decided: the reference for staleness.",
    )

    @model_validator(mode="after")
    def _rejection_has_reason(self) -> FilterDecision:
        check_decision(self)
        return self

    def partition_key(self) -> str:
        return self.scored.trajectory.task.task_id


class RoutedSample(Message):
    """Training data for one stage. RL samples carry their whole group, as GRPO needs it."""

    stage: TrainingStage
    group_id: str
    samples: list[ScoredTrajectory] = Field(min_length=1)
    decision_ids: list[uuid.UUID] = Field(
        default_factory=list, description="FilterDecision event ids this sample came from."
    )
    weight: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    reason: str = Field(description="Why the router sent it to this stage.")
    policy_name: str
    policy_hash: str
    filter_policy_hash: str | None = Field(
        default=None, description="policy_hash of the filter decisions it came from.")
    replay: str | None = Field(
        default=None, description="Name of the replay that published it into the live topics "
        "(`flywheel replay --into-live`); none for the live router's own.")

    def partition_key(self) -> str:
        return self.group_id


class FileDigest(WireModel):
    """One file of a checkpoint, relative to the checkpoint folder."""

    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=0)


class OffsetRange(WireModel):
    """Records ``[start, end)`` of one topic partition."""

    topic: str
    partition: int = Field(ge=0)
    start: int = Field(ge=0, description="First offset, inclusive.")
    end: int = Field(ge=0, description="Last offset, exclusive.")

    @model_validator(mode="after")
    def _ordered(self) -> OffsetRange:
        if self.end < self.start:
            raise ValueError(f"offset range end {self.end} < start {self.start}")
        return self


class DecisionSignature(WireModel):
    """The gate's Ed25519 signature on a decision (see ``services.common.signing``)."""

    key_id: str = Field(description="First 16 hex digits of the SHA-256 of the raw public "
                        "key.")
    ed25519: str = Field(description="Base64 signature of the decision's statement.")


class CheckpointEvent(Message):
    """A checkpoint's life: written as candidate, then promoted or rejected by the gate."""

    model: str = Field(description="Model name; all of one model's events share a partition.")
    version: int = Field(ge=0, description="Monotonically increasing per model.")
    parent_version: int | None = Field(default=None, ge=0)
    uri: str = Field(description="Folder of the checkpoint: a path or an fsspec URL.")
    manifest: list[FileDigest]
    status: CheckpointStatus
    trained_on: list[OffsetRange] = Field(
        default_factory=list, description="Exact input records this checkpoint was trained on."
    )
    metrics: dict[str, float] = Field(default_factory=dict)
    step: int | None = Field(default=None, ge=0)
    stage_mix: dict[str, int] = Field(
        default_factory=dict, description="Samples trained per stage in the producing round."
    )
    reason: str | None = Field(default=None, description="Why the gate decided as it did.")
    rejection: Rejection | None = Field(
        default=None, description="Kind of a rejection: 'regressed' (a held-out set fell "
        "beyond tolerance; the trainer rolls back), 'not_better' (no regression, no "
        "improvement beyond noise: the trainer builds on it), 'invalid' (refused or failed "
        "to load or run), 'superseded' (not evaluated: a newer candidate of the model came "
        "in the same batch, the gate being behind; the trainer builds on it). None on a "
        "rejection written before the kinds: read as regressed.")
    provenance: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="Where the round's samples came from, as counts: "
        "'env', 'router_policy', 'filter_policy', 'scorer' (name@version), 'replay' (samples "
        "a replay published into the live topics).")
    signature: DecisionSignature | None = Field(
        default=None, description="The gate's signature on a promotion or rejection; readers "
        "drop a decision without a valid one. None on a candidate.")

    def partition_key(self) -> str:
        return self.model


MESSAGE_TYPES: dict[str, type[Message]] = {
    m.message_type: m
    for m in (Task, Trajectory, ScoredTrajectory, FilterDecision, RoutedSample, CheckpointEvent)
}
"""Every top-level message type by name."""
