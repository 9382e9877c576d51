"""Batched generation: prefill each prompt once, decode K samples per prompt from the shared prefix cache.

The cache has two parts. The prefix part [L, B, P, G, E] holds each prompt's keys/values once (left-padded, so every
row's prompt ends at slot P-1); the suffix part [L, B, K, S, G, E] holds each sample's own tokens. A decode step
attends over both, so K samples never copy or recompute their shared prompt. Decoding runs in jitted chunks of
`chunk` tokens; between chunks the host checks stop strings (which need detokenised text) and quits once every
sample has finished. Batch, prompt and new-token sizes are bucketed so similar calls reuse compiled code.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rstar_jax.models.config import ModelConfig
from rstar_jax.models.llama import NEG_INF, attn_out_and_mlp, forward, lm_head, qkv, rms_norm
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


class DecodeState(NamedTuple):
    prefix_k: jax.Array  # [L, B, P, G, E]
    prefix_v: jax.Array  # [L, B, P, G, E]
    prefix_valid_BxP: jax.Array  # bool
    suffix_k: jax.Array  # [L, B, K, S, G, E]
    suffix_v: jax.Array  # [L, B, K, S, G, E]
    lens_B: jax.Array  # prompt lengths
    token_BxK: jax.Array  # last sampled token, not yet fed to the model
    t: jax.Array  # new tokens sampled so far (scalar)
    keys_BxK: jax.Array  # per-sample key: fold_in(key, prompt_index * K + k)


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
        n = jax.tree.leaves(layers)[0].shape[0]
        layers = [jax.tree.map(lambda a: a[i], layers) for i in range(n)]
    cast["model"]["layers"] = [transpose(layer) for layer in layers]
    return cast


def bucket(n: int, minimum: int = 1) -> int:
    """Next power of two (>= minimum) up to 256, then the next multiple of 256."""
    n = max(n, minimum)
    return 1 << (n - 1).bit_length() if n <= 256 else -(-n // 256) * 256


def sample_tokens(logits_NxV, keys_N, temperature, top_p, *, greedy: bool, top_k: int, use_top_p: bool):
    """temperature -> top-k -> top-p -> categorical (the order transformers applies them), one key per row."""
    if greedy:
        return jnp.argmax(logits_NxV, axis=-1).astype(jnp.int32)
    logits = logits_NxV / temperature
    if top_k or use_top_p:
        # Sorted candidates: the top-k when set (cheap), else the whole vocabulary (needed for exact top-p).
        sorted_NxC = jax.lax.top_k(logits, top_k or logits.shape[-1])[0]
        if use_top_p:
            probs = jax.nn.softmax(sorted_NxC, axis=-1)
            keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # always keeps the first candidate
            threshold = jnp.take_along_axis(sorted_NxC, jnp.sum(keep, -1, keepdims=True) - 1, axis=-1)
        else:
            threshold = sorted_NxC[..., -1:]
        logits = jnp.where(logits < threshold, NEG_INF, logits)
    return jax.vmap(jax.random.categorical)(keys_N, logits).astype(jnp.int32)


def step_keys(keys_BxK: jax.Array, t: jax.Array) -> jax.Array:
    """Key of every sample at new-token index t: a sample's stream depends only on (base key, sample id, t)."""
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_BxK.reshape(-1), t)


@functools.partial(jax.jit, static_argnames=("cfg", "num_samples", "suffix_len", "greedy", "top_k", "use_top_p"))
def prefill(params, tokens_BxP, lens_B, key, temperature, top_p, *, cfg, num_samples, suffix_len, greedy, top_k, use_top_p):
    """Run the left-padded prompts once, sample each prompt's K first tokens, and allocate the decode state."""
    TRACE_COUNTS["prefill"] += 1
    B, P = tokens_BxP.shape
    pad_B = P - lens_B
    positions_BxP = jnp.maximum(jnp.arange(P)[None, :] - pad_B[:, None], 0)
    valid_BxP = jnp.arange(P)[None, :] >= pad_B[:, None]
    hidden, (k, v) = forward(params, cfg, tokens_BxP, positions_BxP, valid_BxP.astype(jnp.int32), return_kv=True)
    logits_BxV = lm_head(params, cfg, hidden[:, -1])
    keys_BxK = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(B * num_samples)).reshape(B, num_samples)
    logits_BKxV = jnp.repeat(logits_BxV, num_samples, axis=0)
    first = sample_tokens(logits_BKxV, step_keys(keys_BxK, 0), temperature, top_p, greedy=greedy, top_k=top_k, use_top_p=use_top_p)
    L, G, E = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    suffix = jnp.zeros((L, B, num_samples, suffix_len, G, E), k.dtype)
    return DecodeState(k, v, valid_BxP, suffix, suffix, lens_B, first.reshape(B, num_samples), jnp.int32(1), keys_BxK)


def attend_prefix_and_suffix(q_BxKxHxE, pk_BxPxGxE, pv_BxPxGxE, pvalid_BxP, sk_BxKxSxGxE, sv_BxKxSxGxE, svalid_S):
    """One query token per sample over its shared prompt (P) and its own generated tokens (S); returns [B, K, H*E]."""
    B, K, H, E = q_BxKxHxE.shape
    G = pk_BxPxGxE.shape[2]
    q = q_BxKxHxE.reshape(B, K, G, H // G, E)
    scale = 1.0 / np.sqrt(E)
    sp = jnp.einsum("bkgqe,bpge->bkgqp", q, pk_BxPxGxE).astype(jnp.float32) * scale
    ss = jnp.einsum("bkgqe,bksge->bkgqs", q, sk_BxKxSxGxE).astype(jnp.float32) * scale
    sp = jnp.where(pvalid_BxP[:, None, None, None, :], sp, NEG_INF)
    ss = jnp.where(svalid_S, ss, NEG_INF)
    m = jnp.maximum(sp.max(-1, keepdims=True), ss.max(-1, keepdims=True))
    ep, es = jnp.exp(sp - m), jnp.exp(ss - m)
    denom = ep.sum(-1, keepdims=True) + es.sum(-1, keepdims=True)
    dtype = pv_BxPxGxE.dtype
    out = jnp.einsum("bkgqp,bpge->bkgqe", (ep / denom).astype(dtype), pv_BxPxGxE)
    out = out + jnp.einsum("bkgqs,bksge->bkgqe", (es / denom).astype(dtype), sv_BxKxSxGxE)
    return out.reshape(B, K, H * E)


def decode_logits(params: Params, cfg: ModelConfig, st: DecodeState):
    """Feed each sample's last token and write its K/V at suffix slot t-1; returns (logits [B, K, V], state)."""
    B, K = st.token_BxK.shape
    S = st.suffix_k.shape[3]
    slot = st.t - 1
    positions_BxK = jnp.broadcast_to(st.lens_B[:, None] + slot, (B, K))
    svalid_S = jnp.arange(S) <= slot
    h = params["model"]["embed_tokens"]["weight"][st.token_BxK]
    suffix_k, suffix_v = st.suffix_k, st.suffix_v
    for i, layer in enumerate(params["model"]["layers"]):
        q, k, v = qkv(layer, cfg, h, positions_BxK)  # the K samples play the role of T
        suffix_k = jax.lax.dynamic_update_slice(suffix_k, k[None, :, :, None], (i, 0, 0, slot, 0, 0))
        suffix_v = jax.lax.dynamic_update_slice(suffix_v, v[None, :, :, None], (i, 0, 0, slot, 0, 0))
        a = attend_prefix_and_suffix(
            q, st.prefix_k[i], st.prefix_v[i], st.prefix_valid_BxP, suffix_k[i], suffix_v[i], svalid_S
        )
        h = attn_out_and_mlp(layer, cfg, h, a)
    logits = lm_head(params, cfg, rms_norm(h, params["model"]["norm"]["weight"], cfg.rms_norm_eps))
    return logits, st._replace(suffix_k=suffix_k, suffix_v=suffix_v)


def decode_step(params: Params, cfg: ModelConfig, st: DecodeState, temperature, top_p, *, greedy, top_k, use_top_p):
    """One new token per sample: logits for the last token, then sample token t."""
    logits_BxKxV, st = decode_logits(params, cfg, st)
    B, K, V = logits_BxKxV.shape
    keys = step_keys(st.keys_BxK, st.t)
    nxt = sample_tokens(logits_BxKxV.reshape(B * K, V), keys, temperature, top_p, greedy=greedy, top_k=top_k, use_top_p=use_top_p)
    return st._replace(token_BxK=nxt.reshape(B, K), t=st.t + 1)


@functools.partial(jax.jit, static_argnames=("cfg", "steps", "greedy", "top_k", "use_top_p"), donate_argnums=(1,))
def decode_chunk(params, st: DecodeState, temperature, top_p, *, cfg, steps, greedy, top_k, use_top_p):
    """`steps` decode steps in one compiled loop; returns the new state and the tokens sampled [B, K, steps]."""
    TRACE_COUNTS["decode"] += 1

    def body(st, _):
        st = decode_step(params, cfg, st, temperature, top_p, greedy=greedy, top_k=top_k, use_top_p=use_top_p)
        return st, st.token_BxK

    st, toks_SxBxK = jax.lax.scan(body, st, None, length=steps)
    return st, jnp.moveaxis(toks_SxBxK, 0, -1)


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
    key: jax.Array,
) -> list[list[Completion]]:
    """K completions per prompt. `params` should come from `prepare_params` (cast and split once per model)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt must have at least one token")
    n, K = len(prompts), settings.num_samples
    B, P = bucket(n), bucket(max(len(p) for p in prompts), 16)
    tokens_BxP = np.zeros((B, P), np.int32)
    lens_B = np.ones((B,), np.int32)  # padding rows: a one-token dummy prompt, results ignored
    for i, p in enumerate(prompts):
        tokens_BxP[i, P - len(p) :] = p
        lens_B[i] = len(p)
    steps_total = settings.max_new_tokens - 1
    chunk = min(settings.chunk, bucket(steps_total))  # bucketed: short generations do not each compile
    flags = dict(greedy=settings.temperature == 0, top_k=settings.top_k, use_top_p=settings.top_p < 1.0)
    temp, top_p = jnp.float32(max(settings.temperature, 1e-6)), jnp.float32(settings.top_p)
    st = prefill(
        params, jnp.asarray(tokens_BxP), jnp.asarray(lens_B), key, temp, top_p,
        cfg=cfg, num_samples=K, suffix_len=bucket(-(-max(steps_total, 1) // chunk) * chunk), **flags,
    )
    generated = np.asarray(st.token_BxK)[:n, :, None]
    eos = set(cfg.eos_ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    eos = set() if settings.ignore_eos else eos
    results: list[list[Completion | None]] = [[None] * K for _ in range(n)]
    checked = 0
    while True:
        for i in range(n):
            for k in range(K):
                if results[i][k] is None:
                    ids, text, done = _finish(tokenizer, generated[i, k].tolist(), eos, settings.stop, checked)
                    if done or generated.shape[-1] >= settings.max_new_tokens:
                        results[i][k] = Completion(text, ids, "stop" if done else "length")
        checked = generated.shape[-1]
        if all(c is not None for row in results for c in row):
            return results  # type: ignore[return-value]
        st, toks = decode_chunk(params, st, temp, top_p, cfg=cfg, steps=chunk, **flags)
        room = settings.max_new_tokens - generated.shape[-1]
        generated = np.concatenate([generated, np.asarray(toks)[:n, :, :room]], axis=-1)
