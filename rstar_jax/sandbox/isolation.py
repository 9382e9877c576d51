"""Host-side isolation: probe what this machine offers, build worker command lines, own cgroups.

Strongest available, in order: bubblewrap (mount, network, PID, IPC, UTS namespaces; read-only
root with only system and Python directories; an empty size-limited tmpfs as scratch), a real
unprivileged host uid (as root: privileged bubblewrap, then setresuid(65534) in the worker; as a
user: a user namespace), seccomp in every program, and per-worker pids + memory cgroups (root
only, nested in this process's own cgroup so outer limits still apply). Process-only isolation
(rlimits, plus seccomp if present) needs an explicit opt-in.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import site
import subprocess
import sys
import time
from pathlib import Path

from rstar_jax.sandbox.results import SandboxError

NOBODY = 65534
SANDBOX_DIR = "/sandbox"  # where worker.py and syscall_filter.py are mounted
SCRATCH = "/scratch"
_HERE = Path(__file__).resolve().parent
_WORKER_FILES = ("worker.py", "syscall_filter.py")
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
_ENV = {
    "PATH": "/usr/bin:/bin",
    "HOME": SCRATCH,
    "TMPDIR": SCRATCH,
    "LANG": "C.UTF-8",
    # numerical libraries must not start thread pools in the template (forked children would inherit dead pools)
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
_PROBE_TIMEOUT_S = 30.0


@dataclasses.dataclass(frozen=True)
class Limits:
    timeout_s: float
    memory_mb: int
    scratch_mb: int
    max_output_bytes: int
    max_files: int
    pids_max: int


@dataclasses.dataclass(frozen=True)
class Plan:
    """How workers are started; `mode` is what gets logged, e.g. "bwrap+uid+seccomp+cgroup"."""

    bwrap: bool
    privileged: bool  # root: bubblewrap without a user namespace, uid dropped inside the worker
    seccomp: bool
    cgroup: bool

    @property
    def mode(self) -> str:
        parts = ["bwrap+uid" if self.bwrap else "process"]
        parts += ["seccomp"] * self.seccomp + ["cgroup"] * self.cgroup
        return "+".join(parts)

    def worker_argv(self, limits: Limits, scratch: str) -> list[str]:
        cfg = {
            "timeout_s": limits.timeout_s,
            "memory_mb": limits.memory_mb,
            "scratch_mb": limits.scratch_mb,
            "max_output_bytes": limits.max_output_bytes,
            "max_files": limits.max_files,
            "scratch": scratch,
            "seccomp": self.seccomp,
            "pid_namespace": self.bwrap,
            "drop_uid": NOBODY if self.privileged else None,
            "probe": False,
        }
        return self.argv_for(cfg)

    def worker_env(self, scratch: str) -> dict[str, str]:
        return {**_ENV, "HOME": scratch, "TMPDIR": scratch}

    def argv_for(self, cfg: dict) -> list[str]:
        worker = f"{SANDBOX_DIR}/worker.py" if self.bwrap else str(_HERE / "worker.py")
        python = [sys.executable, "-I", "-B", worker, json.dumps(cfg)]
        if not self.bwrap:
            return python
        return _bwrap_prefix(self.privileged, cfg["scratch_mb"]) + ["--", *python]


def _ancestors(path: str) -> list[str]:
    parts = Path(path).parts
    return [str(Path(*parts[:i])) for i in range(2, len(parts))]


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _bwrap_prefix(privileged: bool, scratch_mb: int) -> list[str]:
    argv = [shutil.which("bwrap") or "bwrap", "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts"]
    # No --die-with-parent: it fires when the *thread* that started bwrap exits, and pools replace
    # workers from short-lived threads. A worker ends on its own when the pool's pipe closes.
    argv += ["--unshare-cgroup-try", "--new-session", "--clearenv"]
    for key, value in _ENV.items():
        argv += ["--setenv", key, value]
    if privileged:
        argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-user", "--uid", str(NOBODY), "--gid", str(NOBODY), "--disable-userns"]
    bound: list[str] = []
    for d in _SYSTEM_DIRS:
        if os.path.islink(d):
            argv += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            argv += ["--ro-bind", d, d]
            bound.append(d)
    made: set[str] = set(_SYSTEM_DIRS)

    def parents(path: str) -> None:
        # created world-traversable (bwrap would copy e.g. /root's 0700 and lock out uid 65534)
        for parent in _ancestors(path):
            if parent not in made:
                argv.extend(["--perms", "0755", "--dir", parent])
                made.add(parent)

    roots, links = _python_roots(), _python_links()
    for root in roots:
        if any(_under(root, b) for b in bound):
            continue
        parents(root)
        argv += ["--ro-bind", root, root]
        bound.append(root)
    for link, target in links:  # the interpreter's paths as this process names them, through the same symlinks
        if link not in made and not any(_under(link, b) for b in bound):
            parents(link)
            argv += ["--symlink", target, link]
            made.add(link)
    argv += ["--perms", "0755", "--dir", SANDBOX_DIR]
    for name in _WORKER_FILES:
        argv += ["--ro-bind", str(_HERE / name), f"{SANDBOX_DIR}/{name}"]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    argv += ["--perms", "1777", "--size", str(scratch_mb << 20), "--tmpfs", SCRATCH]
    if not any(_under(path, "/tmp") for path in [*roots, *(link for link, _ in links)]):
        argv += ["--symlink", SCRATCH, "/tmp"]
    # else /tmp holds the interpreter (read-only, like everything but the scratch); TMPDIR points at the scratch
    argv += ["--remount-ro", "/", "--chdir", SCRATCH]
    return argv


def _python_paths() -> list[str]:
    """The interpreter and the directories its packages live in, as this process names them."""
    return [sys.executable, sys.base_prefix, sys.prefix, *site.getsitepackages()]


def _python_roots() -> list[str]:
    """The directories the interpreter and its packages really live in (never the repository or cwd)."""
    candidates = {os.path.dirname(os.path.realpath(sys.executable))}
    candidates |= {os.path.realpath(p) for p in _python_paths()[1:] if os.path.isdir(p)}
    roots = sorted(candidates)
    return [r for i, r in enumerate(roots) if not any(r.startswith(p + "/") for p in roots[:i])]


def _python_links() -> list[tuple[str, str]]:
    """(path, target) of the outermost symlink on the way to the interpreter and to each of its folders (a
    symlinked venv, a symlinked home), so the worker finds them under the names this process uses (what lies
    beyond such a link is inside a bound folder)."""
    links: list[tuple[str, str]] = []
    for path in _python_paths():
        parts = Path(os.path.abspath(path)).parts
        prefixes = (str(Path(*parts[:i])) for i in range(2, len(parts) + 1))
        link = next((p for p in prefixes if os.path.islink(p)), None)
        if link is not None and (link, os.readlink(link)) not in links:
            links.append((link, os.readlink(link)))
    return links


def _probe_worker(plan: Plan) -> dict:
    cfg = {"scratch": SCRATCH if plan.bwrap else "/", "scratch_mb": 1, "seccomp": plan.seccomp,
           "drop_uid": NOBODY if plan.privileged else None, "probe": True}
    proc = subprocess.run(plan.argv_for(cfg), input=b"", capture_output=True, timeout=_PROBE_TIMEOUT_S,
                          env=plan.worker_env(cfg["scratch"]))
    if proc.returncode != 0 or len(proc.stdout) < 4:
        lines = proc.stderr.decode(errors="replace").strip().splitlines()
        raise OSError(lines[-1] if lines else f"exit code {proc.returncode}")
    return json.loads(proc.stdout[4:])


def detect(allow_insecure: bool) -> Plan:
    """Probe once and return the strongest plan; raise SandboxError naming why namespaces are unavailable if only
    process isolation is possible and the caller did not allow it."""
    privileged = os.geteuid() == 0
    cgroup = privileged and Cgroup.supported()
    if shutil.which("bwrap"):
        plan = Plan(bwrap=True, privileged=privileged, seccomp=True, cgroup=cgroup)
        try:
            ready = _probe_worker(plan)
            return dataclasses.replace(plan, seccomp=bool(ready["seccomp"]))
        except (OSError, ValueError, KeyError, subprocess.TimeoutExpired) as exc:
            reason = f"bubblewrap is installed but could not start the worker with {sys.executable} ({exc})"
    else:
        reason = "bubblewrap (bwrap) is not installed (apt-get install bubblewrap)"
    if not allow_insecure:
        who = "as root" if privileged else "as this user"
        raise SandboxError(
            f"sandbox: no namespace isolation: {reason}; --allow-insecure-sandbox would run model-written programs "
            f"with process-only isolation ({who}, able to read this machine's files)"
        )
    plan = Plan(bwrap=False, privileged=False, seccomp=True, cgroup=cgroup)
    try:
        return dataclasses.replace(plan, seccomp=bool(_probe_worker(plan)["seccomp"]))
    except (OSError, ValueError, KeyError, subprocess.TimeoutExpired) as exc:
        raise SandboxError(f"sandbox: cannot start a worker process: {exc}") from exc


@dataclasses.dataclass(frozen=True)
class Cgroup:
    """One worker's pids + memory cgroup (v1 hierarchies or v2), nested in this process's cgroup."""

    dirs: tuple[Path, ...]  # one per hierarchy (v1: pids and memory; v2: one)
    oom_file: Path  # holds the "oom_kill N" counter

    @staticmethod
    def _own_paths() -> dict[str, str]:
        paths = {}
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                paths[c] = path
        return paths

    @staticmethod
    def _v1() -> bool:
        return Path("/sys/fs/cgroup/pids/cgroup.procs").exists() and Path("/sys/fs/cgroup/memory/cgroup.procs").exists()

    @classmethod
    def supported(cls) -> bool:
        try:
            cg = cls.create(f"rstar-sandbox-probe-{os.getpid()}", pids_max=8, memory_bytes=64 << 20)
        except OSError:
            return False
        cg.remove()
        return True

    @classmethod
    def create(cls, name: str, pids_max: int, memory_bytes: int) -> Cgroup:
        own = cls._own_paths()
        if cls._v1():
            pids = Path("/sys/fs/cgroup/pids" + own["pids"].rstrip("/")) / name
            mem = Path("/sys/fs/cgroup/memory" + own["memory"].rstrip("/")) / name
            cg = cls(dirs=(pids, mem), oom_file=mem / "memory.oom_control")
            writes = {pids / "pids.max": str(pids_max), mem / "memory.limit_in_bytes": str(memory_bytes)}
        else:
            parent = Path("/sys/fs/cgroup" + own[""].rstrip("/"))
            (parent / "cgroup.subtree_control").write_text("+pids +memory")
            d = parent / name
            cg = cls(dirs=(d,), oom_file=d / "memory.events")
            writes = {d / "pids.max": str(pids_max), d / "memory.max": str(memory_bytes)}
        try:
            for d in cg.dirs:
                d.mkdir(exist_ok=True)
            for path, value in writes.items():
                path.write_text(value)
        except OSError:
            cg.remove()
            raise
        return cg

    def enter_command(self) -> list[str]:
        """A prefix that moves the started process into this cgroup before it execs the worker."""
        moves = "; ".join(f'echo $$ > "{d}/cgroup.procs"' for d in self.dirs)
        return ["/bin/sh", "-c", moves + '; exec "$@"', "sh"]

    def pids(self) -> list[int]:
        found: set[int] = set()
        for d in self.dirs:
            try:
                found.update(int(p) for p in (d / "cgroup.procs").read_text().split())
            except OSError:
                pass
        return sorted(found)

    def oom_kills(self) -> int:
        try:
            for line in self.oom_file.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except OSError:
            pass
        return 0

    def remove(self) -> None:
        """Kill whatever is left inside and delete the cgroup (processes take a moment to leave)."""
        for _ in range(200):
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            for d in self.dirs:
                try:
                    d.rmdir()
                except FileNotFoundError:
                    pass
                except OSError:
                    break
            if not any(d.exists() for d in self.dirs):
                return
            time.sleep(0.01)
