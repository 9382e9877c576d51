"""Every input is checked before work starts: numbers out of range or not finite, models that are not what the
command needs, problem specs of an evolve run; and Ctrl-C ends any command with one line and exit code 130."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rstar_jax.cli import main
from train_fixtures import TINY, sft_records, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def _run(capsys, *argv):
    capsys.readouterr()  # what fixtures printed
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("argv, key", [
    (["--temperature", "inf"], "temperature"),
    (["--temperature", "nan"], "temperature"),
    (["--batch-size", "0"], "batch_size=0"),
    (["--top-p", "2"], "top_p"),
])
def test_generate_rejects_bad_numbers_before_loading_anything(capsys, tmp_path, tiny_hf_folder, argv, key):
    folder, _ = tiny_hf_folder()
    out = tmp_path / "o.jsonl"
    code, err = _run(capsys, "generate", "--model", folder, "--prompt", "1 + 1 =", "--max-new-tokens", "4",
                     "--out", out, *argv)
    assert code == 2 and len(err) == 1 and key in err[0] and not out.exists(), err


def test_generate_caps_new_tokens_by_the_model_context(tmp_path, tiny_hf_folder):
    """A hundred million new tokens ran until killed; the model's max_position_embeddings bounds them up front."""
    folder, _ = tiny_hf_folder()
    out = tmp_path / "o.jsonl"
    r = subprocess.run([sys.executable, "-m", "rstar_jax.cli", "generate", "--model", str(folder), "--prompt", "hi",
                        "--max-new-tokens", "100000000", "--out", str(out)], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "max_new_tokens=100000000" in err[0], r.stderr[-2000:]
    assert "max_position_embeddings" in err[0] and not out.exists()


@pytest.mark.parametrize("argv, key", [
    (["--few-shot", "-1"], "few_shot=-1"),
    (["--temperature", "inf"], "temperature"),
    (["--max-depth", "0"], "max_depth=0"),
])
def test_search_rejects_bad_numbers_before_writing_anything(capsys, tmp_path, tiny_hf_folder, argv, key):
    folder, _ = tiny_hf_folder()
    out = tmp_path / "run"
    code, err = _run(capsys, "search", "--model", folder, "--problems", "synth:levels=1,n=1,seed=0", "--method", "mcts",
                     "--rollouts", "1", "--candidates", "1", "--max-depth", "1", "--max-new-tokens", "4",
                     "--allow-insecure-sandbox", "--sandbox-workers", "1", "--out", out, *argv)
    assert code == 2 and len(err) == 1 and key in err[0] and not out.exists(), err


def test_train_rejects_a_negative_learning_rate(capsys, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_records(8))
    out = tmp_path / "run"
    code, err = _run(capsys, "train", "sft", "--model", "random", "--data", data, "--out", out, *TINY,
                     "optim.learning_rate=-1")
    assert code == 2 and len(err) == 1 and "optim.learning_rate=-1" in err[0] and not out.exists(), err


def test_batch_sizes_below_one_are_one_line(capsys, tmp_path):
    pb = tmp_path / "pb.jsonl"
    pb.write_text(json.dumps({"id": "a", "problem": "p", "steps": ["s"], "label": -1}) + "\n")
    code, err = _run(capsys, "processbench", "--reward-model", "x", "--data", pb, "--out", tmp_path / "pb",
                     "--batch-size", "0")
    assert code == 2 and len(err) == 1 and "batch_size=0" in err[0]
    code, err = _run(capsys, "label", "consensus", "--mc", pb, "--judge", "x", "--out", tmp_path / "k.jsonl",
                     "--batch-size", "-3")
    assert code == 2 and len(err) == 1 and "batch_size=-3" in err[0]


@pytest.mark.parametrize("extra, key", [("reward", "--reward-model"), (["--grader-workers", "0"], "grader_workers=0")])
def test_eval_checks_its_reward_model_and_grader_before_the_first_search(capsys, tmp_path, tiny_hf_folder, extra,
                                                                         key):
    folder, _ = tiny_hf_folder()
    if extra == "reward":
        extra = ["--reward-model", folder]  # a causal LM, not a reward model
    out = tmp_path / "eval"
    code, err = _run(capsys, "eval", "--model", folder, "--problems", "synth:levels=1,n=1,seed=0", "--methods",
                     "greedy,mcts", "--max-depth", "1", "--max-new-tokens", "4", "--rollouts", "1", "--candidates",
                     "1", "--few-shot", "0", "--sandbox-workers", "1", "--allow-insecure-sandbox", "--out", out, *extra)
    assert code == 2 and len(err) == 1 and key in err[0], err
    assert not (out / "greedy").exists()  # no search ran


def _evolve_config(tmp_path: Path, model: Path) -> Path:
    cfg = {"model": str(model), "rounds": 1,
           "problems": {"train": "synth:levels=1,n=2,seed=0", "heldout": "synth:levels=1,n=2,seed=5"},
           "search": {"rollouts": 1, "bootstrap_rollouts": 1, "candidates": 1, "max_depth": 2, "max_new_tokens": 4,
                      "in_flight": 2, "few_shot": 0},
           "eval": {"rollouts": 1, "candidates": 1, "max_depth": 2, "in_flight": 2},
           "sandbox_workers": 1}
    path = tmp_path / "evolve.yaml"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("override, key", [("problems.train=synth:levels=9,n=2,seed=0", "problems.train"),
                                           ("search.temperature=-1", "temperature=-1.0")])
def test_evolve_checks_every_input_before_round_0(capsys, tmp_path, tiny_hf_folder, override, key):
    folder, _ = tiny_hf_folder()
    run = tmp_path / "run"
    code, err = _run(capsys, "evolve", "--config", _evolve_config(tmp_path, folder), "--out", run,
                     "--allow-insecure-sandbox", override)
    assert code == 2 and len(err) == 1 and key in err[0], err
    assert not run.exists()  # neither round 0 nor a config.json that a corrected rerun would trip over


# ---------------------------------------------------------------------------------------------
# Ctrl-C


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
        except (OSError, ValueError, IndexError):
            pass
    return found


def _interrupt_when(argv: list[str], ready, timeout: float = 300.0) -> tuple[int, str, float]:
    """Start the CLI in its own process group, send SIGINT to the group (as Ctrl-C in a terminal does) once
    `ready(proc)`; (exit code, stderr, seconds from SIGINT to exit)."""
    proc = subprocess.Popen([sys.executable, "-m", "rstar_jax.cli", *map(str, argv)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    while not ready(proc):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the command ended or stalled before the interrupt: {proc.communicate()[1][-2000:]}")
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err, time.monotonic() - t0


def _one_line(err: str, command: str) -> bool:
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    return "Traceback" not in err and lines[-1] == f"rstar-jax {command}: interrupted"


def test_ctrl_c_ends_generate_with_one_line_and_complete_records(tmp_path, tiny_hf_folder):
    folder, _ = tiny_hf_folder()
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"{i} + {i} ="} for i in range(400)])
    out = tmp_path / "o.jsonl"

    def some_written(_):
        return out.is_file() and out.read_text().count("\n") >= 2

    code, err, _ = _interrupt_when(["generate", "--model", folder, "--prompts", prompts, "--batch-size", "1",
                                    "--max-new-tokens", "8", "--temperature", "0.8", "--out", out], some_written)
    assert code == 130 and _one_line(err, "generate"), err[-3000:]
    assert all(json.loads(line)["completions"] for line in out.read_text().splitlines())


def test_ctrl_c_ends_exec_while_a_program_runs(tmp_path):
    programs = write_jsonl(tmp_path / "p.jsonl", [{"id": 1, "code": "import time\ntime.sleep(60)"}])
    started = []

    def running(proc):  # the sandbox worker is up and its program has had time to start
        if not started and _children(proc.pid):
            started.append(time.monotonic())
        return bool(started) and time.monotonic() - started[0] > 15

    code, err, seconds = _interrupt_when(["exec", "--programs", programs, "--timeout", "100", "--workers", "1",
                                          "--allow-insecure-sandbox", "--out", tmp_path / "o.jsonl"], running)
    assert code == 130 and _one_line(err, "exec") and seconds < 30, err[-3000:]


def test_ctrl_c_ends_a_search_with_one_line(tmp_path, tiny_hf_folder):
    folder, _ = tiny_hf_folder()
    results = tmp_path / "run" / "results.jsonl"

    def searching(_):  # its sandbox and grader workers are running
        return results.is_file() and results.read_text().count("\n") >= 1

    code, err, _ = _interrupt_when(["search", "--model", folder, "--problems", "synth:levels=1,n=200,seed=0",
                                    "--method", "maj", "--samples", "2", "--max-depth", "3", "--max-new-tokens", "8",
                                    "--few-shot", "0", "--in-flight", "1", "--sandbox-workers", "1",
                                    "--allow-insecure-sandbox", "--out", tmp_path / "run"], searching)
    assert code == 130 and _one_line(err, "search"), err[-3000:]


def test_ctrl_c_ends_training_with_one_line(tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_records(64))
    out = tmp_path / "run"

    def stepping(_):
        log = out / "metrics.jsonl"
        return log.is_file() and log.read_text().count("\n") >= 2

    code, err, _ = _interrupt_when(["train", "sft", "--model", "random", "--data", data, "--out", out, *TINY,
                                    "train.max_steps=100000", "data.batch_size=2"], stepping)
    assert code == 130 and _one_line(err, "train"), err[-3000:]


def test_a_grader_worker_leaves_ctrl_c_to_its_parent():
    """Ctrl-C in a terminal reaches the whole process group; a math-verify worker must not print a traceback."""
    from rstar_jax.math.grading import Grader

    with Grader() as grader:
        assert grader.equivalent("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}")  # starts a math-verify worker
        [worker] = grader._pool
        os.kill(worker.proc.pid, signal.SIGINT)
        assert grader.equivalent("\\sqrt{8}", "2\\sqrt{2}") and worker.proc.poll() is None
