"""``flywheel up``: a whole flywheel from one profile, supervised, with a live view.

Order: the broker (a local one unless the profile names a cluster), then what
:mod:`services.up.prepare` does (policy files, a check of every setting, Prometheus, the
topics, the seed model: bootstrapped when the profile has no model folder and the store has
no version 0), then every service as its own supervised process (``python -m services run
<name>``) with its settings in ``FLYWHEEL_*`` variables, logs in ``<home>/logs/<name>.log``
and its ``/metrics`` on its own port. The live view is :mod:`services.up.view`;
``<home>/up.json`` describes the running stack for ``flywheel status`` and ``flywheel down``
(:mod:`services.up.control`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.cluster import local_broker as local_kafka
from services.common.checkpoints import CheckpointFollower
from services.common.config import KafkaSettings
from services.common.errors import ConfigError
from services.common.signing import DecisionKeys, Verifier, stack_keys
from services.up import control, monitor, prepare
from services.up.environment import service_fields, settings_env
from services.up.profile import SECRETS, SERVICES, Profile, kafka_from_env, public
from services.up.supervisor import ProcessSpec, Supervisor
from services.up.view import Snapshot, Versions, read_checkpoints

log = logging.getLogger(__name__)


@dataclass
class Stack:
    profile: Profile
    kafka: dict[str, Any] = field(default_factory=dict)
    base_path: Path | None = None
    policy_files: dict[str, Path] = field(default_factory=dict)
    started_broker: bool = False
    ports: dict[str, int] = field(default_factory=dict)
    versions: Versions | None = None
    """Every checkpoint event the last run() saw."""
    prometheus: monitor.Prometheus | None = None
    supervisor: Supervisor | None = None
    signalled: bool = False
    """Whether the last run() ended on SIGINT or SIGTERM."""
    credentials: dict[str, tuple[str, str]] = field(default_factory=dict, repr=False)
    """Per service with its own principal: (username, password)."""
    secrets: dict[str, Any] = field(default_factory=dict, repr=False)
    """The cluster secrets (the kafka section's password): this process's clients only."""
    _owner: control.Owner = field(init=False, repr=False)
    """The running services' supervisor, while run() runs (its children's pids)."""

    @property
    def home(self) -> Path:
        return self.profile.home

    @functools.cached_property
    def keys(self) -> DecisionKeys:
        """The gate's keys: ``FLYWHEEL_DECISIONS__*`` where set, else the home's pair (made
        on first start). Found once: every child's environment and the views use them."""
        return stack_keys(self.home)

    @functools.cached_property
    def verifier(self) -> Verifier:
        return Verifier.load(self.keys.public_key)

    @property
    def kafka_settings(self) -> KafkaSettings:
        return KafkaSettings(**self.kafka, **self.secrets)

    # -- set-up ---------------------------------------------------------------------------

    def prepare(self, say: Callable[[str], None] = print) -> None:
        p = self.profile
        self.home.mkdir(parents=True, exist_ok=True)
        left = control.orphans(self.home)
        if left:
            raise ConfigError(f"a flywheel left by a killed `flywheel up` is still running from "
                              f"{self.home} ({', '.join(sorted(left))}): `flywheel down` first")
        self._owner = control.Owner(self.home)  # until run() ends; a second up fails here
        self.write_state()  # this process's from now on, not a dead up's
        starting: Future[tuple[local_kafka.LocalBroker, bool]] | None = None
        try:
            keys = self.keys  # made now if there are none: the seed's promotion is signed
            resolved = kafka_from_env(p.kafka)
            self.kafka = public(resolved)
            self.secrets = {k: getattr(resolved, k) for k in SECRETS
                            if getattr(resolved, k) is not None}
            self.credentials = {name: (c.username, c.password(name))
                                for name, c in p.credentials.items()}
            self.policy_files = prepare.write_policies(p)
            # before anything starts
            checked = prepare.validate(p, self.kafka | self.secrets, self.policy_files)
            prepare.say_precision(checked, say)
            self.prometheus = prepare.start_monitor(p, say)
            if p.local_broker:
                # Started beside the seed model's training, which needs no broker: the
                # broker's start (about 5 s, mostly waiting on its JVM) costs no time then.
                local_kafka.install()
                pool = ThreadPoolExecutor(1, thread_name_prefix="broker-start")
                starting = pool.submit(local_kafka.start, self.home / "kafka", p.broker_port,
                                       sasl=self._local_admin(resolved))
                pool.shutdown(wait=False)  # its one task runs on
            else:  # a cluster's settings fail now, not after the seed model's training
                prepare.apply_topics(self.kafka_settings, say)
            seed = None if p.model_path else prepare.train_seed(p, say)
            if starting is not None:
                broker, self.started_broker = starting.result()
                self.kafka["bootstrap_servers"] = broker.bootstrap
                self.write_state()  # from here on `down` can stop the broker, whatever happens
                say(f"broker: {broker.bootstrap} "
                    f"({'started' if self.started_broker else 'running'})")
                prepare.apply_topics(self.kafka_settings, say)
            self.base_path = p.model_path or prepare.publish_seed(p, self.kafka_settings, say,
                                                                  seed, keys)
        except BaseException:
            if starting is not None:  # a broker still starting is stopped too, once it is up
                with contextlib.suppress(Exception):  # (a start that failed started nothing)
                    self.started_broker = starting.result()[1]
            if self.started_broker:  # leave nothing behind that this call started
                local_kafka.stop(self.home / "kafka")
            control.clear_state(self.home)
            self._owner.release()
            raise

    @staticmethod
    def _local_admin(kafka: KafkaSettings) -> tuple[str, str] | None:
        """A local broker for a SASL profile is a SASL broker whose admin is the profile's
        principal (SCRAM-SHA-512 on SASL_PLAINTEXT only)."""
        if kafka.security_protocol == "PLAINTEXT":
            return None
        if kafka.security_protocol != "SASL_PLAINTEXT" or kafka.sasl_mechanism != \
                "SCRAM-SHA-512" or not kafka.sasl_username or kafka.sasl_password is None:
            raise ConfigError("a local broker speaks PLAINTEXT, or SASL_PLAINTEXT with "
                              "SCRAM-SHA-512 and the profile's user as its admin; name a "
                              "cluster (kafka.bootstrap_servers) for anything else")
        return kafka.sasl_username, kafka.sasl_password.get_secret_value()

    # -- processes ------------------------------------------------------------------------

    def specs(self) -> list[ProcessSpec]:
        assert self.base_path is not None, "prepare() first"
        p = self.profile
        out, port = [], p.metrics_port
        for service in SERVICES:
            fields = service_fields(p, service, self.base_path, self.policy_files)
            replicas = p.generators if service == "generator" else 1
            for i in range(replicas):
                name = f"{service}-{i}" if service == "generator" else service
                env = (self._env(fields, instance=name, port=port) | self._auth(service)
                       | self._keys_env(service))
                out.append(ProcessSpec(name, [sys.executable, "-m", "services", "run", service],
                                       env, hide=self._hidden()))
                self.ports[name] = port
                port += 1
        return out

    def _env(self, fields: dict[str, Any], *, instance: str, port: int) -> dict[str, str]:
        threads = str(self.profile.threads)
        # The stack's own keys last: one cluster, distinct instance ids and ports.
        return settings_env(fields) | {
            "FLYWHEEL_KAFKA": json.dumps(self.kafka), "FLYWHEEL_INSTANCE_ID": instance,
            "FLYWHEEL_METRICS__PORT": str(port), "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"}

    def _keys_env(self, service: str) -> dict[str, str]:
        """Every service trusts the gate's public key; only the gate has its signing key."""
        keys = self.keys
        env = {"FLYWHEEL_DECISIONS__PUBLIC_KEY": str(keys.public_key.resolve())}
        if service == "gate":
            env["FLYWHEEL_DECISIONS__SIGNING_KEY"] = str(keys.signing_key.resolve())
        return env

    def _auth(self, service: str) -> dict[str, str]:
        """The service's own principal if the profile names one, else the kafka section's
        secrets: in the child's environment only."""
        if service in self.credentials:
            user, password = self.credentials[service]
            return {"FLYWHEEL_KAFKA__SASL_USERNAME": user,
                    "FLYWHEEL_KAFKA__SASL_PASSWORD": password}
        return {f"FLYWHEEL_KAFKA__{k.upper()}": v.get_secret_value()
                for k, v in self.secrets.items()}

    def _hidden(self) -> tuple[str, ...]:
        """Variables of this process no child inherits: the other services' passwords, and
        the kafka section's password where a child has its own principal."""
        return tuple(c.password_env for c in self.profile.credentials.values()) + tuple(
            f"FLYWHEEL_KAFKA__{k.upper()}" for k in SECRETS) + (
            "FLYWHEEL_DECISIONS__SIGNING_KEY",)

    def write_state(self) -> None:
        control.write_state(self.home, ports=self.ports, kafka=self.kafka,
                            prometheus=self.prometheus.url if self.prometheus else None,
                            model_name=self.profile.model_name,
                            started_broker=self.started_broker,
                            public_key=str(stack_keys(self.home, make=False)
                                           .public_key.resolve()))

    def run(self, *, seconds: float | None = None, view: Callable[[Snapshot], None] | None
            = None, until: Callable[[Snapshot], bool] | None = None, stop_broker: bool = True,
            supervisor_options: dict[str, Any] | None = None) -> Snapshot:
        """Start every service, supervise until SIGINT/SIGTERM, ``seconds`` or ``until``
        returns true for a snapshot; then stop them."""
        specs = self.specs()
        if self.prometheus is not None:  # scrapes every service's port
            specs.append(self.prometheus.spec(self.ports))
            specs[-1].hide = self._hidden()
        supervisor = self.supervisor = Supervisor(
            specs, self.home / "logs", **(supervisor_options or {}),
            on_spawn=lambda name, pid: control.record_child(self.home, name, pid))
        stopping = threading.Event()
        previous = {sig: signal.signal(sig, lambda *_: stopping.set())
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        versions = self.versions = Versions(self.profile.model_name)
        settings = self.kafka_settings
        snapshot = Snapshot.empty()
        follower: CheckpointFollower | None = None
        try:
            follower = CheckpointFollower(settings, settings.topic("checkpoints"), versions,
                                          verifier=self.verifier)
            follower.start()
            self.write_state()
            started = time.monotonic()
            supervisor.start()
            while not stopping.is_set():
                supervisor.poll()
                snapshot = Snapshot.take(self.ports, versions, snapshot,
                                         {n: c.state for n, c in supervisor.children.items()},
                                         {n: c.restarts for n, c in supervisor.children.items()},
                                         self.prometheus.alerts() if self.prometheus else None)
                if view is not None:
                    view(snapshot)
                if seconds is not None and time.monotonic() - started >= seconds:
                    break
                if until is not None and until(snapshot):
                    break
                stopping.wait(1.0)
        finally:
            codes = supervisor.stop()
            log.info("stopped: %s", codes)
            if follower is not None:
                follower.stop()
                try:  # again from the start: the decisions committed while stopping too
                    self.versions = read_checkpoints(settings, self.profile.model_name,
                                                     self.verifier, 10)
                except Exception as exc:  # the view's record only: never mask the exit
                    log.warning("checkpoints not read to the end: %s", exc)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.signalled = stopping.is_set()  # a signal while stopping counts too
            if stop_broker and self.started_broker:
                local_kafka.stop(self.home / "kafka")
            if stop_broker or not self.started_broker:
                control.clear_state(self.home)
            self._owner.release()
        return snapshot
