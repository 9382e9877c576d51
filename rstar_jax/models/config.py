"""Decoder-LM architecture description, read from and written to HF `config.json`.

Shape legend used across the project (arrays are named `<name>_<dims>`):
  B batch (problems)   K samples / children per node   T sequence length   S cache length
  D hidden size        F MLP size    H query heads   G kv heads   E head dim   V vocab
  L layers             N tree nodes  C labels of a reward head
"""

from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")


class ConfigError(ValueError):
    """A model config that this project cannot run (message names the input)."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str  # "llama" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias (Qwen2 always has it)
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None  # a tuple, so the config stays hashable (a static jit arg)
    pad_token_id: int | None = None

    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def check_positions(self, needed: int, what: str) -> None:
        """One line naming `what` when it would take the model past its context (before any work starts)."""
        if needed > self.max_position_embeddings:
            raise ConfigError(f"{what}: needs {needed} positions, the model has {self.max_position_embeddings} "
                              "(max_position_embeddings)")

    def replace(self, **kw: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build from an HF config dict; unsupported features are a one-line error naming `source`."""
        mt = d.get("model_type")
        if mt not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"{source}: unsupported architecture model_type={mt!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        # transformers >= 5 nests RoPE settings under `rope_parameters`; older files use `rope_theta`/`rope_scaling`.
        rope = {**(d.get("rope_scaling") or {}), **(d.get("rope_parameters") or {})}
        if (rope.get("rope_type") or rope.get("type")) not in (None, "default"):
            raise ConfigError(f"{source}: RoPE scaling {rope!r} is not supported (only default RoPE)")
        if d.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act={d.get('hidden_act')!r} is not supported (only silu)")
        if d.get("mlp_bias"):
            raise ConfigError(f"{source}: mlp_bias=true is not supported")
        try:
            heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            cfg = cls(
                model_type=mt,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6 if mt == "qwen2" else 1e-5)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=True if mt == "qwen2" else bool(d.get("attention_bias", False)),
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=tuple(eos) if isinstance(eos := d.get("eos_token_id"), list) else eos,
                pad_token_id=d.get("pad_token_id"),
            )
        except KeyError as e:
            raise ConfigError(f"{source}: missing required key {e.args[0]!r}") from None
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ConfigError(
                f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={cfg.num_key_value_heads}"
            )
        return cfg

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that transformers loads with no custom code."""
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[self.model_type]
        d: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type == "llama":
            d["attention_bias"] = self.attention_bias
            d["mlp_bias"] = False
        return d
