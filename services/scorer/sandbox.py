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
  up). Needs root or CAP_SYS_ADMIN, probed once per process in a throwaway child.
- ``setuid`` and ``nproc``: as root, the child drops to uid/gid 65534 (nobody) and gets
  ``RLIMIT_NPROC=max_processes``, which the kernel ignores for root. Needs an interpreter
  that uid 65534 can run (probed once per interpreter), such as ``/usr/bin/python3``; one
  under a private home folder (``/root/.pyenv``) cannot. Without this layer the solution runs
  with the scorer's own uid: it can read the scorer's environment (``/proc/<ppid>/environ``,
  credentials) and files, and with native code signal or trace it. So ``run_python_tests``
  raises ``SandboxUnavailable`` instead, unless called with ``require_isolation=False`` (then
  it runs anyway, with a warning).
- ``audit_hook``: the harness installs ``sys.addaudithook`` before any solution code runs.
  Sockets and name lookups are the violation ``network``; fork, exec, spawn, system and
  Popen are ``process_limit``; ctypes, subinterpreters, raising rlimits, signalling other
  processes (``os.kill``, ``os.killpg``; ``fcntl``/``ioctl`` requests that make the kernel
  signal a chosen process or feed a terminal: ``F_SETOWN``, ``F_SETOWN_EX``, ``F_SETSIG``,
  ``FIOSETOWN``, ``SIOCSPGRP``, ``TIOCSTI``) and the ways to reach or shadow the hook are
  ``forbidden``. Some functions raise no audit event, so before the hook the harness replaces
  them, in the C module and in its Python face, with stubs whose call is a violation:
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
  ``forbidden``); the hook's exit code without a report (the solution broke the pipe):
  ``forbidden``;
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

logger = logging.getLogger(__name__)

Status = Literal["passed", "failed", "killed"]

KILL_REASONS: tuple[str, ...] = (
    "cpu_time", "memory", "output_size", "wall_clock", "network", "process_limit", "forbidden",
)
"""Every ``SandboxResult.reason`` of a killed run."""

_NOBODY = 65534
_CLONE_NEWNET = 0x40000000
_VIOLATION_EXIT = 86
"""The harness's exit code after an audit-hook violation."""
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
    cannot execute the interpreter), and the caller did not waive ``require_isolation``."""


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
        if require_isolation:
            raise SandboxUnavailable(
                f"cannot sandbox solutions with {python}: {_why_no_uid_drop(python)}, so "
                "solutions would run with the scorer's own uid and could read its environment "
                "(credentials) and files. Run the scorer as root with an interpreter that uid "
                "65534 can execute (such as /usr/bin/python3), or pass "
                "require_isolation=False to accept the weaker isolation.")
        _warn_weak_isolation(python)
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
    if returncode == _VIOLATION_EXIT:
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


# Written into each run's folder and started as `python -I harness.py <report fd>`. Plain
# Python for any 3.11+ interpreter; it must not import anything after the hook is installed.
_HARNESS = r'''"""Sandbox harness, written by services/scorer/sandbox.py.

Reports on the pipe whose descriptor is argv[1]: "started <mechanisms>" once the audit hook
is in place, then "passed", "failed <ExceptionClass>" or "memory"; or, from the hook,
"violation <reason>" followed by os._exit, so that no except clause can swallow it.
"""
import _imp
import _signal
import fcntl
import os
import posix
import signal
import sys
import termios
import traceback
import types

import _posixsubprocess

REPORT_FD = int(sys.argv[1])
VIOLATION_EXIT = @VIOLATION_EXIT@
# Functions that reach other processes without an audit event, by the C module that has them
# and its Python face. A fresh instance of one of these modules would have them all again.
STUBBED = {
    "pidfd_open": (posix, os), "setpriority": (posix, os), "sched_setaffinity": (posix, os),
    "sched_setscheduler": (posix, os), "sched_setparam": (posix, os),
    "pidfd_send_signal": (_signal, signal),
}
FRESH_MODULES = {"posix": b"forbidden", "_signal": b"forbidden", "_imp": b"forbidden",
                 "_posixsubprocess": b"process_limit"}
# pidfd_send_signal, pidfd_open, pidfd_getfd, process_madvise, process_mrelease: from the
# table shared by x86_64 and aarch64 (and most others) since Linux 5.1.
SECCOMP_DENIED = (424, 434, 438, 440, 448)


def harden():
    """The mechanisms set with ctypes, which is imported before the hook; using it later is a
    violation."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
    except (ImportError, OSError):
        return []
    done = []
    # /proc/self/mem of a non-dumpable process belongs to root: the solution cannot open it
    # to patch the hook out of memory.
    try:
        if libc.prctl(4, 0, 0, 0, 0) == 0:  # PR_SET_DUMPABLE
            done.append(b"nondumpable")
        if os.uname().machine in ("x86_64", "aarch64") and install_seccomp(ctypes, libc):
            done.append(b"seccomp")
    except (AttributeError, OSError, TypeError):  # not reported, so not claimed
        pass
    return done


def install_seccomp(ctypes, libc):
    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                    ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    n = len(SECCOMP_DENIED)
    code = [(0x20, 0, 0, 0),  # A = seccomp_data.nr
            (0x54, 0, 0, 0xBFFFFFFF)]  # A &= ~__X32_SYSCALL_BIT
    code += [(0x15, n - i, 0, nr) for i, nr in enumerate(SECCOMP_DENIED)]  # jeq: to the last
    code += [(0x06, 0, 0, 0x7FFF0000),  # SECCOMP_RET_ALLOW
             (0x06, 0, 0, 0x00050000 | 1)]  # SECCOMP_RET_ERRNO | EPERM
    program = Program(len(code), (Filter * len(code))(*(Filter(*c) for c in code)))
    ulong = ctypes.c_ulong
    if libc.prctl(38, ulong(1), ulong(0), ulong(0), ulong(0)) != 0:  # PR_SET_NO_NEW_PRIVS
        return False
    # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
    return libc.prctl(22, ulong(2), ctypes.byref(program), ulong(0), ulong(0)) == 0


def stub(name, reason, _audit=sys.audit):
    def stubbed(*args, **kwargs):
        _audit("sandbox.violation", reason)  # the hook exits the process
        raise PermissionError(f"{name} is not available in the sandbox")

    stubbed.__name__ = stubbed.__qualname__ = name
    return stubbed


def close_stubbed():
    # Both the C module and its Python face: `from posix import *` in a reloaded os copies the
    # stub again, and reloading a C module with state does not initialise it again.
    for name, modules in STUBBED.items():
        if hasattr(modules[0], name):
            replacement = stub(name, "forbidden")
            for module in modules:
                setattr(module, name, replacement)
    # multiprocessing's spawn calls _posixsubprocess.fork_exec directly, which raises no
    # audit event. The stub never forks.
    _posixsubprocess.fork_exec = stub("fork_exec", "process_limit")


def guard_module_creation():
    # importlib.util.module_from_spec, and importlib's loaders, create C modules through these
    # two, which raise no audit event: report the name to the hook first. Only a str name and
    # origin go on to the original, so what the hook saw is what gets created.
    def guard(create, _audit=sys.audit, _type=type, _str=str, _getattr=getattr,
              _spec=types.SimpleNamespace):
        def guarded(spec, *args):
            name, origin = spec.name, _getattr(spec, "origin", None)
            if _type(name) is not _str or not (origin is None or _type(origin) is _str):
                raise ImportError("a module spec needs a str name and origin")
            _audit("sandbox.create_module", name)
            return create(_spec(name=name, origin=origin), *args)

        return guarded

    _imp.create_builtin = guard(_imp.create_builtin)
    if hasattr(_imp, "create_dynamic"):
        _imp.create_dynamic = guard(_imp.create_dynamic)


def install_hook():
    # Defined in here so that no global names it: once installed it is reachable only through
    # gc (a violation). Everything it uses is bound at definition, immune to monkeypatching.
    owner_fcntl = frozenset(getattr(fcntl, name, number) for name, number in (
        ("F_SETOWN", 8), ("F_SETSIG", 10), ("F_SETOWN_EX", 15)))
    owner_ioctl = frozenset(getattr(termios, name, number) for name, number in (
        ("FIOSETOWN", 0x8901), ("SIOCSPGRP", 0x8902), ("TIOCSTI", 0x5412)))

    fresh = dict(FRESH_MODULES)  # a copy only the hook holds: the solution can reach globals

    def hook(event, args, _write=os.write, _exit=os._exit, _fd=REPORT_FD,
             _code=VIOLATION_EXIT, _fresh=fresh, _fcntl=owner_fcntl,
             _ioctl=owner_ioctl, _str=str, _type=type):
        if event == "socket.__new__" and args[1] == 1:
            return  # AF_UNIX: asyncio's self-pipe; connect, bind and sendto still trip below
        if event.startswith("socket."):
            reason = b"network"
        elif event in {"os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn",
                       "os.system", "os.startfile", "subprocess.Popen"}:
            reason = b"process_limit"
        elif event in {"import", "sandbox.create_module"}:
            name = args[0]
            reason = _fresh.get(name.rpartition(".")[2]) if _type(name) is _str else b"forbidden"
            if reason is None:
                return
        elif event == "sandbox.violation":
            reason = b"process_limit" if args[0] == "process_limit" else b"forbidden"
        elif event.startswith("ctypes.") or event in {
                "sys.addaudithook", "cpython.PyInterpreterState_New", "gc.get_objects",
                "gc.get_referrers", "gc.get_referents", "os.kill", "os.killpg",
                "resource.setrlimit", "resource.prlimit"} or (
                event == "fcntl.fcntl" and args[1] in _fcntl) or (
                event == "fcntl.ioctl" and args[1] in _ioctl):
            reason = b"forbidden"
        else:
            return
        try:
            _write(_fd, b"violation " + reason + b"\n")
        finally:
            _exit(_code)

    sys.addaudithook(hook)


def run():
    """The report line and exit code of running solution.py, then tests.py."""
    module = types.ModuleType("solution")
    sys.modules["solution"] = module
    try:
        # Both compiled before either runs: the solution cannot rewrite the tests on disk.
        codes = [compile(read(name), name, "exec") for name in ("solution.py", "tests.py")]
        for code in codes:
            exec(code, module.__dict__)
    except MemoryError:
        return b"memory\n", 3
    except BaseException as exc:  # SystemExit too: the tests did not run to the end
        show(exc)
        return b"failed " + type(exc).__name__.encode("utf-8", "replace") + b"\n", 1
    return b"passed\n", 0


def read(name):
    with open(name, encoding="utf-8") as f:
        return f.read()


def show(exc):
    try:
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
            tb = tb.tb_next  # the harness's own frames are noise to whoever reads stderr
        traceback.print_exception(type(exc), exc, tb, file=sys.__stderr__)
    except BaseException:  # stderr may be over its size limit; the report line still goes out
        pass


def flush():
    for stream in (sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:  # over the size limit: the parent sees the file length
            pass


def main():
    mechanisms = b" ".join([b"audit_hook", *harden()])
    close_stubbed()
    guard_module_creation()
    install_hook()
    # Non-blocking: a solution that fills the pipe cannot make the hook hang instead of exit.
    os.set_blocking(REPORT_FD, False)
    os.write(REPORT_FD, b"started " + mechanisms + b"\n")
    line, code = run()
    flush()
    try:
        os.write(REPORT_FD, line)
    finally:
        # No interpreter shutdown: the solution's atexit and __del__ code would run there,
        # some of it after the audit hooks are cleared.
        os._exit(code)


main()
'''.replace("@VIOLATION_EXIT@", str(_VIOLATION_EXIT))
