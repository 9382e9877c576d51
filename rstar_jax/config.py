"""Typed, strict run configuration: frozen dataclasses loaded from YAML plus `a.b=value` overrides.

Sources are merged in order (later wins): dataclass defaults, YAML files (each may `include:` other
YAML files, resolved relative to itself), dotted overrides, then values given by command-line flags. An
unknown key, a missing required key (a field without a default), a value of the wrong type, a non-finite
number or an unreadable file is a `RunConfigError` whose one-line message names the file (or override, or
flag) and the key; a value out of its range is one from the section's `__post_init__`, prefixed with the
section. Derived values are properties, never stored fields.

`Config` is the training config; every other command's config lives next to the code that uses it
(`search/job.py`, `generation.py`, ...), built from the shared sections here: `InferenceConfig` (what every
command that runs a model has) and `SandboxSection`. A section field may hide fields of its dataclass that
the command sets itself (`section(..., fixed=(...))`, e.g. the mode of a search driver's config).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from rstar_jax.engine.config import EngineConfig


class RunConfigError(ValueError):
    """A run config file or override that cannot be used (message names the source and key)."""


class MissingKeyError(RunConfigError):
    """A required key that no source set."""

    def __init__(self, key: str):
        super().__init__(f"config key {key!r} is required")
        self.key = key


class RangeError(RunConfigError):
    """A value outside its allowed range; `key` is the field (the loader adds its section and source)."""

    def __init__(self, key: str, value: Any, rule: str):
        super().__init__(f"{key}={value!r}: must be {rule}")
        self.key = key


def require(ok: bool, key: str, value: Any, rule: str) -> None:
    """One line naming the key, its value and the allowed range, unless `ok`."""
    if not ok:
        raise RangeError(key, value, rule)


def at_least(low: float, **values: float) -> None:
    for key, v in values.items():
        require(v >= low, key, v, f">= {low}")


def section(default: Any, *, fixed: tuple[str, ...] = ()) -> Any:
    """A section field whose `fixed` fields are not config keys (the command sets them)."""
    return dataclasses.field(default=default, metadata={"fixed": fixed})


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

    def __post_init__(self):
        at_least(0, vocab_size=self.vocab_size, head_dim=self.head_dim)
        at_least(1, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                 num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                 num_key_value_heads=self.num_key_value_heads, max_position_embeddings=self.max_position_embeddings)
        require(self.rope_theta > 0, "rope_theta", self.rope_theta, "> 0")
        require(self.rms_norm_eps > 0, "rms_norm_eps", self.rms_norm_eps, "> 0")

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

    def __post_init__(self):
        for axis, size in zip(("data", "fsdp", "tensor"), self.shape):
            require(size >= 1 or size == -1, axis, size, ">= 1, or -1 for the remaining devices")
        require(self.shape.count(-1) <= 1, "data, fsdp, tensor", self.shape, "at most one -1")
        at_least(1, min_shard_elements=self.min_shard_elements)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)


@dataclasses.dataclass(frozen=True, kw_only=True)
class InferenceConfig:
    """What every command that runs a model shares (its config class derives from this one)."""

    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype (weights load in float32)
    mesh: MeshSection = MeshSection()  # over each process's own devices: slots over `data`, weights by the rules
    engine: EngineConfig = EngineConfig()  # the inference engine's slots, caches and chunks


@dataclasses.dataclass(frozen=True)
class SandboxSection:
    """The sandbox that runs model-written programs (`rstar_jax/sandbox/`)."""

    workers: int = 0  # 0: one per core
    timeout_s: float = 5.0  # wall-clock seconds per program
    memory_mb: int = 1024  # per program
    allow_insecure: bool = False  # process-only isolation where namespaces / seccomp are unavailable

    def __post_init__(self):
        at_least(0, workers=self.workers)
        at_least(1, memory_mb=self.memory_mb)
        require(self.timeout_s > 0, "timeout_s", self.timeout_s, "> 0")


@dataclasses.dataclass(frozen=True)
class OptimSection:
    learning_rate: float = 5e-5  # transformers Trainer's default (the configs/qwen* files set 7e-6)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    end_lr_fraction: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0  # <= 0 disables clipping

    def __post_init__(self):
        require(self.learning_rate > 0, "learning_rate", self.learning_rate, "> 0")
        at_least(0, warmup_steps=self.warmup_steps, weight_decay=self.weight_decay, end_lr_fraction=self.end_lr_fraction)
        require(self.end_lr_fraction <= 1, "end_lr_fraction", self.end_lr_fraction, "in [0, 1]")
        for name in ("b1", "b2"):
            require(0 <= getattr(self, name) < 1, name, getattr(self, name), "in [0, 1)")
        require(self.eps > 0, "eps", self.eps, "> 0")


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

    def __post_init__(self):
        at_least(1, batch_size=self.batch_size, grad_accum=self.grad_accum, num_buckets=self.num_buckets)
        require(self.batch_size % self.grad_accum == 0, "grad_accum", self.grad_accum,
                f"a divisor of batch_size={self.batch_size}")
        at_least(2, seq_len=self.seq_len)
        at_least(0, max_eval_batches=self.max_eval_batches)
        require(0 <= self.eval_fraction < 1, "eval_fraction", self.eval_fraction, "in [0, 1)")

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum


@dataclasses.dataclass(frozen=True)
class TrainSection:
    epochs: float = 1.0
    max_steps: int = 0  # > 0 caps the number of optimizer steps
    # at least this many steps: a few short records pack into a few rows, and an epoch of them is a step or two
    min_steps: int = 20
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    save_every: int = 200
    keep_checkpoints: int = 3
    async_checkpoints: bool = True

    def __post_init__(self):
        require(self.epochs > 0, "epochs", self.epochs, "> 0")
        at_least(0, max_steps=self.max_steps, min_steps=self.min_steps, eval_every=self.eval_every)
        at_least(1, log_every=self.log_every, save_every=self.save_every, keep_checkpoints=self.keep_checkpoints)


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
    if tp is float and isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise RunConfigError(f"{where}: {value!r} is not a finite number")
        return float(value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise RunConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _build(cls: type, tree: dict, prefix: str, fixed: tuple[str, ...] = ()) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in fixed}
    kwargs = {}
    for key, node in tree.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            source = node.source if isinstance(node, _Sourced) else _first_source(node)
            raise RunConfigError(f"{source}: unknown config key {dotted!r}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(node, dict):
                raise RunConfigError(f"{node.source}: {dotted!r} is a section, got {node.value!r}")
            kwargs[key] = _build(tp, node, dotted + ".", fields[key].metadata.get("fixed", ()))
        else:
            if isinstance(node, dict):
                raise RunConfigError(f"{_first_source(node)}: {dotted!r} is a value, not a section")
            kwargs[key] = _coerce(node.value, tp, f"{node.source}: {dotted}")
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise MissingKeyError(f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except RangeError as e:
        node = tree.get(e.key)
        source = f"{node.source}: " if isinstance(node, _Sourced) else ""
        raise RunConfigError(f"{source}{prefix}{e}") from None
    except ValueError as e:  # a driver's own config check
        name = prefix[:-1]
        raise RunConfigError(f"{name}: {e}" if name and not str(e).startswith(name) else str(e)) from None


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
    return _nest(key, _Sourced(value, f"override {text!r}"))


def _nest(key: str, node: Any) -> dict:
    for part in reversed(key.split(".")):
        node = {part: node}
    return node


def load_config(sources: list[str] | tuple[str, ...] = (), cls: type = Config,
                given: dict[str, tuple[Any, str]] | None = None) -> Any:
    """Build `cls` from defaults, then each source in order: a `.yaml`/`.yml` path or a `key=value` override;
    then `given`: dotted key -> (value, where it came from, e.g. a command-line flag), already typed."""
    tree: dict = {}
    for src in sources:
        if "=" not in src and src.endswith((".yaml", ".yml")):
            tree = _merge(tree, _read_yaml(Path(src)))
        else:
            tree = _merge(tree, parse_override(src))
    for key, (value, where) in (given or {}).items():
        tree = _merge(tree, _nest(key, _Sourced(value, where)))
    return _build(cls, tree, "")


def key_defaults(cls: type, prefix: str = "", fixed: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every config key of `cls` (dotted) with its default; required keys map to `dataclasses.MISSING`."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in fixed:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            out |= key_defaults(hints[f.name], f"{prefix}{f.name}.", f.metadata.get("fixed", ()))
        else:
            out[f"{prefix}{f.name}"] = f.default
    return out


def key_type(cls: type, key: str) -> Any:
    """The annotated type of a dotted key."""
    *sections, name = key.split(".")
    for part in sections:
        cls = typing.get_type_hints(cls)[part]
    return typing.get_type_hints(cls)[name]


def shared(cfg: Any, cls: type) -> dict[str, Any]:
    """The values of `cls`'s fields in `cfg` (whose class derives from `cls`): how a command hands its shared
    settings to another command's config without naming each field, so fields added later travel too."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)}


def first_difference(old: Any, new: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    """(dotted key, old value, new value) of the first difference between two nested dicts, e.g. the settings a
    folder was written with and a rerun's; None when they are equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*new, *(k for k in old if k not in new)]:
            found = first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found is not None:
                return found
        return None
    return None if old == new else (prefix[:-1], old, new)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (for saving next to checkpoints and metrics)."""
    return dataclasses.asdict(cfg)
