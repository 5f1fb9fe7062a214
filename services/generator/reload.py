"""Hot reload: follow ``checkpoints``, verify promoted checkpoints, swap weights between batches.

The follower thread reads every checkpoint event; the reloader ignores all but ``promoted``
events of its model newer than what it serves, verifies them (``checkpoint.verify`` plus an
architecture check against the served model) away from the serving path, and keeps the newest
verified one pending. The serving loop calls ``apply_pending()`` between batches, so no request
is in flight during the swap and every trajectory carries the version that produced it.
A refused checkpoint is logged with its reason and counted; the current version keeps serving.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from schemas import CheckpointEvent
from services.generator.metrics import (
    POLICY_VERSION,
    RELOAD_REFUSALS,
    RELOAD_SECONDS,
    RELOAD_SKIPPED,
)
from services.models.engines import Engine
from services.models.episodes import ModelVersion
from services.models.fetch import CheckpointSource, CheckpointUnavailable
from services.models.manifest import CheckpointRefused

log = logging.getLogger(__name__)


ARCHITECTURE_KEYS = ("architectures", "model_type", "hidden_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "vocab_size",
                     "intermediate_size")


class Reloader:
    """What the generator serves, and the next verified checkpoint waiting to be loaded."""

    def __init__(self, engine: Engine, root: Path, serving: ModelVersion, served: Path,
                 source: CheckpointSource | None = None) -> None:
        self.engine = engine
        self.source = source or CheckpointSource(root)
        """Versions in place inside ``root``, or fetched from the store's URL."""
        self.serving = serving
        self.served = served
        self._architecture = _architecture(served)
        self._pending: tuple[int, Path, CheckpointEvent] | None = None
        self._loading: Path | None = None
        self._lock = threading.Lock()
        POLICY_VERSION.set(serving.version)

    def offer(self, event: CheckpointEvent) -> None:
        """Consider one checkpoint event; safe from any thread."""
        if event.status != "promoted" or event.model != self.serving.model:
            return
        with self._lock:
            newest = self._pending[0] if self._pending else self.serving.version
            # What a fetch must not evict: served, waiting, or being loaded.
            waiting = self._pending[1] if self._pending else None
            in_use = [f for f in (self.served, self._loading, waiting) if f is not None]
        if event.version <= newest:
            return
        try:
            folder = self.source.resolve(event, in_use=in_use)
            if _architecture(folder) != self._architecture:
                raise CheckpointRefused("incompatible", "its config differs from the served "
                                                        "model's architecture")
        except CheckpointRefused as exc:
            RELOAD_REFUSALS.labels(exc.reason).inc()
            log.error("refused %s v%d (%s); still serving v%d", event.model, event.version, exc,
                      self.serving.version)
            return
        except CheckpointUnavailable as exc:  # the next promotion tries again
            RELOAD_REFUSALS.labels("unavailable").inc()
            log.error("could not fetch %s v%d (%s); still serving v%d", event.model,
                      event.version, exc, self.serving.version)
            return
        with self._lock:
            if self._pending is None or event.version > self._pending[0]:
                if self._pending is not None:  # promoted while a batch ran: never served
                    RELOAD_SKIPPED.inc()
                    log.info("v%d superseded by v%d before it was loaded", self._pending[0],
                             event.version)
                self._pending = (event.version, folder, event)

    def apply_pending(self) -> bool:
        """Load the newest verified checkpoint, if any; call only between batches."""
        with self._lock:
            pending, self._pending = self._pending, None
            self._loading = pending[1] if pending else None
        if pending is None:
            return False
        version, folder, event = pending
        try:  # again, as it is loaded: the files may have changed since the offer
            folder = self.source.resolve(event, in_use=[self.served])
        except (CheckpointRefused, CheckpointUnavailable) as exc:
            with self._lock:
                self._loading = None
            reason = exc.reason if isinstance(exc, CheckpointRefused) else "unavailable"
            RELOAD_REFUSALS.labels(reason).inc()
            log.error("refused %s v%d as it was to be loaded (%s); still serving v%d",
                      event.model, version, exc, self.serving.version)
            return False
        started = time.perf_counter()
        try:
            self.engine.reload(folder)
        except Exception as exc:
            # A partial load must not keep serving: put the previous weights back.
            self.engine.reload(self.served)
            self._loading = None
            RELOAD_REFUSALS.labels("load_failed").inc()
            log.error("loading v%d failed (%s: %s); restored v%d", version, type(exc).__name__,
                      exc, self.serving.version)
            return False
        seconds = time.perf_counter() - started
        RELOAD_SECONDS.observe(seconds)
        with self._lock:
            self.serving, self.served = ModelVersion(self.serving.model, version), folder
            self._loading = None
        POLICY_VERSION.set(version)
        log.info("now serving %s v%d (reload %.1f ms)", self.serving.model, version, 1e3 * seconds)
        return True


def _architecture(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointRefused("incompatible", f"unreadable config.json: {exc}") from exc
    return {k: config.get(k) for k in ARCHITECTURE_KEYS}
