"""Checkpoints for hosts that do not mount the store: fetched over any fsspec URL into a cache.

A generator or a gate either mounts the trainer's checkpoint store (``checkpoint_root``: the
event's URI is a folder inside it, verified in place) or reads it from a URL
(``checkpoint_source.url``: ``http://``, ``s3://``, ``gs://``...; or the event's URI is itself a
URL). A fetched version is written to a staging folder in the local cache: only the files its
event's manifest lists (optimizer state left out: serving never needs it), each at most its
declared size, its path kept inside the folder. The folder is renamed into place and then
verified like a mounted one (sizes, sha256, no pickle, a plausible config); a refused copy is
deleted, so the cache holds only verified versions. The newest ``keep`` versions of a model
stay; older ones are evicted after each fetch (an engine holds what it loaded in memory).

A store that does not answer is retried with backoff; then :class:`CheckpointUnavailable`, a
:class:`~services.common.errors.DependencyError`: not the checkpoint's fault, so the gate
stops and decides the candidate after its restart instead of rejecting it.
"""

from __future__ import annotations

import logging
import re
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

import fsspec
from pydantic import BaseModel, ConfigDict, Field
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

from schemas import CheckpointEvent, FileDigest
from services.common.errors import DependencyError
from services.models.manifest import OPTIONAL_PREFIX, CheckpointRefused, verify

log = logging.getLogger(__name__)

_FOLDER = re.compile(r"^v\d+$")
_CHUNK = 1 << 20


class CheckpointUnavailable(DependencyError):
    """The store did not answer (after retries): the checkpoint may be fine."""


class CheckpointSourceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default=None, description="The checkpoint store as this host "
                            "reads it, when it does not mount it: any fsspec URL (http://, "
                            "s3://, gs://). A version's folder name is looked up under it.")
    cache_dir: Path = Field(default=Path(".flywheel/cache/checkpoints"), description="Where "
                            "fetched versions are kept.")
    keep: int = Field(default=3, ge=1, description="Fetched versions of a model kept.")
    attempts: int = Field(default=4, ge=1, description="Tries of each file before the store "
                          "counts as unavailable.")


class CheckpointSource:
    """Resolves a checkpoint event to a verified local folder: in place, or fetched."""

    def __init__(self, root: Path, settings: CheckpointSourceSettings | None = None,
                 owner: str = "") -> None:
        """``owner`` (the instance id) gets a cache of its own under ``cache_dir``: processes
        on one host never clean up or evict each other's folders."""
        self.root = root
        self.s = settings or CheckpointSourceSettings()
        self.cache = (self.s.cache_dir / _safe(owner) if owner else self.s.cache_dir).resolve()
        for stale in self.cache.glob("*/.v*.tmp-*"):  # a fetch of this owner that died
            shutil.rmtree(stale, ignore_errors=True)

    def resolve(self, event: CheckpointEvent, in_use: Iterable[Path] = ()) -> Path:
        """The verified folder of ``event``; raises CheckpointRefused (the checkpoint is
        bad) or CheckpointUnavailable (the store did not answer). Folders ``in_use`` (the
        caller's served version) are never evicted."""
        remote = self._remote(event)
        if remote is None:
            return verify(event, self.root)
        return self._fetch(event, remote, {p.resolve() for p in in_use})

    def _remote(self, event: CheckpointEvent) -> str | None:
        uri = event.uri.rstrip("/")
        if self.s.url is not None:
            return f"{self.s.url.rstrip('/')}/{uri.rsplit('/', 1)[-1]}"
        if "://" in uri and not uri.startswith("file://"):
            return uri
        return None

    def _fetch(self, event: CheckpointEvent, remote: str, in_use: set[Path]) -> Path:
        name = remote.rsplit("/", 1)[-1]
        if not _FOLDER.match(name):
            raise CheckpointRefused("outside_root", f"{remote!r} is not a version folder")
        models = self.cache
        home = models / _safe(event.model)
        dest = home / name
        if dest.is_dir():
            try:
                return verify(event.model_copy(update={"uri": str(dest)}), models)
            except CheckpointRefused as exc:  # another event for the name, or a changed copy
                log.warning("cached %s is not %s v%d (%s); fetching it again", dest,
                            event.model, event.version, exc)
                shutil.rmtree(dest)
        staging = home / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        fs, path = fsspec.core.url_to_fs(remote)
        try:
            for entry in event.manifest:
                if not entry.path.startswith(OPTIONAL_PREFIX):
                    self._file(fs, f"{path}/{entry.path}", staging, entry)
            try:
                staging.rename(dest)
            except OSError:  # another process sharing the cache renamed its copy first
                if not dest.is_dir():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        try:
            folder = verify(event.model_copy(update={"uri": str(dest)}), models)
        except CheckpointRefused:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        log.info("fetched %s v%d from %s", event.model, event.version, remote)
        self._evict(home, {dest, *in_use})
        return folder

    def _file(self, fs: fsspec.AbstractFileSystem, source: str, staging: Path,
              entry: FileDigest) -> None:
        target = (staging / entry.path).resolve()
        if not target.is_relative_to(staging.resolve()):
            raise CheckpointRefused("outside_root", f"manifest entry {entry.path!r} escapes")
        target.parent.mkdir(parents=True, exist_ok=True)

        @retry(retry=retry_if_exception(_transient), reraise=True,
               stop=stop_after_attempt(self.s.attempts),
               wait=wait_exponential(multiplier=0.5, max=8))
        def copy() -> None:
            size = 0  # the sha256 is checked on the whole folder (verify)
            with fs.open(source, "rb") as src, target.open("wb") as dst:
                while block := src.read(_CHUNK):
                    size += len(block)
                    if size > entry.size_bytes:
                        raise CheckpointRefused("size", f"{entry.path}: larger than the "
                                                "manifest says")
                    dst.write(block)

        try:
            copy()
        except CheckpointRefused:
            raise
        except Exception as exc:
            if _transient(exc):
                why = exc.__cause__ or exc  # fsspec's FileNotFoundError hides the status
                raise CheckpointUnavailable(f"could not fetch {source}: "
                                            f"{type(why).__name__}: {why}") from exc
            raise CheckpointRefused("missing", f"{entry.path} is not in the store") from exc

    def _evict(self, home: Path, kept: set[Path]) -> None:
        """Keep the newest ``keep`` versions, counting ``kept`` (the fetched one, those in
        use) first; delete the others."""
        versions = sorted((p for p in home.iterdir() if p.is_dir() and _FOLDER.match(p.name)
                           and p not in kept), key=lambda p: int(p.name[1:]), reverse=True)
        for old in versions[max(0, self.s.keep - len(kept)):]:
            shutil.rmtree(old, ignore_errors=True)
            log.info("evicted %s from the checkpoint cache", old)


GONE = frozenset({404, 410})
"""HTTP statuses that say the file is not there; any other failed answer (5xx, 429, 403...)
is the store's trouble, not the checkpoint's."""


def _transient(exc: BaseException) -> bool:
    """Whether the store failed rather than the file. fsspec's HTTP reports every failed
    request as a FileNotFoundError (an unreachable server, a 503 and a 404 alike); its cause
    tells them apart: a response with a status other than 404 or 410, or a connection error."""
    if isinstance(exc, CheckpointRefused):
        return False
    if not isinstance(exc, FileNotFoundError):
        return True
    cause = exc.__cause__
    status = getattr(cause, "status", None)
    if isinstance(status, int):
        return status not in GONE
    return isinstance(cause, OSError) and not isinstance(cause, FileNotFoundError)


def _safe(model: str) -> str:
    """A model name as one path component."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", model).lstrip(".") or "_"
