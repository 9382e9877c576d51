"""Sampler: KV-cache parity with the full forward, shared-prefill sampling, stop strings, bucketing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rstar_jax.models.config import ModelConfig
from rstar_jax.models.llama import causal_lm_logits
from rstar_jax.models.params import init_params
from rstar_jax.sampling import (
    TRACE_COUNTS,
    SamplingConfig,
    decode_logits,
    generate,
    prefill,
    prepare_params,
)

CFG = ModelConfig(
    model_type="llama", vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=12, tie_word_embeddings=True, eos_token_id=96,
)


class ThreeCharTokenizer:
    """Every token decodes to three characters, so stop strings can start and end inside tokens."""

    eos_token_id = 96

    def decode(self, ids):
        return "".join(f"{i:02d}|" for i in ids)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0), std=0.3)


def test_kv_cache_decoding_matches_full_forward_at_every_position(params):
    prompts = [[3, 4, 5], [7, 8, 9, 10, 11, 12, 13]]
    forced = np.array([[20, 21, 22, 23, 24], [30, 31, 32, 33, 34]])
    P = 16
    toks = np.zeros((2, P), np.int32)
    for i, p in enumerate(prompts):
        toks[i, P - len(p) :] = p
    st = prefill(
        prepare_params(params), jnp.asarray(toks), jnp.asarray([3, 7], jnp.int32), jax.random.key(0),
        jnp.float32(1.0), jnp.float32(1.0), cfg=CFG, num_samples=1, suffix_len=8, greedy=True, top_k=0, use_top_p=False,
    )
    got = []
    for t in range(forced.shape[1]):
        st = st._replace(token_BxK=jnp.asarray(forced[:, t : t + 1], jnp.int32), t=jnp.int32(t + 1))
        logits, st = decode_logits(prepare_params(params), CFG, st)
        got.append(np.asarray(logits[:, 0]))
    for i, p in enumerate(prompts):
        full = causal_lm_logits(params, CFG, jnp.asarray([p + forced[i].tolist()]))[0]
        want = np.asarray(full[len(p) :])  # logits after each forced token
        np.testing.assert_allclose(np.stack([g[i] for g in got]), want, atol=1e-4)


def test_k_samples_from_shared_prefill_equal_separate_decodes(params):
    prompt = [5, 6, 7, 8]
    s = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=0.95, top_k=40, num_samples=4)
    shared = generate(prepare_params(params), CFG, ThreeCharTokenizer(), [prompt], s, jax.random.key(3))[0]
    one = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=0.95, top_k=40, num_samples=1)
    separate = generate(prepare_params(params), CFG, ThreeCharTokenizer(), [prompt] * 4, one, jax.random.key(3))
    assert [c.token_ids for c in shared] == [row[0].token_ids for row in separate]
    assert len({tuple(c.token_ids) for c in shared}) > 1  # the samples really differ


def test_greedy_equals_argmax_of_full_forward(params):
    prompt = [1, 2, 3, 4, 5]
    out = generate(prepare_params(params), CFG, ThreeCharTokenizer(), [prompt], SamplingConfig(max_new_tokens=10),
                   jax.random.key(0))[0][0]
    full = jax.jit(causal_lm_logits, static_argnums=1)
    seq = list(prompt)
    for _ in range(len(out.token_ids)):
        padded = jnp.asarray([seq + [0] * (len(prompt) + 10 - len(seq))])  # fixed shape: causal, so padding is inert
        seq.append(int(jnp.argmax(full(params, CFG, padded)[0, len(seq) - 1])))
        if seq[-1] == CFG.eos_token_id:
            break
    assert out.token_ids == seq[len(prompt) :]


@pytest.mark.parametrize("settings", [dict(top_k=1), dict(top_p=1e-6)])
def test_top_k_one_and_tiny_top_p_are_greedy(params, settings):
    p = prepare_params(params)
    greedy = generate(p, CFG, ThreeCharTokenizer(), [[9, 8, 7]], SamplingConfig(max_new_tokens=8), jax.random.key(1))
    s = SamplingConfig(max_new_tokens=8, temperature=1.5, num_samples=2, **settings)
    sampled = generate(p, CFG, ThreeCharTokenizer(), [[9, 8, 7]], s, jax.random.key(1))
    assert all(c.token_ids == greedy[0][0].token_ids for c in sampled[0])


def test_stop_string_cuts_text_right_after_it(params):
    p = prepare_params(params)
    free = generate(p, CFG, ThreeCharTokenizer(), [[4, 4]], SamplingConfig(max_new_tokens=20), jax.random.key(0))[0][0]
    assert len(free.token_ids) >= 4, "need a few tokens to place a stop string inside"
    # A stop string that starts inside token 2 and ends inside token 3.
    stop = free.text[4:8]
    first = free.text.find(stop)
    out = generate(p, CFG, ThreeCharTokenizer(), [[4, 4]], SamplingConfig(max_new_tokens=20, stop=("zzz", stop)),
                   jax.random.key(0))[0][0]
    assert out.finish_reason == "stop"
    assert out.text == free.text[: first + len(stop)]
    assert out.token_ids == free.token_ids[: -(-(first + len(stop)) // 3)]


def test_length_finish_and_eos_stop(params):
    p = prepare_params(params)
    out = generate(p, CFG, ThreeCharTokenizer(), [[1, 2]], SamplingConfig(max_new_tokens=5), jax.random.key(0))[0][0]
    assert (out.finish_reason, len(out.token_ids)) == ("length", 5) or out.token_ids[-1] == CFG.eos_token_id
    eos_cfg = CFG.replace(eos_token_id=out.token_ids[2])
    stopped = generate(p, eos_cfg, ThreeCharTokenizer(), [[1, 2]], SamplingConfig(max_new_tokens=5),
                       jax.random.key(0))[0][0]
    first = out.token_ids.index(out.token_ids[2])
    assert stopped.finish_reason == "stop" and stopped.token_ids == out.token_ids[: first + 1]


def test_similar_calls_do_not_recompile(params):
    p = prepare_params(params)
    s = SamplingConfig(max_new_tokens=9, temperature=0.7, num_samples=2)
    generate(p, CFG, ThreeCharTokenizer(), [[1] * 5, [2] * 9], s, jax.random.key(0))
    before = dict(TRACE_COUNTS)
    # Same buckets: batch 2, prompts <= 16 tokens, 6..9 new tokens (decode chunks of 8).
    for prompts, n in [([[3] * 12, [4] * 2], 7), ([[5] * 16, [1]], 9), ([[6] * 3, [7] * 4], 8)]:
        generate(p, CFG, ThreeCharTokenizer(), prompts, SamplingConfig(max_new_tokens=n, temperature=0.7, num_samples=2),
                 jax.random.key(1))
    assert dict(TRACE_COUNTS) == before


def test_bad_settings_and_empty_prompt_are_clear_errors(params):
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="at least one token"):
        generate(prepare_params(params), CFG, ThreeCharTokenizer(), [[]], SamplingConfig(), jax.random.key(0))
