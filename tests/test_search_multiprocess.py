"""2 local processes x 4 fake CPU devices (jax.distributed) give what 1 process x 8 devices gives: the same result
rows and trees for `search --method mcts`, the same records for `label mc`, the same report for `evolve`; and a
killed process, rerun with the others, resumes with nothing lost or done twice."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rstar_jax.search import tree_io

REPO = Path(__file__).resolve().parents[1]
TIMING = ("wall_s", "seconds")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra: str) -> dict[str, str]:
    return {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices), "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
            "RSTAR_JAX_XLA_CACHE": "0", **extra}


def run(argv: list[str], processes: int, script: list[str] | None = None, timeout: float = 900) -> None:
    """`rstar-jax argv` as `processes` processes of 8 / processes devices each, all to the end."""
    cmd = script or [sys.executable, "-m", "rstar_jax.cli"]
    if processes == 1:
        r = subprocess.run([*cmd, *argv], env=_env(8), capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, r.stderr[-3000:]
        return
    port = _port()
    procs = [subprocess.Popen([*cmd, *argv], env=_env(8 // processes, RSTAR_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                                      RSTAR_NUM_PROCESSES=str(processes), RSTAR_PROCESS_ID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(processes)]
    logs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, logs):
        assert p.returncode == 0, err[-3000:]


def rows(out: Path) -> list[dict]:
    return sorted(({k: v for k, v in json.loads(line).items() if k not in TIMING}
                   for line in (out / "results.jsonl").read_text().splitlines()), key=lambda r: r["id"])


def assert_same_trees(a: Path, b: Path) -> None:
    names = sorted(p.name for p in (a / "trees").glob("*.json"))
    assert names and names == sorted(p.name for p in (b / "trees").glob("*.json"))
    for name in names:
        ta, tb = tree_io.load(a / "trees" / name), tree_io.load(b / "trees" / name)
        assert [n["text"] for n in ta.nodes] == [n["text"] for n in tb.nodes], name
        for key, arr in ta.arrays.items():
            np.testing.assert_array_equal(arr, tb.arrays[key], err_msg=f"{name}: {key}")


@pytest.mark.slow
def test_search_and_label_mc_split_over_two_processes_match_one(tiny_hf_folder, tmp_path):
    folder, _ = tiny_hf_folder()
    common = ["--model", str(folder), "--problems", "synth:levels=1,n=5,seed=5", "--method", "mcts", "--rollouts", "2",
              "--candidates", "3", "--max-depth", "3", "--max-new-tokens", "8", "--few-shot", "0",
              "--sandbox-workers", "1", "--allow-insecure-sandbox", "mcts.temperature=1.5"]
    for n in (1, 2):
        run(["search", *common, "--out", str(tmp_path / f"search{n}")], n)
    one, two = tmp_path / "search1", tmp_path / "search2"
    assert rows(one) == rows(two) and len(rows(one)) == 5
    assert_same_trees(one, two)
    assert sorted(p.name for p in two.glob("results.p*.jsonl")) == ["results.p0.jsonl", "results.p1.jsonl"]
    summary = json.loads((two / "summary.json").read_text())
    assert summary["problems"] == 5 and len(summary["processes"]) == 2

    # process 1 lost everything (killed before its first result): the rerun of both redoes its share only
    p0 = (two / "results.p0.jsonl").read_text()
    for line in (two / "results.p1.jsonl").read_text().splitlines():
        tree = two / json.loads(line)["tree"]
        tree.unlink()
        tree.with_suffix(".npz").unlink()
    (two / "results.p1.jsonl").write_text("")
    run(["search", *common, "--out", str(two)], 2)
    assert rows(two) == rows(one) and (two / "results.p0.jsonl").read_text() == p0
    assert_same_trees(one, two)

    # the random policy's trees hold no finished solution: label the problems' reference solutions
    from rstar_jax.data.synth import generate
    from rstar_jax.math.steps import split_solution

    solutions = tmp_path / "solutions.jsonl"
    solutions.write_text("".join(json.dumps({"id": p.id, "question": p.question, "answer": p.answer,
                                             "steps": split_solution(p.solution)}) + "\n"
                                 for p in generate([1], 4, 5)))
    label = ["label", "mc", "--trees", str(solutions), "--policy", str(folder), "--k", "2", "--per-problem", "2",
             "--max-new-tokens", "8", "--max-steps", "3", "--sandbox-workers", "1", "--allow-insecure-sandbox"]
    for n in (1, 2):
        run([*label, "--out", str(tmp_path / f"prm{n}.jsonl")], n)
    assert (tmp_path / "prm1.jsonl").read_text() == (tmp_path / "prm2.jsonl").read_text()
    assert len((tmp_path / "prm1.jsonl").read_text().splitlines()) >= 2


@pytest.mark.slow
def test_evolve_over_two_processes_matches_one(tiny_hf_folder, tmp_path):
    from test_evolve import CHILD, _write_config

    model, _ = tiny_hf_folder()
    cfg = _write_config(tmp_path, model)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    for n in (1, 2):
        run(["evolve", "--config", str(cfg), "--out", str(tmp_path / f"run{n}"), "rounds=1"], n,
            script=[sys.executable, str(script)], timeout=1200)
    one, two = (json.loads((tmp_path / f"run{n}" / "report.json").read_text())["rounds"] for n in (1, 2))
    keep = ("round", "search_mode", "coverage", "greedy_accuracy", "mcts_accuracy", "mcts_no_ppm_accuracy",
            "sft_records", "ppm_pairs")
    assert [{k: r.get(k) for k in keep} for r in one] == [{k: r.get(k) for k in keep} for r in two]
    assert_same_trees(tmp_path / "run1" / "round_1" / "search", tmp_path / "run2" / "round_1" / "search")
    assert (tmp_path / "run1" / "round_1" / "sft_data" / "train.jsonl").read_text() == \
        (tmp_path / "run2" / "round_1" / "sft_data" / "train.jsonl").read_text()
