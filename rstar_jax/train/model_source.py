"""The model a run starts from: a pretrained HF/alias spec via hf_io, or `random` (from `model.arch`, byte tokenizer)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from rstar_jax.config import ArchConfig, Config, RunConfigError
from rstar_jax.models.config import ModelConfig
from rstar_jax.models.hf_io import load_model
from rstar_jax.models.params import Params, init_params
from rstar_jax.models.tokenizer import Tokenizer
from rstar_jax.train.losses import NUM_LABELS

EOS = "<|endoftext|>"


def byte_tokenizer() -> Tokenizer:
    """256 byte tokens + an EOS: any text encodes, nothing to download (for random-init runs and tests)."""
    # alphabet() comes back in hash order; sorting fixes the ids across processes
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([tokenizers.AddedToken(EOS, special=True, normalized=False)])
    return Tokenizer(backend, eos_token=EOS, pad_token=EOS, source="byte tokenizer")


def arch_model_config(arch: ArchConfig, eos_id: int | None = None) -> ModelConfig:
    d = dataclasses.asdict(arch)
    d["head_dim"] = arch.head_dim or arch.hidden_size // arch.num_attention_heads
    d["eos_token_id"] = d["pad_token_id"] = eos_id
    return ModelConfig(attention_bias=arch.model_type == "qwen2", **d)


def load_for_training(spec: str, kind: str, cfg: Config) -> tuple[ModelConfig, Params | Callable[[], Params], Tokenizer]:
    """(model config, host params or a jittable random-init builder, tokenizer)."""
    arch, num_labels = cfg.model.arch, NUM_LABELS[kind]
    if spec == "random":
        if not arch.given:
            raise RunConfigError("--model random needs model.arch.* (at least model.arch.vocab_size)")
        tok = byte_tokenizer()
        if arch.vocab_size < tok.vocab_size:
            raise RunConfigError(f"model.arch.vocab_size={arch.vocab_size} is below the byte tokenizer's {tok.vocab_size}")
        mc = arch_model_config(arch, tok.eos_token_id)
        return mc, lambda: init_params(mc, jax.random.key(cfg.data.seed), num_labels=num_labels), tok
    loaded = load_model(spec, num_labels=num_labels)
    if loaded.num_labels != num_labels:
        raise RunConfigError(f"model {spec!r}: has {loaded.num_labels} reward labels, {kind} training needs {num_labels}")
    if arch.given:
        for f in dataclasses.fields(ArchConfig):
            want, got = getattr(arch, f.name), getattr(loaded.cfg, f.name)
            if f.name == "head_dim" and want == 0:
                continue
            if want != got:
                raise RunConfigError(f"model {spec!r}: {f.name}={got!r} but the config's model.arch says {want!r}")
    params: Any = jax.tree.map(np.asarray, loaded.params)
    return loaded.cfg, params, loaded.tokenizer
