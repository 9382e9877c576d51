"""Sandbox behaviour on ordinary programs: statuses, capture, ordering, the JSONL front end, fallbacks."""

import json
import shutil

import pytest

from rstar_jax.config import SandboxSection
from rstar_jax.sandbox import ExecResult, SandboxError, SandboxPool, exec_file
from rstar_jax.sandbox import isolation
from rstar_jax.sandbox.jsonl import ExecConfig

# Without bubblewrap these behaviour tests still run, on process-only isolation; the attack suite skips.
INSECURE = shutil.which("bwrap") is None
needs_bwrap = pytest.mark.skipif(INSECURE, reason="bubblewrap not installed")


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(workers=2, timeout_s=2.0, memory_mb=256, max_output_bytes=1000, allow_insecure=INSECURE) as p:
        yield p


def run1(pool, code):
    (result,) = pool.run([code])
    return result


def test_ok_program_reports_stdout_last_line_and_times(pool):
    r = run1(pool, "import sympy\nx = sympy.symbols('x')\nprint('roots:')\nprint(sympy.solve(x**2 - 5*x + 6, x))\n\n")
    assert r.status == "ok" and r.ok
    assert r.stdout == "roots:\n[2, 3]\n"
    assert r.last_line == "[2, 3]"
    assert not r.stdout_truncated
    assert r.wall_ms > 0 and r.cpu_ms > 0 and r.error_type == ""


def test_status_is_never_inferred_from_text(pool):
    r = run1(pool, "print('error bound = 0.1')\nprint('Traceback (most recent call last): MemoryError')")
    assert r.status == "ok"


def test_exception_gives_type_message_and_program_traceback(pool):
    r = run1(pool, "def f(x):\n    return 1 / x\n\nprint('before')\nf(0)\n")
    assert r.status == "error" and not r.ok
    assert (r.error_type, r.error_message) == ("ZeroDivisionError", "division by zero")
    assert 'File "<program>", line 2, in f' in r.traceback and "worker.py" not in r.traceback
    assert r.stdout == "before\n"


@pytest.mark.parametrize(
    "code, status, error_type",
    [
        ("print(1 +", "error", "SyntaxError"),
        ("import sys\nsys.exit(0)", "exit", "SystemExit"),
        ("import os\nos._exit(0)", "exit", "Exit"),
        ("import time\ntime.sleep(30)", "timeout", "Timeout"),
        ("x = bytearray(8 * 1024 ** 3)", "memory", "MemoryError"),
        ("import os\nos.abort()", "crashed", "SIGABRT"),
        ("def f(n):\n    return f(n + 1)\nf(0)", "error", "RecursionError"),
    ],
)
def test_statuses(pool, code, status, error_type):
    r = run1(pool, code)
    assert (r.status, r.error_type) == (status, error_type)


def test_timeout_is_enforced_close_to_the_limit(pool):
    r = run1(pool, "while True:\n    pass")
    assert r.status == "timeout"
    assert 2000 <= r.wall_ms < 3500


def test_batch_keeps_order_and_survives_bad_programs(pool):
    codes = [f"print({i} * {i})" for i in range(12)]
    codes[3] = "raise ValueError('bad')"
    codes[7] = "import ctypes\nctypes.string_at(0)"
    results = pool.run(codes)
    assert [r.status for r in results] == ["ok"] * 3 + ["error"] + ["ok"] * 3 + ["crashed"] + ["ok"] * 4
    for i, r in enumerate(results):
        if r.ok:
            assert r.last_line == str(i * i)


def test_stdout_is_bounded_but_last_line_survives(pool):
    r = run1(pool, "for i in range(10000):\n    print(i)")
    assert r.status == "ok" and r.stdout_truncated
    assert len(r.stdout.encode()) == 1000 and r.stdout.startswith("0\n1\n2\n")
    assert r.last_line == "9999"


def test_each_program_gets_pristine_pipe_backed_stdio(pool):
    # The streams are built once in the template: text one program leaves unflushed must never reach
    # another, and they must behave as pipes even when the host's own stderr is a file (as under pytest).
    leak = "import os, sys\nsys.stdout.write('leaked')\nsys.stderr.write('leaked')\nos._exit(0)"
    probe = ("import sys\nprint(sys.stdin.read() == '', [(s.fileno(), s.seekable(), s.line_buffering, s.encoding)"
             " for s in (sys.stdout, sys.stderr)])")
    results = pool.run([leak, probe] * 4)
    assert [r.status for r in results] == ["exit", "ok"] * 4
    expected = "True [(1, False, True, 'utf-8'), (2, False, True, 'utf-8')]\n"
    assert all(r.stdout == expected and r.stderr == "" for r in results[1::2])
    assert all(r.stdout == "" for r in results[::2])


def test_exec_result_json_round_trip_and_validation():
    r = ExecResult(status="error", stdout="x\n", last_line="x", error_type="ValueError", wall_ms=1.5)
    assert ExecResult.from_json(json.loads(json.dumps(r.to_json()))) == r
    with pytest.raises(ValueError, match="status"):
        ExecResult(status="fine")


@pytest.mark.parametrize("kwargs, name", [({"workers": 0}, "workers"), ({"timeout_s": -1}, "timeout_s"),
                                          ({"memory_mb": "big"}, "memory_mb")])
def test_bad_pool_arguments_name_the_argument(kwargs, name):
    with pytest.raises(SandboxError, match=name):
        SandboxPool(**kwargs)


def test_run_rejects_non_string_programs(pool):
    with pytest.raises(SandboxError, match="program 1"):
        pool.run(["print(1)", b"print(2)"])


@needs_bwrap
def test_mode_uses_namespaces_and_seccomp(pool):
    assert pool.isolation_mode.startswith("bwrap+uid")
    assert "seccomp" in pool.isolation_mode
    r = run1(pool, "import os\nprint(os.getuid(), sorted(os.listdir('/')))")
    uid, listing = r.stdout.split(" ", 1)
    assert uid == "65534"
    assert "work" not in listing and "etc" not in listing and "home" not in listing


def test_process_only_isolation_needs_explicit_opt_in(monkeypatch):
    monkeypatch.setattr(isolation.shutil, "which", lambda name: None)
    with pytest.raises(SandboxError, match="allow-insecure-sandbox"):
        SandboxPool(workers=1)
    with SandboxPool(workers=1, timeout_s=2.0, allow_insecure=True) as p:
        assert p.isolation_mode.startswith("process")
        r = p.run(["import os\nopen('f.txt', 'w').write('x')\nprint(sorted(os.listdir('.')))", "import os\nprint(os.listdir('.'))"])
    assert [x.status for x in r] == ["ok", "ok"]
    assert r[0].last_line == "['f.txt']" and r[1].last_line == "[]"  # scratch is emptied between programs


def _exec(programs, out, timeout_s, workers=1):
    return ExecConfig(programs=str(programs), out=str(out or ""),
                      sandbox=SandboxSection(workers=workers, timeout_s=timeout_s, memory_mb=256, allow_insecure=INSECURE))


def test_exec_file_writes_results_in_input_order(tmp_path):
    programs = tmp_path / "programs.jsonl"
    rows = [{"id": "a", "code": "print(6 * 7)"}, {"id": 2, "code": "1 / 0"}, {"id": "c", "code": "print('é')"}]
    programs.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    out = tmp_path / "out.jsonl"
    exec_file(_exec(programs, out, timeout_s=2.0, workers=2))
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["id"] for g in got] == ["a", 2, "c"]
    assert [g["status"] for g in got] == ["ok", "error", "ok"]
    assert got[0]["last_line"] == "42" and got[1]["error_type"] == "ZeroDivisionError" and got[2]["stdout"] == "é\n"


@pytest.mark.parametrize("line, problem", [("{not json", "not valid JSON"), ('{"id": 1}', "string \"code\""),
                                           ('["print(1)"]', "expected an object")])
def test_exec_file_names_file_and_line_of_bad_input(tmp_path, line, problem):
    programs = tmp_path / "programs.jsonl"
    programs.write_text(json.dumps({"id": 0, "code": "print(0)"}) + "\n" + line + "\n")
    with pytest.raises(SandboxError, match=f"programs.jsonl:2: .*{problem}"):
        exec_file(_exec(programs, None, timeout_s=1.0))


def test_exec_file_prints_to_stdout_without_out(tmp_path, capsys):
    programs = tmp_path / "p.jsonl"
    programs.write_text(json.dumps({"id": 9, "code": "print('hi')"}) + "\n")
    exec_file(_exec(programs, None, timeout_s=2.0))
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["id"] == 9 and json.loads(line)["last_line"] == "hi"
