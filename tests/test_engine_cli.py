"""The engine through whole commands: `generate` over a data x tensor mesh of 8 fake CPU devices prints what one
device prints, and a `search` compiles the same few engine and model programs whatever its problems and depth."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# everything jitted under rstar_jax/engine (the rest of a search's compilations: the tree operations, and JAX's
# own small programs for PRNG keys and host-to-device copies)
ENGINE_PROGRAMS = {"_shared_prefill", "_prefill", "_decode", "_layout", "empty_state"}


def _cli(argv: list[str], devices: int, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices), "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
           "RSTAR_JAX_XLA_CACHE": "0", **env}
    r = subprocess.run([sys.executable, "-m", "rstar_jax.cli", *argv], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_generate_on_a_data_by_tensor_mesh_prints_what_one_device_prints(tiny_hf_folder, tmp_path):
    folder, _ = tiny_hf_folder()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["1+1=", "a bc", "x = 41 * 3", "q", "7"]))
    common = ["generate", "--model", str(folder), "--prompts", str(prompts), "--temperature", "0",
              "--max-new-tokens", "12"]
    one = _cli([*common, "mesh.data=1"], 1).stdout
    mesh = _cli([*common, "mesh.data=2", "mesh.tensor=4", "mesh.min_shard_elements=1"], 8).stdout
    rows = [json.loads(line) for line in one.splitlines()]
    assert len(rows) == 5 and sum(len(c["token_ids"]) for r in rows for c in r["completions"]) > 20
    assert mesh == one


def _engine_compiles(stderr: str) -> list[str]:
    """Names of the engine's and the model's programs compiled (JAX_LOG_COMPILES lines), one per compilation."""
    names = re.findall(r"Compiling jit\((\S+)\) with global shapes", stderr)
    return [n for n in names if n in ENGINE_PROGRAMS]


def test_search_compiles_the_same_few_engine_programs_for_any_problems_and_depth(tiny_hf_folder, tmp_path):
    folder, _ = tiny_hf_folder()
    common = ["search", "--model", str(folder), "--method", "mcts", "--rollouts", "2", "--candidates", "4",
              "--max-new-tokens", "8", "--few-shot", "0", "--sandbox-workers", "1", "--allow-insecure-sandbox",
              "mcts.temperature=1.5"]
    small = _cli([*common, "--problems", "synth:levels=1-2,n=4,seed=3", "--max-depth", "2", "--out",
                  str(tmp_path / "small")], 1, JAX_LOG_COMPILES="1")
    large = _cli([*common, "--problems", "synth:levels=1-2,n=8,seed=3", "--max-depth", "4", "--out",
                  str(tmp_path / "large")], 1, JAX_LOG_COMPILES="1")
    a, b = _engine_compiles(small.stderr), _engine_compiles(large.stderr)
    assert any("decode" in n for n in a) and any("prefill" in n for n in a), a
    assert sorted(a) == sorted(b) and len(a) <= 8, (a, b)
