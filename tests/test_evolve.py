"""`rstar-jax evolve` end to end on a tiny model: two rounds, killed with SIGKILL mid-search and mid-training, resumed.

The policy's sampler is replaced (in the child process only) by a scripted proposer that offers each synthetic
problem's next reference step and, at the first step, a guess that ends in a wrong answer, so the trees hold correct
and wrong trajectories and every stage has data; everything else (sandbox, grading, MCTS, labelling, training,
export, evaluation, report) is real.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rstar_jax.cli import main

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent('''
    import os, sys, time
    from pathlib import Path

    from rstar_jax.math.steps import split_solution
    from rstar_jax.engine import Completion
    from rstar_jax.search import policy
    from rstar_jax.train import checkpoint

    SLOW = os.environ.get("EVOLVE_TEST_SLOW") == "1"

    class Scripted:
        """Next reference step of the problem; at the first step also a guess (a program printing a wrong number),
        answered on the next step. Slowed down so the test can kill mid-search."""

        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, requests, num, temperature, *args, **kwargs):
            if SLOW:
                time.sleep(0.3)
            out = []
            for r in requests:
                steps = split_solution(r.problem.solution)
                d = len(r.path_texts)
                wrong = int(r.problem.answer) + 1
                answer_guess = f"\\n<answer>So the guess is \\\\boxed{{{wrong}}}.<end_of_answer>"
                if d and "guess" in r.path_texts[0] or d >= len(steps):
                    cands = [answer_guess]
                else:
                    cands = [steps[d]] + ([f"<code>\\n# guess\\nprint({wrong})\\n<end_of_code>"] if d == 0 else [])
                out.append([Completion(cands[i % len(cands)], [5] * 4, "stop") for i in range(num)])
            return out

    policy.LMProposer = Scripted
    save = checkpoint.Checkpointer.save

    def slow_save(self, *args, **kwargs):
        result = save(self, *args, **kwargs)
        if SLOW:
            Path(os.environ["EVOLVE_TEST_MARKER"]).touch()
            time.sleep(3)
        return result

    checkpoint.Checkpointer.save = slow_save
    from rstar_jax.cli import main
    sys.exit(main(sys.argv[1:]))
''')


def _write_config(tmp_path: Path, model: Path) -> Path:
    train = [str(REPO / "configs" / "base.yaml"), "data.seq_len=1024", "data.batch_size=2", "data.eval_fraction=0",
             "train.max_steps=6", "train.epochs=100", "train.save_every=2", "train.log_every=1", "optim.learning_rate=1e-3",
             "train.async_checkpoints=false"]
    cfg = {
        "model": str(model), "rounds": 2, "seed": 0,
        "problems": {"train": "synth:levels=1,n=6,seed=0", "heldout": "synth:levels=1,n=3,seed=5"},
        "search": {"modes": ["terminal", "ppm"], "rollouts": 2, "bootstrap_rollouts": 2, "candidates": 2,
                   "max_depth": 5, "max_new_tokens": 8, "in_flight": 2, "few_shot": 0},
        "labels": {"ppm_heldout_fraction": 0.3},
        "eval": {"rollouts": 1, "candidates": 2, "max_depth": 5, "in_flight": 3},
        "policy_train": train, "ppm_train": train,
    }
    path = tmp_path / "evolve.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def _start(script: Path, cfg: Path, run: Path, marker: Path, slow: bool) -> subprocess.Popen:
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "1", "RSTAR_JAX_XLA_CACHE": "1",  # the 4 runs share compiled steps
           "EVOLVE_TEST_SLOW": "1" if slow else "0",
           "EVOLVE_TEST_MARKER": str(marker), "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(script), "evolve", "--config", str(cfg), "--out", str(run)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"evolve ended (rc {proc.returncode}) before the kill point: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("kill point not reached in time")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_evolve_two_rounds_killed_mid_search_and_mid_training_resumes(tiny_hf_folder, tmp_path):
    model, _ = tiny_hf_folder()
    cfg = _write_config(tmp_path, model)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    run, marker = tmp_path / "run", tmp_path / "saved-a-checkpoint"
    results = run / "round_1" / "search" / "results.jsonl"

    _kill_when(_start(script, cfg, run, marker, slow=True), lambda: len(_lines(results)) >= 1)
    before = _lines(results)
    assert 1 <= len(before) < 6 and not (run / "round_1" / "search" / "state.json").exists()

    _kill_when(_start(script, cfg, run, marker, slow=True), marker.exists)
    policy_run = run / "round_1" / "policy" / "run"
    assert (policy_run / "checkpoints").is_dir() and not (run / "round_1" / "policy" / "state.json").exists()

    proc = _start(script, cfg, run, marker, slow=False)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert f"report: {run / 'report.md'}" in out

    after = _lines(results)
    assert after[: len(before)] == before  # nothing redone, nothing lost
    assert sorted(r["id"] for r in after) == [f"synth-s0-00000{i}" for i in range(6)]
    states = {s: json.loads((run / "round_1" / s / "state.json").read_text())["result"]
              for s in ("search", "sft_data", "policy", "ppm_data", "ppm", "eval")}
    assert states["search"]["attempts"] == 2 and states["policy"]["attempts"] == 2
    assert states["policy"]["trained"] and states["ppm"]["trained"]
    assert states["policy"]["metrics"]["step"] == 6
    train_steps = [r["step"] for r in _lines(policy_run / "metrics.jsonl") if r.get("split") == "train"]
    assert train_steps[-1] == 6 and len(train_steps) == len(set(train_steps))  # resumed, no step logged twice
    assert states["sft_data"]["train_records"] > 0 and states["ppm_data"]["train_pairs"] > 0
    for k in (1, 2):  # finished training stages keep their export and metrics, not their ~2 GB checkpoints
        for stage in ("policy", "ppm"):
            d = run / f"round_{k}" / stage
            if json.loads((d / "state.json").read_text())["result"]["trained"]:
                assert (d / "hf" / "config.json").is_file() and (d / "run" / "metrics.jsonl").is_file()
            assert not (d / "run" / "checkpoints").exists()

    report = json.loads((run / "report.json").read_text())["rounds"]
    assert [r["round"] for r in report] == [0, 1, 2]
    assert report[0]["mcts_no_ppm_accuracy"] is not None and report[0]["mcts_accuracy"] is None
    for r in report[1:]:
        assert r["greedy_accuracy"] is not None and r["mcts_accuracy"] is not None
        assert r["coverage"] > 0.5  # the script offers the answer
    assert report[1]["mcts_no_ppm_accuracy"] is None and report[2]["mcts_no_ppm_accuracy"] is not None  # "last"
    assert report[2]["search_mode"] == "ppm" and report[1]["search_mode"] == "terminal"
    scored = [r for r in report[1:] if r["heldout_pairs"]]
    assert scored and all(0.0 <= r["ppm_pair_accuracy"] <= 1.0 for r in scored)  # pairs of held-out problems
    for png in ("accuracy_by_round.png", "accuracy_by_level.png", "time_by_stage.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 2 | ppm |" in (run / "report.md").read_text()

    # a rerun of the finished run does nothing and gives the same report
    proc = _start(script, cfg, run, marker, slow=False)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "report:" in out
    assert json.loads((run / "report.json").read_text())["rounds"] == report


def test_round_schedule_is_rstar_maths_by_default_and_a_config_list(tmp_path):
    """rStar-Math: terminal-guided MCTS in rounds 1-2, PPM-augmented from round 3; the main job's 2 rounds are both
    terminal-guided; the long-run config runs the paper's 4 rounds."""
    from rstar_jax.config import RunConfigError
    from rstar_jax.evolve.config import EvolveConfig, load_evolve_config

    search = EvolveConfig().search
    assert [search.round_mode(k) for k in range(1, 6)] == ["terminal", "terminal", "ppm", "ppm", "ppm"]
    main_job, _ = load_evolve_config(REPO / "configs" / "evolve" / "smollm2-135m_cpu.yaml")
    assert [main_job.search.round_mode(k) for k in range(1, main_job.rounds + 1)] == ["terminal", "terminal"]
    long_run, _ = load_evolve_config(REPO / "configs" / "evolve" / "smollm2-135m_cpu_4rounds.yaml")
    assert [long_run.search.round_mode(k) for k in range(1, long_run.rounds + 1)] == ["terminal", "terminal", "ppm", "ppm"]
    main_config = REPO / "configs" / "evolve" / "smollm2-135m_cpu.yaml"
    custom, _ = load_evolve_config(main_config, ["search.modes=[terminal, ppm]"])
    assert custom.search.round_mode(2) == "ppm"
    with pytest.raises(RunConfigError, match=r"search.modes=\['ppm'\]: must be a list that starts with terminal"):
        load_evolve_config(main_config, ["search.modes=[ppm]"])
    with pytest.raises(RunConfigError, match="search.modes: 'mcts' is not one of 'terminal', 'ppm'"):
        load_evolve_config(main_config, ["search.modes=[terminal, mcts]"])


def test_evolve_config_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: 2\nsearch: {rolouts: 4}\n")
    assert main(["evolve", "--config", str(bad), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "search.rolouts" in err
    assert main(["evolve", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "run")]) == 2
    assert "no such evolve config" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text(f"policy_train: [{REPO / 'configs' / 'base.yaml'}, 'train.epochs=oops']\n")
    assert main(["evolve", "--config", str(good), "--out", str(tmp_path / "run")]) == 2
    assert "train.epochs" in capsys.readouterr().err
