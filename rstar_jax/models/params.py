"""The parameter pytree: HF names, stacked layers, logical sharding axes, random init.

Layout (nested dicts whose paths are the HF key with the layer index lifted out):

  model.embed_tokens.weight              [V, D]
  model.layers.self_attn.q_proj.weight   [L, H*E, D]   (HF `model.layers.{i}.self_attn.q_proj.weight`)
  model.layers.self_attn.{q,k,v}_proj.bias  [L, *]      (only when attention_bias)
  model.layers.self_attn.o_proj.weight   [L, D, H*E]
  model.layers.mlp.{gate,up}_proj.weight [L, F, D];  model.layers.mlp.down_proj.weight [L, D, F]
  model.layers.{input,post_attention}_layernorm.weight [L, D]
  model.norm.weight                      [D]
  lm_head.weight                         [V, D]        (absent when embeddings are tied)
  score.weight [C, D], score.bias [C]                  (reward head: HF *ForTokenClassification)
  score.{0,2}.{weight,bias}                            (Qwen2ForProcessRewardModel's two-layer head, loaded only)

Matrices keep HF's [out, in] orientation, so import/export is a key table plus stacking.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rstar_jax.models.config import ModelConfig

Params = dict[str, Any]

# Per-leaf logical axes; the sharding rules table maps these names onto mesh axes.
_LAYER_AXES = {
    "self_attn.q_proj.weight": ("layers", "heads", "embed"),
    "self_attn.k_proj.weight": ("layers", "kv_heads", "embed"),
    "self_attn.v_proj.weight": ("layers", "kv_heads", "embed"),
    "self_attn.q_proj.bias": ("layers", "heads"),
    "self_attn.k_proj.bias": ("layers", "kv_heads"),
    "self_attn.v_proj.bias": ("layers", "kv_heads"),
    "self_attn.o_proj.weight": ("layers", "embed", "heads"),
    "mlp.gate_proj.weight": ("layers", "mlp", "embed"),
    "mlp.up_proj.weight": ("layers", "mlp", "embed"),
    "mlp.down_proj.weight": ("layers", "embed", "mlp"),
    "input_layernorm.weight": ("layers", "norm"),
    "post_attention_layernorm.weight": ("layers", "norm"),
}
_TOP_AXES = {
    "model.embed_tokens.weight": ("vocab", "embed"),
    "model.norm.weight": ("norm",),
    "lm_head.weight": ("vocab", "embed"),
    "score.weight": ("labels", "embed"),
    "score.bias": ("labels",),
}


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Per-layer leaf shapes (without the leading L axis), keyed by the HF sub-path."""
    D, F, E = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    HE, GE = cfg.num_attention_heads * E, cfg.num_key_value_heads * E
    shapes = {
        "self_attn.q_proj.weight": (HE, D),
        "self_attn.k_proj.weight": (GE, D),
        "self_attn.v_proj.weight": (GE, D),
        "self_attn.o_proj.weight": (D, HE),
        "mlp.gate_proj.weight": (F, D),
        "mlp.up_proj.weight": (F, D),
        "mlp.down_proj.weight": (D, F),
        "input_layernorm.weight": (D,),
        "post_attention_layernorm.weight": (D,),
    }
    if cfg.attention_bias:
        shapes.update({"self_attn.q_proj.bias": (HE,), "self_attn.k_proj.bias": (GE,), "self_attn.v_proj.bias": (GE,)})
    return shapes


def top_shapes(cfg: ModelConfig, num_labels: int | None = None, score_mlp: bool = False) -> dict[str, tuple[int, ...]]:
    """`score_mlp`: Qwen2ForProcessRewardModel's score head, Linear(D, D) -> ReLU -> Linear(D, C) (read-only here)."""
    D = cfg.hidden_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, D), "model.norm.weight": (D,)}
    if num_labels is not None and score_mlp:
        shapes.update({"score.0.weight": (D, D), "score.0.bias": (D,), "score.2.weight": (num_labels, D),
                       "score.2.bias": (num_labels,)})
    elif num_labels is not None:
        shapes.update({"score.weight": (num_labels, D), "score.bias": (num_labels,)})
    elif not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    return shapes


def set_path(tree: Params, dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def get_path(tree: Params, dotted: str) -> Any:
    node = tree
    for p in dotted.split("."):
        node = node[p]
    return node


def to_hf_state_dict(params: Params, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Flat `{hf_key: array}`; stacked layers are split into `model.layers.{i}.*`."""
    out: dict[str, np.ndarray] = {}
    for sub in layer_shapes(cfg):
        stacked = np.asarray(get_path(params, "model.layers." + sub))
        for i in range(cfg.num_hidden_layers):
            out[f"model.layers.{i}.{sub}"] = stacked[i]
    for key in _TOP_AXES:
        try:
            out[key] = np.asarray(get_path(params, key))
        except KeyError:
            pass
    return out


def from_hf_state_dict(
    tensors: dict[str, np.ndarray], cfg: ModelConfig, num_labels: int | None = None, source: str = "weights",
    score_mlp: bool = False,
) -> Params:
    """Inverse of `to_hf_state_dict`; a missing key or wrong shape names `source` and the key."""
    params: Params = {}

    def take(key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in tensors:
            raise ValueError(f"{source}: missing tensor {key!r} required by the config")
        arr = tensors[key]
        if tuple(arr.shape) != tuple(shape):
            raise ValueError(f"{source}: tensor {key!r} has shape {tuple(arr.shape)}, config needs {tuple(shape)}")
        return arr

    for sub, shape in layer_shapes(cfg).items():
        rows = [take(f"model.layers.{i}.{sub}", shape) for i in range(cfg.num_hidden_layers)]
        set_path(params, "model.layers." + sub, np.stack(rows))
    for key, shape in top_shapes(cfg, num_labels, score_mlp).items():
        set_path(params, key, take(key, shape))
    return params


def logical_axes(params: Params) -> Params:
    """Same tree as `params`, each leaf replaced by its tuple of logical axis names."""
    out: Params = {}
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        dotted = ".".join(str(k.key) for k in path)
        sub = dotted.removeprefix("model.layers.")
        axes = _LAYER_AXES[sub] if dotted.startswith("model.layers.") else _TOP_AXES[dotted]
        set_path(out, dotted, axes)
    return out


def init_params(
    cfg: ModelConfig, key: jax.Array, num_labels: int | None = None, dtype: Any = jnp.float32, std: float = 0.02
) -> Params:
    """Random init (normal(std) matrices, unit norms, zero biases); `num_labels` adds a reward head."""
    params: Params = {}
    shapes = {"model.layers." + k: (cfg.num_hidden_layers, *s) for k, s in layer_shapes(cfg).items()}
    shapes.update(top_shapes(cfg, num_labels))
    keys = jax.random.split(key, len(shapes))
    for k_, (name, shape) in zip(keys, sorted(shapes.items())):
        if name.endswith("norm.weight"):
            value = jnp.ones(shape, dtype)
        elif name.endswith(".bias"):
            value = jnp.zeros(shape, dtype)
        else:
            value = (std * jax.random.normal(k_, shape)).astype(dtype)
        set_path(params, name, value)
    return params
