"""HF folders in and out: config.json + safetensors (single file or sharded index) + tokenizer files.

Exported folders load in transformers with no custom code:
  * `save_causal_lm`    -> `LlamaForCausalLM` / `Qwen2ForCausalLM` (`AutoModelForCausalLM`).
  * `save_reward_model` -> `LlamaForTokenClassification` / `Qwen2ForTokenClassification`
    (`AutoModelForTokenClassification`) whose `score` head gives `logits[B, T, C]` at every position.
    Its config.json records the head's kind (`models.heads.RewardHead`: ppm, value or prm), which says how
    a step's score is read from the logits at its last token; `load_model` reads the record back.
Qwen2.5-Math-PRM folders (`Qwen2ForProcessRewardModel`, two-layer score head) load as PRMs for scoring.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from rstar_jax.models.config import ConfigError, ModelConfig
from rstar_jax.models.heads import QWEN_PRM_ARCH, HeadError, RewardHead
from rstar_jax.models.params import Params, from_hf_state_dict, layer_shapes, to_hf_state_dict, top_shapes
from rstar_jax.models.registry import ModelLoadError, resolve
from rstar_jax.models.tokenizer import Tokenizer, load_tokenizer

INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"
_MAX_SHARD_BYTES = 4 << 30
_ARCH_NAMES = {"llama": "Llama", "qwen2": "Qwen2"}


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    cfg: ModelConfig
    params: Params  # jnp arrays in the layout of rstar_jax/models/params.py
    tokenizer: Tokenizer
    path: Path  # the HF folder the model was read from
    num_labels: int | None = None  # C of the reward head; None for a causal LM
    head: RewardHead | None = None  # how a saved reward model is read; None for a causal LM or a fresh head


# --- loading -----------------------------------------------------------------------------------------


def load_model(spec: str, *, dtype: Any = jnp.float32, num_labels: int | None = None,
               mesh: jax.sharding.Mesh | None = None, min_shard_elements: int = 2**14) -> LoadedModel:
    """Load a causal LM, or with `num_labels` (or from a *ForTokenClassification folder) a reward model. With
    `mesh`, every parameter goes straight from the host into its shards (the rules table); else onto the default
    device.

    A causal-LM folder loaded with `num_labels` gets a fresh zero-initialised score head (its lm_head is
    dropped): the reward model starts from the policy's backbone and reports neutral scores until trained.
    """
    folder = resolve(spec)
    hf_config = _read_json_object(folder / "config.json")
    try:
        cfg = ModelConfig.from_hf_dict(hf_config, source=str(folder / "config.json"))
    except ConfigError as e:
        raise ModelLoadError(str(e)) from None
    fresh_head = num_labels is not None  # only an explicit request may start a score head from scratch
    head = None
    if num_labels is None:
        num_labels = _saved_num_labels(hf_config)
        if num_labels is not None:
            try:
                head = RewardHead.from_hf(hf_config, num_labels, str(folder / "config.json"))
            except HeadError as e:
                raise ModelLoadError(str(e)) from None
    tensors = read_weights(folder, dtype)
    if fresh_head and "score.weight" not in tensors:
        tensors["score.weight"] = np.zeros((num_labels, cfg.hidden_size), jnp.dtype(dtype))
        tensors["score.bias"] = np.zeros((num_labels,), jnp.dtype(dtype))
    tokenizer = load_tokenizer(folder)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ModelLoadError(
            f"{folder}: tokenizer has {tokenizer.vocab_size} tokens but config.json vocab_size is {cfg.vocab_size}"
        )
    params = _params_from_tensors(tensors, cfg, num_labels, folder)
    if mesh is not None:
        from rstar_jax.sharding import place_params

        return LoadedModel(cfg, place_params(params, mesh, min_shard_elements), tokenizer, folder, num_labels, head)
    return LoadedModel(cfg, jax.tree.map(jnp.asarray, params), tokenizer, folder, num_labels, head)


def model_config(spec: str, *, reward: bool, name: str) -> ModelConfig:
    """The config of `spec` without reading its weights (a first use of an alias fetches it), checked to be a
    reward model (`reward`) or a causal LM: how a command checks its models before work starts. Errors name the
    flag or key `name`."""
    folder = resolve(spec)
    hf_config = _read_json_object(folder / "config.json")
    try:
        cfg = ModelConfig.from_hf_dict(hf_config, source=str(folder / "config.json"))
    except ConfigError as e:
        raise ModelLoadError(f"{name}: {e}") from None
    is_reward = _saved_num_labels(hf_config) is not None
    if reward and not is_reward:
        raise ModelLoadError(f"{name} {spec!r}: not a reward model (expected a *ForTokenClassification folder)")
    if is_reward and not reward:
        raise ModelLoadError(f"{name} {spec!r}: a reward model (*ForTokenClassification), not a causal LM")
    return cfg


def read_weights(folder: Path, dtype: Any = jnp.float32) -> dict[str, np.ndarray]:
    """All tensors of an HF folder (single safetensors file or sharded index), cast to `dtype` on the host."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = _read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index}: no 'weight_map' object")
        files = sorted(set(weight_map.values()))
    elif (folder / WEIGHTS_FILE).is_file():
        weight_map, files = None, [WEIGHTS_FILE]
    else:
        raise ModelLoadError(f"{folder}: no {WEIGHTS_FILE} or {INDEX_FILE} (only safetensors weights are supported)")
    tensors: dict[str, np.ndarray] = {}
    # The flax framework reads bfloat16 (numpy's cannot); keep the arrays on the host until they are stacked.
    with jax.default_device(jax.local_devices(backend="cpu")[0]):  # this process's own, under jax.distributed
        for name in files:
            path = folder / name
            if not path.is_file():
                raise ModelLoadError(f"{index}: shard {name!r} is missing")
            try:
                with safetensors.safe_open(str(path), framework="flax") as f:
                    for key in f.keys():
                        tensors[key] = np.asarray(f.get_tensor(key).astype(dtype))
            except safetensors.SafetensorError as e:
                raise ModelLoadError(f"{path}: not a valid safetensors file ({e})") from None
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise ModelLoadError(f"{index}: tensor {absent[0]!r} is not in its shard {weight_map[absent[0]]!r}")
    return tensors


def _params_from_tensors(tensors: dict[str, np.ndarray], cfg: ModelConfig, num_labels: int | None, folder: Path) -> Params:
    score_mlp = "score.0.weight" in tensors
    if num_labels is None and ("score.weight" in tensors or score_mlp):
        raise ModelLoadError(f"{folder}: has a score head but no lm_head; load it as a reward model (num_labels)")
    expected = set(_hf_keys(cfg, num_labels, score_mlp))
    # Tolerated leftovers: a duplicate of tied embeddings, a policy's lm_head under a new score head, RoPE buffers.
    droppable = {"lm_head.weight"} if (cfg.tie_word_embeddings or num_labels is not None) else set()
    unexpected = sorted(k for k in tensors if k not in expected | droppable and not k.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise ModelLoadError(f"{folder}: weights do not match config.json: unexpected tensor {unexpected[0]!r}")
    try:
        return from_hf_state_dict(tensors, cfg, num_labels, source=f"{folder}: weights do not match config.json",
                                  score_mlp=score_mlp)
    except ValueError as e:
        raise ModelLoadError(str(e)) from None


def _saved_num_labels(hf_config: dict[str, Any]) -> int | None:
    archs = [str(a) for a in hf_config.get("architectures") or []]
    if QWEN_PRM_ARCH in archs:
        return 2  # its head is built with 2 labels whatever config.json says
    if not any(a.endswith("ForTokenClassification") for a in archs):
        return None
    id2label = hf_config.get("id2label")
    return len(id2label) if id2label else int(hf_config.get("num_labels", 2))


def _hf_keys(cfg: ModelConfig, num_labels: int | None, score_mlp: bool = False) -> list[str]:
    keys = [f"model.layers.{i}.{sub}" for i in range(cfg.num_hidden_layers) for sub in layer_shapes(cfg)]
    return keys + list(top_shapes(cfg, num_labels, score_mlp))


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


# --- saving ------------------------------------------------------------------------------------------


def save_causal_lm(
    out_dir: str | Path, cfg: ModelConfig, params: Params, tokenizer: Tokenizer, *, overwrite: bool = False,
    max_shard_bytes: int = _MAX_SHARD_BYTES,
) -> Path:
    """Write an HF folder that `transformers.AutoModelForCausalLM.from_pretrained` loads."""
    return _save(Path(out_dir), cfg, cfg.to_hf_dict(), params, None, tokenizer, overwrite, max_shard_bytes)


def save_reward_model(
    out_dir: str | Path, cfg: ModelConfig, params: Params, tokenizer: Tokenizer, head: RewardHead, *,
    overwrite: bool = False, max_shard_bytes: int = _MAX_SHARD_BYTES,
) -> Path:
    """Write a `*ForTokenClassification` folder whose config.json records `head` (see module doc)."""
    if "score" not in params or "weight" not in params["score"]:
        raise ModelLoadError(f"{out_dir}: params have no linear score head to export as a reward model")
    num_labels = int(params["score"]["weight"].shape[0])
    if num_labels != head.num_labels:
        raise ModelLoadError(f"{out_dir}: a {head.kind} head has {head.num_labels} labels, the params {num_labels}")
    hf_config = cfg.to_hf_dict() | head.to_hf()
    hf_config["architectures"] = [f"{_ARCH_NAMES[cfg.model_type]}ForTokenClassification"]
    hf_config["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
    hf_config["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    return _save(Path(out_dir), cfg, hf_config, params, num_labels, tokenizer, overwrite, max_shard_bytes)


def convert(spec: str, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """`rstar-jax convert`: any model spec in, an HF folder out, through the project's parameter tree."""
    m = load_model(spec)
    if m.head is None:
        return save_causal_lm(out_dir, m.cfg, m.params, m.tokenizer, overwrite=overwrite)
    return save_reward_model(out_dir, m.cfg, m.params, m.tokenizer, m.head, overwrite=overwrite)


def _save(
    out_dir: Path, cfg: ModelConfig, hf_config: dict[str, Any], params: Params, num_labels: int | None,
    tokenizer: Tokenizer, overwrite: bool, max_shard_bytes: int,
) -> Path:
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ModelLoadError(f"output {str(out_dir)!r} already exists and is not an empty folder")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ModelLoadError(f"{out_dir}: tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}")
    state = to_hf_state_dict(params, cfg)
    state = {k: np.ascontiguousarray(state[k]) for k in _hf_keys(cfg, num_labels) if k in state}
    try:  # the same checks as loading, so nothing is exported that would not load back
        from_hf_state_dict(state, cfg, num_labels, source=f"{out_dir}: params do not match the config")
    except ValueError as e:
        raise ModelLoadError(str(e)) from None
    gen_config = {k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _write_weights(tmp, state, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(gen_config, indent=2) + "\n")
        tokenizer.save(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it owner-only
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write_weights(folder: Path, state: dict[str, np.ndarray], max_shard_bytes: int) -> None:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, arr in state.items():
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = arr
        size += arr.nbytes
    metadata = {"format": "pt"}  # transformers refuses safetensors files without a known format
    if len(shards) == 1:
        safetensors.numpy.save_file(shards[0], folder / WEIGHTS_FILE, metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        safetensors.numpy.save_file(shard, folder / name, metadata=metadata)
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(a.nbytes for a in state.values())}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _publish(tmp: Path, out_dir: Path) -> None:
    """Move the finished folder into place; an old one (when overwriting) is removed only afterwards."""
    old = None
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent)) / "old"
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)
