"""Inference-time step scoring reads the head at each step's last token, independent of batching."""

import jax
import jax.numpy as jnp
import numpy as np

from rstar_jax.models.config import ModelConfig
from rstar_jax.models.heads import reward_logits
from rstar_jax.models.params import init_params
from rstar_jax.reward import encode_steps, score_steps

CFG = ModelConfig(model_type="llama", vocab_size=420, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def test_scores_are_the_head_at_step_ends_for_both_head_kinds(tiny_tokenizer):
    items = [("Q: 12 + 30?", ["x = 12 + 30\n", "print(x)\n"]), ("The capital of France", ["is", " Paris.", ""])]
    for c in (1, 2):
        params = init_params(CFG, jax.random.key(c), num_labels=c, std=0.3)
        got = score_steps(params, CFG, tiny_tokenizer, items, batch_size=1)
        batched = score_steps(params, CFG, tiny_tokenizer, items, batch_size=8)
        for (prompt, steps), scores, scores_b in zip(items, got, batched):
            ids, ends = encode_steps(tiny_tokenizer, prompt, steps)
            logits = reward_logits(params, CFG, jnp.asarray([ids]))[0]
            want = jnp.tanh(logits[:, 0]) if c == 1 else jax.nn.softmax(logits, -1)[:, 1]
            for e, s, sb in zip(ends, scores, scores_b):
                if e < 0:
                    assert np.isnan(s) and np.isnan(sb)  # an empty step has no token to read
                else:
                    np.testing.assert_allclose([s, sb], float(want[e]), atol=1e-5)
        assert len(got[1]) == 3
