"""Settings: environment parsing, Kafka property mapping, redaction."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from services.common.config import ServiceSettings


def test_nested_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS", "b1:9093,b2:9093")
    monkeypatch.setenv("FLYWHEEL_KAFKA__TOPIC_PREFIX", "prod.")
    monkeypatch.setenv("FLYWHEEL_RUNTIME__DELIVERY", "at_least_once")
    monkeypatch.setenv("FLYWHEEL_RUNTIME__BATCH_MAX_RECORDS", "250")
    monkeypatch.setenv("FLYWHEEL_INSTANCE_ID", "filter-2")
    s = ServiceSettings(service="filter")
    assert s.kafka.bootstrap_servers == "b1:9093,b2:9093"
    assert s.topic("raw") == "prod.raw"
    assert s.runtime.delivery == "at_least_once"
    assert s.runtime.batch_max_records == 250
    assert s.group_id == "prod.filter"
    assert s.transactional_id == "prod.filter.filter-2"


def test_bounds_are_enforced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_RUNTIME__BATCH_MAX_RECORDS", "0")
    with pytest.raises(ValidationError):
        ServiceSettings()


def test_security_settings_map_to_librdkafka(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("FLYWHEEL_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("FLYWHEEL_KAFKA__SASL_USERNAME", "flywheel")
    monkeypatch.setenv("FLYWHEEL_KAFKA__SASL_PASSWORD", "s3cret-pw")
    monkeypatch.setenv("FLYWHEEL_KAFKA__SSL_CA_LOCATION", "/etc/ca.pem")
    monkeypatch.setenv(
        "FLYWHEEL_KAFKA__CLIENT_PROPERTIES",
        '{"sasl.oauthbearer.client.secret": "oauth-secret", "socket.keepalive.enable": "true"}',
    )
    s = ServiceSettings()
    conf = s.kafka.client_config()
    assert conf["security.protocol"] == "SASL_SSL"
    assert conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert conf["sasl.username"] == "flywheel"
    assert conf["sasl.password"] == "s3cret-pw"
    assert conf["ssl.ca.location"] == "/etc/ca.pem"
    assert conf["socket.keepalive.enable"] == "true"
    logged = json.dumps(s.redacted())
    assert "s3cret-pw" not in logged and "oauth-secret" not in logged
    assert "socket.keepalive.enable" in logged and "flywheel" in logged


def test_unset_security_settings_are_not_passed() -> None:
    conf = ServiceSettings().kafka.client_config()
    assert not any(k.startswith(("sasl.", "ssl.")) for k in conf)


def test_a_service_keeps_its_runtime_defaults_when_one_runtime_setting_is_overridden(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from services.generator.main import GeneratorSettings

    monkeypatch.setenv("FLYWHEEL_MODEL_PATH", "/models/tiny")
    assert GeneratorSettings().runtime.delivery == "at_least_once"
    monkeypatch.setenv("FLYWHEEL_RUNTIME__SESSION_TIMEOUT_MS", "20000")
    s = GeneratorSettings()
    assert (s.runtime.delivery, s.runtime.batch_max_records, s.runtime.session_timeout_ms) == (
        "at_least_once", 64, 20000)
    monkeypatch.setenv("FLYWHEEL_RUNTIME__DELIVERY", "exactly_once")
    assert GeneratorSettings().runtime.delivery == "exactly_once"
