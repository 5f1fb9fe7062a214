"""Run untrusted Python solutions against unit tests in a sandboxed child process.

The code verifier rewards a coding completion by running it against the task's tests. The
completion is written by the policy being trained, so it is untrusted: it may loop, allocate
without bound, flood its output, open sockets, fork, or try to break out of whatever watches
it. Each run gets its own temporary folder and a fresh interpreter (``python -I harness.py``),
and these layers, each recorded in ``SandboxResult.isolation`` when it was active:

- ``rlimits``: set between fork and exec. ``RLIMIT_CPU`` (SIGXCPU at the limit, SIGKILL one
  second later), ``RLIMIT_AS`` (memory), ``RLIMIT_FSIZE`` (stdout and stderr are files, so
  output is capped by the kernel), ``RLIMIT_CORE=0``. The parent adds the wall clock: it
  kills the child's whole process group (``start_new_session``) at ``wall_seconds`` and
  again, always, when the run ends, so no stray descendant outlives it.
- ``netns``: a new, empty network namespace (``unshare(CLONE_NEWNET)``; not even loopback is
  up). Needs root or CAP_SYS_ADMIN, probed once per process in a throwaway child.
- ``setuid`` and ``nproc``: as root, the child drops to uid/gid 65534 (nobody) and gets
  ``RLIMIT_NPROC=max_processes``, which the kernel ignores for root. Needs an interpreter
  that uid 65534 can run (probed once per interpreter); one under a private home folder
  (``/root/.pyenv``) cannot, and the run then stays root with a warning: insist on
  ``"setuid" in result.isolation`` where that matters.
- ``audit_hook``: the harness installs ``sys.addaudithook`` before any solution code runs.
  Sockets and name lookups are the violation ``network``; fork, exec, spawn, system and
  Popen are ``process_limit``; ctypes, subinterpreters, raising rlimits, signalling other
  processes and the ways to reach or shadow the hook are ``forbidden``. On a violation the
  hook writes the reason to the report pipe and calls ``os._exit``: it never raises, since
  the solution could catch the exception.
- ``nondumpable``: the harness sets ``PR_SET_DUMPABLE=0``, so ``/proc/self/mem`` (the usual
  way to patch an audit hook out of memory) belongs to root, out of the solution's reach
  unless it runs as root.

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

Threat model. This contains resource abuse, network access and process creation, with the
kernel layers (rlimits, netns, uid 65534, RLIMIT_NPROC) as the boundary and the audit hook as
an early, precise tripwire; audit hooks are not a security boundary on their own. It does NOT
stop a solution from subverting its own test harness: the solution runs in the harness's
interpreter and can forge a pass on the report pipe or return objects that compare equal to
anything. That is reward hacking, to be caught elsewhere (held-out tests, review of high-reward
samples). Also out of scope: concurrent runs share uid 65534 (``max_processes`` counts all of
its processes and threads on the host), and the solution may read world-readable files and
write to world-writable folders such as ``/tmp``.

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
_CHILD_MECHANISMS = ("audit_hook", "nondumpable")
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


def run_python_tests(
    solution: str, tests: str, limits: SandboxLimits | None = None, *,
    python: str = sys.executable,
) -> SandboxResult:
    """Run ``solution`` then ``tests`` (plain asserts) in one namespace, in a sandbox.

    Never raises because of what the solution does; raises OSError when the sandbox itself
    cannot run (no temporary folder, the interpreter does not start).
    """
    limits = limits or SandboxLimits()
    plan = _plan(limits, python)
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
    drop = os.geteuid() == 0 and _nobody_can_run(python)
    unshare = _netns_unshare()
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
    isolation = ["rlimits"]
    if unshare is not None:
        isolation.append("netns")
    if drop:
        isolation += ["setuid", "nproc"]
    return _Plan(tuple((which, _within_hard_limit(which, soft, hard))
                       for which, soft, hard in wanted),
                 unshare, drop, tuple(isolation))


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
    """Whether uid 65534 can start ``python`` (binary, stdlib and site folders readable)."""
    try:
        subprocess.run([python, "-I", "-c", ""], preexec_fn=_become_nobody, env={"PATH": _PATH},
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        logger.warning("uid 65534 cannot run %s: sandboxed code will run as root; use an "
                       "interpreter outside private folders to drop privileges", python)
        return False
    return True


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
    try:
        # The child writes its output through inherited descriptors: the files stay private.
        for name in ("stdout", "stderr"):
            child_fds.append(os.open(workdir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
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
    finally:
        for fd in (report_r, *child_fds):
            os.close(fd)

    stdout, stdout_over = _read_capped(workdir / "stdout", limits.output_bytes)
    stderr, stderr_over = _read_capped(workdir / "stderr", limits.output_bytes)
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


def _read_capped(path: Path, cap: int) -> tuple[str, bool]:
    """The first ``cap`` bytes of an output file as text, and whether it went over."""
    with path.open("rb") as f:
        data = f.read(cap + 1)
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
import os
import sys
import traceback
import types

import _posixsubprocess

REPORT_FD = int(sys.argv[1])
VIOLATION_EXIT = @VIOLATION_EXIT@


def make_nondumpable():
    # /proc/self/mem of a non-dumpable process belongs to root: the solution cannot open it
    # to patch the hook out of memory. ctypes is imported before the hook; using it later
    # is a violation.
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) == 0  # PR_SET_DUMPABLE
    except (ImportError, OSError, AttributeError):
        return False


def close_fork_exec():
    # multiprocessing's spawn calls _posixsubprocess.fork_exec directly, which raises no
    # audit event. The stub never forks; importing the real module afresh is a violation.
    def fork_exec(*args, _audit=sys.audit):
        _audit("subprocess.Popen", "_posixsubprocess.fork_exec")
        raise PermissionError("no processes in the sandbox")

    _posixsubprocess.fork_exec = fork_exec


def install_hook():
    # Defined in here so that no global names it: once installed it is reachable only through
    # gc (a violation). Everything it uses is bound at definition, immune to monkeypatching.
    def hook(event, args, _write=os.write, _exit=os._exit, _fd=REPORT_FD,
             _code=VIOLATION_EXIT):
        if event == "socket.__new__" and args[1] == 1:
            return  # AF_UNIX: asyncio's self-pipe; connect, bind and sendto still trip below
        if event.startswith("socket."):
            reason = b"network"
        elif event in {"os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn",
                       "os.system", "os.startfile", "subprocess.Popen"} or (
                event == "import" and args[0] == "_posixsubprocess"):
            reason = b"process_limit"
        elif event.startswith("ctypes.") or event in {
                "sys.addaudithook", "cpython.PyInterpreterState_New", "gc.get_objects",
                "gc.get_referrers", "gc.get_referents", "os.kill", "os.killpg",
                "resource.setrlimit", "resource.prlimit"}:
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
    mechanisms = b"audit_hook nondumpable" if make_nondumpable() else b"audit_hook"
    close_fork_exec()
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
