"""The engine sharded over 8 fake CPU devices: the same tokens as on one device; and Qwen2.5-Math-7B's prefill
and decode programs compiled ahead of time for an 8-device tensor mesh and the v5p-64 mesh."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from rstar_jax import sharding
from rstar_jax.config import MeshSection
from rstar_jax.engine import Engine, EngineConfig, Request, SamplingConfig, prepare
from rstar_jax.models.config import ModelConfig
from rstar_jax.models.params import init_params

REPO = Path(__file__).resolve().parents[1]
ARCHS = {
    "llama": ModelConfig(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                         eos_token_id=127),
    "qwen2": ModelConfig(model_type="qwen2", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=8, attention_bias=True,
                         eos_token_id=127, rope_theta=1e6, rms_norm_eps=1e-6),
}
CONFIG = EngineConfig(slots=16, lanes=4, max_prompt=64, max_new_tokens=16, block=16, prefill_chunk=16,
                      prefill_rows=2, decode_steps=4)


class Tok:
    eos_token_id = 127
    vocab_size = 128

    def decode(self, ids):
        return " ".join(map(str, ids))

    def encode(self, text):
        return []


def run(params, cfg, mesh, temperature):
    model = prepare(params, cfg, mesh=mesh, min_shard_elements=1)
    engine = Engine(model, Tok(), CONFIG)
    engine.set_shared_prefix(range(30, 40))
    prompts = [list(range(30, 40)) + p for p in ([1, 2, 3], [4] * 20, [9, 8], list(range(50, 70)), [5])]
    keys = jax.random.split(jax.random.key(4), len(prompts))
    s = SamplingConfig(12, temperature=temperature, num_samples=3)
    return [[c.token_ids for c in row] for row in engine.run([Request(p, s, k) for p, k in zip(prompts, keys)])]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_mesh_tokens_equal_one_device(arch):
    cfg = ARCHS[arch]
    params = init_params(cfg, jax.random.key(1), std=0.3)
    one = sharding.make_mesh(MeshSection(data=1), jax.devices()[:1])
    greedy, sampled = run(params, cfg, one, 0.0), run(params, cfg, one, 1.0)
    for shape in [(8, 1, 1), (2, 1, 4), (1, 1, 8), (2, 4, 1)]:
        mesh = sharding.make_mesh(MeshSection(*shape))
        assert run(params, cfg, mesh, 0.0) == greedy, shape
        if shape[1:] == (1, 1):  # data-only: each group's rows compute exactly as on one device
            assert run(params, cfg, mesh, 1.0) == sampled, shape
    assert len({tuple(t) for row in sampled for t in row}) > 5


AOT = """
import json, sys
import jax
from rstar_jax import sharding
from rstar_jax.config import MeshSection, load_config
from rstar_jax.engine.aot import abstract_model, compile_programs
from rstar_jax.engine.config import EngineConfig
from rstar_jax.train.model_source import arch_model_config
for path, shape in json.loads(sys.argv[1]):
    cfg = load_config([path])
    mesh = sharding.make_mesh(MeshSection(*shape))
    model = abstract_model(arch_model_config(cfg.model.arch), mesh)
    compiled = compile_programs(model, EngineConfig(slots=64, lanes=8, max_prompt=4096, max_new_tokens=256), read=2)
    print(path, shape, {k: len(v.as_text()) for k, v in compiled.items()}, flush=True)
"""


@pytest.mark.slow
def test_qwen_7b_engine_programs_compile_for_pod_meshes():
    jobs = {8: [[str(REPO / "configs/qwen2.5-math-7b_8xh100.yaml"), [1, 1, 8]]],
            32: [[str(REPO / "configs/qwen2.5-math-7b_v5p-64.yaml"), [1, 32, 1]]]}
    for n, job in jobs.items():
        env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(n), "PYTHONPATH": str(REPO)}
        r = subprocess.run([sys.executable, "-c", AOT, json.dumps(job)], env=env, capture_output=True, text=True,
                           timeout=1200)
        assert r.returncode == 0, r.stderr[-3000:]
        assert len(r.stdout.splitlines()) == len(job), r.stdout
