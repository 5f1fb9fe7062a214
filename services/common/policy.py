"""Policy files: YAML, validated by pydantic, identified by the sha256 of their content.

The filter and the router record the hash of the policy file that made each decision, so
history can be audited and replayed under a new policy and the two told apart. The hash is of
the file's bytes (what the operator wrote and can ``sha256sum``), not of the parsed model;
the embedded default is hashed as its canonical YAML dump. A policy whose meaning also
depends on code (the filter's MinHash) names that code's version in a class attribute
``IMPLEMENTATION``; the hash then covers it too (the sha256 of the content followed by a
line ``# implementation: <version>``), so a decision made by other code under the same file
never shares its hash.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from services.common.errors import ConfigError

P = TypeVar("P", bound=BaseModel)


def load_policy(model: type[P], path: Path | None) -> tuple[P, str]:
    """The policy in ``path`` (the model's defaults when None) and its content hash."""
    if path is None:
        policy = model()
        text = yaml.safe_dump(policy.model_dump(mode="json"), sort_keys=True)
        return policy, digest(model, text.encode())
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read policy file {path}: {exc}") from exc
    try:
        policy = model.model_validate(yaml.safe_load(data) or {})
    except yaml.YAMLError as exc:
        raise ConfigError(f"policy file {path} is not YAML: {exc}") from exc
    except ValidationError as exc:
        raise ConfigError(f"policy file {path} is invalid: {exc}") from exc
    return policy, digest(model, data)


def digest(model: type[BaseModel], content: bytes) -> str:
    """The hash of a policy of ``model`` with this ``content`` (see the module docstring)."""
    implementation = getattr(model, "IMPLEMENTATION", None)
    if implementation is not None:
        content += f"\n# implementation: {implementation}\n".encode()
    return hashlib.sha256(content).hexdigest()
