"""Topics as code: load ``deploy/topics.yaml``, make the cluster match it, and describe it.

``apply`` is convergent and additive: it creates missing topics, sets declared configs that
differ, and adds partitions where fewer exist than declared. It never deletes a topic, never
removes a config it does not declare, and cannot remove partitions (Kafka cannot), so it reports
that as a warning. It returns only once a broker reads back what it changed: an admin call
returns when the controller has the change, and a broker's metadata follows a moment later
(KRaft), so without that wait an ``apply`` right after another could read the old value and
change it again. A second ``apply`` right after the first makes no change (on a cluster it may
ask a broker a moment behind the one that read back, and set a value again that is set).

Over 300 lines: loading the declaration, converging the cluster to it and describing the
result (``describe``, and ``table`` for ``flywheel topics list``) are one contract over the
same specs; the retries around the admin API's eventual consistency are most of the length.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewPartitions,
    NewTopic,
    OffsetSpec,
)
from pydantic import BaseModel, Field, field_validator
from rich.table import Table

from services.common.config import DEPLOY_DIR, KafkaSettings
from services.common.errors import ConfigError, FlywheelError
from services.registry import TOPICS

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_TOPICS_FILE = DEPLOY_DIR / "topics.yaml"
TIMEOUT = 30.0
_METADATA_LAG = {
    KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.UNKNOWN_LEADER_EPOCH,
    KafkaError.FENCED_LEADER_EPOCH,
}


def _strings(value: dict[str, Any] | None) -> dict[str, str]:
    # Kafka configs are strings; YAML would hand us ints and bools.
    return {str(k): str(v).lower() if isinstance(v, bool) else str(v)
            for k, v in (value or {}).items()}


class TopicOverride(BaseModel):
    model_config = {"extra": "forbid"}
    partitions: int | None = Field(default=None, ge=1)
    replication_factor: int | None = Field(default=None, ge=1)
    config: dict[str, str] = Field(default_factory=dict)

    _coerce = field_validator("config", mode="before")(lambda v: _strings(v))


class TopicsFile(BaseModel):
    """The schema of ``topics.yaml``."""

    model_config = {"extra": "forbid"}
    defaults: TopicOverride = Field(default_factory=TopicOverride)
    topics: dict[str, TopicOverride | None]


@dataclass(frozen=True)
class TopicSpec:
    """One topic as it should be: full name, partitions, replication, declared configs."""

    name: str
    partitions: int
    replication_factor: int | None
    config: dict[str, str]


@dataclass
class ApplyReport:
    changes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TopicState:
    name: str
    exists: bool
    partitions: int
    config: dict[str, str]
    end_offsets: dict[int, int]


def load(path: Path = DEFAULT_TOPICS_FILE, prefix: str = "flywheel.") -> list[TopicSpec]:
    """Parse and validate the topics file; every logical flywheel topic must be declared."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read topics file {path}: {exc}") from exc
    spec = TopicsFile.model_validate(raw)
    missing = [n for n in TOPICS if n not in spec.topics]
    if missing:
        raise ConfigError(f"{path} does not declare: {', '.join(missing)}")
    d = spec.defaults
    out = []
    for name, override in spec.topics.items():
        o = override or TopicOverride()
        out.append(TopicSpec(
            name=f"{prefix}{name}",
            partitions=o.partitions or d.partitions or 1,
            replication_factor=o.replication_factor or d.replication_factor,
            config=d.config | o.config,
        ))
    return out


def admin_client(kafka: KafkaSettings) -> AdminClient:
    return AdminClient(kafka.client_config())


def apply(admin: AdminClient, specs: list[TopicSpec]) -> ApplyReport:
    """Make the cluster match ``specs``; see the module docstring for what that means."""
    report = ApplyReport()
    partitions: dict[str, int] = {}  # what apply changed, to read back before returning
    configs: dict[str, dict[str, str]] = {}
    existing = _partition_counts(admin)
    to_create = [s for s in specs if s.name not in existing]
    if to_create:
        futures = admin.create_topics(
            [NewTopic(s.name, s.partitions, s.replication_factor or -1, config=s.config)
             for s in to_create],
            request_timeout=TIMEOUT,
        )
        raced = []
        for s in to_create:
            try:
                futures[s.name].result()
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise FlywheelError(f"create topic {s.name} failed: {exc.args[0]}") from exc
                # Created a moment ago (by an earlier apply, or another operator) but not yet
                # in the metadata we read: check it like any existing topic.
                raced.append(s.name)
                continue
            report.changes.append(f"created {s.name} ({s.partitions} partitions)")
            partitions[s.name] = s.partitions
        if raced:
            existing |= _wait_for_metadata(admin, raced)
    present = [s for s in specs if s.name in existing]
    actual = _configs(admin, [s.name for s in present])
    for s in present:
        differing = {k: v for k, v in s.config.items() if actual[s.name].get(k) != v}
        if differing:
            resource = ConfigResource(
                ConfigResource.Type.TOPIC, s.name,
                incremental_configs=[
                    ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
                    for k, v in sorted(differing.items())
                ],
            )
            for fut in admin.incremental_alter_configs([resource]).values():
                _wait(fut, f"alter configs of {s.name}")
            for k, v in sorted(differing.items()):
                report.changes.append(f"{s.name}: {k} {actual[s.name].get(k)!r} -> {v!r}")
            configs[s.name] = differing
        have = existing[s.name]
        if have < s.partitions and _add_partitions(admin, s.name, s.partitions):
            report.changes.append(f"{s.name}: partitions {have} -> {s.partitions}")
            partitions[s.name] = s.partitions
            report.warnings.append(
                f"{s.name}: more partitions re-map keys; records of one group written before "
                "and after the change may sit in different partitions"
            )
        elif have > s.partitions:
            report.warnings.append(
                f"{s.name} has {have} partitions, {s.partitions} declared; Kafka cannot remove "
                "partitions, left as is"
            )
    _read_back(admin, partitions, configs)
    return report


def describe(admin: AdminClient, specs: list[TopicSpec]) -> list[TopicState]:
    """Each declared topic's partitions, declared configs as set on the cluster, end offsets."""
    existing = _partition_counts(admin)
    present = [s.name for s in specs if s.name in existing]
    configs = _configs(admin, present)
    request = {
        TopicPartition(name, p): OffsetSpec.latest()
        for name in present for p in range(existing[name])
    }
    ends: dict[str, dict[int, int]] = {name: {} for name in present}
    for tp, offset in _list_offsets(admin, request).items():
        ends[tp.topic][tp.partition] = offset
    out = []
    for s in specs:
        if s.name in existing:
            declared = {k: configs[s.name].get(k, "") for k in sorted(s.config)}
            out.append(TopicState(s.name, True, existing[s.name], declared, ends[s.name]))
        else:
            out.append(TopicState(s.name, False, 0, {}, {}))
    return out


def table(states: list[TopicState], title: str) -> Table:
    """``flywheel topics list``'s view."""
    out = Table(title=title, show_lines=True)
    for col in ("topic", "partitions", "configs", "end offsets", "records"):
        out.add_column(col, justify="right" if col in ("partitions", "records") else "left")
    for st in states:
        if not st.exists:
            out.add_row(st.name, "-", "[red]missing[/]", "-", "-")
            continue
        configs = "\n".join(f"{k}={v}" for k, v in st.config.items())
        ends = " ".join(str(st.end_offsets[p]) for p in sorted(st.end_offsets))
        out.add_row(st.name, str(st.partitions), configs, ends,
                    str(sum(st.end_offsets.values())))
    return out


def _list_offsets(
    admin: AdminClient, request: dict[TopicPartition, OffsetSpec]
) -> dict[TopicPartition, int]:
    """End offsets, retrying partitions whose leader is not settled yet (just created or grown:
    the metadata and leader epoch reach each broker's cache a moment after the admin call
    returns) for up to ``TIMEOUT`` seconds."""
    out: dict[TopicPartition, int] = {}
    deadline = time.monotonic() + TIMEOUT
    while request:
        retry = {}
        for tp, fut in admin.list_offsets(request, request_timeout=TIMEOUT).items():
            try:
                out[tp] = fut.result().offset
            except KafkaException as exc:
                err = exc.args[0]
                transient = err.retriable() or err.code() in _METADATA_LAG
                if not transient or time.monotonic() > deadline:
                    raise FlywheelError(f"list offsets of {tp.topic}: {err}") from exc
                retry[tp] = request[tp]
        request = retry
        if request:
            time.sleep(0.1)
    return out


def _add_partitions(admin: AdminClient, name: str, count: int) -> bool:
    """Grow ``name`` to ``count`` partitions; False if it already has them (an earlier apply
    did it a moment ago and the metadata we read had not caught up)."""
    try:
        admin.create_partitions([NewPartitions(name, count)])[name].result()
        return True
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.INVALID_PARTITIONS:
            raise FlywheelError(f"add partitions to {name} failed: {exc.args[0]}") from exc
    _poll(lambda: _partition_counts(admin).get(name, 0) >= count,
          lambda: f"add partitions to {name}: refused, and it does not have {count}")
    return False


def _wait_for_metadata(admin: AdminClient, names: list[str]) -> dict[str, int]:
    """Partition counts of topics that exist but may not show in metadata yet."""
    def counts() -> dict[str, int] | None:
        have = _partition_counts(admin)
        return {n: have[n] for n in names} if all(n in have for n in names) else None

    return _poll(counts, lambda: f"topics {names} exist but never appeared in metadata")


def _read_back(admin: AdminClient, partitions: dict[str, int],
               configs: dict[str, dict[str, str]]) -> None:
    """Wait until the broker's metadata shows every change apply made: topics and partitions
    (``partitions``: at least that many), configs (``configs``: exactly these values)."""
    if not partitions and not configs:
        return
    behind: list[str] = []

    def caught_up() -> bool:
        have = _partition_counts(admin)
        read = _configs(admin, [n for n in configs if n in have])
        behind[:] = [f"{n}: {have.get(n, 0)} of {count} partitions"
                     for n, count in partitions.items() if have.get(n, 0) < count]
        behind.extend(f"{n}: {k} reads {read.get(n, {}).get(k)!r}, set {v!r}"
                      for n, changed in configs.items() for k, v in changed.items()
                      if read.get(n, {}).get(k) != v)
        return not behind

    _poll(caught_up, lambda: "the cluster never showed what apply changed: " + "; ".join(behind))


def _poll(check: Callable[[], T | None], failure: Callable[[], str]) -> T:
    """``check()`` until it returns something truthy; FlywheelError(``failure()``) after
    ``TIMEOUT`` seconds. Metadata changes show within a second on a healthy cluster."""
    deadline = time.monotonic() + TIMEOUT
    while not (value := check()):
        if time.monotonic() > deadline:
            raise FlywheelError(failure())
        time.sleep(0.1)
    return value


def _partition_counts(admin: AdminClient) -> dict[str, int]:
    try:
        md = admin.list_topics(timeout=TIMEOUT)
    except KafkaException as exc:
        raise FlywheelError(f"cannot reach the Kafka cluster: {exc.args[0]}") from exc
    return {name: len(t.partitions) for name, t in md.topics.items()}


def _configs(admin: AdminClient, names: list[str]) -> dict[str, dict[str, str]]:
    if not names:
        return {}
    resources = [ConfigResource(ConfigResource.Type.TOPIC, n) for n in names]
    out = {}
    for res, fut in admin.describe_configs(resources, request_timeout=TIMEOUT).items():
        entries = _wait(fut, f"describe configs of {res.name}")
        out[res.name] = {k: e.value for k, e in entries.items()}
    return out


def _wait(future: Any, what: str) -> Any:
    try:
        return future.result()
    except KafkaException as exc:
        raise FlywheelError(f"{what} failed: {exc.args[0]}") from exc
