"""SandboxPool: long-lived sandboxed workers that run batches of untrusted programs.

Start it before JAX initialises a backend: workers are forked from this process, and forking a
process that holds accelerator state is unsafe. Each worker is a pre-warmed template (worker.py)
that forks a fresh child per program; a worker that dies or hangs is replaced and only its
current program is reported (as sandbox_error), never the rest of the batch.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import select
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time

from rstar_jax.config import SandboxSection
from rstar_jax.sandbox import isolation
from rstar_jax.sandbox.results import ExecResult, SandboxError

log = logging.getLogger(__name__)

_FRAME = struct.Struct(">I")
_START_TIMEOUT_S = 120.0  # pre-warming imports sympy; slow on a loaded 2-core machine
_GRACE_S = 5.0  # the worker enforces the deadline itself; the pool only catches a hung worker
_TEMPLATE_MB = 512  # memory-cgroup headroom for the template process on top of a program's limit
_WORKER_NAMES = itertools.count()  # process-wide: two pools must never share a cgroup


class _WorkerGone(Exception):
    pass


class _Worker:
    """One template process (behind bubblewrap) and its pipes."""

    def __init__(self, plan: isolation.Plan, limits: isolation.Limits, name: str):
        self.cgroup = None
        self.scratch_dir = None if plan.bwrap else tempfile.mkdtemp(prefix="rstar-scratch-")
        scratch = isolation.SCRATCH if plan.bwrap else self.scratch_dir
        argv = plan.worker_argv(limits, scratch)
        if plan.cgroup:
            self.cgroup = isolation.Cgroup.create(name, limits.pids_max, (limits.memory_mb + _TEMPLATE_MB) << 20)
            argv = self.cgroup.enter_command() + argv
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=plan.worker_env(scratch),
                                     start_new_session=True, close_fds=True)
        self._in, self._out = self.proc.stdin.fileno(), self.proc.stdout.fileno()

    def wait_ready(self) -> dict:
        return self._receive(time.monotonic() + _START_TIMEOUT_S)

    def execute(self, code: str, timeout_s: float) -> dict:
        payload = code.encode("utf-8", errors="surrogatepass")
        try:
            self._send(_FRAME.pack(len(payload)) + payload)
        except OSError as exc:
            raise _WorkerGone(f"worker stopped taking programs ({exc})") from exc
        return self._receive(time.monotonic() + timeout_s + _GRACE_S)

    def _send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._in, view):]

    def _read_exact(self, n: int, deadline: float) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._out], [], [], remaining)[0]:
                raise _WorkerGone("worker did not answer in time")
            chunk = os.read(self._out, n - len(buf))
            if not chunk:
                raise _WorkerGone(f"worker died (exit code {self.proc.wait()})")
            buf += chunk
        return bytes(buf)

    def _receive(self, deadline: float) -> dict:
        (size,) = _FRAME.unpack(self._read_exact(_FRAME.size, deadline))
        return json.loads(self._read_exact(size, deadline))

    def host_pids(self) -> list[int]:
        """Host pids of this worker and everything running under it."""
        pids = set(self.cgroup.pids()) if self.cgroup else set()
        return sorted(pids | {self.proc.pid} | _descendants(self.proc.pid))

    def oom_kills(self) -> int:
        return self.cgroup.oom_kills() if self.cgroup else 0

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # bwrap is its session leader; its PID namespace dies with it
        except OSError:
            pass
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()
        if self.cgroup:
            self.cgroup.remove()
        if self.scratch_dir:
            shutil.rmtree(self.scratch_dir, ignore_errors=True)


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, stack = set(), [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


class SandboxPool:
    """Run untrusted Python programs in parallel, isolated workers.

    pool.run(codes) returns one ExecResult per program, in order. Use as a context manager (or call
    close()) so no worker outlives the pool.
    """

    def __init__(self, workers: int | None = None, timeout_s: float = 5.0, memory_mb: int = 1024,
                 allow_insecure: bool = False, max_output_bytes: int = 1 << 16, scratch_mb: int = 64,
                 max_files: int = 64, pids_max: int = 32):
        workers = (os.cpu_count() or 1) if workers is None else workers
        for name, value in (("workers", workers), ("memory_mb", memory_mb), ("max_output_bytes", max_output_bytes),
                            ("scratch_mb", scratch_mb), ("max_files", max_files), ("pids_max", pids_max)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SandboxError(f"sandbox: {name} must be a positive integer, got {value!r}")
        if not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise SandboxError(f"sandbox: timeout_s must be a positive number of seconds, got {timeout_s!r}")
        self.limits = isolation.Limits(float(timeout_s), memory_mb, scratch_mb, max_output_bytes, max_files, pids_max)
        self._plan = isolation.detect(allow_insecure)
        if not self._plan.bwrap:
            log.warning("sandbox: process-only isolation (%s): programs can see the host file system", self._plan.mode)
        log.info("sandbox isolation: %s, %d workers", self._plan.mode, workers)
        self._lock = threading.Lock()
        self._workers: list[_Worker | None] = [None] * workers
        try:
            for slot in range(workers):  # start all, then wait: pre-warming overlaps
                self._workers[slot] = self._spawn()
            for worker in self._workers:
                self._ready(worker)
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_section(cls, s: SandboxSection) -> SandboxPool:
        """The pool a command's `sandbox` config section describes."""
        return cls(workers=s.workers or None, timeout_s=s.timeout_s, memory_mb=s.memory_mb,
                   allow_insecure=s.allow_insecure)

    @property
    def isolation_mode(self) -> str:
        return self._plan.mode

    def _spawn(self) -> _Worker:
        return _Worker(self._plan, self.limits, f"rstar-sandbox-{os.getpid()}-{next(_WORKER_NAMES)}")

    def _ready(self, worker: _Worker) -> None:
        try:
            ready = worker.wait_ready()
        except (_WorkerGone, ValueError) as exc:
            raise SandboxError(f"sandbox: a worker failed to start ({exc})") from exc
        if ready.get("seccomp") != self._plan.seccomp:  # never run with less isolation than the mode logged
            raise SandboxError(f"sandbox: a worker came up without the seccomp filter that mode {self.isolation_mode} needs")

    def _replace(self, slot: int) -> None:
        old = self._workers[slot]
        if old is not None:
            old.stop()
        worker = self._spawn()
        self._workers[slot] = worker
        self._ready(worker)

    def _execute(self, slot: int, code: str) -> ExecResult:
        worker = self._workers[slot]
        ooms_before = worker.oom_kills()
        try:
            reply = worker.execute(code, self.limits.timeout_s)
        except (_WorkerGone, ValueError) as exc:
            self._replace(slot)
            return ExecResult(status="sandbox_error", error_type="WorkerLost", error_message=str(exc))
        if reply.pop("recycle", False):
            self._replace(slot)
        if reply["status"] == "crashed" and reply["error_type"] == "SIGKILL" and worker.oom_kills() > ooms_before:
            reply.update(status="memory", error_message="killed by the memory cgroup")
        return ExecResult.from_json(reply)

    def run(self, codes: list[str]) -> list[ExecResult]:
        """Run every program; results in the same order. Safe to call from one thread at a time."""
        for i, code in enumerate(codes):
            if not isinstance(code, str):
                raise SandboxError(f"sandbox: program {i} must be a string of Python source, got {type(code).__name__}")
        if any(w is None for w in self._workers):
            raise SandboxError("sandbox: the pool is closed")
        results: list[ExecResult | None] = [None] * len(codes)
        indices = iter(range(len(codes)))
        errors: list[BaseException] = []

        def drive(slot: int) -> None:
            try:
                while True:
                    with self._lock:
                        i = next(indices, None)
                    if i is None or errors:
                        return
                    results[i] = self._execute(slot, codes[i])
            except BaseException as exc:  # e.g. a replacement worker failed to start
                errors.append(exc)

        threads = [threading.Thread(target=drive, args=(slot,), daemon=True) for slot in range(len(self._workers))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results

    def worker_pids(self) -> list[int]:
        """Host pids of all workers and their programs (for monitoring and tests)."""
        return sorted(p for w in self._workers if w is not None for p in w.host_pids())

    def close(self) -> None:
        for slot, worker in enumerate(self._workers):
            if worker is not None:
                worker.stop()
                self._workers[slot] = None

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
