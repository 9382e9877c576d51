"""Hostile programs against the sandbox: each asserts the status and that nothing escaped.

Marked sandbox_attack. tests/run_sandbox_attacks.sh runs this file inside its own PID namespace and
pids cgroup, so even a broken sandbox cannot take the machine down; plain pytest runs it too.
After every test no program process may remain in any worker.
"""

import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from rstar_jax.sandbox import SandboxPool

pytestmark = [pytest.mark.sandbox_attack,
              pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")]

REPO = Path(__file__).resolve().parents[1]
SECRET = "rstar-secret-7f3a91"
TIMEOUT_S = 1.5


@pytest.fixture(scope="module")
def secret_env():
    os.environ["RSTAR_TEST_SECRET"] = SECRET  # set before the pools start: it must not reach programs
    yield
    del os.environ["RSTAR_TEST_SECRET"]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _python_worker(pid: int) -> bool:
    """worker.py's interpreter: a template, or a program forked from one (bwrap's own command line names it too)."""
    cmd = _cmdline(pid)
    return "worker.py" in cmd and "bwrap" not in cmd.split(" ", 1)[0]


def templates(pool) -> list[int]:
    """Host pids of the template processes (started by bubblewrap, not forked by a template)."""
    return [p for p in pool.worker_pids() if _python_worker(p) and not _python_worker(_ppid(p))]


def strays(pool) -> list[int]:
    """Processes in any worker that are not bubblewrap or a template: leftovers of programs."""
    tpl = set(templates(pool))
    return [p for p in pool.worker_pids() if p not in tpl and "bwrap" not in _cmdline(p) and os.path.exists(f"/proc/{p}")]


def _make_pool(workers):
    seen: set[int] = set()
    pool = SandboxPool(workers=workers, timeout_s=TIMEOUT_S, memory_mb=256, scratch_mb=16, max_output_bytes=4096)
    return pool, seen


@pytest.fixture(scope="module")
def pools(secret_env):
    made = [_make_pool(2), _make_pool(1)]
    yield made
    for pool, seen in made:
        seen.update(pool.worker_pids())
        pool.close()
    time.sleep(0.2)
    alive = [p for _, seen in made for p in seen if "worker.py" in _cmdline(p)]
    assert not alive, f"processes outlived the pool: {alive}"


def _checked(entry):
    p, seen = entry
    yield p
    seen.update(p.worker_pids())
    left = strays(p)
    assert not left, f"a program left a process behind: {[(q, _cmdline(q)[:80]) for q in left]}"


@pytest.fixture
def pool(pools):
    yield from _checked(pools[0])


@pytest.fixture
def single(pools):
    yield from _checked(pools[1])


def run1(pool, code):
    (r,) = pool.run([code])
    assert r.status != "sandbox_error", r
    return r


# --- time ---------------------------------------------------------------------------------------

TIMEOUTS = {
    "busy_loop": "while True:\n    pass",
    "sleep": "import time\ntime.sleep(60)",
    "ignores_signals": "import signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGXCPU, signal.SIGALRM, signal.SIGHUP):\n"
                       "    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass",
    "catches_everything": "import time\nwhile True:\n    try:\n        time.sleep(10)\n    except BaseException:\n        pass",
    "long_c_call": "import re\nre.match(r'(a+)+$', 'a' * 64 + 'b')",
    # the threads spin without allocating: a growing list could fill the address-space limit before the last thread
    # starts, and the program then ended with "can't start new thread" instead of running into the time limit
    "threads_keep_running": "import threading\ndef spin():\n    while True:\n        pass\nfor _ in range(4):\n"
                            "    threading.Thread(target=spin).start()\nwhile True:\n    pass",
}


@pytest.mark.parametrize("name", TIMEOUTS)
def test_time_limits(pool, name):
    r = run1(pool, TIMEOUTS[name])
    assert r.status == "timeout", r
    assert r.wall_ms < TIMEOUT_S * 1000 + 1500


# --- memory -------------------------------------------------------------------------------------

@pytest.mark.parametrize("code", [
    "x = bytearray(10 * 1024 ** 3)",
    "chunks = []\nwhile True:\n    chunks.append(b'x' * (8 << 20))",
    "import numpy as np\nnp.ones((100_000, 100_000))",
], ids=["10GB", "gradual", "numpy"])
def test_memory_limits(pool, code):
    r = run1(pool, code)
    assert (r.status, r.error_type) == ("memory", "MemoryError"), r


def test_thread_bomb_is_bounded(pool):
    r = run1(pool, "import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()")
    assert (r.status, r.error_type) == ("error", "RuntimeError"), r
    assert "can't start new thread" in r.error_message


# --- processes and signals ----------------------------------------------------------------------

@pytest.mark.parametrize("code", [
    "import os\nwhile True:\n    os.fork()",
    "import os\nwhile True:\n    if os.fork() == 0:\n        os.setsid()\n        os.fork()",
    "import subprocess\nsubprocess.run(['sh', '-c', 'echo pwned'])",
    "import os\nos.execv('/bin/sh', ['sh', '-c', 'echo pwned'])",
    "import multiprocessing\np = multiprocessing.Process(target=print, args=('pwned',))\np.start()\np.join()",
    "import pty\npty.spawn('/bin/sh')",
], ids=["fork_loop", "fork_bomb_setsid", "subprocess", "execv", "multiprocessing", "pty"])
def test_no_new_processes(pool, code):
    r = run1(pool, code)
    assert r.status == "error" and r.error_type in ("PermissionError", "OSError"), r
    assert "pwned" not in r.stdout


def test_os_system_runs_nothing(pool):
    r = run1(pool, "import os\nrc = os.system('echo pwned > /scratch/pwned; echo pwned')\nprint(rc != 0, os.path.exists('/scratch/pwned'))")
    assert r.status == "ok" and r.stdout == "True False\n", r


@pytest.mark.parametrize("code", [
    "import os\nos.kill(os.getppid(), 9)",
    "import os, signal\nos.kill(-1, signal.SIGKILL)",
    "import os, signal\nos.kill(1, signal.SIGKILL)",
    "import os, signal\nos.killpg(os.getpgid(os.getppid()), signal.SIGKILL)",
], ids=["parent", "minus_one", "init", "parent_group"])
def test_no_signals_to_other_processes(pool, code):
    before = templates(pool)
    r = run1(pool, code)
    assert (r.status, r.error_type) == ("error", "PermissionError"), r
    assert templates(pool) == before  # the workers survived, unreplaced


# --- file system --------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["/etc/rstar_pwned", str(Path.home() / "rstar_pwned"), str(REPO / "rstar_pwned"),
                                    "/usr/rstar_pwned", "/proc/1/root/rstar_pwned"])
def test_writes_outside_scratch_fail(pool, target):
    r = run1(pool, f"open({target!r}, 'w').write('pwned')")
    assert r.status == "error" and r.error_type in ("FileNotFoundError", "PermissionError", "OSError"), r
    assert not os.path.exists(target)


def test_secrets_and_environment_are_invisible(pool, tmp_path):
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text(SECRET)
    secret_file.chmod(0o644)
    code = (
        "import os\nfound = []\n"
        f"for path in [{str(secret_file)!r}, '/etc/shadow', '/proc/1/environ', '/proc/self/environ', {str(REPO / 'pyproject.toml')!r}]:\n"
        "    try:\n        found.append(open(path, 'rb').read().decode(errors='replace'))\n"
        "    except OSError as e:\n        found.append(type(e).__name__)\n"
        "print(found)\nprint(dict(os.environ))"
    )
    r = run1(pool, code)
    assert r.status == "ok", r
    assert SECRET not in r.stdout and "rstar-jax" not in r.stdout
    assert "FileNotFoundError" in r.stdout and "PermissionError" in r.stdout  # host paths absent, /proc/1 closed


def test_symlink_escapes_from_scratch(pool, tmp_path):
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text(SECRET)
    code = (
        "import os\nresults = []\n"
        f"os.symlink({str(secret_file)!r}, 'to_secret')\nos.symlink('/', 'to_root')\nos.symlink('/proc/1/root', 'to_init')\n"
        "for path, mode in [('to_secret', 'r'), ('to_root/etc/pwned', 'w'), ('to_init/etc/hostname', 'r'), ('to_root/usr/pwned', 'w')]:\n"
        "    try:\n        results.append(open(path, mode).read() if mode == 'r' else open(path, mode).write('x'))\n"
        "    except OSError as e:\n        results.append(type(e).__name__)\n"
        "print(results)"
    )
    r = run1(pool, code)
    assert r.status == "ok", r
    assert SECRET not in r.stdout
    assert r.stdout.count("Error") == 4
    assert not os.path.exists("/etc/pwned") and not os.path.exists("/usr/pwned")


@pytest.mark.parametrize("code, error_type", [
    ("open('big', 'wb').write(b'\\0' * (64 << 20))", "OSError"),
    ("i = 0\nwhile True:\n    open(f'f{i}', 'wb').write(b'\\0' * (1 << 20))\n    i += 1", "OSError"),
    ("files = [open('/dev/null') for _ in range(100_000)]", "OSError"),
], ids=["one_big_file", "many_files", "fd_exhaustion"])
def test_scratch_quota_and_fd_limits(single, code, error_type):
    r = run1(single, code)
    assert (r.status, r.error_type) == ("error", error_type), r
    after = run1(single, "import os\nprint(os.listdir('.'), len(os.listdir('/dev/fd')))")
    assert after.status == "ok" and after.stdout.startswith("[] ")  # scratch emptied, limits reset


# --- network ------------------------------------------------------------------------------------

@pytest.mark.parametrize("code", [
    "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)",
    "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('8.8.8.8', 53))",
    "import socket\nprint(socket.getaddrinfo('example.com', 80))",
    "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=1)",
], ids=["tcp", "udp", "dns", "http"])
def test_no_network(pool, code):
    r = run1(pool, code)
    assert r.status == "error", r


def test_loopback_server_and_unix_sockets_unreachable(pool, tmp_path):
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    tcp.setblocking(False)
    unix = socket.socket(socket.AF_UNIX)
    unix_path = str(tmp_path / "host.sock")
    unix.bind(unix_path)
    unix.listen()
    unix.setblocking(False)
    port = tcp.getsockname()[1]
    code = (
        "import socket\nout = []\n"
        f"for family, addr in [(socket.AF_INET, ('127.0.0.1', {port})), (socket.AF_UNIX, {unix_path!r}),"
        " (socket.AF_UNIX, '\\0abstract')]:\n"
        "    try:\n        socket.socket(family).connect(addr)\n        out.append('connected')\n"
        "    except OSError as e:\n        out.append(type(e).__name__)\n"
        "print(out)"
    )
    try:
        r = run1(pool, code)
        assert r.status == "ok" and "connected" not in r.stdout, r
        for server in (tcp, unix):
            with pytest.raises(BlockingIOError):
                server.accept()
    finally:
        tcp.close()
        unix.close()


# --- output and input ---------------------------------------------------------------------------

def test_direct_fd_writes_are_captured_not_leaked(pool, capfd):
    r = run1(pool, "import os\nos.write(1, b'direct-one\\n')\nos.write(2, b'direct-two\\n')")
    assert r.status == "ok" and r.stdout == "direct-one\n" and "direct-two" in r.stderr
    host = capfd.readouterr()
    assert "direct-one" not in host.out + host.err and "direct-two" not in host.out + host.err


def test_stdin_is_empty(pool):
    assert run1(pool, "import sys\nprint(repr(sys.stdin.read()))").stdout == "''\n"
    r = run1(pool, "input('number? ')")
    assert (r.status, r.error_type) == ("error", "EOFError")


def test_fifty_megabyte_line(pool):
    r = run1(pool, "print('x' * 50_000_000)\nprint('done')")
    assert r.status == "ok" and r.stdout_truncated and len(r.stdout) == 4096 and r.last_line == "done"


def test_non_utf8_output(pool):
    r = run1(pool, "import sys\nsys.stdout.buffer.write(b'\\xff\\xfe bad \\x80 bytes\\n')")
    assert r.status == "ok" and "bad" in r.stdout and "\ufffd" in r.stdout


# --- endings that are never ok ------------------------------------------------------------------

@pytest.mark.parametrize("code, status", [
    ("import sys\nsys.exit(0)", "exit"),
    ("import os\nos._exit(0)", "exit"),
    ("import os\nos.close(3)\nprint('closed the report pipe')", "exit"),
    ("import ctypes\nctypes.string_at(0)", "crashed"),
    ("import os\nos.abort()", "crashed"),
    ("def f(n):\n    return f(n + 1)\nf(0)", "error"),
    ("import json, sys\nx = []\nfor _ in range(10 ** 6):\n    x = [x]\nsys.setrecursionlimit(10 ** 8)\n"
     "json.dumps(x, check_circular=False)", "crashed"),
], ids=["sys_exit", "os_exit", "closed_report_pipe", "segfault", "abort", "recursion", "c_stack_overflow"])
def test_abnormal_endings_are_never_ok(pool, code, status):
    assert run1(pool, code).status == status


# --- isolation between programs -----------------------------------------------------------------

def test_state_does_not_leak_between_programs(single):
    first = run1(single, (
        "import builtins, math, os, sys\nmath.sqrt = lambda x: 42\nos.environ['LEAK'] = '1'\n"
        "open('leak.txt', 'w').write('x')\nos.mkdir('d')\nos.chmod('d', 0)\nsys.modules['json'] = None\n"
        "builtins.len = None\nprint('patched')"))
    assert first.status == "ok"
    second = run1(single, "import math, os, json\nprint(math.sqrt(16), os.environ.get('LEAK'), os.listdir('.'), len('abc'))")
    assert second.status == "ok" and second.stdout == "4.0 None [] 3\n", second


def test_worker_killed_mid_batch_loses_only_its_program(single):
    (victim,) = templates(single)
    codes = ["import time\ntime.sleep(1.0)\nprint('slow')"] + [f"print({i})" for i in range(8)]
    timer = threading.Timer(0.4, os.kill, args=(victim, signal.SIGKILL))
    timer.start()
    results = single.run(codes)
    timer.join()
    assert results[0].status == "sandbox_error" and "worker" in results[0].error_message
    assert [r.last_line for r in results[1:]] == [str(i) for i in range(8)]
    assert templates(single) != [victim]
    assert run1(single, "print('still serving')").ok
