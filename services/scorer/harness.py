"""The sandbox's harness: copied into each run's folder by ``services/scorer/sandbox.py`` and
started there as ``python -I harness.py <report fd>``, as uid 65534 with the run's limits.

Plain Python for any 3.11+ interpreter, standard library only; it must not import anything
after the audit hook is installed (an import then is a violation). Reports on the pipe whose
descriptor is argv[1]: "started <mechanisms>" once the audit hook is in place, then
"passed", "failed <ExceptionClass>" or "memory"; or, from the hook, "violation <reason>"
followed by os._exit, so that no except clause can swallow it.
"""

from __future__ import annotations

import _imp
import _posixsubprocess
import _signal
import fcntl
import os
import posix
import signal
import sys
import termios
import traceback
import types
from collections.abc import Callable
from typing import Any

REPORT_FD = -1
"""The report pipe's descriptor: ``argv[1]``, set by :func:`main`."""
VIOLATION_EXIT = 86
"""The exit code after an audit-hook violation (the sandbox reads it from here)."""
# Functions that reach other processes without an audit event, by the C module that has them
# and its Python face. A fresh instance of one of these modules would have them all again.
STUBBED = {
    "pidfd_open": (posix, os), "setpriority": (posix, os), "sched_setaffinity": (posix, os),
    "sched_setscheduler": (posix, os), "sched_setparam": (posix, os),
    "pidfd_send_signal": (_signal, signal),
}
FILESYSTEM_CHANGES = frozenset({
    "os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.symlink", "os.link", "os.chmod",
    "os.chown", "os.truncate", "os.utime", "os.chflags", "os.setxattr", "os.removexattr"})
"""Audit events that change the file system: a violation, like opening a file to write."""
FRESH_MODULES = {"posix": b"forbidden", "_signal": b"forbidden", "_imp": b"forbidden",
                 "_posixsubprocess": b"process_limit"}
# pidfd_send_signal, pidfd_open, pidfd_getfd, process_madvise, process_mrelease: from the
# table shared by x86_64 and aarch64 (and most others) since Linux 5.1.
SECCOMP_DENIED = (424, 434, 438, 440, 448)


def harden() -> list[bytes]:
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


def install_seccomp(ctypes: Any, libc: Any) -> bool:
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
    filters: Any = Filter  # ctypes' array types: Filter * n
    program = Program(len(code), (filters * len(code))(*(Filter(*c) for c in code)))
    ulong = ctypes.c_ulong
    if libc.prctl(38, ulong(1), ulong(0), ulong(0), ulong(0)) != 0:  # PR_SET_NO_NEW_PRIVS
        return False
    # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
    return bool(libc.prctl(22, ulong(2), ctypes.byref(program), ulong(0), ulong(0)) == 0)


def stub(name: str, reason: str, _audit: Callable[..., None] = sys.audit
         ) -> Callable[..., Any]:
    def stubbed(*args: object, **kwargs: object) -> None:
        _audit("sandbox.violation", reason)  # the hook exits the process
        raise PermissionError(f"{name} is not available in the sandbox")

    stubbed.__name__ = stubbed.__qualname__ = name
    return stubbed


def close_stubbed() -> None:
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


def guard_module_creation() -> None:
    # importlib.util.module_from_spec, and importlib's loaders, create C modules through these
    # two, which raise no audit event: report the name to the hook first. Only a str name and
    # origin go on to the original, so what the hook saw is what gets created.
    def guard(create: Callable[..., Any], event: str, _audit: Callable[..., None] = sys.audit,
              _type: type[type] = type, _str: type[str] = str,
              _getattr: Callable[..., Any] = getattr,
              _spec: type[types.SimpleNamespace] = types.SimpleNamespace
              ) -> Callable[..., Any]:
        def guarded(spec: Any, *args: Any) -> Any:
            name, origin = spec.name, _getattr(spec, "origin", None)
            if _type(name) is not _str or not (origin is None or _type(origin) is _str):
                raise ImportError("a module spec needs a str name and origin")
            _audit(event, name, origin)
            return create(_spec(name=name, origin=origin), *args)

        return guarded

    _imp.create_builtin = guard(_imp.create_builtin, "sandbox.create_module")
    if hasattr(_imp, "create_dynamic"):  # an extension module: its file is checked too
        _imp.create_dynamic = guard(_imp.create_dynamic, "sandbox.create_dynamic")


def install_hook() -> None:
    # Defined in here so that no global names it: once installed it is reachable only through
    # gc (a violation). Everything it uses is bound at definition, immune to monkeypatching.
    owner_fcntl = frozenset(getattr(fcntl, name, number) for name, number in (
        ("F_SETOWN", 8), ("F_SETSIG", 10), ("F_SETOWN_EX", 15)))
    owner_ioctl = frozenset(getattr(termios, name, number) for name, number in (
        ("FIOSETOWN", 0x8901), ("SIOCSPGRP", 0x8902), ("TIOCSTI", 0x5412)))

    fresh = dict(FRESH_MODULES)  # a copy only the hook holds: the solution can reach globals
    # Extension modules only from the interpreter's own folders, which the solution cannot
    # write: one it wrote itself would run native code (a socket(2) with no audit event).
    trusted = tuple(sorted({os.path.realpath(p) + os.sep for p in (
        sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix)}))
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def hook(event: str, args: tuple[Any, ...], _write: Callable[[int, bytes], int] = os.write,
             _exit: Callable[[int], Any] = os._exit, _fd: int = REPORT_FD,
             _code: int = VIOLATION_EXIT, _fresh: dict[str, bytes] = fresh,
             _fcntl: frozenset[int] = owner_fcntl, _ioctl: frozenset[int] = owner_ioctl,
             _str: type[str] = str, _type: type[type] = type, _int: type[int] = int,
             _trusted: tuple[str, ...] = trusted, _writing: int = writing,
             _real: Callable[[str], str] = os.path.realpath,
             _changes: frozenset[str] = FILESYSTEM_CHANGES) -> None:
        reason: bytes | None
        if event == "open":  # writing a file: anywhere (the run's folder is not writable)
            path, flags = args[0], args[2]
            if _type(path) is _int or not (_type(flags) is _int and flags & _writing):
                return
            reason = b"filesystem"
        elif event in _changes:
            reason = b"filesystem"
        elif event == "sandbox.create_dynamic" and not (
                _type(args[1]) is _str and _real(args[1]).startswith(_trusted)):
            reason = b"forbidden"
        elif event == "socket.__new__" and args[1] == 1:
            return  # AF_UNIX: asyncio's self-pipe; connect, bind and sendto still trip below
        elif event.startswith("socket."):
            reason = b"network"
        elif event in {"os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn",
                       "os.system", "os.startfile", "subprocess.Popen"}:
            reason = b"process_limit"
        elif event in {"import", "sandbox.create_module", "sandbox.create_dynamic"}:
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


def run() -> tuple[bytes, int]:
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


def read(name: str) -> str:
    with open(name, encoding="utf-8") as f:
        return f.read()


def show(exc: BaseException) -> None:
    try:
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
            tb = tb.tb_next  # the harness's own frames are noise to whoever reads stderr
        traceback.print_exception(type(exc), exc, tb, file=sys.__stderr__)
    except BaseException:  # stderr may be over its size limit; the report line still goes out
        pass


def flush() -> None:
    for stream in (sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except BaseException:  # over the size limit: the parent sees the file length
            pass


def main() -> None:
    global REPORT_FD
    REPORT_FD = int(sys.argv[1])
    sys.dont_write_bytecode = True  # an import would open a .pyc to write: a violation
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


if __name__ == "__main__":
    main()
