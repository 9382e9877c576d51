"""Llama / Qwen2 decoder as pure functions over the parameter pytree of `params.py`.

Parameters stay fp32 (master weights); each matmul casts its weight to `compute_dtype`. RMSNorm, softmax and
logits run in fp32. RoPE is HF's rotate-half convention, so HF checkpoints load without permutation.

One layer function (`decoder_layer`) and one attention (`models.attention`) serve training, scoring, prefill and
decode; they differ only in the `attend` callback, which decides what a layer's queries read (the sequence itself,
or the engine's caches) and which caches it writes.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from rstar_jax.backends import cpu
from rstar_jax.models.attention import combine, row_part, split_heads
from rstar_jax.models.config import ModelConfig
from rstar_jax.models.params import Params


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


def linear(x: jax.Array, proj: Params) -> jax.Array:
    """x @ W.T for a projection's HF `weight` [out, in] (+ `bias`), in x's dtype, accumulated in fp32. On the CPU
    path the dot keeps fp32 results over flattened rows, and inference weights may come as `weight_t` [in, out]
    (`backends.cpu`)."""
    if cpu.tuned():
        y = cpu.rows_dot(x, proj["weight_t"], "ni,io->no") if "weight_t" in proj else cpu.rows_dot(x, proj["weight"], "ni,oi->no")
    else:
        y = jnp.einsum("...i,oi->...o", x, proj["weight"].astype(x.dtype), preferred_element_type=jnp.float32)
    y = y if proj.get("bias") is None else y + proj["bias"].astype(jnp.float32)
    return y.astype(x.dtype)


def rope(x_BxTxHxE: jax.Array, positions_BxT: jax.Array, theta: float) -> jax.Array:
    E = x_BxTxHxE.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, E, 2, dtype=jnp.float32) / E))
    angles_BxTxE2 = positions_BxT[..., None].astype(jnp.float32) * inv_freq
    cos = jnp.cos(angles_BxTxE2)[..., None, :]
    sin = jnp.sin(angles_BxTxE2)[..., None, :]
    x = x_BxTxHxE.astype(jnp.float32)
    x1, x2 = x[..., : E // 2], x[..., E // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxHxE.dtype)


def qkv(layer: Params, cfg: ModelConfig, h_BxTxD: jax.Array, positions_BxT: jax.Array):
    """Projected, rotated q [B,T,H,E] and k, v [B,T,G,E] for one layer's input (pre-norm applied here)."""
    attn = layer["self_attn"]
    x = rms_norm(h_BxTxD, layer["input_layernorm"]["weight"], cfg.rms_norm_eps)
    B, T, _ = x.shape
    q = linear(x, attn["q_proj"]).reshape(B, T, cfg.num_attention_heads, cfg.head_dim)
    k = linear(x, attn["k_proj"]).reshape(B, T, cfg.num_key_value_heads, cfg.head_dim)
    v = linear(x, attn["v_proj"]).reshape(B, T, cfg.num_key_value_heads, cfg.head_dim)
    return rope(q, positions_BxT, cfg.rope_theta), rope(k, positions_BxT, cfg.rope_theta), v


def attn_out_and_mlp(layer: Params, cfg: ModelConfig, h_BxTxD: jax.Array, attn_BxTxHE: jax.Array) -> jax.Array:
    """Residual add of the attention output, then the SwiGLU MLP block."""
    h = h_BxTxD + linear(attn_BxTxHE, layer["self_attn"]["o_proj"])
    mlp = layer["mlp"]
    x = rms_norm(h, layer["post_attention_layernorm"]["weight"], cfg.rms_norm_eps)
    gated = jax.nn.silu(linear(x, mlp["gate_proj"])) * linear(x, mlp["up_proj"])
    return h + linear(gated, mlp["down_proj"])


def unstack_layers(layers: Params) -> list[Params]:
    """A stacked layer tree [L, ...] as L per-layer trees. Split (not L slices): its gradient is one concatenate,
    where slices would add L zero-padded copies (~0.6 s per SmolLM2 train step on CPU)."""
    leaves, treedef = jax.tree.flatten(layers)
    n = leaves[0].shape[0]
    parts = [[x.reshape(x.shape[1:]) for x in jnp.split(a, n)] for a in leaves]
    return [jax.tree.unflatten(treedef, [p[i] for p in parts]) for i in range(n)]


def segment_mask(positions_BxT: jax.Array, segment_ids_BxT: jax.Array) -> jax.Array:
    """Causal within a segment; segment id 0 marks padding. Works for left/right padding and packing."""
    same = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
    causal = positions_BxT[:, :, None] >= positions_BxT[:, None, :]
    return same & causal & (segment_ids_BxT[:, None, :] != 0)


def embed(params: Params, input_ids_BxT: jax.Array, compute_dtype: Any) -> jax.Array:
    return params["model"]["embed_tokens"]["weight"][input_ids_BxT].astype(compute_dtype)


# attend(q [B,T,H,E], k [B,T,G,E], v [B,T,G,E], cache) -> (attention output [B, T, H*E], new cache): how a layer
# attends. Training and scoring attend within the sequence (`self_attention`); the engine's prefill and decode
# read and write their caches (`rstar_jax.engine.layers`). Only this differs between them.
Attend = Callable[[jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


def self_attention(allowed_BxTxT: jax.Array) -> Attend:
    """Attention of each token to the allowed tokens of its own sequence (no cache)."""

    def attend(q, k, v, cache):
        parts = [row_part(split_heads(q, k.shape[2]), k, v, allowed_BxTxT)]
        return combine(parts, q.dtype), cache

    return attend


def decoder_layer(layer: Params, cfg: ModelConfig, h_BxTxD: jax.Array, positions_BxT: jax.Array, attend: Attend,
                  cache: Any = None) -> tuple[jax.Array, Any]:
    """One pre-norm decoder layer: attention (as `attend` reads and writes its cache), then the SwiGLU MLP."""
    q, k, v = qkv(layer, cfg, h_BxTxD, positions_BxT)
    a, cache = attend(q, k, v, cache)
    return attn_out_and_mlp(layer, cfg, h_BxTxD, a), cache


def run_layers(
    params: Params,
    cfg: ModelConfig,
    h_BxTxD: jax.Array,
    positions_BxT: jax.Array,
    attend: Attend,
    caches: Sequence[Any] | None = None,
    *,
    scan_layers: bool = False,
    remat: bool = False,
    constrain: Callable[[jax.Array, tuple[str, ...]], jax.Array] | None = None,
) -> tuple[jax.Array, list[Any] | None]:
    """Every decoder layer, then the final norm: (hidden [B, T, D], the layers' new caches). `caches` is one
    entry per layer (a per-layer list: each cache array is read and written in place; not with `scan_layers`).
    Layers come stacked [L, ...] (training, scannable) or as a per-layer list (`engine.params`)."""
    pin = constrain or (lambda x, axes: x)
    h = pin(h_BxTxD, ("batch", "length", "embed"))

    def block(h, layer, cache):
        h, cache = decoder_layer(layer, cfg, h, positions_BxT, attend, cache)
        return pin(h, ("batch", "length", "embed")), cache

    if remat:
        block = jax.checkpoint(block, policy=jax.checkpoint_policies.nothing_saveable)
    layers = params["model"]["layers"]
    if scan_layers:
        if caches is not None:
            raise ValueError("run_layers: caches need per-layer iteration, not scan_layers")
        h, _ = jax.lax.scan(lambda h, layer: (block(h, layer, None)[0], None), h, layers)
        new_caches = None
    else:
        per_layer = layers if isinstance(layers, list) else unstack_layers(layers)
        new_caches = []
        for layer, cache in zip(per_layer, caches if caches is not None else [None] * len(per_layer)):
            h, cache = block(h, layer, cache)
            new_caches.append(cache)
    return rms_norm(h, params["model"]["norm"]["weight"], cfg.rms_norm_eps), new_caches


def forward(
    params: Params,
    cfg: ModelConfig,
    input_ids_BxT: jax.Array,
    positions_BxT: jax.Array,
    segment_ids_BxT: jax.Array,
    *,
    compute_dtype: Any = jnp.float32,
    scan_layers: bool = False,
    remat: bool = False,
    constrain: Callable[[jax.Array, tuple[str, ...]], jax.Array] | None = None,
) -> jax.Array:
    """Final-norm hidden states [B, T, D] of packed or padded sequences (no cache).

    `constrain(x, logical_axes)` lets the training code pin activation shardings without the model knowing the mesh.
    """
    attend = self_attention(segment_mask(positions_BxT, segment_ids_BxT))
    h, _ = run_layers(params, cfg, embed(params, input_ids_BxT, compute_dtype), positions_BxT, attend,
                      scan_layers=scan_layers, remat=remat, constrain=constrain)
    return h


def lm_head(params: Params, cfg: ModelConfig, hidden: jax.Array) -> jax.Array:
    """fp32 logits; tied models reuse the embedding matrix."""
    w = params["model"]["embed_tokens"]["weight"] if cfg.tie_word_embeddings else params["lm_head"]["weight"]
    if cpu.tuned():
        return cpu.rows_dot(hidden, w, "nd,vd->nv")
    return jnp.einsum("...d,vd->...v", hidden, w.astype(hidden.dtype), preferred_element_type=jnp.float32)


def positions_from_mask(attention_mask_BxT: jax.Array) -> jax.Array:
    return jnp.maximum(jnp.cumsum(attention_mask_BxT.astype(jnp.int32), axis=-1) - 1, 0)


def padded_forward(
    params: Params,
    cfg: ModelConfig,
    input_ids_BxT: jax.Array,
    attention_mask_BxT: jax.Array | None = None,
    compute_dtype: Any = jnp.float32,
    **forward_kw: Any,
) -> jax.Array:
    """Final hidden states [B, T, D] of a full forward (no cache) over a padded batch (no mask: all real)."""
    if attention_mask_BxT is None:
        attention_mask_BxT = jnp.ones_like(input_ids_BxT)
    mask = attention_mask_BxT.astype(jnp.int32)
    return forward(params, cfg, input_ids_BxT, positions_from_mask(mask), mask, compute_dtype=compute_dtype, **forward_kw)


def causal_lm_logits(
    params: Params,
    cfg: ModelConfig,
    input_ids_BxT: jax.Array,
    attention_mask_BxT: jax.Array | None = None,
    compute_dtype: Any = jnp.float32,
) -> jax.Array:
    """Full forward (no cache) over a padded batch; logits [B, T, V] in fp32."""
    return lm_head(params, cfg, padded_forward(params, cfg, input_ids_BxT, attention_mask_BxT, compute_dtype))
