"""The same train steps on different meshes give the same losses; fsdp shards every large leaf; rules table."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from rstar_jax.config import load_config
from rstar_jax import sharding
from rstar_jax.train.data import build_batches, tokenize
from rstar_jax.train.model_source import load_for_training
from rstar_jax.train.state import abstract_params, compile_step, init_state, make_optimizer, make_train_step, state_shardings

from train_fixtures import TINY, sft_records

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices, see tests/conftest.py")


@functools.lru_cache(maxsize=None)
def _losses(mesh_shape, n_devices, steps=3, extra=()):
    cfg = load_config([*TINY, "data.batch_size=8", "optim.learning_rate=1e-2", "mesh.min_shard_elements=1024",
                       *(f"mesh.{a}={s}" for a, s in zip(sharding.MESH_AXES, mesh_shape)), *extra])
    mc, build, tok = load_for_training("random", "sft", cfg)
    batches = build_batches(tokenize(sft_records(32), "sft", tok, cfg.data), "sft", cfg.data)
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:n_devices])
    opt = make_optimizer(cfg.optim, steps)
    sh = state_shardings(abstract_params(mc, "sft"), opt, mesh, cfg.mesh.min_shard_elements)
    with jax.set_mesh(mesh):
        state = init_state(build, opt, sh)
        step = compile_step(make_train_step("sft", mc, cfg, opt, steps), sh, mesh, batches.at_step(0))
        out = []
        for i in range(steps):
            state, m = step(state, sharding.put_batch(batches.at_step(i), mesh))
            out.append(float(m["loss"]))
    return np.array(out), state, sh


def test_meshes_and_single_device_agree():
    ref, _, _ = _losses((1, 1, 1), 1)
    assert ref[-1] < ref[0]  # it trains
    for shape in [(8, 1, 1), (1, 8, 1), (2, 2, 2)]:
        np.testing.assert_allclose(_losses(shape, 8)[0], ref, rtol=1e-5, err_msg=str(shape))


def test_grad_accumulation_matches_one_big_batch():
    ref, _, _ = _losses((2, 2, 2), 8)
    np.testing.assert_allclose(_losses((2, 2, 2), 8, extra=("data.grad_accum=2",))[0], ref, rtol=1e-5)


def test_fsdp_leaves_no_large_leaf_replicated():
    _, state, sh = _losses((1, 8, 1), 8)
    leaves = jax.tree_util.tree_leaves_with_path(state)
    large = [(p, x) for p, x in leaves if x.size >= 1024]
    assert large
    for path, x in large:
        assert not x.sharding.is_fully_replicated, jax.tree_util.keystr(path)
        shard = x.addressable_shards[0].data
        assert shard.size == x.size // 8, jax.tree_util.keystr(path)
    # Adam moments follow their parameters.
    mu = sh.opt_state[1][0].mu if isinstance(sh.opt_state, tuple) and len(sh.opt_state) == 2 else None
    assert mu is not None
    jax.tree.map(lambda a, b: (a.spec == b.spec) or pytest.fail(f"{a.spec} != {b.spec}"), mu, sh.params)


def test_rules_table_reuses_no_mesh_axis_and_skips_uneven_dims():
    mesh = jax.make_mesh((2, 2, 2), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    assert sharding.logical_to_spec(("vocab", "embed"), (64, 32), mesh) == PartitionSpec("tensor", "fsdp")
    assert sharding.logical_to_spec(("batch", "length", "embed"), (8, 16, 32), mesh) == PartitionSpec(("data", "fsdp"), None, None)
    assert sharding.logical_to_spec(("kv_heads", "embed"), (3, 32), mesh) == PartitionSpec(None, "fsdp")
    assert sharding.logical_to_spec(("batch",), (2,), mesh) == PartitionSpec("data")
