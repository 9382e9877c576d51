"""The sandbox worker: a pre-warmed template process that forks one fresh child per program.

Started by pool.py as `python -I -B worker.py CONFIG_JSON`, normally inside bubblewrap. It cannot
import the rstar_jax package (only this file and syscall_filter.py are mounted), so it uses the
standard library only. Protocol on the template's stdin/stdout: 4-byte big-endian length frames;
host -> worker frames are program source (UTF-8), worker -> host frames are JSON objects (first a
ready message, then one result per program).
"""

from __future__ import annotations

import builtins
import ctypes
import dataclasses
import gc
import io
import json
import math
import os
import resource
import select
import signal
import struct
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import syscall_filter  # noqa: E402

_FRAME = struct.Struct(">I")
_TAIL_BYTES = 4096  # kept separately so last_line survives stdout truncation
_TEXT_LIMIT = 2000  # error message / traceback / stderr tail
_READ_CHUNK = 1 << 16
_RESULT_FD = 3
_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_OK_REPORT = json.dumps({"status": "ok"}).encode()
_MADV_COLLAPSE = 25  # Linux 6.1+
_HUGE_PAGE = 2 << 20  # x86-64 and 4 KiB-page arm64; elsewhere no range qualifies and nothing changes


def _read_exact(fd: int, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _read_frame(fd: int) -> bytes | None:
    header = _read_exact(fd, _FRAME.size)
    return None if header is None else _read_exact(fd, _FRAME.unpack(header)[0])


def _write_frame(fd: int, obj: dict) -> None:
    payload = json.dumps(obj).encode()
    view = memoryview(_FRAME.pack(len(payload)) + payload)
    while view:
        view = view[os.write(fd, view):]


_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _prctl(option: int, value: int) -> None:
    _LIBC.prctl(option, value, 0, 0, 0)


def _collapse_heap() -> None:
    """Back the template's anonymous memory with huge pages where the kernel can.

    Copying page tables at fork and tearing them down at exit is most of what a small program
    costs; a 2 MiB page is one entry instead of 512. A child that writes into one splits only its
    own mapping (the copy stays 4 KiB). Best effort: ranges the kernel declines are left as they are.
    """
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if fields[1] != "rw-p" or fields[5:] not in ([], ["[heap]"]):
                continue
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            lo, hi = -(-lo // _HUGE_PAGE) * _HUGE_PAGE, hi // _HUGE_PAGE * _HUGE_PAGE
            if hi > lo:
                _LIBC.madvise(lo, hi - lo, _MADV_COLLAPSE)


def _prewarm() -> None:
    """Import and exercise the libraries programs use, so lazy imports are paid once, here."""
    import cmath, collections, decimal, fractions, functools, itertools, random, re, statistics  # noqa: E401,F401

    import numpy as np
    import sympy as sp

    x, y = sp.symbols("x y")
    str(sp.solve([x + y - 3, x - y - 1], [x, y]))
    str(sp.simplify(sp.sin(x) ** 2 + sp.cos(x) ** 2))
    str(sp.factor(x**2 - 5 * x + 6)), str(sp.expand((x + 1) ** 3)), str(sp.integrate(x**2, x))
    str(sp.Rational(1, 3) + sp.sqrt(8) / 2), str(sp.N(sp.pi, 20)), str(sp.factorint(360)), sp.latex(x / 2)
    np.linalg.solve(np.eye(2), np.ones(2)).sum()
    str(fractions.Fraction(1, 3) + fractions.Fraction(1, 6)), math.comb(10, 3)
    list(itertools.permutations(range(3))), statistics.mean([1, 2, 3]), decimal.Decimal("1.5") * 2


class _Capture:
    """Bounded capture of a stream: the first `limit` bytes plus a tail for the last line."""

    def __init__(self, limit: int):
        self.limit = limit
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, data: bytes) -> None:
        if len(self.head) < self.limit:
            self.head += data[: self.limit - len(self.head)]
        self.total += len(data)
        self.tail = (self.tail + data)[-_TAIL_BYTES:]

    @property
    def truncated(self) -> bool:
        return self.total > self.limit

    def text(self) -> str:
        return self.head.decode("utf-8", errors="replace")

    def last_line(self) -> str:
        lines = [ln.strip() for ln in self.tail.decode("utf-8", errors="replace").splitlines()]
        return next((ln for ln in reversed(lines) if ln), "")


def _describe(exc: BaseException) -> dict:
    if isinstance(exc, SystemExit):
        return {"status": "exit", "error_type": "SystemExit", "error_message": f"exit code {exc.code!r}"}
    status = "memory" if isinstance(exc, MemoryError) else "error"
    try:
        tb = traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next)  # skip the exec frame
        return {
            "status": status,
            "error_type": type(exc).__name__,
            "error_message": str(exc)[:_TEXT_LIMIT],
            "traceback": "".join(tb)[-_TEXT_LIMIT:],
        }
    except BaseException:  # formatting itself failed (e.g. out of memory): keep the type
        return {"status": status, "error_type": type(exc).__name__}


@dataclasses.dataclass(frozen=True)
class _Confinement:
    """What each child applies to itself, prepared once in the template: every line of Python a
    child runs, and every template object it touches, costs it copy-on-write page faults."""

    scratch: str
    memory_bytes: int  # the address-space limit on top of the template's own mappings
    limits: tuple[tuple[int, tuple[int, int]], ...]  # the other rlimits
    cpu_limit_s: int  # the soft RLIMIT_CPU (the template uses it to tell a CPU-limit kill)
    fd_limit: int  # the template's own descriptor limit: children close everything above fd 3
    seccomp: syscall_filter.Filter | None
    stdio: tuple[io.TextIOWrapper, ...]  # sys.stdin, sys.stdout, sys.stderr for programs


def _confinement(cfg: dict, seccomp: syscall_filter.Filter | None) -> _Confinement:
    cpu_s = math.ceil(cfg["timeout_s"]) + 1
    limits = (
        (resource.RLIMIT_CPU, (cpu_s, cpu_s + 1)),
        (resource.RLIMIT_FSIZE, (cfg["scratch_mb"] << 20,) * 2),
        (resource.RLIMIT_NOFILE, (cfg["max_files"],) * 2),
        (resource.RLIMIT_CORE, (0, 0)),
    )
    return _Confinement(cfg["scratch"], cfg["memory_mb"] << 20, limits, cpu_s,
                        resource.getrlimit(resource.RLIMIT_NOFILE)[0], seccomp, _program_stdio())


def _program_stdio() -> tuple[io.TextIOWrapper, ...]:
    """Text streams over fds 0-2 for programs. Built while fds 1 and 2 are pipes, as they are in
    every child, so what a wrapper learns when built (not seekable) holds there; fd 0 is already
    /dev/null, as in children."""
    saved = os.dup(1), os.dup(2)
    pipe_r, pipe_w = os.pipe()
    try:
        os.dup2(pipe_w, 1)
        os.dup2(pipe_w, 2)
        writer = {"encoding": "utf-8", "errors": "backslashreplace", "line_buffering": True}
        return (
            io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8"),
            io.TextIOWrapper(io.FileIO(1, "w", closefd=False), **writer),
            io.TextIOWrapper(io.FileIO(2, "w", closefd=False), **writer),
        )
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, pipe_r, pipe_w):
            os.close(fd)


def _child(code: str, conf: _Confinement, address_space: int, out_w: int, err_w: int, res_w: int) -> None:
    """In the forked child: confine, run the program in fresh globals, report, exit. Never returns."""
    exit_now, write, dumps = os._exit, os.write, json.dumps  # bound before the program can monkeypatch them
    report_fd = res_w
    try:
        os.setsid()  # own process group, so kill(0, ...) and the template's killpg reach only this program
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        for src, dst in ((out_w, 1), (err_w, 2), (res_w, _RESULT_FD)):  # fd 0 is /dev/null already (main)
            os.dup2(src, dst)
        report_fd = _RESULT_FD
        os.closerange(_RESULT_FD + 1, conf.fd_limit)
        os.chdir(conf.scratch)
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
        for which, value in conf.limits:
            resource.setrlimit(which, value)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # oversized writes fail with EFBIG instead of killing
        if conf.seccomp is not None:
            conf.seccomp.install(os.getpid())
        sys.stdin, sys.stdout, sys.stderr = conf.stdio
    except BaseException as exc:  # the confinement failed: never run the program unconfined
        report = {"status": "sandbox_error", "error_type": type(exc).__name__, "error_message": str(exc)}
        write(report_fd, dumps(report).encode())
        exit_now(0)
    result = None
    try:
        exec(compile(code, "<program>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
    except BaseException as exc:
        result = _describe(exc)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    try:
        write(_RESULT_FD, _OK_REPORT if result is None else dumps(result).encode())
    except BaseException:
        exit_now(1)
    exit_now(0)


def _signal_status(sig: int, cpu_s: float, cpu_limit_s: int) -> dict:
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_s >= cpu_limit_s):
        return {"status": "timeout", "error_type": "CPUTimeLimit", "error_message": f"killed after {cpu_s:.1f}s of CPU"}
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    return {"status": "crashed", "error_type": name, "error_message": f"killed by {name}"}


def _read_into(fd: int, capture: _Capture) -> bool:
    """Read one chunk; False at end of stream or when a non-blocking pipe is empty."""
    try:
        chunk = os.read(fd, _READ_CHUNK)
    except BlockingIOError:
        return False
    capture.feed(chunk)
    return bool(chunk)


def _kill_program(pid: int, pid_namespace: bool) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass  # already gone
    if pid_namespace:  # everything else in this namespace with our uid belongs to the program
        try:
            os.kill(-1, signal.SIGKILL)
        except OSError:
            pass


def _run_program(code: str, cfg: dict, conf: _Confinement) -> dict:
    vm_bytes = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    res_r, res_w = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            _child(code, conf, vm_bytes + conf.memory_bytes, out_w, err_w, res_w)
        finally:
            os._exit(1)
    for fd in (out_w, err_w, res_w):
        os.close(fd)
    pidfd = os.pidfd_open(pid)
    captures = {out_r: _Capture(cfg["max_output_bytes"]), err_r: _Capture(_TEXT_LIMIT), res_r: _Capture(1 << 20)}
    open_fds = set(captures)
    deadline = start + cfg["timeout_s"]
    timed_out = False
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        ready, _, _ = select.select([*open_fds, pidfd], [], [], remaining)
        for fd in ready:
            if fd != pidfd and not _read_into(fd, captures[fd]):
                open_fds.discard(fd)
        if pidfd in ready:
            break
    _kill_program(pid, cfg["pid_namespace"])
    _, wait_status, usage = os.wait4(pid, 0)
    wall_ms = (time.monotonic() - start) * 1000
    cpu_ms = (usage.ru_utime + usage.ru_stime) * 1000
    for fd in open_fds:  # the program is dead: take what is left in the pipes
        os.set_blocking(fd, False)
        while _read_into(fd, captures[fd]):
            pass
    for fd in (pidfd, out_r, err_r, res_r):
        os.close(fd)
    out, err, res = captures[out_r], captures[err_r], captures[res_r]
    if timed_out:
        result = {"status": "timeout", "error_type": "Timeout", "error_message": f"wall-clock limit of {cfg['timeout_s']}s"}
    elif os.WIFSIGNALED(wait_status):
        result = _signal_status(os.WTERMSIG(wait_status), cpu_ms / 1000, conf.cpu_limit_s)
    else:
        result = _reported(res, os.waitstatus_to_exitcode(wait_status))
    return {
        "status": result["status"],
        "stdout": out.text(),
        "stdout_truncated": out.truncated,
        "last_line": out.last_line(),
        "stderr": err.text()[-_TEXT_LIMIT:],
        "error_type": result.get("error_type", ""),
        "error_message": result.get("error_message", ""),
        "traceback": result.get("traceback", ""),
        "wall_ms": round(wall_ms, 3),
        "cpu_ms": round(cpu_ms, 3),
    }


def _reported(res: _Capture, exit_code: int) -> dict:
    """The child's own report, trusted only when the child also exited cleanly after writing it."""
    if exit_code == 0 and not res.truncated:
        try:
            report = json.loads(res.head)
        except ValueError:
            report = None
        if isinstance(report, dict) and report.get("status") in ("ok", "error", "memory", "exit", "sandbox_error"):
            return report
    return {"status": "exit", "error_type": "Exit", "error_message": f"program exited with code {exit_code} before finishing"}


def _wipe(path: str) -> None:
    """Empty a scratch directory, whatever permissions the program left on what it made."""
    with os.scandir(path) as it:
        entries = list(it)
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            os.chmod(entry.path, 0o700)
            _wipe(entry.path)
            os.rmdir(entry.path)
        else:
            os.unlink(entry.path)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    if cfg["drop_uid"] is not None:  # privileged bubblewrap: become a real unprivileged host uid
        os.setgroups([])
        os.setresgid(cfg["drop_uid"], cfg["drop_uid"], cfg["drop_uid"])
        os.setresuid(cfg["drop_uid"], cfg["drop_uid"], cfg["drop_uid"])
    _prctl(_PR_SET_DUMPABLE, 0)  # programs share our uid: keep them out of /proc/<template>/mem and fds
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    proto_in, proto_out = os.dup(0), os.dup(1)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)  # a stray print in the template must not corrupt the protocol
    seccomp = None
    if cfg["seccomp"]:
        try:
            seccomp = syscall_filter.Filter()
        except OSError as exc:
            print(f"sandbox worker: no seccomp ({exc})", file=sys.stderr)
    if not cfg["probe"]:
        _prewarm()
        conf = _confinement(cfg, seccomp)
        gc.freeze()  # keep the collector from touching (and so copying) the template's pages in children
        _collapse_heap()
    _write_frame(proto_out, {"ready": True, "seccomp": seccomp is not None, "uid": os.getuid()})
    if cfg["probe"]:
        return
    while (frame := _read_frame(proto_in)) is not None:
        result = _run_program(frame.decode("utf-8", errors="replace"), cfg, conf)
        try:
            _wipe(cfg["scratch"])
            result["recycle"] = False
        except (OSError, RecursionError):  # the pool replaces this worker (and its scratch)
            result["recycle"] = True
        _write_frame(proto_out, result)
        if result["recycle"]:
            return


if __name__ == "__main__":
    main()
