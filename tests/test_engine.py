"""The inference engine: tokens equal a cache-free sampler's, whatever the order, slots, lanes or chunking;
stops on device and on the host; the CPU and plain paths agree; few programs; clear errors."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rstar_jax.backends import cpu
from rstar_jax.engine import Engine, EngineConfig, Request, RequestError, SamplingConfig, generate, prepare, prompt_keys
from rstar_jax.engine import sample
from rstar_jax.models.attention import NEG_INF
from rstar_jax.models.config import ModelConfig
from rstar_jax.models.llama import causal_lm_logits
from rstar_jax.models.params import init_params

CFG = ModelConfig(
    model_type="llama", vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=12, tie_word_embeddings=True, eos_token_id=96,
)
SMALL = EngineConfig(slots=8, lanes=4, max_prompt=64, max_new_tokens=32, block=16, prefill_chunk=8, prefill_rows=2,
                     decode_steps=4)


class ThreeCharTokenizer:
    """Every token decodes to three characters, so stop strings can start and end inside tokens. It cannot
    encode, so the engine checks its stop strings on the host."""

    eos_token_id = 96
    vocab_size = 97

    def decode(self, ids):
        return "".join(f"{i:02d}|" for i in ids)

    def encode(self, text):
        return []


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0), std=0.3)


@pytest.fixture(scope="module")
def model(params):
    return prepare(params, CFG)


_full_logits = jax.jit(causal_lm_logits, static_argnums=1)
_next = jax.jit(sample.next_tokens)


def cache_free_samples(params, prompt, key, K, T, temperature=0.0, top_p=1.0, top_k=0, stop=None):
    """K samples drawn token by token from full forwards (no cache) with the engine's per-token keys, each until
    EOS, T tokens, or `stop(tokens)`."""
    data = jax.random.key_data(key)
    out = []
    for k in range(K):
        seq = list(prompt)
        while len(seq) < len(prompt) + T and (len(seq) == len(prompt) or seq[-1] != CFG.eos_token_id):
            if stop is not None and stop(seq[len(prompt):]):
                break
            padded = jnp.asarray([seq + [0] * (len(prompt) + T - len(seq))])  # fixed shape; causal, so inert
            logits = _full_logits(params, CFG, padded)[0, len(seq) - 1]
            t = len(seq) - len(prompt)
            token = _next(logits[None], sample.token_key(data, k, t)[None], jnp.float32([temperature]),
                          jnp.float32([top_p]), jnp.int32([top_k]), jnp.array([True]))
            seq.append(int(token[0]))
        out.append(seq[len(prompt):])
    return out


def tokens(out):
    return [[c.token_ids for c in row] for row in out]


def test_greedy_equals_the_full_forward_with_and_without_a_shared_prefix(params, model):
    few_shot = list(range(40, 58))
    prompts = [few_shot + [3, 4, 5], few_shot + list(range(7, 40)), few_shot + [20]]  # 33 tokens: 3 chunks, 3 blocks
    want = [cache_free_samples(params, p, jax.random.key(0), 1, 12)[0] for p in prompts]
    s = SamplingConfig(max_new_tokens=12)
    for shared in (few_shot, ()):
        out = generate(model, ThreeCharTokenizer(), prompts, s, jax.random.key(0), shared_prefix=shared, config=SMALL)
        assert [row[0].token_ids for row in out] == want
    assert len({tuple(w) for w in want}) == 3


def test_bfloat16_greedy_follows_a_bfloat16_full_forward(params):
    """Prefill, the caches and decode all compute in the model's dtype: the first tokens match a bf16 forward."""
    m = prepare(params, CFG, jnp.bfloat16)
    prompts = [[5, 6, 7, 8], list(range(20, 50))]
    out = generate(m, ThreeCharTokenizer(), prompts, SamplingConfig(max_new_tokens=3), jax.random.key(0), config=SMALL)
    for p, row in zip(prompts, out):
        logits = causal_lm_logits(params, CFG, jnp.asarray([p]), compute_dtype=jnp.bfloat16)[0, -1]
        assert row[0].token_ids[0] == int(jnp.argmax(logits))


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7, top_p=0.9, top_k=20)])
def test_samples_equal_a_cache_free_sampler_with_the_same_keys(params, model, kw):
    prompt, K, T = [5, 6, 7, 8], 6, 12  # 6 samples over lanes of 4: the request spans two entries
    key = jax.random.key(3)
    out = generate(model, ThreeCharTokenizer(), [prompt], SamplingConfig(T, num_samples=K, **kw), key[None],
                   config=SMALL)[0]
    assert [c.token_ids for c in out] == cache_free_samples(params, prompt, key, K, T, **kw)
    assert len({tuple(c.token_ids) for c in out}) > 1


def _requests(shared=()):
    """Requests with different prompts, sample counts and settings (greedy and sampled in one batch)."""
    prompts = [[5, 6], list(range(1, 30)), [8], [9, 10, 11, 12], list(range(60, 75)), [3, 3, 3]]
    settings = [SamplingConfig(10, temperature=1.0, num_samples=3), SamplingConfig(14, num_samples=1),
                SamplingConfig(9, temperature=0.8, top_k=7, num_samples=5), SamplingConfig(12, temperature=1.2),
                SamplingConfig(6, temperature=0.9, top_p=0.8, num_samples=2), SamplingConfig(11, temperature=1.0)]
    keys = jax.random.split(jax.random.key(7), len(prompts))
    return [Request(list(shared) + p, s, k) for p, s, k in zip(prompts, settings, keys)]


@pytest.mark.parametrize("shared", [(), tuple(range(40, 60))])
def test_tokens_do_not_depend_on_order_slots_lanes_or_chunking(model, shared):
    """The same requests admitted in different orders, into engines with 1 to 16 slots, 1 to 8 lanes and other
    prefill chunks, draw the same tokens (slots free and refill mid-call: continuous batching)."""
    reqs = _requests(shared)
    base = None
    configs = [SMALL, EngineConfig(slots=1, lanes=1, entries=1, max_prompt=64, max_new_tokens=16, block=16,
                                   prefill_chunk=4, prefill_rows=1, decode_steps=3),
               EngineConfig(slots=16, lanes=8, max_prompt=64, max_new_tokens=16, block=32, prefill_chunk=32,
                            prefill_rows=4, decode_steps=5),
               EngineConfig(slots=3, lanes=2, entries=2, max_prompt=48, max_new_tokens=16, block=16, prefill_chunk=5,
                            prefill_rows=3, decode_steps=2)]
    orders = [list(range(6)), [5, 3, 1, 0, 2, 4], [2, 0, 4, 1, 5, 3], [4, 5, 0, 3, 1, 2]]
    for config, order in zip(configs, orders):
        engine = Engine(model, ThreeCharTokenizer(), config)
        engine.set_shared_prefix(shared)
        got = engine.run([reqs[i] for i in order])
        by_request = [None] * 6
        for i, row in zip(order, got):
            by_request[i] = [c.token_ids for c in row]
        base = base or by_request
        assert by_request == base, config
    assert [len(row) for row in base] == [3, 1, 5, 1, 2, 1]
    assert len({tuple(t) for row in base for t in row}) > 8


def test_requests_submitted_while_others_run_draw_the_same(model):
    """Requests submitted from inside the completions loop (as a search submits its next expansion)."""
    reqs = _requests()
    alone = Engine(model, ThreeCharTokenizer(), SMALL).run(reqs)
    engine = Engine(model, ThreeCharTokenizer(), SMALL)
    ids = [engine.submit(reqs[0])]
    got = {}
    for fin in engine.completions():
        got[fin.id] = [c.token_ids for c in fin.completions]
        if len(ids) < len(reqs):
            ids.append(engine.submit(reqs[len(ids)]))
    assert [got[i] for i in ids] == tokens(alone)


def test_plain_path_draws_the_same_tokens_as_the_cpu_path(params, model):
    plain = prepare(params, CFG, tuned=False)
    assert model.tuned and not plain.tuned
    reqs = _requests(tuple(range(40, 60)))
    outs = []
    for m in (model, plain):
        engine = Engine(m, ThreeCharTokenizer(), SMALL)
        engine.set_shared_prefix(range(40, 60))
        outs.append(tokens(engine.run(reqs)))
    assert outs[0] == outs[1]


def test_host_checked_stop_string_cuts_text_right_after_it(model):
    free = generate(model, ThreeCharTokenizer(), [[4, 4]], SamplingConfig(max_new_tokens=20), jax.random.key(0),
                    config=SMALL)[0][0]
    assert len(free.token_ids) >= 4, "need a few tokens to place a stop string inside"
    stop = free.text[4:8]  # starts inside token 2, ends inside token 3
    first = free.text.find(stop)
    out = generate(model, ThreeCharTokenizer(), [[4, 4]], SamplingConfig(max_new_tokens=20, stop=("zzz", stop)),
                   jax.random.key(0), config=SMALL)[0][0]
    assert out.finish_reason == "stop"
    assert out.text == free.text[: first + len(stop)]
    assert out.token_ids == free.token_ids[: -(-(first + len(stop)) // 3)]


def test_device_stop_patterns_end_samples_where_their_text_does(tiny_tokenizer):
    """Stop strings the tokenizer can encode are matched on device, merged first and last tokens included; the
    samples end exactly where the text holds the string, and the text is cut right after it."""
    cfg = CFG.replace(vocab_size=tiny_tokenizer.vocab_size, eos_token_id=tiny_tokenizer.eos_token_id)
    params = init_params(cfg, jax.random.key(2), std=0.3)
    m = prepare(params, cfg)
    prompt = tiny_tokenizer.encode("The capital of France is")
    s = SamplingConfig(24, temperature=1.3, num_samples=8, ignore_eos=True)
    free = generate(m, tiny_tokenizer, [prompt], s, jax.random.key(5)[None], config=SMALL)[0]
    texts = [c.text for c in free]
    stop = next(t for t in ("e", "a", "s", " ") if sum(t in x for x in texts) >= 3)
    engine = Engine(m, tiny_tokenizer, SMALL)
    assert engine.stops.string(stop) is not None  # on the device table
    [out] = engine.run([Request(prompt, SamplingConfig(24, temperature=1.3, num_samples=8, ignore_eos=True,
                                                      stop=(stop,)), jax.random.key(5))])
    for c_free, c in zip(free, out):
        if stop in c_free.text:
            assert c.finish_reason == "stop" and c.text == c_free.text[: c_free.text.find(stop) + len(stop)]
            assert c.token_ids == c_free.token_ids[: len(c.token_ids)]
        else:
            assert c.token_ids == c_free.token_ids and c.finish_reason == "length"


def test_length_finish_and_eos_stop(model, params):
    out = generate(model, ThreeCharTokenizer(), [[1, 2]], SamplingConfig(max_new_tokens=5), jax.random.key(0),
                   config=SMALL)[0][0]
    assert (out.finish_reason, len(out.token_ids)) == ("length", 5) or out.token_ids[-1] == CFG.eos_token_id
    eos_cfg = CFG.replace(eos_token_id=out.token_ids[2])
    stopped = generate(prepare(params, eos_cfg), ThreeCharTokenizer(), [[1, 2]], SamplingConfig(max_new_tokens=5),
                       jax.random.key(0), config=SMALL)[0][0]
    first = out.token_ids.index(out.token_ids[2])
    assert stopped.finish_reason == "stop" and stopped.token_ids == out.token_ids[: first + 1]
    one = generate(model, ThreeCharTokenizer(), [[1, 2]], SamplingConfig(max_new_tokens=1, num_samples=3),
                   jax.random.key(0), config=SMALL)[0]
    assert [len(c.token_ids) for c in one] == [1, 1, 1]


def test_one_key_folds_in_the_prompt_index(model):
    prompts = [[5, 6], [7], [8, 9, 10]]
    s = SamplingConfig(max_new_tokens=6, temperature=1.0, num_samples=2)
    one = generate(model, ThreeCharTokenizer(), prompts, s, jax.random.key(7), config=SMALL)
    folded = generate(model, ThreeCharTokenizer(), prompts, s, list(prompt_keys(jax.random.key(7), 3)), config=SMALL)
    assert tokens(one) == tokens(folded)


@pytest.mark.parametrize("settings", [dict(top_k=1), dict(top_p=1e-6)])
def test_top_k_one_and_tiny_top_p_are_greedy(model, settings):
    greedy = generate(model, ThreeCharTokenizer(), [[9, 8, 7]], SamplingConfig(max_new_tokens=8), jax.random.key(1),
                      config=SMALL)
    s = SamplingConfig(max_new_tokens=8, temperature=1.5, num_samples=2, **settings)
    sampled = generate(model, ThreeCharTokenizer(), [[9, 8, 7]], s, jax.random.key(1), config=SMALL)
    assert all(c.token_ids == greedy[0][0].token_ids for c in sampled[0])


def test_two_level_argmax_equals_argmax_with_ties_and_a_ragged_vocabulary():
    logits = np.array(jax.random.normal(jax.random.key(0), (6, 600)))  # 600: two whole blocks and a part
    logits[1, [3, 300]] = 9.0  # a tie across blocks: the first wins
    logits[2, [520, 599]] = 9.0  # both in the last, partial block
    logits[3, 255:257] = 9.0  # on a block edge
    logits[4, :] = -2.0  # all equal
    assert np.array_equal(np.asarray(cpu.argmax(jnp.asarray(logits))), np.argmax(logits, axis=-1))


@pytest.mark.parametrize("tuned", [True, False])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.8)])
def test_sampled_frequencies_follow_the_filtered_softmax(temperature, top_k, top_p, tuned):
    """Inverse-CDF draws over a vocabulary that is not a whole number of blocks, with NEG_INF (masked) entries:
    the frequencies of 10k draws match softmax(logits / T) after the top-k / top-p cut, on both paths."""
    V, n = 300, 10_000
    logits = np.array(jax.random.normal(jax.random.key(1), (V,))) * 2.0
    logits[[7, 260, 299]] = NEG_INF
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

    def draw(k):
        with cpu.tuning(tuned):
            full = lambda x: jnp.full((n,), x)  # noqa: E731
            return sample.next_tokens(jnp.broadcast_to(jnp.asarray(logits), (n, V)), k, full(temperature),
                                      full(top_p), full(top_k).astype(jnp.int32), jnp.ones(n, bool))

    freq = np.bincount(np.asarray(jax.jit(draw)(keys)), minlength=V) / n
    assert freq[expected == 0].sum() == 0
    assert np.abs(freq - expected).max() < 4 * np.sqrt(expected.max() / n)


def test_engine_programs_compile_once_for_any_workload(model, caplog):
    """Prompt lengths, request counts, samples and new tokens do not add programs: after a first run, other
    workloads compile nothing of the engine's."""
    def workload(seed, n, lengths, K, T):
        prompts = [list(range(40, 60)) + [int(x) % 90 for x in np.random.default_rng(seed).integers(0, 90, L)]
                   for L in lengths[:n]]
        engine = Engine(model, ThreeCharTokenizer(), SMALL)
        engine.set_shared_prefix(range(40, 60))
        engine.run([Request(p, SamplingConfig(T, temperature=0.8, num_samples=K), jax.random.key(seed)) for p in prompts])

    workload(0, 2, [3, 9], 2, 5)
    caplog.set_level(logging.WARNING, logger="jax._src.interpreters.pxla")
    jax.config.update("jax_log_compiles", True)
    try:
        workload(1, 5, [1, 40, 17, 2, 30], 3, 12)
        workload(2, 1, [44], 7, 30)
        workload(3, 6, [5, 6, 7, 8, 9, 10], 1, 2)
    finally:
        jax.config.update("jax_log_compiles", False)
    compiled = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    ours = [m for m in compiled if any(name in m for name in ("prefill", "decode", "_empty", "_layout"))]
    assert ours == [], ours


def test_bad_requests_are_one_line_errors(model):
    engine = Engine(model, ThreeCharTokenizer(), SMALL)
    with pytest.raises(RequestError, match="no tokens"):
        engine.submit(Request([], SamplingConfig(max_new_tokens=4), jax.random.key(0)))
    with pytest.raises(RequestError, match="65 tokens after the shared prefix; engine.max_prompt is 64"):
        engine.submit(Request([1] * 65, SamplingConfig(max_new_tokens=4), jax.random.key(0)))
    with pytest.raises(RequestError, match="max_new_tokens=40 is above engine.max_new_tokens=32"):
        engine.submit(Request([1], SamplingConfig(max_new_tokens=40), jax.random.key(0)))
    with pytest.raises(RequestError, match=r"token ids must be in \[0, 97\)"):
        engine.submit(Request([1, 97], SamplingConfig(max_new_tokens=4), jax.random.key(0)))
    with pytest.raises(ValueError, match="temperature=inf"):
        SamplingConfig(temperature=float("inf"))
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="one key or 2 keys"):
        generate(model, ThreeCharTokenizer(), [[1], [2]], SamplingConfig(), jax.random.split(jax.random.key(0), 3))
    with pytest.raises(ValueError, match="engine.slots=6: must be a multiple"):
        EngineConfig(slots=6).layout(4)
