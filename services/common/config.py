"""Configuration shared by every service: Kafka connection, runtime, metrics endpoint, logging.

Settings come from the environment with the prefix ``FLYWHEEL_`` and ``__`` for nesting
(``FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS=broker:9092``,
``FLYWHEEL_RUNTIME__DELIVERY=at_least_once``). Each service subclasses :class:`ServiceSettings`
with its own fields. Secrets are ``SecretStr`` and never printed: :meth:`ServiceSettings.redacted`
is what gets logged at start.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.signing import DecisionKeys

DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy"
"""Kafka pom, topics file, Prometheus and Grafana files, in the source checkout."""



class KafkaSettings(BaseModel):
    """Where the cluster is and how to authenticate; mapped onto librdkafka properties."""

    bootstrap_servers: str = Field(default="127.0.0.1:9092", description="host:port,...")
    topic_prefix: str = Field(default="flywheel.", description="Prepended to every topic name.")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: (
        Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI", "OAUTHBEARER"] | None
    ) = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_ca_location: str | None = Field(default=None, description="CA bundle (PEM) path.")
    ssl_certificate_location: str | None = Field(default=None, description="Client cert path.")
    ssl_key_location: str | None = Field(default=None, description="Client key path.")
    ssl_key_password: SecretStr | None = None
    client_properties: dict[str, str] = Field(
        default_factory=dict,
        description="Any further librdkafka property, passed through as is "
        "(e.g. FLYWHEEL_KAFKA__CLIENT_PROPERTIES='{\"socket.keepalive.enable\": \"true\"}').",
    )

    @model_validator(mode="after")
    def _credentials_complete(self) -> Self:
        """A SASL protocol with a password mechanism and no credentials cannot work: say so at
        start, not as a retry loop of failed handshakes."""
        if not self.security_protocol.startswith("SASL_"):
            return self
        if self.sasl_mechanism is None:
            raise ValueError(f"security_protocol {self.security_protocol} needs a "
                             "sasl_mechanism (FLYWHEEL_KAFKA__SASL_MECHANISM, e.g. "
                             "SCRAM-SHA-512)")
        if self.sasl_mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
            missing = [f"FLYWHEEL_KAFKA__{name.upper()}" for name, value in (
                ("sasl_username", self.sasl_username), ("sasl_password", self.sasl_password))
                if not value]
            if missing:
                raise ValueError(f"{self.sasl_mechanism} needs credentials: "
                                 f"{' and '.join(missing)} not set")
        return self

    def topic(self, name: str) -> str:
        """Full topic name for a logical name: ``topic("raw") == "flywheel.raw"``."""
        return f"{self.topic_prefix}{name}"

    def client_config(self) -> dict[str, Any]:
        """librdkafka properties for connection and security, secrets revealed.

        The client's own log lines go to the ``librdkafka`` Python logger (WARNING and up by
        default, see ``services.common.logs``) instead of raw stderr.
        """
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
            "logger": logging.getLogger("librdkafka"),
        }
        optional = {
            "sasl.mechanism": self.sasl_mechanism,
            "sasl.username": self.sasl_username,
            "sasl.password": self.sasl_password.get_secret_value() if self.sasl_password else None,
            "ssl.ca.location": self.ssl_ca_location,
            "ssl.certificate.location": self.ssl_certificate_location,
            "ssl.key.location": self.ssl_key_location,
            "ssl.key.password": (
                self.ssl_key_password.get_secret_value() if self.ssl_key_password else None
            ),
        }
        conf.update({k: v for k, v in optional.items() if v is not None})
        conf.update(self.client_properties)
        return conf


class RuntimeSettings(BaseModel):
    """How the consume-process-produce loop batches, commits and shuts down."""

    delivery: Literal["exactly_once", "at_least_once"] = Field(
        default="exactly_once",
        description="exactly_once: one Kafka transaction per batch. at_least_once: offsets "
        "stored only after every output of a record is acknowledged.",
    )
    batch_max_records: int = Field(
        default=5000, ge=1, le=100_000,
        description="Records per batch (one transaction each). Larger batches spread the fixed "
        "cost of a commit, about 10 ms, over more records.",
    )
    batch_max_bytes: int = Field(
        default=16 * 2**20, ge=1024, description="Bound on the summed record values of a batch."
    )
    max_record_bytes: int = Field(
        default=8 * 2**20 - 2**16, ge=1024,
        description="Largest value produced. An input whose output is larger is dead-lettered; "
        "keep it below the topics' max.message.bytes (deploy/topics.yaml: 8 MiB).",
    )
    batch_max_seconds: float = Field(
        default=0.5, gt=0, le=60, description="A batch closes at this age even if not full."
    )
    transaction_timeout_ms: int = Field(default=60_000, ge=1_000, le=900_000)
    shutdown_timeout_seconds: float = Field(
        default=10.0, gt=0, le=300, description="Bound on finishing the in-flight batch at stop."
    )
    broker_down_seconds: float = Field(
        default=120.0, gt=0, description="Exit non-zero once no broker answered this long."
    )
    lag_interval_seconds: float = Field(default=2.0, gt=0, description="Lag gauge refresh.")
    group_id: str | None = Field(default=None, description="Defaults to '<prefix><service>'.")
    static_membership: bool = Field(
        default=True,
        description="Join the group as 'group.instance.id=<instance_id>': a restarted instance "
        "takes its partitions back at once instead of after the dead member's session times "
        "out. A cleanly stopped static member keeps its partitions until session_timeout_ms.",
    )
    session_timeout_ms: int = Field(
        default=15_000, ge=6_000, le=300_000, description="How long a silent member is kept."
    )
    max_poll_interval_ms: int = Field(
        default=300_000, ge=10_000, description="Longest a batch may take to process before "
        "the group takes the partitions away (raise it for slow stages such as the gate).")
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    bounds: dict[str, dict[int, tuple[int, int]]] | None = Field(
        default=None, description="Replay: per input topic and partition, the offsets "
        "[start, end) to process. A partition the group has no committed offset for starts at "
        "start; records at or past end are never processed; the loop stops by itself once "
        "every partition is there. A partition not listed has nothing to process.")
    shared_bounds: bool = Field(
        default=False, description="Replay workers: several members of the group share the "
        "bounds, and each stops once the partitions it owns (after its first assignment) are "
        "at their end, rather than waiting to own every partition.")


class StateSettings(BaseModel):
    """Where stateful stages (filter, router) keep what they remember between batches; the
    changelog topic is the source of truth either way (services.common.state_storage)."""

    backend: Literal["rocksdb", "memory"] = Field(
        default="rocksdb", description="rocksdb: on local disk, memory bounded by memory_mb "
        "whatever is remembered. memory: a dict, growing with what is remembered.")
    dir: Path | None = Field(default=None, description="Folder for the RocksDB files "
                             "[default: <temp dir>/flywheel-state]; a copy of the changelog, "
                             "kept by a clean stop for a restart on the same disk (it then "
                             "reads only the changelog written after), wiped otherwise.")
    memory_mb: int = Field(default=64, ge=8, le=65536,
                           description="RocksDB's block cache, memtables included.")


class MetricsSettings(BaseModel):
    """The HTTP endpoint serving /metrics, /healthz and /readyz."""

    enabled: bool = True
    host: str = Field(default="0.0.0.0", description="Bind address.")
    port: int = Field(default=9400, ge=0, le=65535, description="0 picks a free port.")


class ServiceSettings(BaseSettings):
    """Base of every service's settings."""

    model_config = SettingsConfigDict(
        env_prefix="FLYWHEEL_", env_nested_delimiter="__", extra="ignore"
    )

    service: str = Field(default="service", description="Service name, used in ids and metrics.")
    instance_id: str = Field(
        default_factory=socket.gethostname,
        description="Stable per replica (a StatefulSet pod name, 'generator-0'): it is part of "
        "the transactional id, so a restarted replica fences its own zombie. Two live replicas "
        "must never share it.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    state: StateSettings = Field(default_factory=StateSettings)
    decisions: DecisionKeys = Field(default_factory=DecisionKeys, description="The gate's "
                                    "keys: decisions on `checkpoints` without its signature "
                                    "are dropped.")

    def topic(self, name: str) -> str:
        return self.kafka.topic(name)

    @property
    def group_id(self) -> str:
        return self.runtime.group_id or f"{self.kafka.topic_prefix}{self.service}"

    @property
    def transactional_id(self) -> str:
        return f"{self.group_id}.{self.instance_id}"

    @classmethod
    def with_overrides(cls, **overrides: Any) -> Self:
        """Settings from the environment, with the non-None ``overrides`` (CLI options) on
        top."""
        return cls(**{k: v for k, v in overrides.items() if v is not None})

    def redacted(self) -> dict[str, Any]:
        """The resolved settings as plain data, fit to log: secrets show as '**********'.

        ``SecretStr`` fields dump masked; pass-through client properties whose name mentions a
        secret (``sasl.oauthbearer.client.secret``, ``ssl.keystore.password``) are masked too.
        """
        data = self.model_dump(mode="json")
        props = data["kafka"]["client_properties"]
        for key in props:
            if names_a_secret(key):
                props[key] = "**********"
        return data


def names_a_secret(key: str) -> bool:
    """Whether a pass-through client property (``ssl.keystore.password``,
    ``sasl.oauthbearer.client.secret``, a JAAS line) holds a secret."""
    return any(word in key for word in ("password", "secret", "token", "jaas"))
