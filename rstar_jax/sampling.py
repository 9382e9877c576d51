"""Batched generation: prefill each prompt once, decode K samples per prompt from the shared prefix cache.

The cache has three parts, each a tuple of L per-layer arrays in the layouts the attention dots read (keys
[..., E, slots], values [..., slots, E]). The shared part [G, E, P0] holds the keys/values of a prefix that every
prompt of the call starts with (a few-shot block): computed once per (params, cfg, tokens) and kept in a small LRU,
so search never re-prefills its ~1k-token few-shot prompt. The prefix part [B, G, E, P] holds each prompt's
remaining tokens once (left-padded, so every row's prompt ends at slot P-1; the prefill itself runs them packed
several to a row, `pack_prompts`); the suffix part [B*K, G, E, S] holds each sample's own tokens, S growing with
them. A decode step attends over all three with one softmax, so K samples never copy or recompute their prompt.
Decoding runs in jitted chunks of `chunk` tokens; between chunks the host checks stop strings (which need
detokenised text) and quits once every sample has finished. When at most half the rows are still running, the state is gathered down to those rows (one
sample per row, rows a power of two): a search's call decodes until its longest step ends, and most samples end
long before. Batch, prompt, shared-prefix and new-token sizes are bucketed so similar calls reuse compiled code.

Sample k of prompt i draws token t with fold_in(fold_in(key_i, k), t), key_i being the prompt's own key, so what a
prompt samples does not depend on its row or on the other prompts of the call.
"""

from __future__ import annotations

import collections
import dataclasses
import weakref
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rstar_jax.jit import quick_jit
from rstar_jax.models.config import ModelConfig
from rstar_jax.models.llama import NEG_INF, attend_parts, attn_out_and_mlp, forward, lm_head, qkv, rms_norm, unstack_layers
from rstar_jax.models.params import Params

# Incremented only while tracing, so it counts compilations (tests assert that similar calls do not recompile).
TRACE_COUNTS: collections.Counter[str] = collections.Counter()


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    num_samples: int = 1
    stop: tuple[str, ...] = ()
    chunk: int = 16  # tokens per jitted decode call between host stop checks
    ignore_eos: bool = False  # always produce max_new_tokens (benchmarks)

    def __post_init__(self):
        for name, ok in [
            ("max_new_tokens", self.max_new_tokens >= 1),
            ("temperature", self.temperature >= 0),
            ("top_p", 0 < self.top_p <= 1),
            ("top_k", self.top_k >= 0),
            ("num_samples", self.num_samples >= 1),
            ("chunk", self.chunk >= 1),
        ]:
            if not ok:
                raise ValueError(f"sampling: invalid {name}={getattr(self, name)!r}")


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class SharedPrefix(NamedTuple):
    """Keys/values of the prefix every prompt of a call starts with. Kept apart from `DecodeState`, which decoding
    donates: these buffers live on in the cache. P0 = 0 when there is none."""

    k: tuple[jax.Array, ...]  # L x [G, E, P0], in the layouts of `DecodeState`'s caches
    v: tuple[jax.Array, ...]  # L x [G, P0, E]
    valid_P0: jax.Array  # bool: real tokens (the rest pads P0 to its bucket)


class DecodeState(NamedTuple):
    # One array per layer, keys as [..., E, slots] and values as [..., slots, E]: what XLA:CPU's attention dots read
    # in place. Stacked [L, B, P, G, E] caches were copied out (sliced and transposed) at every layer of every step:
    # 29% of a deep search call's decode step.
    prefix_k: tuple[jax.Array, ...]  # L x [B, G, E, P]: each prompt's tokens after the shared prefix
    prefix_v: tuple[jax.Array, ...]  # L x [B, G, P, E]
    prefix_valid_BxP: jax.Array  # bool
    # The samples' own tokens by flat row b*K + k: with a size-1 K axis (one sample, or rows gathered) XLA copied the
    # loop-carried buffer three times per layer per step instead of writing the new slot in place.
    suffix_k: tuple[jax.Array, ...]  # L x [B*K, G, E, S] (`as_bits`); S grows by chunks (`grow_suffix`)
    suffix_v: tuple[jax.Array, ...]  # L x [B*K, G, S, E]
    lens_B: jax.Array  # whole prompt lengths (shared prefix included)
    token_BxK: jax.Array  # last sampled token, not yet fed to the model
    t: jax.Array  # new tokens sampled so far (scalar)
    keys_BxK: jax.Array  # per-sample key: fold_in(key_b, k)


def prepare_params(params: Params, compute_dtype: Any = jnp.float32) -> Params:
    """Decode layout, made once per model: cast to the compute dtype, split the layer stack into a list (each
    weight read in place), and store projections as `weight_t` [in, out] (see `llama.linear`)."""
    cast = jax.tree.map(lambda a: jnp.asarray(a, compute_dtype), params)

    def transpose(tree: Params) -> Params:
        if "weight" in tree and tree["weight"].ndim >= 2:
            return {**{k: v for k, v in tree.items() if k != "weight"}, "weight_t": jnp.swapaxes(tree["weight"], -1, -2)}
        return {k: transpose(v) if isinstance(v, dict) else v for k, v in tree.items()}

    layers = cast["model"]["layers"]
    if isinstance(layers, dict):
        layers = unstack_layers(layers)
    cast["model"]["layers"] = [transpose(layer) for layer in layers]
    return cast


def bucket(n: int, minimum: int = 1) -> int:
    """Next power of two (>= minimum) up to 256, then the next multiple of 256."""
    n = max(n, minimum)
    return 1 << (n - 1).bit_length() if n <= 256 else -(-n // 256) * 256


def batch_bucket(n: int) -> int:
    """Rows of a batched call: powers of two up to 4, then multiples of 4. Every padding row is decoded like a
    real one, so 12 prompts pay for 12, not 16 (a search over 12 problems spent a quarter of its sampling on
    padding); a search keeps its batch size, so the finer steps add few compilations."""
    return bucket(n) if n <= 4 else -(-n // 4) * 4


def suffix_window(t_end: int, suffix_len: int) -> int:
    """Suffix slots a decode chunk attends to when its last slot is below `t_end`: a power of two from 64 up to the
    whole suffix. Attention over each sample's own slots is a tiny-M dot per sample that XLA:CPU runs at
    ~6-11 GB/s, so at 64 rows and 256 slots it costs as much as all the projections; most chunks need far fewer
    slots. Windows of 64 and up add at most two compiled chunks per shape, and none for suffixes <= 64."""
    return min(suffix_len, bucket(t_end, 64))


GATHER_MIN_ROWS = 8  # below this many rows a decode step costs about the same whatever the rows (weights dominate)

VOCAB_BLOCK = 256  # vocabulary entries per block of the two-level argmax and CDF search


def vocab_blocks(x_NxV: jax.Array, fill: float) -> jax.Array:
    """[N, V] -> [N, C, VOCAB_BLOCK], the vocabulary padded with `fill` to whole blocks."""
    N, V = x_NxV.shape
    return jnp.pad(x_NxV, ((0, 0), (0, -V % VOCAB_BLOCK)), constant_values=fill).reshape(N, -1, VOCAB_BLOCK)


def in_block(x_NxCxB: jax.Array, block_N: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x_NxCxB, block_N[:, None, None], axis=1)[:, 0]


def argmax_rows(logits_NxV: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (first maximum wins), in two levels: XLA:CPU's argmax reduction is not
    vectorised (2.6 ms for 16 rows of a 49k vocabulary), a max per block then an argmax per block is (0.15 ms)."""
    x = vocab_blocks(logits_NxV, -jnp.inf)
    block = jnp.argmax(x.max(-1), axis=-1)
    return (block * VOCAB_BLOCK + jnp.argmax(in_block(x, block), axis=-1)).astype(jnp.int32)


def first_above(cdf_NxM: jax.Array, u_N: jax.Array, p_NxM: jax.Array) -> jax.Array:
    """Index of the first entry whose cumulative mass exceeds u, never past the last entry of positive mass
    (where rounding puts u at the very top)."""
    M = cdf_NxM.shape[-1]
    last = M - 1 - jnp.argmax(p_NxM[:, ::-1] > 0, axis=-1)
    return jnp.minimum(jnp.sum(cdf_NxM <= u_N[:, None], axis=-1), last)


def draw_categorical(keys_N: jax.Array, logits_NxV: jax.Array, temperature) -> jax.Array:
    """One draw per row from softmax(logits / temperature): one uniform per row inverts the CDF, found in two
    levels (block masses, then inside the chosen block). jax.random.categorical draws a Gumbel per vocabulary
    entry instead: ~90 ms per step for 96 rows of a 49k vocabulary on CPU, against ~3 ms here. The temperature
    is applied inside the exp: dividing the logits first lets XLA:CPU fuse the division into the head's matmul,
    which then runs 3x slower. NEG_INF entries are never drawn."""
    x = vocab_blocks(logits_NxV.astype(jnp.float32), NEG_INF)
    p_NxCxB = jnp.exp((x - x.max(axis=(-2, -1), keepdims=True)) / temperature)
    mass_NxC = p_NxCxB.sum(-1)
    cdf_NxC = jnp.cumsum(mass_NxC, axis=-1)
    u_N = jax.vmap(jax.random.uniform)(keys_N) * cdf_NxC[:, -1]
    block = first_above(cdf_NxC, u_N, mass_NxC)
    before_N = jnp.where(block > 0, jnp.take_along_axis(cdf_NxC, jnp.maximum(block - 1, 0)[:, None], 1)[:, 0], 0.0)
    p_NxB = in_block(p_NxCxB, block)
    inner = first_above(before_N[:, None] + jnp.cumsum(p_NxB, axis=-1), u_N, p_NxB)
    return (block * VOCAB_BLOCK + inner).astype(jnp.int32)


def sample_tokens(logits_NxV, keys_N, temperature, top_p, *, greedy: bool, top_k: int, use_top_p: bool):
    """temperature -> top-k -> top-p -> categorical (the order transformers applies them), one key per row.
    A positive temperature keeps the order of the logits, so the top-k / top-p cut is found on the raw logits."""
    if greedy:
        return argmax_rows(logits_NxV)
    logits = logits_NxV
    if top_k or use_top_p:
        # Sorted candidates: the top-k when set (cheap), else the whole vocabulary (needed for exact top-p).
        sorted_NxC = jax.lax.top_k(logits, top_k or logits.shape[-1])[0]
        if use_top_p:
            probs = jax.nn.softmax(sorted_NxC / temperature, axis=-1)
            keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # always keeps the first candidate
            threshold = jnp.take_along_axis(sorted_NxC, jnp.sum(keep, -1, keepdims=True) - 1, axis=-1)
        else:
            threshold = sorted_NxC[..., -1:]
        logits = jnp.where(logits < threshold, NEG_INF, logits)
    return draw_categorical(keys_N, logits, temperature)


def step_keys(keys_BxK: jax.Array, t: jax.Array) -> jax.Array:
    """Key of every sample at new-token index t: a sample's stream depends only on (its prompt's key, k, t)."""
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_BxK.reshape(-1), t)


def sample_keys(keys_B: jax.Array, num_samples: int) -> jax.Array:
    """[B, K] keys: sample k of prompt b gets fold_in(key_b, k)."""
    return jax.vmap(lambda key: jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(num_samples)))(keys_B)


def prompt_keys(key, n: int) -> jax.Array:
    """One typed key per prompt from one key (prompt i: fold_in(key, i)) or from n keys (typed or raw uint32)."""
    key = jnp.stack(list(key)) if isinstance(key, (list, tuple)) else key
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    if key.shape == ():
        return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(n))
    if key.shape != (n,):
        raise ValueError(f"generate: key must be one key or {n} keys (one per prompt), got shape {key.shape}")
    return key


def compute_dtype(params: Params) -> Any:
    """The dtype `prepare_params` cast the model to: prefill, the caches and decode all compute in it."""
    return params["model"]["embed_tokens"]["weight"].dtype


def as_bits(x: jax.Array) -> jax.Array:
    """The suffix cache's storage of x: half-width floats as unsigned ints of their width, because XLA:CPU runs a
    bfloat16 dynamic-update-slice by converting the whole buffer (4 s per decode step at a search call's shapes,
    against 0.2 s in fp32); on integers it writes in place. fp32 stays fp32: it is written in place, and reading an
    fp32 cache through a bitcast made XLA copy it at every layer of every step. `from_bits` reads it back."""
    return x if x.dtype.itemsize == 4 else jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))


def from_bits(x: jax.Array, dtype: Any) -> jax.Array:
    return x if x.dtype == dtype else jax.lax.bitcast_convert_type(x, dtype)


def decode_layout(k: jax.Array, v: jax.Array) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """Stacked [L, ..., P, G, E] keys/values as the cache's per-layer [..., G, E, P] keys and [..., G, P, E] values."""
    return (tuple(jnp.moveaxis(k[i], -3, -1) for i in range(k.shape[0])),
            tuple(jnp.moveaxis(v[i], -3, -2) for i in range(v.shape[0])))


def empty_shared_prefix(params: Params, cfg: ModelConfig) -> SharedPrefix:
    kv = jnp.zeros((cfg.num_hidden_layers, 0, cfg.num_key_value_heads, cfg.head_dim), compute_dtype(params))
    return SharedPrefix(*decode_layout(kv, kv), jnp.zeros((0,), bool))


@quick_jit(static_argnames=("cfg",))
def shared_prefill(params, tokens_1xP, length, *, cfg) -> SharedPrefix:
    """Keys/values of a right-padded prefix whose first `length` tokens are real."""
    TRACE_COUNTS["shared_prefill"] += 1
    P = tokens_1xP.shape[1]
    valid_P = jnp.arange(P) < length
    _, (k, v) = forward(params, cfg, tokens_1xP, jnp.arange(P)[None], valid_P[None].astype(jnp.int32), return_kv=True,
                        compute_dtype=compute_dtype(params))
    return SharedPrefix(*decode_layout(k[:, 0], v[:, 0]), valid_P)


SHARED_CACHE_SIZE = 4  # a few (model, few-shot) pairs; one SmolLM2 entry of 1k tokens is ~47 MB
_shared_cache: collections.OrderedDict[tuple, tuple[weakref.ref, SharedPrefix]] = collections.OrderedDict()


def shared_prefix_kv(params: Params, cfg: ModelConfig, prefix: tuple[int, ...]) -> SharedPrefix:
    """The prefix's keys/values, computed once per (params object, cfg, tokens) and kept in a small LRU.

    Keyed by the params object's identity (params are never mutated in place); a weak reference to its embedding
    makes sure a freed model whose id gets reused misses instead of hitting, and the cache keeps no model alive.
    """
    if not prefix:
        return empty_shared_prefix(params, cfg)
    embed = params["model"]["embed_tokens"]["weight"]
    cache_key = (id(params), cfg, prefix)
    hit = _shared_cache.get(cache_key)
    if hit is None or hit[0]() is not embed:
        # Multiples of 64, not powers of two: a run uses one prefix, so the finer size adds no compilations, and
        # every decode step attends over the padding (789 few-shot tokens would be padded to 1024).
        tokens_1xP = np.zeros((1, -(-len(prefix) // 64) * 64), np.int32)
        tokens_1xP[0, : len(prefix)] = prefix
        hit = (weakref.ref(embed), shared_prefill(params, jnp.asarray(tokens_1xP), jnp.int32(len(prefix)), cfg=cfg))
        _shared_cache[cache_key] = hit
        while len(_shared_cache) > SHARED_CACHE_SIZE:
            _shared_cache.popitem(last=False)
    _shared_cache.move_to_end(cache_key)
    return hit[1]


class PackedPrompts(NamedTuple):
    """Prompt remainders packed into R rows of W tokens for the prefill (host arrays), and where each prompt's
    tokens go in the decode state's left-padded [B, P = W] prefix."""

    tokens_RxW: np.ndarray
    positions_RxW: np.ndarray  # within the prompt's remainder
    segments_RxW: np.ndarray  # 1 + prompt index; 0 = padding
    src_BxP: np.ndarray  # flat index into R*W of prefix slot p of prompt b (0 for left padding, masked)
    last_B: np.ndarray  # flat index of each prompt's last token
    lens_B: np.ndarray


def pack_prompts(rests: Sequence[Sequence[int]], B: int) -> PackedPrompts:
    """First-fit decreasing into rows as wide as the longest prompt's bucket. A batch pads every prompt to the
    longest, so prefilling 16 short prompts of 4-29 tokens ran 512 token slots for 214 tokens; packed, a few rows
    of the same width hold them all, and no row attends further than the longest prompt would. Rows past the n
    prompts (B > n) copy prompt 0's slots; their results are ignored."""
    lens = [len(r) for r in rests]
    W = bucket(max(lens), 16)
    room: list[int] = []
    at = [(0, 0)] * len(rests)
    for i in sorted(range(len(rests)), key=lambda i: -lens[i]):
        r = next((r for r, free in enumerate(room) if free >= lens[i]), len(room))
        if r == len(room):
            room.append(W)
        at[i] = (r, W - room[r])
        room[r] -= lens[i]
    R = batch_bucket(len(room))
    tokens, positions, segments = (np.zeros((R, W), np.int32) for _ in range(3))
    src_BxP, last_B, lens_B = np.zeros((B, W), np.int32), np.zeros((B,), np.int32), np.full((B,), lens[0], np.int32)
    for i, ((r, c), n) in enumerate(zip(at, lens)):
        tokens[r, c : c + n], positions[r, c : c + n], segments[r, c : c + n] = rests[i], np.arange(n), i + 1
        src_BxP[i, W - n :], last_B[i], lens_B[i] = r * W + c + np.arange(n), r * W + c + n - 1, n
    src_BxP[len(rests) :], last_B[len(rests) :] = src_BxP[0], last_B[0]
    return PackedPrompts(tokens, positions, segments, src_BxP, last_B, lens_B)


@quick_jit(static_argnames=("cfg", "num_samples", "suffix_len", "greedy", "top_k", "use_top_p"))
def prefill(params, packed: PackedPrompts, keys_B, shared: SharedPrefix, temperature, top_p, *, cfg, num_samples,
            suffix_len, greedy, top_k, use_top_p):
    """Run the packed prompt remainders once (after the shared prefix), sample each prompt's K first tokens, and
    allocate the decode state."""
    TRACE_COUNTS["prefill"] += 1
    offset = jnp.sum(shared.valid_P0, dtype=jnp.int32)
    hidden_RxWxD, (k, v) = forward(params, cfg, packed.tokens_RxW, packed.positions_RxW + offset, packed.segments_RxW,
                                   return_kv=True, compute_dtype=compute_dtype(params),
                                   shared_kv=shared if shared.valid_P0.shape[0] else None)
    L, R, W, G, E = k.shape
    B, P = packed.src_BxP.shape
    k, v = (x.reshape(L, R * W, G, E)[:, packed.src_BxP] for x in (k, v))  # [L, B, P, G, E], left-padded
    valid_BxP = jnp.arange(P)[None, :] >= P - packed.lens_B[:, None]
    logits_BxV = lm_head(params, cfg, hidden_RxWxD.reshape(R * W, -1)[packed.last_B])
    keys_BxK = sample_keys(keys_B, num_samples)
    logits_BKxV = jnp.repeat(logits_BxV, num_samples, axis=0)
    first = sample_tokens(logits_BKxV, step_keys(keys_BxK, 0), temperature, top_p, greedy=greedy, top_k=top_k, use_top_p=use_top_p)
    suffix_k = tuple(as_bits(jnp.zeros((B * num_samples, G, E, suffix_len), k.dtype)) for _ in range(L))
    suffix_v = tuple(as_bits(jnp.zeros((B * num_samples, G, suffix_len, E), v.dtype)) for _ in range(L))
    return DecodeState(*decode_layout(k, v), valid_BxP, suffix_k, suffix_v, packed.lens_B + offset,
                       first.reshape(B, num_samples), jnp.int32(1), keys_BxK)


@quick_jit(static_argnames=("slots",))
def grow_suffix(st: DecodeState, *, slots: int) -> DecodeState:
    """The state with `slots` suffix slots, the new ones zero. A decode step reads every slot of the suffix, so it
    is only as long as the tokens so far need (`suffix_window`) and grows between chunks: slicing a window out of
    a longer buffer made XLA copy the window at every layer of every step. (Apart from `decode_chunk`, so that
    growing adds only this small program per shape.)"""
    S = st.suffix_k[0].shape[-1]
    grow = lambda xs, axis: tuple(  # noqa: E731
        jnp.concatenate([x, jnp.zeros(x.shape[:axis] + (slots - S,) + x.shape[axis:][1:], x.dtype)], axis) for x in xs)
    return st._replace(suffix_k=grow(st.suffix_k, 3), suffix_v=grow(st.suffix_v, 2))


def decode_logits(params: Params, cfg: ModelConfig, st: DecodeState, shared: SharedPrefix):
    """Feed each sample's last token and write its K/V at suffix slot t-1; returns (logits [B, K, V], state)."""
    B, K = st.token_BxK.shape
    G, E = cfg.num_key_value_heads, cfg.head_dim
    slot = st.t - 1
    positions_BxK = jnp.broadcast_to(st.lens_B[:, None] + slot, (B, K))
    svalid_S = jnp.arange(st.suffix_k[0].shape[-1]) <= slot
    h = params["model"]["embed_tokens"]["weight"][st.token_BxK]
    suffix_k, suffix_v = list(st.suffix_k), list(st.suffix_v)
    for i, layer in enumerate(params["model"]["layers"]):
        q, k, v = qkv(layer, cfg, h, positions_BxK)  # the K samples play the role of T
        suffix_k[i] = jax.lax.dynamic_update_slice(suffix_k[i], as_bits(k).reshape(B * K, G, E, 1), (0, 0, 0, slot))
        suffix_v[i] = jax.lax.dynamic_update_slice(suffix_v[i], as_bits(v).reshape(B * K, G, 1, E), (0, 0, slot, 0))
        a = attend_parts(q, [  # the K samples play the role of T: the suffix part is per query
            ("gep,gpe", shared.k[i], shared.v[i], shared.valid_P0),
            ("bgep,bgpe", st.prefix_k[i], st.prefix_v[i], st.prefix_valid_BxP[:, None, None, None, :]),
            ("rgep,rgpe", from_bits(suffix_k[i], k.dtype), from_bits(suffix_v[i], v.dtype), svalid_S),
        ])
        h = attn_out_and_mlp(layer, cfg, h, a)
    logits = lm_head(params, cfg, rms_norm(h, params["model"]["norm"]["weight"], cfg.rms_norm_eps))
    return logits, st._replace(suffix_k=tuple(suffix_k), suffix_v=tuple(suffix_v))


def decode_step(params: Params, cfg: ModelConfig, st: DecodeState, shared: SharedPrefix, temperature, top_p, *,
                greedy, top_k, use_top_p):
    """One new token per sample: logits for the last token, then sample token t."""
    logits_BxKxV, st = decode_logits(params, cfg, st, shared)
    B, K, V = logits_BxKxV.shape
    keys = step_keys(st.keys_BxK, st.t)
    nxt = sample_tokens(logits_BxKxV.reshape(B * K, V), keys, temperature, top_p, greedy=greedy, top_k=top_k, use_top_p=use_top_p)
    return st._replace(token_BxK=nxt.reshape(B, K), t=st.t + 1)


@quick_jit(static_argnames=("cfg", "steps", "greedy", "top_k", "use_top_p"), donate_argnums=(1,))
def decode_chunk(params, st: DecodeState, shared: SharedPrefix, temperature, top_p, *, cfg, steps, greedy, top_k,
                 use_top_p):
    """`steps` decode steps in one compiled loop (the suffix must hold every slot they write); returns the new
    state and the tokens sampled [B, K, steps]."""
    TRACE_COUNTS["decode"] += 1

    def body(st, _):
        st = decode_step(params, cfg, st, shared, temperature, top_p, greedy=greedy, top_k=top_k, use_top_p=use_top_p)
        return st, st.token_BxK

    st, toks_SxBxK = jax.lax.scan(body, st, None, length=steps)
    return st, jnp.moveaxis(toks_SxBxK, 0, -1)


@quick_jit
def gather_rows(st: DecodeState, b_R: jax.Array, k_R: jax.Array) -> DecodeState:
    """The state of samples (b_R[r], k_R[r]) only, as R prompts of one sample each (every row carries its own copy
    of its prompt's keys/values; keys and positions are per row, so what each sample draws does not change)."""
    TRACE_COUNTS["gather_rows"] += 1
    rows = lambda xs: tuple(x[b_R] for x in xs)  # noqa: E731
    samples = lambda xs: tuple(x[b_R * st.token_BxK.shape[1] + k_R] for x in xs)  # noqa: E731
    return DecodeState(rows(st.prefix_k), rows(st.prefix_v), st.prefix_valid_BxP[b_R], samples(st.suffix_k),
                       samples(st.suffix_v), st.lens_B[b_R], st.token_BxK[b_R, k_R][:, None], st.t,
                       st.keys_BxK[b_R, k_R][:, None])


def _finish(tokenizer, ids: list[int], eos: set[int], stops: Sequence[str], checked: int):
    """(token_ids, text, done) for one sample; `checked` tokens were already known not to contain a stop."""
    cut = next((i for i, t in enumerate(ids) if t in eos), None)
    body = ids if cut is None else ids[:cut]
    text = tokenizer.decode(body)
    hits = [(text.find(s), s) for s in stops if s in text]
    if hits:
        pos, s = min(hits)
        end = pos + len(s)
        n = next(n for n in range(max(checked, 1), len(body) + 1) if len(tokenizer.decode(body[:n])) >= end)
        return body[:n], text[:end], True
    if cut is not None:
        return ids[: cut + 1], text, True
    return ids, text, False


def generate(
    params: Params,
    cfg: ModelConfig,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    settings: SamplingConfig,
    key: jax.Array | Sequence[jax.Array],
    *,
    shared_prefix: Sequence[int] = (),
) -> list[list[Completion]]:
    """K completions per prompt. `params` should come from `prepare_params` (cast and split once per model).

    key: one key (prompt i then uses fold_in(key, i)) or one key per prompt. shared_prefix: tokens that every
    prompt starts with and continues after; their keys/values are cached (`shared_prefix_kv`).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt must have at least one token")
    shared_prefix = tuple(shared_prefix)
    n0 = len(shared_prefix)
    if n0:
        bad = next((i for i, p in enumerate(prompts) if len(p) <= n0 or tuple(p[:n0]) != shared_prefix), None)
        if bad is not None:
            raise ValueError(f"generate: prompt {bad} does not continue the {n0}-token shared_prefix")
    n, K = len(prompts), settings.num_samples
    keys_n = prompt_keys(key, n)
    rests = [p[n0:] for p in prompts]
    B = batch_bucket(n)
    shared = shared_prefix_kv(params, cfg, shared_prefix)
    steps_total = settings.max_new_tokens - 1
    chunk = min(settings.chunk, bucket(steps_total))  # bucketed: short generations do not each compile
    flags = dict(greedy=settings.temperature == 0, top_k=settings.top_k, use_top_p=settings.top_p < 1.0)
    temp, top_p = jnp.float32(max(settings.temperature, 1e-6)), jnp.float32(settings.top_p)
    keys_B = keys_n[np.minimum(np.arange(B), n - 1)]  # padding rows reuse a key; their samples are dropped
    suffix_len = bucket(-(-max(steps_total, 1) // chunk) * chunk)
    st = prefill(
        params, jax.tree.map(jnp.asarray, pack_prompts(rests, B)), keys_B, shared, temp, top_p,
        cfg=cfg, num_samples=K, suffix_len=suffix_window(1 + chunk, suffix_len), **flags,
    )
    generated = np.zeros((n, K, settings.max_new_tokens), np.int32)
    generated[:, :, 0] = np.asarray(st.token_BxK)[:n]
    filled = 1
    # state row r (of the flattened [B, K]) -> (prompt, sample); -1 for padding rows
    row_Rx2 = np.stack(np.divmod(np.arange(B * K), K), axis=1)
    row_Rx2[row_Rx2[:, 0] >= n] = -1
    eos = set(cfg.eos_ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    eos = set() if settings.ignore_eos else eos
    results: list[list[Completion | None]] = [[None] * K for _ in range(n)]
    checked = 0
    while True:
        for i in range(n):
            for k in range(K):
                if results[i][k] is None:
                    ids, text, done = _finish(tokenizer, generated[i, k, :filled].tolist(), eos, settings.stop, checked)
                    if done or filled >= settings.max_new_tokens:
                        results[i][k] = Completion(text, ids, "stop" if done else "length")
        checked = filled
        live = np.flatnonzero([i >= 0 and results[i][k] is None for i, k in row_Rx2])
        if not len(live):
            return results  # type: ignore[return-value]
        rows = bucket(len(live))
        if len(row_Rx2) >= GATHER_MIN_ROWS and 2 * rows <= len(row_Rx2):
            pick = np.concatenate([live, np.full(rows - len(live), live[0])])  # padding repeats a live row
            K_now = st.token_BxK.shape[1]
            st = gather_rows(st, jnp.asarray(pick // K_now), jnp.asarray(pick % K_now))
            row_Rx2 = np.concatenate([row_Rx2[live], np.full((rows - len(live), 2), -1)])
        window = suffix_window(filled + chunk, suffix_len)
        if window > st.suffix_k[0].shape[-1]:
            st = grow_suffix(st, slots=window)
        st, toks = decode_chunk(params, st, shared, temp, top_p, cfg=cfg, steps=chunk, **flags)
        take = min(chunk, settings.max_new_tokens - filled)
        real = row_Rx2[:, 0] >= 0
        toks_RxC = np.asarray(toks).reshape(len(row_Rx2), chunk)
        generated[row_Rx2[real, 0], row_Rx2[real, 1], filled : filled + take] = toks_RxC[real, :take]
        filled += take
