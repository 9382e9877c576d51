"""Decoder variants agree with each other; reward heads read the right positions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rstar_jax.models.config import ConfigError, ModelConfig
from rstar_jax.models.heads import HEAD_KINDS, RewardHead, gather_positions, reward_logits
from rstar_jax.models.llama import causal_lm_logits, forward, lm_head, positions_from_mask
from rstar_jax.models.params import from_hf_state_dict, init_params, logical_axes, to_hf_state_dict

CFG = ModelConfig(
    model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=1, head_dim=8, attention_bias=True,
)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(1), std=0.2)


def _batch():
    ids = jax.random.randint(jax.random.key(2), (2, 10), 0, CFG.vocab_size)
    mask = jnp.ones((2, 10), jnp.int32).at[1, 7:].set(0)
    return ids, mask


def test_scan_remat_and_unrolled_layers_agree(params):
    ids, mask = _batch()
    pos = positions_from_mask(mask)
    base = forward(params, CFG, ids, pos, mask)
    for kw in [dict(scan_layers=True), dict(remat=True), dict(scan_layers=True, remat=True)]:
        np.testing.assert_allclose(forward(params, CFG, ids, pos, mask, **kw), base, atol=1e-5)


def test_bf16_compute_is_close_to_fp32(params):
    ids, mask = _batch()
    f32 = causal_lm_logits(params, CFG, ids, mask)
    bf16 = causal_lm_logits(params, CFG, ids, mask, compute_dtype=jnp.bfloat16)
    assert bf16.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(f32 - bf16))) < 0.05 * float(jnp.max(jnp.abs(f32)))


def test_padding_does_not_change_valid_positions(params):
    ids, mask = _batch()
    full = causal_lm_logits(params, CFG, ids[1:, :7])
    padded = causal_lm_logits(params, CFG, ids, mask)[1:, :7]
    np.testing.assert_allclose(padded, full, atol=1e-5)


def test_packed_segments_match_separate_sequences(params):
    ids, _ = _batch()
    a, b = ids[0, :6], ids[1, :4]
    packed = jnp.concatenate([a, b])[None]
    positions = jnp.asarray([list(range(6)) + list(range(4))])
    segments = jnp.asarray([[1] * 6 + [2] * 4])
    h = lm_head(params, CFG, forward(params, CFG, packed, positions, segments))[0]
    np.testing.assert_allclose(h[:6], causal_lm_logits(params, CFG, a[None])[0], atol=1e-5)
    np.testing.assert_allclose(h[6:], causal_lm_logits(params, CFG, b[None])[0], atol=1e-5)


def test_reward_heads(params):
    ids, mask = _batch()
    for c in (1, 2):
        rp = {**params, "score": init_params(CFG, jax.random.key(c), num_labels=c, std=1.0)["score"]}
        out = reward_logits(rp, CFG, ids, mask)
        assert out.shape == (2, 10, c)
        at = gather_positions(out, jnp.asarray([[3, 9], [0, 6]]))
        np.testing.assert_array_equal(at[1, 1], out[1, 6])
        for kind in [k for k, labels in HEAD_KINDS.items() if labels == c]:
            head = RewardHead(kind)
            score = head.read(100 * out)
            assert score.shape == (2, 10) and jnp.all((score >= head.low) & (score <= 1.0)), kind


def test_hf_state_dict_roundtrip_is_bitwise_and_axes_cover_every_leaf(params):
    sd = to_hf_state_dict(params, CFG)
    assert "model.layers.2.self_attn.q_proj.bias" in sd and "lm_head.weight" in sd
    back = from_hf_state_dict(sd, CFG)
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        assert np.array_equal(np.asarray(x), y)
    axes = logical_axes(params)
    for leaf, ax in zip(jax.tree.leaves(params), jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))):
        assert leaf.ndim == len(ax)


def test_bad_configs_are_one_line_errors():
    base = {"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2}
    with pytest.raises(ConfigError, match=r"x\.json: unsupported architecture model_type='gpt2'"):
        ModelConfig.from_hf_dict({**base, "model_type": "gpt2"}, "x.json")
    with pytest.raises(ConfigError, match="missing required key 'vocab_size'"):
        ModelConfig.from_hf_dict({k: v for k, v in base.items() if k != "vocab_size"}, "x.json")
    with pytest.raises(ConfigError, match="RoPE scaling"):
        ModelConfig.from_hf_dict({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "x.json")
    with pytest.raises(ConfigError, match="not a multiple"):
        ModelConfig.from_hf_dict({**base, "num_key_value_heads": 3}, "x.json")
