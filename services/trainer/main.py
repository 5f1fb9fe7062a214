"""``flywheel run trainer``: one process, or a job of several ranks (``ranks``, or under a
``torchrun`` started by the user: rank 0 runs the loop, the others train their part of each
round; :mod:`services.trainer.ranks`)."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys

from services.common.errors import FatalRuntimeError
from services.common.logs import setup_logging
from services.common.service import Reconnecting, serve_loop
from services.trainer.loop import Trainer
from services.trainer.settings import TrainerSettings
from services.trainer.train import resolve_dtype

log = logging.getLogger(__name__)


def run(settings: TrainerSettings) -> int:
    setup_logging(settings.log_level)
    settings.optim = resolve_dtype(settings.optim, role="trainer's compute")
    if "WORLD_SIZE" not in os.environ and settings.ranks > 1:
        _exec_torchrun(settings)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _run_ranks(settings)
    log.info("config: %s", json.dumps(settings.redacted(), sort_keys=True))
    return serve_loop(settings, Reconnecting(settings, lambda: Trainer(settings)))


def _exec_torchrun(settings: TrainerSettings) -> None:
    """Become ``torchrun`` (same pid: a supervisor's signals reach it) running this command
    on ``ranks`` processes of this host; it stops them all when one fails or on SIGTERM, and
    gives a stop a round's time (``max_round_seconds``) before it kills them."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={settings.ranks}",
            f"--shutdown-timeout={int(settings.max_round_seconds) + 60}",
            "-m", "services", *sys.argv[1:]]
    log.info("starting %d ranks: %s", settings.ranks, " ".join(argv[1:]))
    logging.shutdown()
    os.execv(sys.executable, argv)


def _run_ranks(settings: TrainerSettings) -> int:
    from services.trainer.parallel import Parallel
    from services.trainer.ranks import Leader, follow

    _die_with_parent()
    parallel = Parallel.launch(settings.strategy, settings.ranks_timeout_seconds)
    if not parallel.leader:
        return follow(settings.optim, parallel)
    log.info("config: %s", json.dumps(settings.redacted(), sort_keys=True))
    log.info("rank 0 of %d (%s): consuming, and leading the rounds", parallel.world,
             parallel.strategy)
    leader = Leader(parallel, settings.optim)

    def trainer() -> Trainer:  # after a broker outage, a new loop over the same ranks
        if leader.broken is not None:
            raise FatalRuntimeError(f"the ranks are out of step: {leader.broken}")
        return Trainer(settings, leader)

    try:
        return serve_loop(settings, Reconnecting(settings, trainer))
    finally:
        leader.stop()


def _die_with_parent() -> None:
    """A rank gets SIGTERM when its torchrun dies (SIGKILLed by a supervisor after its grace
    period): torchrun starts each rank in a session of its own, out of reach of a signal to
    its process group, and rank 0 would otherwise go on consuming alone. Linux only."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the call
        os.kill(os.getpid(), signal.SIGTERM)
