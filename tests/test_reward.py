"""Inference-time step scoring reads the head at each step's last token, independent of batching, and reads each
kind of head on its own scale (PPM tanh(raw / 5), value clip(raw, 0, 1), PRM softmax), as its folder records."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rstar_jax.models.config import ModelConfig
from rstar_jax.models.heads import HEAD_KEY, RewardHead, reward_logits
from rstar_jax.models.hf_io import load_model, save_reward_model
from rstar_jax.models.params import init_params
from rstar_jax.models.registry import ModelLoadError
from rstar_jax.reward import encode_steps, score_steps

CFG = ModelConfig(model_type="llama", vocab_size=420, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8)


@pytest.mark.parametrize("kind", ["ppm", "value", "prm"])
def test_scores_are_the_head_at_step_ends_for_every_head_kind(tiny_tokenizer, kind):
    items = [("Q: 12 + 30?", ["x = 12 + 30\n", "print(x)\n"]), ("The capital of France", ["is", " Paris.", ""])]
    head = RewardHead(kind)
    params = init_params(CFG, jax.random.key(head.num_labels), num_labels=head.num_labels, std=0.3)
    got = score_steps(params, CFG, tiny_tokenizer, head, items, batch_size=1)
    batched = score_steps(params, CFG, tiny_tokenizer, head, items, batch_size=8)
    for (prompt, steps), scores, scores_b in zip(items, got, batched):
        ids, ends = encode_steps(tiny_tokenizer, prompt, steps)
        logits = reward_logits(params, CFG, jnp.asarray([ids]))[0]
        want = {"ppm": jnp.tanh(logits[:, 0] / 5.0), "value": jnp.clip(logits[:, 0], 0.0, 1.0),
                "prm": jax.nn.softmax(logits, -1)[:, 1]}[kind]
        for e, s, sb in zip(ends, scores, scores_b):
            if e < 0:
                assert np.isnan(s) and np.isnan(sb)  # an empty step has no token to read
            else:
                np.testing.assert_allclose([s, sb], float(want[e]), atol=1e-5)
    assert len(got[1]) == 3


def test_each_head_kind_reads_on_its_scale():
    raw = jnp.asarray([[-7.5], [0.0], [0.6], [1.3]])
    # rStar-Math's PPM: tanh(raw / 5), so a raw 5 is 0.76, not tanh(5) = 0.9999
    np.testing.assert_allclose(RewardHead("ppm").read(raw), np.tanh([-1.5, 0.0, 0.12, 0.26]), rtol=1e-6)
    np.testing.assert_allclose(RewardHead("ppm", ppm_scale=1.0).read(raw), np.tanh([-7.5, 0.0, 0.6, 1.3]), rtol=1e-6)
    # ReST-MCTS*'s value model: the raw output clipped to [0, 1]: a value trained to 1 reads 1, to 0 reads 0
    np.testing.assert_allclose(RewardHead("value").read(raw), [0.0, 0.0, 0.6, 1.0])
    np.testing.assert_allclose(RewardHead("prm").read(jnp.asarray([[0.0, np.log(3.0)]])), [0.75], rtol=1e-6)
    # [0, 1] (ReST-MCTS*, Best-of-N) and [-1, 1] (rStar's Q) views of each
    assert RewardHead("ppm").unit(-0.5) == 0.25 and RewardHead("value").unit(0.8) == 0.8
    assert RewardHead("prm").signed(0.75) == 0.5 and RewardHead("ppm").signed(-0.5) == -0.5


def test_the_head_kind_travels_with_the_folder(tmp_path, tiny_tokenizer):
    params = init_params(CFG, jax.random.key(0), num_labels=1, std=0.3)
    folder = save_reward_model(tmp_path / "vm", CFG, params, tiny_tokenizer, RewardHead("value"))
    assert json.loads((folder / "config.json").read_text())[HEAD_KEY]["kind"] == "value"
    assert load_model(str(folder)).head == RewardHead("value")
    with pytest.raises(ModelLoadError, match="a prm head has 2 labels, the params 1"):
        save_reward_model(tmp_path / "bad", CFG, params, tiny_tokenizer, RewardHead("prm"))
    # a 1-label head without its record is a PPM or a value model: refused, with what to add
    config = json.loads((folder / "config.json").read_text())
    del config[HEAD_KEY]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=f"config.json: a 1-label reward head without a '{HEAD_KEY}' entry"):
        load_model(str(folder))
    (folder / "config.json").write_text(json.dumps(config | {HEAD_KEY: {"kind": "orm"}}))
    with pytest.raises(ModelLoadError, match="config.json: reward head kind 'orm': must be one of ppm, value, prm"):
        load_model(str(folder))
