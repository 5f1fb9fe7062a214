"""The code sandbox: each limit and rule stops a real child process, and scoring goes on.

Every run starts a real interpreter under small limits; the whole file takes a few seconds,
most of it the CPU-time and wall-clock cases.

Runs use ``/usr/bin/python3``, which uid 65534 can execute, with the isolation the module
requires by default; where this process cannot drop privileges (not root) they fail, unless
the run waives isolation (``FLYWHEEL_TEST_UNISOLATED=1``, :mod:`tests.isolation`). The
weak-isolation cases (no uid drop: the solution keeps the scorer's uid and can touch the run's
folder and the scorer's siblings) run the sandbox's parent as uid 65534 (:func:`unprivileged`),
as a scorer run by an ordinary user with isolation waived: solutions never run as root, so a
root scorer that cannot drop them to uid 65534 (``weak_python``, an interpreter uid 65534 may
not execute) refuses, waiver or not.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.scorer.harness import VIOLATION_EXIT
from services.scorer.sandbox import (
    KILL_REASONS,
    SandboxLimits,
    SandboxResult,
    SandboxUnavailable,
    _parse_report,
    _Report,
    _verdict,
    isolation_plan,
    run_python_tests,
)
from tests.isolation import require, waived

# A wall clock far above the CPU limit: on a busy machine a passing run, or one that spends its
# CPU second, takes longer than its CPU time, and must not end as "wall_clock" for that.
LIMITS = SandboxLimits(cpu_seconds=1, wall_seconds=20)
SOLUTION = "def add(a, b):\n    return a + b\n"
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
REPO = Path(__file__).resolve().parents[2]


@functools.cache
def _isolated() -> bool:
    return {"setuid", "netns"} <= set(isolation_plan(PYTHON))


def sandbox(solution: str, tests: str = TESTS, limits: SandboxLimits = LIMITS,
            **kwargs: Any) -> SandboxResult:
    """``run_python_tests`` with PYTHON and the uid drop; where this process cannot drop
    privileges the test fails, unless the run waived isolation."""
    kwargs.setdefault("python", PYTHON)
    if kwargs.get("require_isolation", True):
        if not waived():  # waived: run without the uid drop, checking less
            require(f"uid 65534 cannot be switched to for {kwargs['python']}", _isolated())
        kwargs["require_isolation"] = _isolated()
    return run_python_tests(solution, tests, limits, **kwargs)


@pytest.fixture(scope="session")
def weak_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An interpreter uid 65534 cannot execute (mode 0700), so runs keep this process's uid."""
    launcher = tmp_path_factory.mktemp("weak") / "python"
    launcher.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    launcher.chmod(0o700)
    assert "setuid" not in isolation_plan(str(launcher))
    return str(launcher)


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
"""A command's prefix that runs it as uid 65534, as the sandbox's parent of the weak cases."""

_UNPRIVILEGED = """\
import dataclasses, json, sys
from services.scorer.sandbox import SandboxLimits, SandboxUnavailable, run_python_tests
a = json.loads(sys.argv[1])
try:
    r = run_python_tests(a["solution"], a["tests"], SandboxLimits(**a["limits"]),
                         python=a["python"], require_isolation=a["require"])
except SandboxUnavailable as e:
    print(json.dumps({"unavailable": str(e)}))
else:
    print(json.dumps(dataclasses.asdict(r)))
"""


def unprivileged(solution: str, tests: str = TESTS, limits: SandboxLimits = LIMITS, *,
                 python: str = PYTHON, require_isolation: bool = False,
                 timeout: float = 120) -> SandboxResult | str:
    """``run_python_tests`` from a parent running as uid 65534, not root: the result, or the
    ``SandboxUnavailable`` message."""
    require("root, to start the sandbox's parent as another user", os.geteuid() == 0)
    args = json.dumps({"solution": solution, "tests": tests, "limits": limits.model_dump(),
                       "python": python, "require": require_isolation})
    done = subprocess.run([*NOBODY, sys.executable, "-c", _UNPRIVILEGED, args], cwd="/",
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    if "unavailable" in out:
        return str(out["unavailable"])
    return SandboxResult(**{**out, "isolation": tuple(out["isolation"])})


def _ran(result: SandboxResult | str) -> SandboxResult:
    assert isinstance(result, SandboxResult), result
    return result


@pytest.fixture
def victim() -> Iterator[subprocess.Popen[bytes]]:
    """A process of uid 65534 that a weakly isolated solution (of a parent of that uid) could
    otherwise signal."""
    proc = subprocess.Popen([*NOBODY, "sleep", "60"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_correct_solution_passes_and_its_output_is_kept() -> None:
    result = sandbox(SOLUTION + "print('hello')\n")
    assert (result.status, result.reason, result.exit_code) == ("passed", None, 0)
    assert result.stdout == "hello\n"
    assert {"rlimits", "audit_hook"} <= set(result.isolation)
    assert set(isolation_plan(PYTHON)) <= set(result.isolation)


def test_a_wrong_solution_fails_with_the_assertion() -> None:
    result = sandbox("def add(a, b):\n    return a - b\n")
    assert (result.status, result.reason) == ("failed", "AssertionError")
    assert 'File "tests.py", line 1' in result.stderr
    assert "harness" not in result.stderr


@pytest.mark.parametrize(("solution", "tests", "reason"), [
    ("def add(a, b:\n    return a + b\n", TESTS, "SyntaxError"),
    (SOLUTION, "assert add(1, 1) == 2\nassert add(1 1) == 2\n", "SyntaxError"),
    ("def f(n):\n    return f(n + 1)\n", "f(0)\n", "RecursionError"),
    ("import sys\nsys.exit(0)\n", TESTS, "SystemExit"),  # exiting early is not passing
    ("import os\nos._exit(0)\n", TESTS, "NoReport"),
])
def test_errors_fail_with_their_class(solution: str, tests: str, reason: str) -> None:
    result = sandbox(solution, tests)
    assert (result.status, result.reason) == ("failed", reason)


@pytest.mark.parametrize(("solution", "reason"), [
    ("while True:\n    pass\n", "cpu_time"),
    ("x = bytearray(10 * 1024**3)\n", "memory"),
    ("import socket\nsocket.socket()\n", "network"),
    ("import socket\ntry:\n    socket.socket()\nexcept BaseException:\n    pass\n", "network"),
    ("import socket\nsocket.getaddrinfo('example.com', 80)\n", "network"),
    ("import os\nwhile True:\n    os.fork()\n", "process_limit"),
    ("import subprocess\nsubprocess.run(['true'])\n", "process_limit"),
    # spawn goes through _posixsubprocess.fork_exec, which raises no audit event of its own
    ("import multiprocessing as mp\nmp.get_context('spawn').Process(target=print).start()\n",
     "process_limit"),
    ("print('x' * 10_000_000)\n", "output_size"),
    ("import ctypes\nctypes.string_at(id(1), 8)\n", "forbidden"),
    ("import gc\nhooks = gc.get_objects()\n", "forbidden"),
    # Writing outside the run's folder (which is not writable either): /tmp is, to uid 65534.
    ("open('/tmp/flywheel-sandbox-escape', 'w').write('x')\n", "filesystem"),
    ("import os\nos.close(os.open('/dev/shm/escape', os.O_CREAT | os.O_WRONLY))\n",
     "filesystem"),
    ("import os\nos.mkdir('/tmp/flywheel-sandbox-escape.d')\n", "filesystem"),
    ("import os\nos.symlink('/etc/passwd', '/tmp/flywheel-sandbox-escape.lnk')\n",
     "filesystem"),
])
def test_limits_and_rules_kill_the_run(solution: str, reason: str) -> None:
    result = sandbox(solution)
    assert (result.status, result.reason) == ("killed", reason), result.stderr
    assert len(result.stdout) <= LIMITS.output_bytes
    assert result.seconds < LIMITS.wall_seconds


def test_a_sleeping_solution_is_killed_by_the_wall_clock() -> None:
    limits = SandboxLimits(cpu_seconds=1, wall_seconds=2)
    result = sandbox("import time\ntime.sleep(100)\n", limits=limits)
    assert (result.status, result.reason) == ("killed", "wall_clock")
    assert limits.wall_seconds <= result.seconds < 100


def test_asyncio_still_works_under_the_network_rule() -> None:
    solution = "import asyncio\n\nasync def twice(x):\n    return 2 * x\n"
    result = sandbox(solution, "assert asyncio.run(twice(4)) == 8\n")
    assert result.status == "passed", result.stderr


def test_a_fork_bomb_leaves_no_process_behind_and_scoring_goes_on() -> None:
    bomb = "import os\nprint(os.getsid(0), flush=True)\nwhile True:\n    os.fork()\n"
    result = sandbox(bomb)
    assert (result.status, result.reason) == ("killed", "process_limit")
    assert _session_members(int(result.stdout)) == []
    for killer in ("x = bytearray(10 * 1024**3)\n", "print('x' * 10_000_000)\n",
                   "import socket\nsocket.socket()\n"):
        assert sandbox(killer).status == "killed"
    after = sandbox(SOLUTION)
    assert after.status == "passed"
    assert after.seconds < LIMITS.wall_seconds


def test_descendants_are_killed_when_the_run_ends() -> None:
    # The audit hook stops every fork a solution can make, so a stand-in interpreter leaves
    # the descendant: it reports a pass at once and exits, with `sleep` still running.
    folder = Path(tempfile.mkdtemp(prefix="flywheel-test-fake-"))  # uid 65534 may enter it
    folder.chmod(0o755)
    fake = folder / "fake-python"
    fake.write_text(f"#!{PYTHON}\n"
                    "import os, subprocess, sys\n"
                    "print(subprocess.Popen(['sleep', '60']).pid, flush=True)\n"
                    "os.write(int(sys.argv[3]), b'started audit_hook\\npassed\\n')\n")
    fake.chmod(0o755)
    try:
        result = _ran(unprivileged(SOLUTION, python=str(fake)))
    finally:
        shutil.rmtree(folder)
    assert result.status == "passed"
    assert _dies_within(int(result.stdout), seconds=2)


def _dies_within(pid: int, seconds: float) -> bool:
    """Whether ``pid`` is gone or a zombie within ``seconds``: SIGKILL lands when the target
    is next scheduled, a moment after killpg returns."""
    deadline = time.monotonic() + seconds
    while _state(pid) not in (None, "Z"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_the_network_namespace_has_only_loopback() -> None:
    solution = ("def interfaces():\n    with open('/proc/self/net/dev') as f:\n"
                "        return [line.split(':')[0].strip() for line in f.readlines()[2:]]\n")
    result = sandbox(solution, "assert interfaces() == ['lo'], interfaces()\n")
    require("no network namespaces here (they need root or CAP_SYS_ADMIN)",
            "netns" in result.isolation)
    assert result.status == "passed", result.stderr


def test_as_root_the_child_runs_as_nobody_with_a_process_limit() -> None:
    require("privileges are only dropped by a root parent", os.geteuid() == 0)
    solution = (
        "import os, threading\n\n"
        "def threads_started(n):\n"
        "    release, started = threading.Event(), 0\n"
        "    try:\n"
        "        for _ in range(n):\n"
        "            threading.Thread(target=release.wait, daemon=True).start()\n"
        "            started += 1\n"
        "    except RuntimeError:\n"
        "        pass\n"
        "    release.set()\n"
        "    return started\n")
    tests = ("assert (os.getuid(), os.getgid(), os.getgroups()) == (65534, 65534, [])\n"
             "assert threads_started(20) < 8\n"  # RLIMIT_NPROC counts threads, child included
             "try:\n    open('/proc/self/mem', 'rb')\nexcept PermissionError:\n    pass\n"
             "else:\n    raise AssertionError('/proc/self/mem is open to the solution')\n")
    # The interpreter must be one uid 65534 can run; a pyenv under /root is not.
    require(f"uid 65534 cannot run {PYTHON}", _isolated())
    result = run_python_tests(solution, tests, LIMITS, python=PYTHON)
    assert result.status == "passed", result.stderr
    assert {"setuid", "nproc", "nondumpable"} <= set(result.isolation)


def test_without_a_uid_drop_the_sandbox_refuses_unless_isolation_is_waived() -> None:
    """A scorer that is not root cannot drop solutions to uid 65534: it refuses, naming the
    fix, unless isolation is waived; then the solution runs with the scorer's uid."""
    refused = unprivileged(SOLUTION, require_isolation=True)
    assert isinstance(refused, str) and "require_isolation=False" in refused
    assert "not root" in refused and "/usr/bin/python3" in refused
    result = _ran(unprivileged(SOLUTION))
    assert result.status == "passed", result.stderr
    assert "setuid" not in result.isolation


def test_solutions_never_run_as_root_even_with_isolation_waived(weak_python: str) -> None:
    """As root, with an interpreter uid 65534 cannot execute, the waiver used to run the
    solution as root. Now neither the sandbox nor the code scorer goes ahead."""
    from services.common.errors import ConfigError
    from services.scorer.scorers import CodeConfig, CodeScorer

    require("root", os.geteuid() == 0)
    for waive in (False, True):
        with pytest.raises(SandboxUnavailable, match=r"uid 65534 .*never run as root"):
            run_python_tests(SOLUTION, TESTS, LIMITS, python=weak_python,
                             require_isolation=not waive)
        with pytest.raises(ConfigError, match="never run as root"):
            CodeScorer(CodeConfig(python=weak_python, require_isolation=not waive))


SIGNALLING = {
    "pidfd_open": "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open({pid}), 9)\n",
    "proc_folder_as_pidfd": "import os, signal\n"
                            "fd = os.open('/proc/{pid}', os.O_RDONLY | os.O_DIRECTORY)\n"
                            "signal.pidfd_send_signal(fd, 9)\n",
    "reloaded_modules": "import importlib, os, posix, signal, _signal\n"
                        "for module in (posix, os, _signal, signal):\n"
                        "    importlib.reload(module)\n"
                        "signal.pidfd_send_signal(os.pidfd_open({pid}), 9)\n",
    "fresh_import": "import sys\ndel sys.modules['_signal']\nimport _signal\n"
                    "_signal.pidfd_send_signal(_signal.pidfd_open({pid}), 9)\n",
    "module_from_spec": "import importlib.util as u, signal\n"
                        "posix = u.module_from_spec(u.find_spec('posix'))\n"
                        "signal.pidfd_send_signal(posix.pidfd_open({pid}), 9)\n",
    "kill": "import os\nos.kill({pid}, 9)\n",
    "sigio_owner": "import fcntl, os\nr, w = os.pipe()\nfcntl.fcntl(r, fcntl.F_SETOWN, {pid})\n",
    "setpriority": "import os\nos.setpriority(os.PRIO_PROCESS, {pid}, 19)\n",
    # The original out of the harness's wrapper: only the seccomp filter is left to stop it.
    "original_create_builtin": "import _imp, importlib.util as u, os\n"
                               "create = next(c.cell_contents for c in "
                               "_imp.create_builtin.__closure__\n"
                               "              if getattr(c.cell_contents, '__name__', '') == "
                               "'create_builtin')\n"
                               "s = create(u.find_spec('_signal'))\n"
                               "s.pidfd_send_signal(os.open('/proc/{pid}', os.O_DIRECTORY), 9)\n",
}


@pytest.mark.parametrize("way", SIGNALLING)
def test_other_processes_of_the_same_uid_cannot_be_signalled(
        way: str, victim: subprocess.Popen[bytes]) -> None:
    solution = SIGNALLING[way].format(pid=victim.pid)
    result = _ran(unprivileged(solution))
    if way == "original_create_builtin":
        require("no seccomp filter here: native-level access is out of reach",
                "seccomp" in result.isolation)
        assert (result.status, result.reason) == ("failed", "PermissionError"), result.stderr
    else:
        assert (result.status, result.reason) == ("killed", "forbidden"), result.stderr
    with pytest.raises(subprocess.TimeoutExpired):
        victim.wait(timeout=0.1)


def test_a_solution_signalling_its_parent_is_stopped_and_scoring_goes_on() -> None:
    # The sandbox's parent is a separate process here, so that a failure cannot kill pytest.
    parent = ("import sys\n"
              "from services.scorer.sandbox import SandboxLimits, run_python_tests\n"
              "r = run_python_tests(sys.argv[1], 'pass', SandboxLimits(cpu_seconds=1, "
              "wall_seconds=20), python=sys.argv[2], require_isolation=False)\n"
              "print(r.status, r.reason)\n")
    solution = ("import os, signal\n"
                "signal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGKILL)\n")
    require("root, to start the sandbox's parent as another user", os.geteuid() == 0)
    done = subprocess.run([*NOBODY, sys.executable, "-c", parent, solution, PYTHON],
                          cwd="/",
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["killed", "forbidden"]
    assert sandbox(SOLUTION).status == "passed"


def test_the_parent_reads_output_only_through_its_own_descriptors() -> None:
    # Without a uid drop the solution could rename files in its folder. A FIFO in place of
    # stdout would block an open() by path forever; a symlink would read another file. Changes
    # to the file system are violations now (the rename is stopped), and the parent still
    # reads what was written before through its own descriptors.
    solution = SOLUTION + ("import os, sys\n"
                           "print('kept', flush=True)\n"
                           "print('err', file=sys.stderr, flush=True)\n"
                           "os.rename('stdout', 'stdout.moved')\n"
                           "os.mkfifo('stdout')\n"
                           "os.rename('stderr', 'stderr.moved')\n"
                           "os.symlink('/etc/passwd', 'stderr')\n")
    try:  # a parent blocked on the solution's FIFO outlives the wall clock
        result = _ran(unprivileged(solution, timeout=LIMITS.wall_seconds + 30))
    except subprocess.TimeoutExpired:
        pytest.fail("the parent blocked on the solution's FIFO")
    assert (result.status, result.reason, result.stdout, result.stderr) == (
        "killed", "filesystem", "kept\n", "err\n")


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after "(comm)": state, ppid, pgrp, session, ...; None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()


def _state(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def _session_members(sid: int) -> list[int]:
    """Pids of processes in session ``sid`` that are not dead zombies."""
    members = []
    for entry in Path("/proc").iterdir():
        fields = _stat_fields(int(entry.name)) if entry.name.isdigit() else None
        if fields and int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


# The mapping from what the parent saw to a verdict, case by case, including endings the
# runs above cannot provoke on purpose (the OOM killer, a crash, a hook that could not report).
STARTED = ("audit_hook",)


@pytest.mark.parametrize(("returncode", "cpu", "report", "expected"), [
    (-signal.SIGXCPU, 1.0, _Report(STARTED, None, None), ("killed", "cpu_time")),
    (-signal.SIGKILL, 2.0, _Report(STARTED, None, None), ("killed", "cpu_time")),
    (-signal.SIGKILL, 0.3, _Report(STARTED, None, None), ("killed", "memory")),
    (-signal.SIGSEGV, 0.3, _Report(STARTED, None, None), ("killed", "memory")),
    (-signal.SIGABRT, 0.3, _Report(STARTED, None, None), ("killed", "memory")),
    (3, 0.3, _Report(STARTED, None, "memory"), ("killed", "memory")),
    (-signal.SIGXFSZ, 0.3, _Report(STARTED, None, None), ("killed", "output_size")),
    (-signal.SIGALRM, 0.3, _Report(STARTED, None, None), ("killed", "forbidden")),
    (VIOLATION_EXIT, 0.3, _Report(STARTED, "network", None), ("killed", "network")),
    (VIOLATION_EXIT, 0.3, _Report(STARTED, None, None), ("killed", "forbidden")),
    (0, 0.3, _Report(STARTED, None, "passed"), ("passed", None)),
    (1, 0.3, _Report(STARTED, None, "passed"), ("failed", "NoReport")),
    (1, 0.3, _Report(STARTED, None, "failed KeyError"), ("failed", "KeyError")),
    (0, 0.3, _Report(STARTED, None, None), ("failed", "NoReport")),
])
def test_verdict_mapping(returncode: int, cpu: float, report: _Report,
                         expected: tuple[str, str | None]) -> None:
    verdict = _verdict(report, returncode, cpu_seconds=cpu, timed_out=False, output_over=False,
                       cpu_limit=1)
    assert verdict == expected
    assert verdict[0] != "killed" or verdict[1] in KILL_REASONS


def test_output_and_wall_clock_come_before_the_way_the_child_ended() -> None:
    report = _Report(STARTED, None, "failed OSError")
    assert _verdict(report, 1, cpu_seconds=0.1, timed_out=False, output_over=True,
                    cpu_limit=1) == ("killed", "output_size")
    assert _verdict(report, -signal.SIGKILL, cpu_seconds=0.1, timed_out=True,
                    output_over=False, cpu_limit=1) == ("killed", "wall_clock")


def test_report_lines_are_sanitised() -> None:
    report = _parse_report(b"started audit_hook nondumpable root\nfailed bad name\n"
                           b"violation escape\n")
    assert report == _Report(("audit_hook", "nondumpable"), "forbidden", "failed Exception")
    assert _parse_report(b"").started is None


@pytest.fixture(scope="session")
def extension(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A C extension module that opens a socket with no audit event (socket(2) from native
    code), built with the system's compiler in a folder uid 65534 can read: what a solution
    would write and import if it could write anywhere."""
    import sysconfig

    folder = tmp_path_factory.mktemp("extension")
    source = folder / "escape.c"
    source.write_text(
        "#include <Python.h>\n#include <sys/socket.h>\n"
        "static PyObject *sock(PyObject *s, PyObject *a) {\n"
        "  return PyLong_FromLong(socket(AF_INET, SOCK_STREAM, 0)); }\n"
        "static PyMethodDef m[] = {{\"sock\", sock, METH_NOARGS, 0}, {0}};\n"
        "static struct PyModuleDef d = {PyModuleDef_HEAD_INIT, \"escape\", 0, -1, m};\n"
        "PyMODINIT_FUNC PyInit_escape(void) { return PyModule_Create(&d); }\n")
    include = subprocess.run([PYTHON, "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['include'])"], capture_output=True, text=True, check=True)
    suffix = subprocess.run([PYTHON, "-c", "import sysconfig; print(sysconfig.get_config_var("
                             "'EXT_SUFFIX'))"], capture_output=True, text=True, check=True)
    built = folder / f"escape{suffix.stdout.strip()}"
    compiled = subprocess.run(["cc", "-shared", "-fPIC", f"-I{include.stdout.strip()}",
                               str(source), "-o", str(built)], capture_output=True, text=True)
    assert compiled.returncode == 0, compiled.stderr
    assert sysconfig.get_config_var("EXT_SUFFIX")
    for p in (folder, *folder.parents):
        if p == Path(p.anchor):
            break
        p.chmod(p.stat().st_mode | 0o005)  # uid 65534 may traverse and read
    built.chmod(0o755)
    return folder


def test_an_extension_module_from_outside_the_interpreter_is_refused(extension: Path) -> None:
    """Native code opens sockets with no audit event; only the interpreter's own extension
    modules load. The same module imported by a plain interpreter works (so the refusal is
    the sandbox's, not a broken build)."""
    plain = subprocess.run([PYTHON, "-c", f"import sys; sys.path.insert(0, '{extension}'); "
                            "import escape; print(escape.sock() >= 0)"],
                           capture_output=True, text=True)
    assert plain.stdout.strip() == "True", plain.stderr
    result = sandbox(f"import sys\nsys.path.insert(0, {str(extension)!r})\nimport escape\n"
                     "escape.sock()\n")
    assert (result.status, result.reason) == ("killed", "forbidden"), result.stderr
    stdlib = sandbox(SOLUTION + "import math, _json, select\nassert math.sqrt(4) == 2\n")
    assert stdlib.status == "passed", stdlib.stderr


def test_without_cap_sys_admin_the_code_scorer_refuses_to_start() -> None:
    """Without CAP_SYS_ADMIN (a container's default) there is no network namespace: the
    scorer used to run solutions with the network anyway. Now it refuses to start, naming the
    capability, unless the operator waives isolation; a waived run still stops sockets at the
    audit hook. Run in a child whose capability bounding set lacks CAP_SYS_ADMIN."""
    require("root, to take one capability away and keep the others", os.geteuid() == 0)
    script = (
        "from services.scorer.scorers import CodeConfig, CodeScorer\n"
        "from services.scorer.sandbox import SandboxUnavailable, isolation_plan, "
        "run_python_tests\n"
        "print('plan', *isolation_plan('/usr/bin/python3'))\n"
        "try:\n    CodeScorer(CodeConfig())\nexcept Exception as e:\n    print('refused', e)\n"
        "try:\n    run_python_tests('x = 1\\n', 'pass\\n', python='/usr/bin/python3')\n"
        "except SandboxUnavailable as e:\n    print('unavailable', e)\n"
        "CodeScorer(CodeConfig(require_isolation=False))\n"
        "r = run_python_tests('import socket\\nsocket.socket()\\n', 'pass\\n', "
        "python='/usr/bin/python3', require_isolation=False)\n"
        "print('waived', r.status, r.reason, 'netns' in r.isolation)\n")
    done = subprocess.run(["setpriv", "--bounding-set", "-sys_admin", "--inh-caps",
                           "-sys_admin", "--", sys.executable, "-c", script],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = {line.split(" ", 1)[0]: line for line in done.stdout.splitlines()}
    assert "netns" not in lines["plan"].split() and "setuid" in lines["plan"].split()
    assert "refused code scorer code: cannot give solutions a network namespace" in lines[
        "refused"] and "CAP_SYS_ADMIN" in lines["refused"]
    assert "CAP_SYS_ADMIN" in lines["unavailable"]
    assert lines["waived"] == "waived killed network False"
