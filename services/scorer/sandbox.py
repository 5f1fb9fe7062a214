"""Run untrusted Python solutions against unit tests in a sandboxed child process.

The code verifier rewards a coding completion by running it against the task's tests. The
completion is written by the policy being trained, so it is untrusted: it may loop, allocate
without bound, flood its output, open sockets, fork, signal other processes, or try to break
out of whatever watches it. Each run gets its own temporary folder and a fresh interpreter
(``python -I harness.py``), and these layers, each recorded in ``SandboxResult.isolation`` when
it was active (``isolation_plan(python)`` tells beforehand which of the parent's will be):

- ``rlimits``: set between fork and exec. ``RLIMIT_CPU`` (SIGXCPU at the limit, SIGKILL one
  second later), ``RLIMIT_AS`` (memory), ``RLIMIT_FSIZE`` (stdout and stderr are files, so
  output is capped by the kernel), ``RLIMIT_CORE=0``. The parent adds the wall clock: it
  kills the child's whole process group (``start_new_session``) at ``wall_seconds`` and
  again, always, when the run ends, so no stray descendant outlives it.
- ``netns``: a new, empty network namespace (``unshare(CLONE_NEWNET)``; not even loopback is
  up). Needs root or CAP_SYS_ADMIN, probed once per process in a throwaway child. Without it
  ``run_python_tests`` raises ``SandboxUnavailable`` too, unless isolation is waived.
- ``setuid`` and ``nproc``: as root, the child drops to uid/gid 65534 (nobody) and gets
  ``RLIMIT_NPROC=max_processes``, which the kernel ignores for root. Needs an interpreter
  that uid 65534 can run (probed once per interpreter), such as ``/usr/bin/python3``; one
  under a private home folder (``/root/.pyenv``) cannot. Without this layer the solution runs
  with the scorer's own uid: it can read the scorer's environment (``/proc/<ppid>/environ``,
  credentials) and files, and with native code signal or trace it. So ``run_python_tests``
  raises ``SandboxUnavailable`` instead, unless called with ``require_isolation=False`` (then
  it runs anyway, with a warning). Never as root: a scorer running as root whose interpreter
  uid 65534 cannot run is refused even with the waiver (the solution would be root).
- ``audit_hook``: the harness installs ``sys.addaudithook`` before any solution code runs.
  Sockets and name lookups are the violation ``network``; fork, exec, spawn, system and
  Popen are ``process_limit``; ctypes, subinterpreters, raising rlimits, signalling other
  processes (``os.kill``, ``os.killpg``; ``fcntl``/``ioctl`` requests that make the kernel
  signal a chosen process or feed a terminal: ``F_SETOWN``, ``F_SETOWN_EX``, ``F_SETSIG``,
  ``FIOSETOWN``, ``SIOCSPGRP``, ``TIOCSTI``) and the ways to reach or shadow the hook are
  ``forbidden``; opening a file to write and changing the file system (``os.mkdir``,
  ``os.rename``, ``os.symlink``, ...) are ``filesystem`` (the run's folder is not writable
  to uid 65534, but ``/tmp`` and ``/dev/shm`` are; no bytecode is written); an extension
  module from outside the interpreter's own folders is ``forbidden`` (its native code could
  open a socket with no audit event). Some functions raise no audit event, so before the
  hook the harness replaces them, in the C module and in its Python face, with stubs whose
  call is a violation:
  ``pidfd_open``, ``setpriority``, ``sched_setaffinity``, ``sched_setscheduler`` and
  ``sched_setparam`` (``os``, ``posix``), ``pidfd_send_signal`` (``signal``, ``_signal``):
  ``forbidden``; ``_posixsubprocess.fork_exec`` (multiprocessing's spawn):
  ``process_limit`` (``os.waitid`` and ``signal.pthread_kill`` stay: they reach only the
  solution's own children and threads). ``importlib.reload`` brings none back (``os`` and
  ``signal`` copy the stubs again; the C modules keep their state and are not initialised
  again). A fresh instance of one of those C modules (or of ``_imp``) would: importing one
  anew (after deleting it from ``sys.modules``) is a violation, and so is creating one
  through ``_imp.create_builtin`` or
  ``_imp.create_dynamic`` (what ``importlib.util.module_from_spec`` calls; they raise no
  audit event of their own, so the harness wraps them to report the name first). On a
  violation the hook writes the reason to the report pipe and calls ``os._exit``: it never
  raises, since the solution could catch the exception.
- ``seccomp``: the harness sets ``no_new_privs`` and a seccomp filter under which
  ``pidfd_open``, ``pidfd_send_signal``, ``pidfd_getfd``, ``process_madvise`` and
  ``process_mrelease`` fail with EPERM, however the solution reaches them: the wrappers above
  keep the original ``_imp`` functions in their closures, and an open ``/proc/<pid>``
  directory is a pidfd too. x86_64 and aarch64 only (the numbers are the same on both).
- ``nondumpable``: the harness sets ``PR_SET_DUMPABLE=0``, so ``/proc/self/mem`` (the usual
  way to patch an audit hook out of memory) belongs to root, out of the solution's reach
  unless it runs as root.

The parent reads nothing from the run's folder by path once the child has started: stdout and
stderr through descriptors it opened before the start, the report through a non-blocking pipe.
A solution that can write the folder (no ``setuid``) therefore cannot make the parent block on
a FIFO or follow a symlink; ``shutil.rmtree`` removes the folder without following symlinks.

Kill reasons (``status == "killed"``), first match wins:

- the hook reported a violation: that reason (``network``, ``process_limit``,
  ``filesystem``, ``forbidden``); the hook's exit code without a report (the solution broke
  the pipe): ``forbidden``;
- the solution wrote more than ``output_bytes`` to stdout or stderr, or SIGXFSZ:
  ``output_size``;
- the parent's wall clock ran out: ``wall_clock``;
- SIGXCPU, or SIGKILL after using at least the CPU limit: ``cpu_time``;
- the harness caught ``MemoryError``; or SIGSEGV, SIGBUS, SIGABRT, or SIGKILL below the CPU
  limit: ``memory``. With ctypes blocked and ``RLIMIT_AS`` set, a crash is almost always a
  failed allocation or stack growth, and a SIGKILL nobody else sends is the OOM killer;
- any other signal: ``forbidden`` (the solution signalled itself, e.g. SIGALRM).

Otherwise ``passed`` when the harness reports that solution and tests ran to the end, or
``failed`` with the exception's class name (``AssertionError``, ``SyntaxError``,
``RecursionError``), or ``NoReport`` when the interpreter ended before the harness could
report (the solution called ``os._exit``).

Threat model. This contains resource abuse, network access, process creation and signalling,
with the kernel layers (rlimits, netns, uid 65534, RLIMIT_NPROC, seccomp) as the boundary and
the audit hook and stubs as an early, precise tripwire; audit hooks are not a security
boundary on their own. Native code gets past the tripwire: a solution can write a shared
object (to ``/tmp``) and import it, or call the original ``_imp`` functions kept in the
wrappers' closures to get the stubbed functions back. It then meets only the kernel layers,
and those do not stop ``kill(2)`` or ``setpriority(2)`` between processes of uid 65534, i.e.
between concurrent runs (which could then fail each other's runs, never the scorer's, which
runs as root). Without ``setuid`` (``require_isolation=False``) the solution runs with the
scorer's uid, and those same tricks reach the scorer itself and everything it can read.
This does NOT stop a solution from subverting its own test harness: the solution runs in the
harness's interpreter and can forge a pass on the report pipe or return objects that compare
equal to anything. That is reward hacking, to be caught elsewhere (held-out tests, review of
high-reward samples). Also out of scope: concurrent runs share uid 65534 (``max_processes``
counts all of its processes and threads on the host), and the solution may read
world-readable files and write to world-writable folders such as ``/tmp``.

Linux only. ``preexec_fn`` runs Python between fork and exec, which the subprocess docs warn
against in threaded programs (the scorer runs sandboxes from a thread pool): it only calls
unshare, setgroups/setgid/setuid and setrlimit, which take no lock another thread could have
left held, so the hazard is small.

Over 300 lines: every isolation layer is set up, checked and reported here, in the order
the child process goes through them; split, the order would be spread over files.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import math
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from services.scorer import harness

logger = logging.getLogger(__name__)

Status = Literal["passed", "failed", "killed"]

KILL_REASONS: tuple[str, ...] = (
    "cpu_time", "memory", "output_size", "wall_clock", "network", "process_limit",
    "filesystem", "forbidden",
)
"""Every ``SandboxResult.reason`` of a killed run."""

_NOBODY = 65534
_CLONE_NEWNET = 0x40000000
_HARNESS = Path(harness.__file__).read_text(encoding="utf-8")
"""``services/scorer/harness.py``, written into each run's folder and started as ``python -I
harness.py <report fd>``."""
_PATH = "/usr/local/bin:/usr/bin:/bin"
_REPORT_CAP = 65536
_CHILD_MECHANISMS = ("audit_hook", "seccomp", "nondumpable")
"""What the harness itself can confirm on its ``started`` line."""


class SandboxLimits(BaseModel):
    """Limits of one sandboxed run."""

    model_config = ConfigDict(extra="forbid")

    cpu_seconds: float = Field(
        default=5.0, gt=0, le=3600,
        description="RLIMIT_CPU, rounded up to whole seconds (at least 1).")
    memory_mb: int = Field(default=512, ge=32, description="RLIMIT_AS: address space, in MiB.")
    output_bytes: int = Field(
        default=65536, ge=1,
        description="Most bytes kept of stdout, and of stderr; writing more is output_size.")
    wall_seconds: float = Field(
        default=10.0, gt=0, le=3600,
        description="The parent kills the child's process group after this long.")
    max_processes: int = Field(
        default=8, ge=1,
        description="RLIMIT_NPROC of uid 65534, when the child runs as it (processes and "
        "threads of every concurrent run).")


@dataclass(frozen=True, slots=True)
class SandboxResult:
    """What one run did. ``reason``: a ``KILL_REASONS`` entry when killed, the exception's
    class name when failed, None when passed. ``exit_code``: as ``Popen.returncode``
    (negative: the signal that ended the child)."""

    status: Status
    reason: str | None
    exit_code: int | None
    seconds: float
    stdout: str
    stderr: str
    isolation: tuple[str, ...]


class SandboxUnavailable(Exception):
    """The solution cannot be switched to uid 65534 (the scorer is not root, or uid 65534
    cannot execute the interpreter), or cannot be given a network namespace of its own, and
    the caller did not waive ``require_isolation``."""


NO_NETNS = (
    "cannot give solutions a network namespace of their own: unshare(CLONE_NEWNET) needs "
    "CAP_SYS_ADMIN, which this process lacks (in a container: `--cap-add SYS_ADMIN`, or "
    "Kubernetes `securityContext.capabilities.add: [SYS_ADMIN]`; a container's default "
    "seccomp profile may refuse unshare too), so submitted code could reach the network.")
"""Why the ``netns`` layer is missing, and what to change."""


def isolation_plan(python: str) -> tuple[str, ...]:
    """The mechanisms the parent will set up for runs with interpreter ``python``: always
    ``rlimits``; ``netns`` when this process may create network namespaces; ``setuid`` and
    ``nproc`` when it runs as root and uid 65534 can execute ``python``. Each run's
    ``SandboxResult.isolation`` adds what the harness confirmed in the child (``audit_hook``,
    ``seccomp``, ``nondumpable``). Probes once per process and interpreter, then is free."""
    isolation = ["rlimits"]
    if _netns_unshare() is not None:
        isolation.append("netns")
    if os.geteuid() == 0 and _nobody_can_run(python):
        isolation += ["setuid", "nproc"]
    return tuple(isolation)


def run_python_tests(
    solution: str, tests: str, limits: SandboxLimits | None = None, *,
    python: str = sys.executable, require_isolation: bool = True,
) -> SandboxResult:
    """Run ``solution`` then ``tests`` (plain asserts) in one namespace, in a sandbox.

    ``require_isolation``: refuse to run (``SandboxUnavailable``) when the solution would keep
    the scorer's uid; False runs it anyway, with a warning (see the module docstring).
    Never raises because of what the solution does; raises OSError when the sandbox itself
    cannot run (no temporary folder, the interpreter does not start).
    """
    limits = limits or SandboxLimits()
    plan = _plan(limits, python)
    if not plan.drop_to_nobody:
        if os.geteuid() == 0:  # not even waived: the solution would run as root
            raise SandboxUnavailable(
                f"cannot sandbox solutions with {python}: {_why_no_uid_drop(python)}, and "
                "solutions never run as root, whatever require_isolation says. Use an "
                "interpreter that uid 65534 can execute (such as /usr/bin/python3), or run the "
                "scorer as a user other than root.")
        if require_isolation:
            raise SandboxUnavailable(
                f"cannot sandbox solutions with {python}: {_why_no_uid_drop(python)}, so "
                "solutions would run with the scorer's own uid and could read its environment "
                "(credentials) and files. Run the scorer as root with an interpreter that uid "
                "65534 can execute (such as /usr/bin/python3), or pass "
                "require_isolation=False to accept the weaker isolation.")
        _warn_weak_isolation(python)
    if plan.unshare is None:
        if require_isolation:
            raise SandboxUnavailable(NO_NETNS + " Or pass require_isolation=False to accept "
                                     "solutions with the network.")
        _warn_no_netns()
    workdir = Path(tempfile.mkdtemp(prefix="flywheel-sandbox-"))
    try:
        return _run(workdir, solution, tests, limits, python, plan)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@dataclass(frozen=True, slots=True)
class _Plan:
    """What the child does between fork and exec. Decided in the parent, because the child
    cannot tell it afterwards which steps worked: each step works or aborts the start."""

    rlimits: tuple[tuple[int, tuple[int, int]], ...]
    unshare: Callable[[int], int] | None
    drop_to_nobody: bool
    isolation: tuple[str, ...]

    def preexec(self) -> None:
        # Order matters: the namespace needs root, RLIMIT_NPROC only binds once uid is not
        # root, and RLIMIT_AS comes last because the forked parent image may already exceed it.
        if self.unshare is not None and self.unshare(_CLONE_NEWNET) != 0:
            raise OSError("unshare(CLONE_NEWNET) failed")
        if self.drop_to_nobody:
            _become_nobody()
        for which, limit in self.rlimits:
            resource.setrlimit(which, limit)


def _plan(limits: SandboxLimits, python: str) -> _Plan:
    isolation = isolation_plan(python)
    drop = "setuid" in isolation
    unshare = _netns_unshare() if "netns" in isolation else None
    cpu = max(1, math.ceil(limits.cpu_seconds))
    # RLIMIT_FSIZE one byte over the cap: a file longer than the cap means output was cut.
    wanted = [
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_FSIZE, limits.output_bytes + 1, limits.output_bytes + 1),
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_AS, limits.memory_mb << 20, limits.memory_mb << 20),
    ]
    if drop:
        wanted.insert(0, (resource.RLIMIT_NPROC, limits.max_processes, limits.max_processes))
    return _Plan(tuple((which, _within_hard_limit(which, soft, hard))
                       for which, soft, hard in wanted),
                 unshare, drop, isolation)


def _within_hard_limit(which: int, soft: int, hard: int) -> tuple[int, int]:
    """Lowered to this process's hard limit: an unprivileged child may not raise it."""
    current = resource.getrlimit(which)[1]
    if current == resource.RLIM_INFINITY:
        return soft, hard
    return min(soft, current), min(hard, current)


def _become_nobody() -> None:
    os.setgroups([])
    os.setgid(_NOBODY)
    os.setuid(_NOBODY)


@functools.cache
def _nobody_can_run(python: str) -> bool:
    """Whether uid 65534 can start ``python`` (binary, stdlib and site folders readable).
    Only asked as root."""
    try:
        subprocess.run([python, "-I", "-c", ""], preexec_fn=_become_nobody, env={"PATH": _PATH},
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def _why_no_uid_drop(python: str) -> str:
    if os.geteuid() != 0:
        return (f"the scorer runs as uid {os.geteuid()}, not root, so it cannot switch them to "
                "uid 65534 (nobody)")
    return (f"uid 65534 (nobody) cannot execute {python} (it or its standard library is in a "
            "folder that uid 65534 may not read, such as /root)")


@functools.cache
@functools.cache
def _warn_no_netns() -> None:
    """Once per process: runs go ahead with the network (``require_isolation=False``)."""
    logger.warning("sandbox without a network namespace (require_isolation waived): %s",
                   NO_NETNS)


def _warn_weak_isolation(python: str) -> None:
    """Once per interpreter: runs go ahead without ``setuid`` (``require_isolation=False``)."""
    logger.warning("sandbox without a uid drop: %s; solutions run with the scorer's uid and "
                   "can read its environment and files", _why_no_uid_drop(python))


@functools.cache
def _netns_unshare() -> Callable[[int], int] | None:
    """libc's ``unshare`` if this process may create network namespaces, else None."""
    try:
        unshare: Callable[[int], int] = ctypes.CDLL(None, use_errno=True).unshare
    except (OSError, AttributeError):
        return None

    def probe() -> None:
        if unshare(_CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")

    try:
        subprocess.run([sys.executable, "-I", "-S", "-c", ""], preexec_fn=probe,
                       env={"PATH": _PATH}, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
                       check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return unshare


def _run(workdir: Path, solution: str, tests: str, limits: SandboxLimits, python: str,
         plan: _Plan) -> SandboxResult:
    for name, text in (("harness.py", _HARNESS), ("solution.py", solution), ("tests.py", tests)):
        path = workdir / name
        # surrogatepass: any str is written; the child reports what it cannot decode.
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        path.chmod(0o644)
    workdir.chmod(0o711)  # uid 65534 may read the three files and create nothing
    report_r, report_w = os.pipe()
    child_fds = [report_w]
    readers: list[int] = []
    try:
        # The child writes its output through inherited descriptors: the files stay private.
        # The parent reads through its own, opened now: once the child runs, it may (without
        # setuid) replace the names in the folder, e.g. by a FIFO that would block open().
        for name in ("stdout", "stderr"):
            flags = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            child_fds.append(os.open(workdir / name, os.O_WRONLY | flags, 0o600))
            readers.append(os.open(workdir / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC))
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                [python, "-I", str(workdir / "harness.py"), str(report_w)], cwd=workdir,
                env={"PATH": _PATH}, stdin=subprocess.DEVNULL, stdout=child_fds[1],
                stderr=child_fds[2], pass_fds=(report_w,), close_fds=True,
                start_new_session=True, preexec_fn=plan.preexec)
        except subprocess.SubprocessError as exc:  # preexec_fn raised
            raise OSError(f"sandbox child could not be set up: {exc}") from exc
        finally:
            while child_fds:  # the parent's copies: EOF on the pipe once the child is gone
                os.close(child_fds.pop())
        timed_out, seconds, returncode, cpu = _supervise(proc, limits.wall_seconds, start)
        report = _parse_report(_drain(report_r))
        stdout, stdout_over = _read_capped(readers[0], limits.output_bytes)
        stderr, stderr_over = _read_capped(readers[1], limits.output_bytes)
    finally:
        for fd in (report_r, *child_fds, *readers):
            os.close(fd)
    if report.started is None and not timed_out:
        raise OSError(f"sandbox harness did not start (return code {returncode}): "
                      f"{stderr[-500:]}")
    status, reason = _verdict(report, returncode, cpu_seconds=cpu, timed_out=timed_out,
                              output_over=stdout_over or stderr_over,
                              cpu_limit=max(1, math.ceil(limits.cpu_seconds)))
    logger.debug("sandbox run %s (%s) in %.2fs, return code %s", status, reason, seconds,
                 returncode)
    return SandboxResult(status=status, reason=reason, exit_code=returncode, seconds=seconds,
                         stdout=stdout, stderr=stderr,
                         isolation=plan.isolation + (report.started or ()))


def _supervise(proc: subprocess.Popen[bytes], wall_seconds: float,
               start: float) -> tuple[bool, float, int, float]:
    """Wait, kill the group, reap: (timed out, seconds, return code, child CPU seconds)."""
    try:
        timed_out = not _wait_for_exit(proc.pid, wall_seconds)
        seconds = time.monotonic() - start
    finally:
        # Always: the group outlives its leader when the solution left descendants. The
        # leader is still an unreaped zombie here, so its pid (the group id) cannot be reused.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not reap it again
    return timed_out, seconds, proc.returncode, usage.ru_utime + usage.ru_stime


def _wait_for_exit(pid: int, timeout: float) -> bool:
    """Whether the child exited within ``timeout`` seconds, leaving it unreaped."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfd (old kernel, seccomp): poll instead
        deadline = time.monotonic() + timeout
        while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True
    try:
        return bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)


def _drain(fd: int) -> bytes:
    """What is in the report pipe, without blocking: an escaped descendant might hold the
    write end open forever."""
    os.set_blocking(fd, False)
    data = b""
    while len(data) < _REPORT_CAP:
        try:
            chunk = os.read(fd, _REPORT_CAP - len(data))
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return data


def _read_capped(fd: int, cap: int) -> tuple[str, bool]:
    """The first ``cap`` bytes of an output file, read through the parent's own descriptor
    ``fd`` (from offset 0, whatever the child did to its own), as text, and whether it went
    over."""
    data = b""
    while len(data) <= cap:
        chunk = os.pread(fd, cap + 1 - len(data), len(data))
        if not chunk:
            break
        data += chunk
    return data[:cap].decode("utf-8", errors="replace"), len(data) > cap


@dataclass(frozen=True, slots=True)
class _Report:
    """The harness's lines. The solution shares its process and can forge them: a forged
    pass is reward hacking, out of this module's reach (see the module docstring)."""

    started: tuple[str, ...] | None
    violation: str | None
    outcome: str | None


def _parse_report(data: bytes) -> _Report:
    started: tuple[str, ...] | None = None
    violation: str | None = None
    outcome: str | None = None
    for line in data.decode("utf-8", errors="replace").splitlines():
        word, _, rest = line.partition(" ")
        if word == "started" and started is None:
            started = tuple(m for m in _CHILD_MECHANISMS if m in rest.split())
        elif word == "violation" and violation is None:
            violation = rest if rest in KILL_REASONS else "forbidden"
        elif word in ("passed", "memory") and not rest:
            outcome = word
        elif word == "failed":  # a class name, unless the solution renamed its class
            name = rest if rest.isidentifier() and len(rest) <= 100 else "Exception"
            outcome = f"failed {name}"
    return _Report(started, violation, outcome)


def _verdict(report: _Report, returncode: int, *, cpu_seconds: float, timed_out: bool,
             output_over: bool, cpu_limit: int) -> tuple[Status, str | None]:
    """Status and reason, in the order of the module docstring."""
    sig = -returncode if returncode < 0 else None
    if report.violation is not None:
        return "killed", report.violation
    if returncode == harness.VIOLATION_EXIT:
        return "killed", "forbidden"
    if output_over or sig == signal.SIGXFSZ:
        return "killed", "output_size"
    if timed_out:
        return "killed", "wall_clock"
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_seconds >= cpu_limit):
        return "killed", "cpu_time"
    if report.outcome == "memory" or sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT,
                                             signal.SIGKILL):
        return "killed", "memory"
    if sig is not None:
        return "killed", "forbidden"
    if report.outcome == "passed" and returncode == 0:
        return "passed", None
    if report.outcome is not None and report.outcome.startswith("failed "):
        return "failed", report.outcome.removeprefix("failed ")
    return "failed", "NoReport"

