"""Shared by the deployment-file tests (docker-compose.yml, deploy/k8s): a service's
environment as a deployment gives it, loaded by the service's real settings class."""

from __future__ import annotations

import os
from typing import Any

import pytest

from services.registry import SERVICES


def load_settings(name: str, environment: dict[str, str],
                  monkeypatch: pytest.MonkeyPatch) -> Any:
    """Every FLYWHEEL_* variable is a field of service ``name``'s settings (they allow
    extras, so a typo would be silently ignored), then the settings loaded from exactly
    those variables: values that do not validate fail here."""
    cls = SERVICES[name].settings_class()
    for variable in environment:
        if not variable.startswith("FLYWHEEL_"):
            continue
        top, *nested = variable.removeprefix("FLYWHEEL_").lower().split("__")
        assert top in cls.model_fields, f"{name}: {variable} is not a setting"
        if nested:
            inner = cls.model_fields[top].annotation
            assert nested[0] in inner.model_fields, f"{name}: {variable}"
    for key in list(os.environ):
        if key.startswith("FLYWHEEL_"):
            monkeypatch.delenv(key)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    return cls()
