"""GGUF (llama.cpp) -> config, parameter tree and tokenizer, written out as an HF folder.

Tensors are dequantized to fp32 with the `gguf` package. llama.cpp's converter permutes the rows of every
llama q/k projection so that each head's rotary pairs are adjacent (interleaved RoPE); HF and this project
rotate the two halves of a head instead, so those rows are permuted back. Qwen2 GGUFs are not permuted.
The tokenizer is rebuilt from the metadata (byte-level BPE: tokens, merges, token types, special ids, chat
template).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import tokenizers
from tokenizers import decoders, pre_tokenizers, processors
from tqdm import tqdm

from rstar_jax.models.config import ConfigError, ModelConfig
from rstar_jax.models.hf_io import save_causal_lm
from rstar_jax.models.params import Params, from_hf_state_dict
from rstar_jax.models.registry import ModelLoadError
from rstar_jax.models.tokenizer import Tokenizer

_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# tokenizer.ggml.pre -> pre-tokenizer: GPT-2's byte-level regex, optionally splitting digits one by one first.
_PRE_TOKENIZERS = {
    "default": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    "smollm": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    ),
}
_REQUIRED = object()


def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Convert a GGUF file into an HF folder (fp32 safetensors, tokenizer files, chat template)."""
    cfg, params, tokenizer = read_gguf(gguf_path)
    return save_causal_lm(out_dir, cfg, params, tokenizer)


def read_gguf(gguf_path: str | Path) -> tuple[ModelConfig, Params, Tokenizer]:
    path = Path(gguf_path)
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError) as e:  # what the reader raises on a short or foreign file
        raise ModelLoadError(f"{path}: not a readable GGUF file ({e})") from None
    meta = _Metadata(reader, path)
    cfg = _config(meta, reader, path)
    tensors = {t.name: t for t in reader.tensors}
    if any(name.startswith("rope_freqs") for name in tensors):
        raise ModelLoadError(f"{path}: RoPE frequency scaling (rope_freqs) is not supported")
    state: dict[str, np.ndarray] = {}
    for name, tensor in tqdm(tensors.items(), desc=f"convert {path.name}", unit="tensor", file=sys.stderr):
        hf_name = _hf_name(name, path)
        weights = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
        if cfg.model_type == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            weights = _unpermute_rope_rows(weights, cfg.num_attention_heads)
        elif cfg.model_type == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            weights = _unpermute_rope_rows(weights, cfg.num_key_value_heads)
        state[hf_name] = weights
    try:
        params = from_hf_state_dict(state, cfg, source=f"{path}: tensors do not match the metadata")
    except ValueError as e:
        raise ModelLoadError(str(e)) from None
    return cfg, params, _tokenizer(meta, path)


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows per head go from interleaved pairs (0,1),(2,3).. back to halves [0, 2, 4.. | 1, 3, 5..]."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(name: str, path: Path) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise ModelLoadError(f"{path}: unsupported tensor {name!r}")


class _Metadata:
    def __init__(self, reader: gguf.GGUFReader, path: Path):
        self.fields, self.path = reader.fields, path

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        field = self.fields.get(key)
        if field is None:
            if default is _REQUIRED:
                raise ModelLoadError(f"{self.path}: missing metadata key {key!r}")
            return default
        value = field.contents()
        if isinstance(value, float) and field.types == [gguf.GGUFValueType.FLOAT32]:
            return float(str(np.float32(value)))  # float32 metadata: its shortest decimal (1e-05, not 9.99999975e-06)
        return value


def _config(meta: _Metadata, reader: gguf.GGUFReader, path: Path) -> ModelConfig:
    arch = meta.get(gguf.Keys.General.ARCHITECTURE)
    key = lambda template: template.format(arch=arch)  # noqa: E731
    if meta.get(key(gguf.Keys.Rope.SCALING_TYPE), "none") != "none" or meta.get(
        key(gguf.Keys.Rope.SCALING_FACTOR), 1.0
    ) != 1.0:
        raise ModelLoadError(f"{path}: RoPE scaling is not supported")
    heads = meta.get(key(gguf.Keys.Attention.HEAD_COUNT))
    names = {t.name for t in reader.tensors}
    hf = {
        "model_type": arch,
        "vocab_size": meta.get(key(gguf.Keys.LLM.VOCAB_SIZE), None)
        or len(meta.get(gguf.Keys.Tokenizer.LIST)),
        "hidden_size": meta.get(key(gguf.Keys.LLM.EMBEDDING_LENGTH)),
        "intermediate_size": meta.get(key(gguf.Keys.LLM.FEED_FORWARD_LENGTH)),
        "num_hidden_layers": meta.get(key(gguf.Keys.LLM.BLOCK_COUNT)),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get(key(gguf.Keys.Attention.HEAD_COUNT_KV), heads),
        "head_dim": meta.get(key(gguf.Keys.Attention.KEY_LENGTH), None)
        or meta.get(key(gguf.Keys.Rope.DIMENSION_COUNT), None),
        "rope_theta": meta.get(key(gguf.Keys.Rope.FREQ_BASE), 10000.0),
        "rms_norm_eps": meta.get(key(gguf.Keys.Attention.LAYERNORM_RMS_EPS)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "max_position_embeddings": meta.get(key(gguf.Keys.LLM.CONTEXT_LENGTH), 2048),
        "bos_token_id": meta.get(gguf.Keys.Tokenizer.BOS_ID, None),
        "eos_token_id": meta.get(gguf.Keys.Tokenizer.EOS_ID, None),
        "pad_token_id": meta.get(gguf.Keys.Tokenizer.PAD_ID, None),
    }
    try:
        return ModelConfig.from_hf_dict(hf, source=str(path))
    except ConfigError as e:
        raise ModelLoadError(str(e)) from None


def _tokenizer(meta: _Metadata, path: Path) -> Tokenizer:
    model = meta.get(gguf.Keys.Tokenizer.MODEL)
    if model != "gpt2":
        raise ModelLoadError(f"{path}: tokenizer model {model!r} is not supported (only byte-level BPE 'gpt2')")
    pre = meta.get(gguf.Keys.Tokenizer.PRE, "default")
    if pre not in _PRE_TOKENIZERS:
        raise ModelLoadError(f"{path}: tokenizer pre-tokenizer {pre!r} is not supported ({', '.join(_PRE_TOKENIZERS)})")
    tokens = meta.get(gguf.Keys.Tokenizer.LIST)
    types = meta.get(gguf.Keys.Tokenizer.TOKEN_TYPE, [gguf.TokenType.NORMAL] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.get(gguf.Keys.Tokenizer.MERGES)]
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    backend.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()

    def name_of(id_key: str) -> str | None:
        token_id = meta.get(id_key, None)
        return None if token_id is None else tokens[token_id]

    bos = name_of(gguf.Keys.Tokenizer.BOS_ID)
    if meta.get(gguf.Keys.Tokenizer.ADD_BOS, False) and bos is not None:
        bos_id = meta.get(gguf.Keys.Tokenizer.BOS_ID)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    # Control tokens are special (never split, skippable on decode); user-defined ones are plain added tokens.
    backend.add_special_tokens(
        [tokenizers.AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types)
         if k == gguf.TokenType.CONTROL]
    )
    backend.add_tokens(
        [tokenizers.AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == gguf.TokenType.USER_DEFINED]
    )
    return Tokenizer(
        backend,
        bos_token=bos,
        eos_token=name_of(gguf.Keys.Tokenizer.EOS_ID),
        pad_token=name_of(gguf.Keys.Tokenizer.PAD_ID),
        unk_token=name_of(gguf.Keys.Tokenizer.UNK_ID),
        chat_template=meta.get(gguf.Keys.Tokenizer.CHAT_TEMPLATE, None),
        source=str(path),
    )
