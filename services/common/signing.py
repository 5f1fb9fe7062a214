"""The gate's signature on its decisions: only the gate promotes or rejects.

Any principal that may write to ``checkpoints`` (the trainer writes its candidates there) could
otherwise write a ``promoted`` event, and every generator would load its weights. So the gate
signs each decision with an Ed25519 key only it holds, and every reader of decisions
(generators, the trainer, the filter, the gate itself, the operator's views) drops a
``promoted`` or ``rejected`` event that does not carry a valid signature from a trusted key,
with an error and the count ``flywheel_checkpoint_events_refused_total{reason="unsigned"}``.
Candidates are not signed: the gate verifies their files against their manifest before it
evaluates them.

What is signed is the decision's *statement*: the model, the version and its parent, the
status and rejection kind, the folder and the manifest (so the files a generator loads are the
files the gate evaluated), and the event id. It is built from the parsed fields as canonical
JSON (sorted keys, ints and strings only), so it does not depend on how a reader serializes
the event; the explanatory fields (metrics, reason) are not part of it. An old decision
replayed verbatim says nothing new: generators only move to a newer version.

Keys are PEM files: the private key (PKCS#8, mode 0600) for the gate alone, the public key
for everyone. A public-key file may hold several keys (rotation: trust the new key
everywhere, then give it to the gate). ``flywheel keys create`` writes a pair; ``flywheel
up`` writes one into its home on first start.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas import CheckpointEvent, DecisionSignature

DECISIONS = ("promoted", "rejected")
"""The statuses only the gate may write."""

_PEM_PUBLIC = re.compile(rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.S)


class DecisionKeys(BaseModel):
    """Where the gate's keys are: every service reads the public key; only the gate loads the
    signing key (give it to no other service)."""

    public_key: Path = Field(default=Path(".flywheel/keys/gate.pub"), description="PEM "
                             "file of the keys whose signatures on decisions are trusted.")
    signing_key: Path = Field(default=Path(".flywheel/keys/gate.key"), description="The "
                              "gate's private key (PEM, PKCS#8); read by the gate only.")


class DecisionKeysFromEnv(DecisionKeys, BaseSettings):
    """The same, from ``FLYWHEEL_DECISIONS__PUBLIC_KEY``/``__SIGNING_KEY``, for the commands
    that have no service settings (the operator's views, the bootstrap)."""

    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_DECISIONS__", extra="ignore")


class KeyMissing(RuntimeError):
    """A key file is absent or unreadable: the service cannot start."""


class Unsigned(ValueError):
    """A decision without a valid signature from a trusted key."""


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def statement(event: CheckpointEvent) -> bytes:
    """The bytes a decision's signature covers (see the module's docstring)."""
    body: dict[str, Any] = {
        "event_id": str(event.event_id), "model": event.model, "version": event.version,
        "parent_version": event.parent_version, "status": event.status,
        "rejection": event.rejection, "uri": event.uri,
        "manifest": [[f.path, f.sha256, f.size_bytes] for f in event.manifest],
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def key_paths(folder: Path) -> tuple[Path, Path]:
    """The private and the public key of the pair in ``folder``."""
    return folder / "gate.key", folder / "gate.pub"


def create_keys(folder: Path) -> tuple[Path, Path]:
    """Write a new key pair into ``folder`` (``gate.key`` mode 0600, ``gate.pub``); refuses
    to overwrite a key."""
    folder.mkdir(parents=True, exist_ok=True)
    private_path, public_path = key_paths(folder)
    for path in (private_path, public_path):
        if path.exists():
            raise FileExistsError(f"{path} exists; move it away to make a new key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path


def ensure_keys(folder: Path) -> tuple[Path, Path]:
    """The pair in ``folder``, made if there is none (``flywheel up``'s home)."""
    private_path, public_path = key_paths(folder)
    if private_path.exists() and public_path.exists():
        return private_path, public_path
    return create_keys(folder)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KeyMissing(
            f"cannot read the gate's {what} at {path} ({exc.strerror}): decisions on "
            "`checkpoints` are signed by the gate; make a pair with `flywheel keys create` "
            "(`flywheel up` makes one in its home) and point FLYWHEEL_DECISIONS__"
            f"{'PUBLIC_KEY' if what == 'public key' else 'SIGNING_KEY'} at it") from exc


class Signer:
    """The gate's side: signs each decision it writes."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._key = private
        self.key_id = key_id(private.public_key())

    @classmethod
    def load(cls, path: Path) -> Signer:
        try:
            key = serialization.load_pem_private_key(_read(path, "signing key"), password=None)
        except ValueError as exc:
            raise KeyMissing(f"{path} is not a PEM private key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyMissing(f"{path} is a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    def sign(self, event: CheckpointEvent) -> CheckpointEvent:
        """``event`` with its signature (a copy; a candidate is returned as it is)."""
        if event.status not in DECISIONS:
            return event
        signature = base64.b64encode(self._key.sign(statement(event))).decode()
        return event.model_copy(update={"signature": DecisionSignature(
            key_id=self.key_id, ed25519=signature)})


class Verifier:
    """Every reader's side: which decisions came from the gate."""

    def __init__(self, keys: list[Ed25519PublicKey]) -> None:
        if not keys:
            raise KeyMissing("no trusted public key")
        self._keys = {key_id(k): k for k in keys}

    @classmethod
    def load(cls, path: Path) -> Verifier:
        blocks = _PEM_PUBLIC.findall(_read(path, "public key"))
        keys = []
        for block in blocks:
            try:
                key = serialization.load_pem_public_key(block)
            except ValueError as exc:
                raise KeyMissing(f"{path} holds a key that is not PEM: {exc}") from exc
            if not isinstance(key, Ed25519PublicKey):
                raise KeyMissing(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
            keys.append(key)
        if not keys:
            raise KeyMissing(f"{path} holds no PEM public key")
        return cls(keys)

    @property
    def key_ids(self) -> set[str]:
        return set(self._keys)

    def check(self, event: CheckpointEvent) -> None:
        """Raises :class:`Unsigned` for a decision without a valid trusted signature."""
        if event.status not in DECISIONS:
            return
        sig = event.signature
        if sig is None:
            raise Unsigned(f"{event.status} event for {event.model} v{event.version} is not "
                           "signed by the gate")
        key = self._keys.get(sig.key_id)
        if key is None:
            raise Unsigned(f"{event.status} event for {event.model} v{event.version} is "
                           f"signed by key {sig.key_id}, which is not trusted")
        try:
            key.verify(base64.b64decode(sig.ed25519, validate=True), statement(event))
        except (InvalidSignature, ValueError) as exc:
            raise Unsigned(f"{event.status} event for {event.model} v{event.version} has a "
                           "signature that does not match its content") from exc

    def trusted(self, event: CheckpointEvent) -> bool:
        try:
            self.check(event)
        except Unsigned:
            return False
        return True


def stack_keys(home: Path, *, make: bool = True) -> DecisionKeys:
    """``flywheel up``'s keys: those ``FLYWHEEL_DECISIONS__*`` name, else the pair in
    ``<home>/keys``, made on first use (with ``make``)."""
    if any(os.environ.get(f"FLYWHEEL_DECISIONS__{n}") for n in ("PUBLIC_KEY", "SIGNING_KEY")):
        return DecisionKeys.model_validate(DecisionKeysFromEnv().model_dump())
    private_path, public_path = ensure_keys(home / "keys") if make \
        else key_paths(home / "keys")
    return DecisionKeys(public_key=public_path, signing_key=private_path)
