"""Checkpoints: SIGKILL after a save then resume gives the same later losses; restore onto another mesh; HF export."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from rstar_jax.config import load_config
from rstar_jax.train import export_checkpoint, run_training
from rstar_jax.train.model_source import load_for_training

from train_fixtures import TINY, ppm_records, sft_records, write_jsonl

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices, see tests/conftest.py")

REPO = Path(__file__).resolve().parents[1]
RUN = [*TINY, "optim.schedule=constant", "optim.learning_rate=3e-3", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
       "train.keep_checkpoints=2"]


def _losses(out: Path) -> dict[int, float]:
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if r["split"] == "train"}


def _finished_steps(ckpts: Path) -> list[int]:
    return sorted(int(p.name) for p in ckpts.glob("*") if p.name.isdigit()) if ckpts.is_dir() else []


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """A training subprocess SIGKILLed right after its second checkpoint is committed."""
    tmp = tmp_path_factory.mktemp("kill")
    data = write_jsonl(tmp / "sft.jsonl", sft_records(64))
    out = tmp / "run"
    code = (
        "import sys; from rstar_jax.train import run_training; "
        "run_training('sft', 'random', sys.argv[1], sys.argv[2], sys.argv[3:])"
    )
    args = [*RUN, "train.max_steps=100000", "train.save_every=3", "train.async_checkpoints=true"]
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "8", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code, str(data), str(out), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while len(_finished_steps(out / "checkpoints")) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    steps = _finished_steps(out / "checkpoints")
    assert len(steps) >= 2, err.decode()[-2000:]
    return data, out, max(steps)


def test_sigkill_then_resume_matches_uninterrupted_run(killed_run, tmp_path):
    data, out, saved = killed_run
    run = tmp_path / "resumed"
    shutil.copytree(out, run)
    end = saved + 4
    run_training("sft", "random", str(data), str(run), [*RUN, f"train.max_steps={end}", "train.save_every=1000"])
    straight = tmp_path / "straight"
    run_training("sft", "random", str(data), str(straight), [*RUN, f"train.max_steps={end}", "train.save_every=1000"])
    resumed, ref = _losses(run), _losses(straight)
    assert sorted(resumed) == list(range(1, end + 1))  # lines logged after the save by the killed run were dropped
    later = range(saved + 1, end + 1)
    np.testing.assert_allclose([resumed[s] for s in later], [ref[s] for s in later], rtol=1e-6)
    assert ref[end] != ref[saved]


def test_restore_onto_a_different_mesh(killed_run, tmp_path):
    data, out, saved = killed_run
    run = tmp_path / "other_mesh"
    shutil.copytree(out, run)
    end = saved + 2
    other = [*RUN, "mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1", f"train.max_steps={end}", "train.save_every=1000"]
    run_training("sft", "random", str(data), str(run), other)
    straight = tmp_path / "straight"
    run_training("sft", "random", str(data), str(straight), [*RUN, f"train.max_steps={end}", "train.save_every=1000"])
    resumed, ref = _losses(run), _losses(straight)
    np.testing.assert_allclose([resumed[s] for s in (saved + 1, end)], [ref[s] for s in (saved + 1, end)], rtol=1e-5)


def test_export_policy_and_reward_model_load_in_transformers(killed_run, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from rstar_jax.models.hf_io import load_model
    from rstar_jax.models.llama import causal_lm_logits
    from rstar_jax.models.heads import reward_logits

    _, out, saved = killed_run
    hf = export_checkpoint(out, tmp_path / "policy")
    ids = np.array([[5, 17, 99, 3, 250, 41]])
    m = load_model(str(hf))
    ours = np.asarray(causal_lm_logits(m.params, m.cfg, ids))
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    theirs = torch_model(torch.tensor(ids)).logits.detach().numpy()
    np.testing.assert_allclose(theirs, ours, atol=2e-4)
    # The exported weights are the checkpoint's: training moved them away from the random init.
    init = jax.jit(load_for_training("random", "sft", load_config(TINY))[1])()
    assert not np.allclose(np.asarray(init["model"]["norm"]["weight"]), np.asarray(m.params["model"]["norm"]["weight"]))

    ppm_data = write_jsonl(tmp_path / "ppm.jsonl", ppm_records(16))
    run_training("ppm", "random", str(ppm_data), str(tmp_path / "ppm"), [*TINY, "train.max_steps=2", "optim.learning_rate=1e-2"])
    rm_dir = export_checkpoint(tmp_path / "ppm" / "checkpoints", tmp_path / "ppm_hf")
    rm = load_model(str(rm_dir))
    assert rm.num_labels == 1
    torch_rm = transformers.AutoModelForTokenClassification.from_pretrained(rm_dir, dtype=torch.float32)
    np.testing.assert_allclose(
        torch_rm(torch.tensor(ids)).logits.detach().numpy(), np.asarray(reward_logits(rm.params, rm.cfg, ids)), atol=2e-4
    )
    assert np.abs(np.asarray(rm.params["score"]["weight"])).max() > 0
