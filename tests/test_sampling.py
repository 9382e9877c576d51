"""Sampler: KV-cache parity with the full forward (with and without a cached shared prefix), shared-prefill
sampling, per-prompt keys, stop strings, bucketing, the shared-prefix cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rstar_jax.models.config import ModelConfig
from rstar_jax.models.llama import causal_lm_logits
from rstar_jax.models.params import init_params
from rstar_jax import sampling
from rstar_jax.sampling import (
    TRACE_COUNTS,
    SamplingConfig,
    decode_logits,
    generate,
    prefill,
    prepare_params,
    prompt_keys,
    sample_keys,
    sample_tokens,
    shared_prefix_kv,
    step_keys,
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


def forced_decode_logits(p, prompts, forced, shared_prefix=(), window=8):
    """Logits [n, T, V] after each forced token, decoding from the KV cache (after `shared_prefix`, if given) with
    `window` suffix slots."""
    shared = shared_prefix_kv(p, CFG, tuple(shared_prefix))
    rests = [q[len(shared_prefix) :] for q in prompts]
    packed = jax.tree.map(jnp.asarray, sampling.pack_prompts(rests, len(rests)))
    st = prefill(
        p, packed, prompt_keys(jax.random.key(0), len(rests)), shared, jnp.float32(1.0), jnp.float32(1.0), cfg=CFG,
        num_samples=1, suffix_len=window, greedy=True, top_k=0, use_top_p=False,
    )
    got = []
    step = jax.jit(decode_logits, static_argnums=(1,))
    for t in range(forced.shape[1]):
        st = st._replace(token_BxK=jnp.asarray(forced[:, t : t + 1], jnp.int32), t=jnp.int32(t + 1))
        logits, st = step(p, CFG, st, shared)
        got.append(np.asarray(logits[:, 0]))
    return np.stack(got, axis=1)


def test_kv_cache_decoding_matches_full_forward_at_every_position(params):
    few_shot = [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57]  # 18 tokens: bucket 32
    prompts = [few_shot + [3, 4, 5], few_shot + [7, 8, 9, 10, 11, 12, 13]]
    forced = np.array([[20, 21, 22, 23, 24], [30, 31, 32, 33, 34]])
    p = prepare_params(params)
    shared = forced_decode_logits(p, prompts, forced, shared_prefix=few_shot)
    for i, prompt in enumerate(prompts):
        full = causal_lm_logits(params, CFG, jnp.asarray([prompt + forced[i].tolist()]))[0]
        want = np.asarray(full[len(prompt) :])  # logits after each forced token
        np.testing.assert_allclose(shared[i], want, atol=1e-4)
    # the same prompts with nothing shared: every token in the per-prompt part
    unshared = forced_decode_logits(p, prompts, forced)
    np.testing.assert_allclose(shared, unshared, rtol=1e-5, atol=1e-5)
    # a suffix of just the 5 written slots gives the same logits as one of 8 (up to rounding)
    windowed = forced_decode_logits(p, prompts, forced, few_shot, window=5)
    np.testing.assert_allclose(windowed, shared, rtol=1e-5, atol=1e-5)


def test_bfloat16_decoding_matches_a_bfloat16_full_forward(params):
    """Prefill, the caches and decode all compute in the dtype the params were prepared in."""
    few_shot = list(range(40, 58))
    prompts = [few_shot + [3, 4, 5], few_shot + [7, 8, 9, 10, 11, 12, 13]]
    forced = np.array([[20, 21, 22, 23, 24], [30, 31, 32, 33, 34]])
    p = prepare_params(params, jnp.bfloat16)
    for shared_prefix in (few_shot, ()):
        got = forced_decode_logits(p, prompts, forced, shared_prefix)
        for i, prompt in enumerate(prompts):
            full = causal_lm_logits(params, CFG, jnp.asarray([prompt + forced[i].tolist()]), compute_dtype=jnp.bfloat16)
            want = np.asarray(full[0, len(prompt) :])
            # bf16 rounding alone moves these logits by ~5% of their range from fp32; a cache error moves them by all of it
            assert np.abs(got[i] - want).max() <= 0.04 * np.abs(want).max()
    out = generate(p, CFG, ThreeCharTokenizer(), prompts, SamplingConfig(max_new_tokens=6, num_samples=2,
                   ignore_eos=True), jax.random.key(0), shared_prefix=few_shot)
    assert [len(c.token_ids) for row in out for c in row] == [6] * 4


def test_greedy_with_shared_prefix_equals_without(params):
    p = prepare_params(params)
    few_shot = list(range(40, 59))
    prompts = [few_shot + [3], few_shot + [7, 8, 9, 10, 11, 12, 13], few_shot + [20, 21, 22]]
    s = SamplingConfig(max_new_tokens=10, num_samples=2, ignore_eos=True)
    plain = generate(p, CFG, ThreeCharTokenizer(), prompts, s, jax.random.key(0))
    shared = generate(p, CFG, ThreeCharTokenizer(), prompts, s, jax.random.key(0), shared_prefix=few_shot)
    assert [[c.token_ids for c in row] for row in shared] == [[c.token_ids for c in row] for row in plain]
    assert len({tuple(row[0].token_ids) for row in plain}) == 3  # the prompts' continuations differ


_full_logits = jax.jit(causal_lm_logits, static_argnums=1)
_sample = jax.jit(sample_tokens, static_argnames=("greedy", "top_k", "use_top_p"))


def cache_free_samples(params, prompt, key, K, T, *, temperature, top_p=1.0, top_k=0, stop=None):
    """K samples drawn token by token from full forwards (no cache) with the sampler's per-step keys, each until
    EOS, T tokens, or `stop(tokens)`."""
    keys_1xK = sample_keys(key[None], K)
    out = []
    for k in range(K):
        seq = list(prompt)
        while len(seq) < len(prompt) + T and (len(seq) == len(prompt) or seq[-1] != CFG.eos_token_id):
            if stop is not None and stop(seq[len(prompt) :]):
                break
            padded = jnp.asarray([seq + [0] * (len(prompt) + T - len(seq))])
            logits = _full_logits(params, CFG, padded)[0, len(seq) - 1]
            step_key = step_keys(keys_1xK, len(seq) - len(prompt))[k]
            seq.append(int(_sample(logits[None], step_key[None], jnp.float32(temperature), jnp.float32(top_p),
                                   greedy=False, top_k=top_k, use_top_p=top_p < 1.0)[0]))
        out.append(seq[len(prompt) :])
    return out


def test_k_samples_from_shared_prefill_equal_a_full_forward_sampler(params):
    """K samples decoded from one prefill draw what a cache-free sampler draws with the same per-step keys."""
    prompt, K, T = [5, 6, 7, 8], 4, 12
    kw = dict(temperature=1.0, top_p=0.95, top_k=40)
    out = generate(prepare_params(params), CFG, ThreeCharTokenizer(), [prompt], SamplingConfig(T, num_samples=K, **kw),
                   jax.random.key(3)[None])[0]
    assert [c.token_ids for c in out] == cache_free_samples(params, prompt, jax.random.key(3), K, T, **kw)
    assert len({tuple(c.token_ids) for c in out}) > 1  # the samples really differ


def test_finished_samples_leave_the_decode_batch_and_the_rest_draw_the_same(params, monkeypatch):
    """Once at most half the rows still run, the state is gathered down to them (32 -> 16 -> ... rows here); every
    sample still draws exactly what a cache-free sampler draws with its keys."""
    gathered = []
    real_gather = sampling.gather_rows
    monkeypatch.setattr(sampling, "gather_rows", lambda st, b, k: gathered.append(len(b)) or real_gather(st, b, k))
    prompts, K, T, stop = [[5, 6, 7, 8], [9], [1, 2, 3]], 8, 40, "5|"  # about 1 token in 10 ends with the digit 5
    keys = jax.random.split(jax.random.key(11), 3)
    settings = SamplingConfig(T, temperature=1.0, num_samples=K, stop=(stop,), chunk=4)
    out = generate(prepare_params(params), CFG, ThreeCharTokenizer(), prompts, settings, keys)
    assert gathered and gathered == sorted(gathered, reverse=True) and gathered[-1] < 16
    tok = ThreeCharTokenizer()
    for i, prompt in enumerate(prompts):
        want = cache_free_samples(params, prompt, keys[i], K, T, temperature=1.0, stop=lambda ids: stop in tok.decode(ids))
        assert [c.token_ids for c in out[i]] == want
    lengths = sorted(len(c.token_ids) for row in out for c in row)
    assert lengths[0] < 8 and lengths[-1] >= 20  # samples ended at very different points


def test_chunks_attend_to_a_window_of_the_suffix_and_draw_the_same(params, monkeypatch):
    """A long generation's suffix starts at 64 slots and grows to 128 and 256 as chunks need them (the prefill sizes
    it for the first chunk); the samples are the same as with all 256 slots from the start."""
    p, tok = prepare_params(params), ThreeCharTokenizer()
    settings = SamplingConfig(150, temperature=1.0, num_samples=4, ignore_eos=True)
    prompts, keys = [[5, 6, 7], [9]], jax.random.split(jax.random.key(3), 2)
    windows = []
    real_window = sampling.suffix_window
    monkeypatch.setattr(sampling, "suffix_window", lambda t, s: windows.append((real_window(t, s), s)) or real_window(t, s))
    out = generate(p, CFG, tok, prompts, settings, keys)
    assert [w for w, _ in windows] == [64] * 4 + [128] * 4 + [256] * 3 and {s for _, s in windows} == {256}
    monkeypatch.setattr(sampling, "suffix_window", lambda t, s: s)
    whole = generate(p, CFG, tok, prompts, settings, keys)
    assert [[c.token_ids for c in row] for row in out] == [[c.token_ids for c in row] for row in whole]


@pytest.mark.parametrize("shared_prefix", [(), tuple(range(40, 60))])
def test_a_prompts_samples_do_not_depend_on_the_rest_of_the_batch(params, shared_prefix):
    p = prepare_params(params)
    s = SamplingConfig(max_new_tokens=10, temperature=1.0, num_samples=3)
    prompts = [list(shared_prefix) + q for q in ([5, 6], [1, 2, 3, 4, 5, 6, 7, 8, 9], [8])]
    keys = jax.random.split(jax.random.key(7), 3)
    batch = generate(p, CFG, ThreeCharTokenizer(), prompts, s, keys, shared_prefix=shared_prefix)
    for i in range(3):
        [alone] = generate(p, CFG, ThreeCharTokenizer(), [prompts[i]], s, keys[i : i + 1], shared_prefix=shared_prefix)
        assert [c.token_ids for c in alone] == [c.token_ids for c in batch[i]]
    # reordered, with a list of keys; one key means prompt i uses fold_in(key, i)
    swapped = generate(p, CFG, ThreeCharTokenizer(), prompts[::-1], s, list(keys[::-1]), shared_prefix=shared_prefix)
    assert [[c.token_ids for c in row] for row in swapped[::-1]] == [[c.token_ids for c in row] for row in batch]
    one = generate(p, CFG, ThreeCharTokenizer(), prompts, s, jax.random.key(7), shared_prefix=shared_prefix)
    folded = generate(p, CFG, ThreeCharTokenizer(), prompts, s, prompt_keys(jax.random.key(7), 3),
                      shared_prefix=shared_prefix)
    assert [[c.token_ids for c in row] for row in one] == [[c.token_ids for c in row] for row in folded]
    assert len({tuple(c.token_ids) for row in batch for c in row}) > 3  # samples and prompts really differ


def test_two_level_argmax_equals_argmax_with_ties_and_a_ragged_vocabulary():
    logits = np.array(jax.random.normal(jax.random.key(0), (6, 600)))  # 600: two whole blocks and a part
    logits[1, [3, 300]] = 9.0  # a tie across blocks: the first wins
    logits[2, [520, 599]] = 9.0  # both in the last, partial block
    logits[3, 255:257] = 9.0  # on a block edge
    logits[4, :] = -2.0  # all equal
    assert np.array_equal(np.asarray(sampling.argmax_rows(jnp.asarray(logits))), np.argmax(logits, axis=-1))


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.8)])
def test_sampled_frequencies_follow_the_filtered_softmax(temperature, top_k, top_p):
    """Inverse-CDF draws over a vocabulary that is not a whole number of blocks, with NEG_INF (masked) entries:
    the frequencies of 40k draws match softmax(logits / T) after the top-k / top-p cut, and no cut or masked
    entry is ever drawn."""
    V, n = 300, 40_000
    logits = np.array(jax.random.normal(jax.random.key(1), (V,))) * 2.0
    logits[[7, 260, 299]] = sampling.NEG_INF
    z = logits / temperature
    order = np.argsort(-z)
    keep = np.zeros(V, bool)
    keep[order[: top_k or V]] = True
    if top_p < 1.0:
        p_sorted = np.exp(z[order] - z[order].max())
        p_sorted /= p_sorted.sum()
        keep &= np.isin(np.arange(V), order[(np.cumsum(p_sorted) - p_sorted) < top_p])
    expected = np.where(keep, np.exp(z - z.max()), 0.0)
    expected /= expected.sum()
    keys = jax.random.split(jax.random.key(2), n)
    draw = jax.jit(lambda k: sample_tokens(jnp.broadcast_to(jnp.asarray(logits), (n, V)), k, jnp.float32(temperature),
                                           jnp.float32(top_p), greedy=False, top_k=top_k, use_top_p=top_p < 1.0))
    freq = np.bincount(np.asarray(draw(keys)), minlength=V) / n
    assert freq[expected == 0].sum() == 0
    assert np.abs(freq - expected).max() < 4 * np.sqrt(expected.max() / n)


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


def test_batch_rows_are_powers_of_two_up_to_four_then_multiples_of_four():
    assert [sampling.batch_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 12, 13)] == [1, 2, 4, 4, 8, 8, 12, 12, 16]


def test_prompts_are_packed_into_rows_as_wide_as_the_longest():
    lens = [29, 5, 6, 10, 18, 13, 11, 19, 12, 11, 8, 9, 15, 4, 7, 18]  # bench/generate.py's batch 16
    rests = [list(range(100 * i, 100 * i + n)) for i, n in enumerate(lens)]
    pk = sampling.pack_prompts(rests, 16)
    assert pk.tokens_RxW.shape == (8, 32)  # 214 tokens in 8 rows of 32, not 16
    assert (pk.segments_RxW > 0).sum() == sum(lens)
    tokens, positions = pk.tokens_RxW.reshape(-1), pk.positions_RxW.reshape(-1)
    for i, r in enumerate(rests):
        slots = pk.src_BxP[i, 32 - len(r) :]
        assert tokens[slots].tolist() == r and positions[slots].tolist() == list(range(len(r)))
        assert set(pk.segments_RxW.reshape(-1)[slots]) == {i + 1} and tokens[pk.last_B[i]] == r[-1]
    assert pk.lens_B.tolist() == lens
    # a batch padded past its prompts: the extra rows copy prompt 0
    pk = sampling.pack_prompts(rests[:3], 4)
    assert pk.tokens_RxW.shape == (2, 32) and pk.lens_B.tolist() == [29, 5, 6, 29]  # [29], [6, 5]
    assert (pk.src_BxP[3] == pk.src_BxP[0]).all() and pk.last_B[3] == pk.last_B[0]


def test_similar_calls_do_not_recompile(params):
    p = prepare_params(params)
    s = SamplingConfig(max_new_tokens=9, temperature=0.7, num_samples=2)
    generate(p, CFG, ThreeCharTokenizer(), [[1] * 5, [2] * 9], s, jax.random.key(0))
    before = dict(TRACE_COUNTS)
    # Same buckets: batch 2, prompts packed into one row of 16 tokens, 6..9 new tokens (decode chunks of 8).
    for prompts, n in [([[3] * 12, [4] * 2], 7), ([[5] * 15, [1]], 9), ([[6] * 3, [7] * 4], 8)]:
        generate(p, CFG, ThreeCharTokenizer(), prompts, SamplingConfig(max_new_tokens=n, temperature=0.7, num_samples=2),
                 jax.random.key(1))
    assert dict(TRACE_COUNTS) == before
    # A shared prefix: after the first call, other prefixes of the same bucket (17..32 tokens) and similar prompt
    # remainders compile nothing more.
    generate(p, CFG, ThreeCharTokenizer(), [[9] * 20 + [1] * 5, [9] * 20 + [2] * 9], s, jax.random.key(0),
             shared_prefix=[9] * 20)
    before = dict(TRACE_COUNTS)
    for prefix, rests, n in [([9] * 20, [[3] * 12, [4]], 7), ([8] * 32, [[5] * 15, [1]], 9),
                             ([7] * 17, [[6] * 3, [2] * 2], 8)]:
        generate(p, CFG, ThreeCharTokenizer(), [prefix + r for r in rests],
                 SamplingConfig(max_new_tokens=n, temperature=0.7, num_samples=2), jax.random.key(1),
                 shared_prefix=prefix)
    assert dict(TRACE_COUNTS) == before


def test_shared_prefix_is_computed_once_per_model_and_prefix(params, monkeypatch):
    runs = []
    real = sampling.shared_prefill
    monkeypatch.setattr(sampling, "shared_prefill", lambda *a, **kw: runs.append(a[1].shape) or real(*a, **kw))
    p = prepare_params(params)
    prefix = [11, 12, 13, 14, 15, 16, 17]
    s = SamplingConfig(max_new_tokens=4, temperature=1.0, num_samples=2)
    prompts = [prefix + [1, 2], prefix + [3]]
    first = generate(p, CFG, ThreeCharTokenizer(), prompts, s, jax.random.key(0), shared_prefix=prefix)
    again = generate(p, CFG, ThreeCharTokenizer(), prompts, s, jax.random.key(0), shared_prefix=prefix)
    generate(p, CFG, ThreeCharTokenizer(), [prefix + [4, 5, 6]], s, jax.random.key(1), shared_prefix=prefix)
    assert runs == [(1, 64)]  # one forward over the prefix padded to a multiple of 64 for three calls
    assert [[c.token_ids for c in row] for row in again] == [[c.token_ids for c in row] for row in first]
    # another prefix, or another params object (even with equal values), is computed afresh
    generate(p, CFG, ThreeCharTokenizer(), [prefix[:-1] + [1]], s, jax.random.key(0), shared_prefix=prefix[:-1])
    other = prepare_params(params)
    generate(other, CFG, ThreeCharTokenizer(), [prefix + [1, 2]], s, jax.random.key(0), shared_prefix=prefix)
    assert len(runs) == 3
    # a small LRU: the least recently used entries go
    for i in range(sampling.SHARED_CACHE_SIZE):
        generate(p, CFG, ThreeCharTokenizer(), [[i, 1]], s, jax.random.key(0), shared_prefix=[i])
    generate(p, CFG, ThreeCharTokenizer(), [prefix + [1, 2]], s, jax.random.key(0), shared_prefix=prefix)
    assert len(runs) == 3 + sampling.SHARED_CACHE_SIZE + 1


def test_bad_settings_and_empty_prompt_are_clear_errors(params):
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    p = prepare_params(params)
    with pytest.raises(ValueError, match="at least one token"):
        generate(p, CFG, ThreeCharTokenizer(), [[]], SamplingConfig(), jax.random.key(0))
    with pytest.raises(ValueError, match="prompt 1 does not continue the 2-token shared_prefix"):
        generate(p, CFG, ThreeCharTokenizer(), [[1, 2, 3], [1, 3, 3]], SamplingConfig(), jax.random.key(0),
                 shared_prefix=[1, 2])
    with pytest.raises(ValueError, match="prompt 0 does not continue"):
        generate(p, CFG, ThreeCharTokenizer(), [[1, 2]], SamplingConfig(), jax.random.key(0), shared_prefix=[1, 2])
    with pytest.raises(ValueError, match="one key or 2 keys"):
        generate(p, CFG, ThreeCharTokenizer(), [[1], [2]], SamplingConfig(), jax.random.split(jax.random.key(0), 3))
