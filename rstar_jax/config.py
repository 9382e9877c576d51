"""Typed, strict run configuration: frozen dataclasses loaded from YAML plus `a.b=value` overrides.

Sources are merged in order (later wins): dataclass defaults, YAML files (each may `include:` other
YAML files, resolved relative to itself), then dotted overrides. An unknown key, a value of the wrong
type or an unreadable file is a `RunConfigError` whose one-line message names the file (or override)
and the key. Derived values are properties, never stored fields.

Later issues add their own sections (search, evolve) as fields of `Config`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml


class RunConfigError(ValueError):
    """A run config file or override that cannot be used (message names the source and key)."""


@dataclasses.dataclass(frozen=True)
class ArchConfig:
    """Architecture numbers (HF config.json names) for `--model random` and for checking a loaded model."""

    model_type: str = "llama"
    vocab_size: int = 0  # 0: no architecture given
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 2048

    @property
    def given(self) -> bool:
        return self.vocab_size > 0


@dataclasses.dataclass(frozen=True)
class ModelSection:
    arch: ArchConfig = ArchConfig()  # `--model random` builds from it (with a byte tokenizer)
    compute_dtype: Literal["float32", "bfloat16"] = "float32"  # master weights stay float32
    remat: bool = False
    scan_layers: bool = False


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """Mesh axis sizes; one of them may be -1 to take the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    # Parameters with fewer elements than this stay replicated (norms, biases).
    min_shard_elements: int = 2**14

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)


@dataclasses.dataclass(frozen=True)
class OptimSection:
    learning_rate: float = 1e-5
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    end_lr_fraction: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0  # <= 0 disables clipping


@dataclasses.dataclass(frozen=True)
class DataSection:
    batch_size: int = 8  # global rows per optimizer step (all micro-batches together)
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 1024
    layout: Literal["pack", "bucket"] = "pack"  # PPM pairs are always bucketed
    num_buckets: int = 4  # bucket lengths: seq_len * (i+1) / num_buckets
    seed: int = 0
    eval_fraction: float = 0.05  # held-out share of records (0: no eval)
    max_eval_batches: int = 8

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum


@dataclasses.dataclass(frozen=True)
class TrainSection:
    epochs: float = 1.0
    max_steps: int = 0  # > 0 caps the number of optimizer steps
    min_steps: int = 0  # at least this many steps (a few records' epochs are a handful of steps)
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    save_every: int = 200
    keep_checkpoints: int = 3
    async_checkpoints: bool = True


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelSection = ModelSection()
    mesh: MeshSection = MeshSection()
    optim: OptimSection = OptimSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()


# ---------------------------------------------------------------------------------------------
# Generic loader (works for any frozen dataclass tree)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise RunConfigError(f"{path}: include cycle")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise RunConfigError(f"{path}: cannot read config file ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise RunConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise RunConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    merged: dict = {}
    includes = raw.pop("include", [])
    for inc in [includes] if isinstance(includes, str) else includes:
        merged = _merge(merged, _read_yaml(path.parent / inc, (*seen, path)))
    return _merge(merged, _tag(raw, str(path)))


class _Sourced:
    """A YAML/override value remembering where it came from, for error messages."""

    __slots__ = ("value", "source")

    def __init__(self, value: Any, source: str):
        self.value, self.source = value, source


def _tag(tree: Any, source: str) -> Any:
    if isinstance(tree, dict):
        return {k: _tag(v, source) for k, v in tree.items()}
    return _Sourced(tree, source)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            raise RunConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise RunConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], where) for v in value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise RunConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _build(cls: type, tree: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, node in tree.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            source = node.source if isinstance(node, _Sourced) else _first_source(node)
            raise RunConfigError(f"{source}: unknown config key {dotted!r}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(node, dict):
                raise RunConfigError(f"{node.source}: {dotted!r} is a section, got {node.value!r}")
            kwargs[key] = _build(tp, node, dotted + ".")
        else:
            if isinstance(node, dict):
                raise RunConfigError(f"{_first_source(node)}: {dotted!r} is a value, not a section")
            kwargs[key] = _coerce(node.value, tp, f"{node.source}: {dotted}")
    return cls(**kwargs)


def _first_source(tree: dict) -> str:
    for v in tree.values():
        return v.source if isinstance(v, _Sourced) else _first_source(v)
    return "config"


def parse_override(text: str) -> dict:
    """`a.b=value` -> nested dict; the value is parsed as YAML (so `1e-4`, `true`, `[2, 4]` work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise RunConfigError(f"override {text!r}: expected key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node: Any = _Sourced(value, f"override {text!r}")
    for part in reversed(key.split(".")):
        node = {part: node}
    return node


def load_config(sources: list[str] | tuple[str, ...] = (), cls: type = Config) -> Any:
    """Build `cls` from defaults, then each source in order: a `.yaml`/`.yml` path or a `key=value` override."""
    tree: dict = {}
    for src in sources:
        if "=" not in src and src.endswith((".yaml", ".yml")):
            tree = _merge(tree, _read_yaml(Path(src)))
        else:
            tree = _merge(tree, parse_override(src))
    return _build(cls, tree, "")


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (for saving next to checkpoints and metrics)."""
    return dataclasses.asdict(cfg)
