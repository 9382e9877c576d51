"""2 local processes x 4 CPU devices (jax.distributed + gloo) train exactly like 1 process x 8 devices."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from rstar_jax.train import run_training

from train_fixtures import TINY, sft_records, write_jsonl

REPO = Path(__file__).resolve().parents[1]
ARGS = [*TINY, "mesh.data=2", "mesh.fsdp=4", "mesh.tensor=1", "train.max_steps=4", "train.save_every=2",
        "optim.learning_rate=3e-3", "data.eval_fraction=0.25"]
CODE = "import sys; from rstar_jax.train import run_training; run_training('sft', 'random', sys.argv[1], sys.argv[2], sys.argv[3:])"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(out: Path):
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"], [r["loss"] for r in rows if r["split"] == "eval"]


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices, see tests/conftest.py")
def test_two_processes_match_one(tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_records(48))
    port = _free_port()
    procs = []
    for pid in range(2):
        env = {**os.environ, "JAX_NUM_CPU_DEVICES": "4", "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
               "RSTAR_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "RSTAR_NUM_PROCESSES": "2", "RSTAR_PROCESS_ID": str(pid)}
        procs.append(subprocess.Popen([sys.executable, "-c", CODE, str(data), str(tmp_path / "multi"), *ARGS],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=400)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    run_training("sft", "random", str(data), str(tmp_path / "single"), ARGS)
    multi, single = _metrics(tmp_path / "multi"), _metrics(tmp_path / "single")
    assert len(multi[0]) == 4 and len(multi[1]) == 2  # eval at step 0 (baseline) and at the end
    np.testing.assert_allclose(multi[0], single[0], rtol=1e-5)
    np.testing.assert_allclose(multi[1], single[1], rtol=1e-5)
    assert sorted(int(p.name) for p in (tmp_path / "multi" / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
