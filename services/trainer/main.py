"""``flywheel run trainer``."""

from __future__ import annotations

import json
import logging

from services.common.logs import setup_logging
from services.common.service import Reconnecting, serve_loop
from services.trainer.loop import Trainer
from services.trainer.settings import TrainerSettings

log = logging.getLogger(__name__)


def run(settings: TrainerSettings) -> int:
    setup_logging(settings.log_level)
    log.info("config: %s", json.dumps(settings.redacted(), sort_keys=True))
    return serve_loop(settings, Reconnecting(settings, lambda: Trainer(settings)))
