"""Llama / Qwen2 decoder as pure functions over the parameter pytree of `params.py`.

Parameters stay fp32 (master weights); each matmul casts its weight to `compute_dtype`. RMSNorm, softmax and
logits run in fp32. RoPE is HF's rotate-half convention, so HF checkpoints load without permutation.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rstar_jax.models.config import ModelConfig
from rstar_jax.models.params import Params

NEG_INF = -1e30


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dot_f32(x: jax.Array, w: jax.Array, spec: str) -> jax.Array:
    """einsum with an fp32 result, and a backward pass whose two dots also accumulate and return fp32 (then cast):
    XLA:CPU runs bf16 dots 2.5x faster that way (AVX512-BF16 kernels), and JAX's own transpose would ask for
    bf16 results."""
    return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)


def _dot_f32_fwd(x, w, spec):
    return dot_f32(x, w, spec), (x, w)


def _dot_f32_bwd(spec, res, dy):
    x, w = res
    inputs, c = spec.split("->")
    a, b = inputs.split(",")
    dy = dy.astype(x.dtype)
    dx = jnp.einsum(f"{c},{b}->{a}", dy, w, preferred_element_type=jnp.float32).astype(x.dtype)
    dw = jnp.einsum(f"{c},{a}->{b}", dy, x, preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, dw


dot_f32.defvjp(_dot_f32_fwd, _dot_f32_bwd)


def rows_dot(x: jax.Array, w: jax.Array, spec: str) -> jax.Array:
    """`dot_f32` over x's last axis (spec "ni,oi->no" for a weight [out, in], "ni,io->no" for [in, out]) with x's
    leading axes flattened into rows, weight cast to x's dtype. Flattened, XLA:CPU's backward pass gets the
    weight gradient from plain 2-D dots; with the batch and length axes kept apart it wrote their operands
    transposed through a slow loop fusion (SmolLM2 train step 7.4 -> 6.2 s, BUILD_NOTES)."""
    y = dot_f32(x.reshape(-1, x.shape[-1]), w.astype(x.dtype), spec)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def linear(x: jax.Array, proj: Params) -> jax.Array:
    """x @ W.T for a projection's HF `weight` [out, in] (+ `bias`), in x's dtype, accumulated in fp32. Decode-prepared
    parameters (`sampling.prepare_params`) carry `weight_t` [in, out] instead: XLA:CPU runs small-batch matmuls
    ~1.4x faster in that layout."""
    y = rows_dot(x, proj["weight_t"], "ni,io->no") if "weight_t" in proj else rows_dot(x, proj["weight"], "ni,oi->no")
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


def attend(q_BxTxHxE: jax.Array, k_BxSxGxE: jax.Array, v_BxSxGxE: jax.Array, allowed_BxTxS: jax.Array) -> jax.Array:
    """Grouped-query attention without materialising repeated K/V heads; returns [B, T, H*E]. Kept beside
    `attend_parts` for full sequences: its [B, G, Q, T, S] score layout made a CPU train step 1.2x faster."""
    B, T, H, E = q_BxTxHxE.shape
    G = k_BxSxGxE.shape[2]
    q_BxTxGxQxE = q_BxTxHxE.reshape(B, T, G, H // G, E)
    scores = jnp.einsum("btgqe,bsge->bgqts", q_BxTxGxQxE, k_BxSxGxE).astype(jnp.float32) / jnp.sqrt(E).astype(jnp.float32)
    scores = jnp.where(allowed_BxTxS[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxGxE.dtype)
    out = jnp.einsum("bgqts,bsge->btgqe", probs, v_BxSxGxE)
    return out.reshape(B, T, H * E)


# Score layout of each kind of key/value part, keyed by the row axes its keys carry ("": shared by every row, "b":
# per row, "bt": per query): the dots' batch axes first, then the query axes, so XLA's dot output is already in
# place. One common [B, T, G, Q, p] layout cost a transpose of every score and probability tensor (in a 12-prompt
# prefill after a 1k-token shared prefix, 113 MB per layer and most of the call's time).
PART_LAYOUTS = {"": "gbtq", "b": "bgtq", "bt": "btgq"}


def to_layout(x: jax.Array, src: str, dst: str) -> jax.Array:
    """Permute x's axes from `src` to `dst` (axis names); an x of fewer axes broadcasts as it is."""
    return jnp.transpose(x, [src.index(a) for a in dst]) if x.ndim == len(src) else x


def attend_parts(q_BxTxHxE: jax.Array, parts: Sequence[tuple[str, jax.Array, jax.Array, jax.Array]]) -> jax.Array:
    """Grouped-query attention over several key/value parts with one softmax across all of them; [B, T, H*E].

    A part is (layout, k, v, allowed): `layout` names k's and v's axes with p as the key axis ("pge": one set shared
    by every row, "bpge": per row, "btpge" or "rpge": per query, r being the flat query b*T + t), so a shared part
    is broadcast, never copied per row; as "K,V" it names them apart. A decode cache stores k as "..gep" and v as
    "..gpe", the operand layouts XLA:CPU's dots take, so no step copies it transposed. `allowed` is [p] or
    [B, T, G, Q, p] (size-1 axes broadcast). Parts without keys are skipped (shapes are static). Each part keeps its
    scores in its own layout (`PART_LAYOUTS`); only the per-query softmax statistics and outputs, which have no key
    axis, are moved to a common layout.
    """
    B, T, H, E = q_BxTxHxE.shape
    lays = [(k_lay, v_lay or k_lay) for k_lay, _, v_lay in (part[0].partition(",") for part in parts)]
    keep = [k.shape[lay.index("p")] > 0 for (lay, _), (_, k, _, _) in zip(lays, parts)]
    lays, parts = [x for x, o in zip(lays, keep) if o], [x for x, o in zip(parts, keep) if o]
    G = parts[0][1].shape[lays[0][0].index("g")]
    q_BxTxGxQxE = q_BxTxHxE.reshape(B, T, G, -1, E)
    scale = 1.0 / np.sqrt(E)
    common = "btgq"
    score_lays = [PART_LAYOUTS["".join(a for a in "bt" if a in k_lay.replace("r", "bt"))] for k_lay, _ in lays]

    def dot(x, x_lay, y, y_lay, out_lay):  # an einsum where a flat-query part's r axis stands for b, t
        if "r" not in y_lay:
            return jnp.einsum(f"{x_lay},{y_lay}->{out_lay}", x, y)
        flat = lambda lay: lay.replace("bt", "r")  # noqa: E731
        out = jnp.einsum(f"{flat(x_lay)},{y_lay}->{flat(out_lay)}", x.reshape(B * T, *x.shape[2:]), y)
        return out.reshape(B, T, *out.shape[1:])

    scores = []
    for (_, k, _, allowed), (k_lay, _), lay in zip(parts, lays, score_lays):
        s = dot(q_BxTxGxQxE, "btgqe", k, k_lay, lay + "p").astype(jnp.float32) * scale
        scores.append(jnp.where(to_layout(allowed, common + "p", lay + "p"), s, NEG_INF))
    m = functools.reduce(jnp.maximum, [to_layout(s.max(-1), lay, common) for s, lay in zip(scores, score_lays)])
    denom, out = 0.0, 0.0
    for (_, _, v, _), (_, v_lay), s, lay in zip(parts, lays, scores, score_lays):
        e = jnp.exp(s - to_layout(m, common, lay)[..., None])
        denom = denom + to_layout(e.sum(-1), lay, common)
        o = dot(e.astype(v.dtype), lay + "p", v, v_lay, lay + "e")
        out = out + to_layout(o, lay + "e", common + "e").astype(jnp.float32)
    return (out / denom[..., None]).astype(q_BxTxHxE.dtype).reshape(B, T, H * E)


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
    return_kv: bool = False,
    constrain: Callable[[jax.Array, tuple[str, ...]], jax.Array] | None = None,
    shared_kv: tuple[Sequence[jax.Array], Sequence[jax.Array], jax.Array] | None = None,
):
    """Final-norm hidden states [B, T, D]; with `return_kv`, also k, v stacked as [L, B, T, G, E].

    `constrain(x, logical_axes)` lets the training code pin activation shardings without the model knowing the mesh.
    `shared_kv` = (k: L x [G, E, P], v: L x [G, P, E], valid [P]): per-layer keys/values of a prefix that every row
    continues, in the decode cache's layouts (`sampling.SharedPrefix`; positions must start after it); every token
    attends to its valid slots, broadcast over the batch.
    """
    pin = constrain or (lambda x, axes: x)
    allowed_BxTxT = segment_mask(positions_BxT, segment_ids_BxT)
    h = pin(embed(params, input_ids_BxT, compute_dtype), ("batch", "length", "embed"))

    def block(h, xs):
        layer, shared = xs
        q, k, v = qkv(layer, cfg, h, positions_BxT)
        if shared is None:
            a = attend(q, k, v, allowed_BxTxT)
        else:
            a = attend_parts(q, [("gep,gpe", *shared, shared_kv[2]), ("bpge", k, v, allowed_BxTxT[:, :, None, None])])
        h = attn_out_and_mlp(layer, cfg, h, a)
        return pin(h, ("batch", "length", "embed")), ((k, v) if return_kv else None)

    if remat:
        block = jax.checkpoint(block, policy=jax.checkpoint_policies.nothing_saveable)
    layers = params["model"]["layers"]  # stacked dict, or a per-layer list (see sampling.prepare_params)
    if scan_layers:
        stacked = None if shared_kv is None else tuple(jnp.stack(x) for x in shared_kv[:2])
        h, kv = jax.lax.scan(block, h, (layers, stacked))
    else:
        per_layer = layers if isinstance(layers, list) else unstack_layers(layers)
        per_shared = [None] * len(per_layer) if shared_kv is None else list(zip(*shared_kv[:2]))
        outs = []
        for layer, shared in zip(per_layer, per_shared):
            h, kv_i = block(h, (layer, shared))
            outs.append(kv_i)
        kv = jax.tree.map(lambda *xs: jnp.stack(xs), *outs) if return_kv else None
    h = rms_norm(h, params["model"]["norm"]["weight"], cfg.rms_norm_eps)
    return (h, kv) if return_kv else h


def lm_head(params: Params, cfg: ModelConfig, hidden: jax.Array) -> jax.Array:
    """fp32 logits; tied models reuse the embedding matrix."""
    w = params["model"]["embed_tokens"]["weight"] if cfg.tie_word_embeddings else params["lm_head"]["weight"]
    return rows_dot(hidden, w, "nd,vd->nv")


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
