"""Every shipped config loads strictly and lowers one train step on fake CPU devices shaped like its target mesh."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rstar_jax.config import Config, RunConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml") if p.name != "base.yaml")

LOWER = """
import json, sys
import jax
from rstar_jax.config import load_config
from rstar_jax.train.loop import lower_step
from rstar_jax.train.model_source import arch_model_config
for path, kind in json.loads(sys.argv[1]):
    cfg = load_config([path])
    hlo = lower_step(cfg, kind, arch_model_config(cfg.model.arch)).as_text()
    print(path, kind, len(hlo), flush=True)
"""


def test_base_yaml_lists_exactly_the_defaults():
    assert load_config([str(REPO / "configs" / "base.yaml")]) == Config()


def test_unknown_keys_and_bad_values_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("include: [%s]\noptim: {learnin_rate: 1.0}\n" % (REPO / "configs" / "base.yaml"))
    with pytest.raises(RunConfigError, match=r"bad.yaml: unknown config key 'optim.learnin_rate'"):
        load_config([str(bad)])
    with pytest.raises(RunConfigError, match=r"data.batch_size: expected int"):
        load_config([str(CONFIGS[0]), "data.batch_size=eight"])
    cfg = load_config([str(CONFIGS[0]), "optim.learning_rate=3e-4", "mesh.fsdp=2"])
    assert cfg.optim.learning_rate == 3e-4 and cfg.mesh.fsdp == 2


def _devices(cfg: Config) -> int:
    return 8 if -1 in cfg.mesh.shape else math.prod(cfg.mesh.shape)


@pytest.mark.slow
def test_every_config_lowers_on_its_mesh_shape():
    groups: dict[int, list] = {}
    for path in CONFIGS:
        cfg = load_config([str(path)])
        assert cfg.model.arch.given, f"{path.name}: no model.arch"
        assert cfg.data.batch_size % cfg.data.grad_accum == 0
        kinds = ["sft", "ppm"] if path.name.startswith("smollm2") else ["sft"]
        groups.setdefault(_devices(cfg), []).extend([str(path), k] for k in kinds)
    for n, jobs in groups.items():
        env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(n), "PYTHONPATH": str(REPO)}
        r = subprocess.run([sys.executable, "-c", LOWER, json.dumps(jobs)], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert len(r.stdout.splitlines()) == len(jobs), r.stdout
