"""Reward heads on the decoder backbone: a linear `score` layer on every position (HF *ForTokenClassification),
and how each kind of head is read.

Every reward model has one kind, recorded in its exported config.json (`RewardHead`, key `HEAD_KEY`), so every
reader (search, Best-of-N, beam, ProcessBench, evolve's pair accuracy) turns the same logits into the same score:

  kind   labels  trained by                        reported score                   range
  ppm    1       Bradley-Terry on the raw output   tanh(raw / ppm_scale), scale 5   [-1, 1]
  value  1       MSE of the raw output to v_k      clip(raw, 0, 1)                  [0, 1]
  prm    2       cross-entropy (logit 1 = correct) softmax(logits)[1]               [0, 1]

* PPM: rStar-Math reads its PPM as tanh(raw / 5) ("PPM use 5 as the scale", microsoft/rStar, branch rStar-math,
  rstar_deepthink/llms/llms.py:79-80), so the PPM's initial Q of a new node stays well inside the +-1 of the
  terminal outcomes and the c = 2 exploration term. A Bradley-Terry-trained raw output has no natural unit;
  the scale is recorded with the head (`ppm_scale`) and can be changed there.
* Value (ReST-MCTS*): the raw output trained by MSE, clipped to [low, high] = [0, 1] when read, as the authors'
  code does (THUDM/ReST-MCTS, PRM/train_VM_mistral.py:98 trains `nn.MSELoss` on the raw output;
  models/value_models.py:121-133 reads `min(high, max(value, low))`). A sigmoid head trained by MSE on the sigmoid
  would also land in [0, 1] but saturates: its gradient vanishes at the very targets 0 and 1 the tree labels
  are full of; the raw head fits them exactly and the clip removes only overshoot.
* PRM: P(step correct), as Qwen's PRMs report it.

`unit` maps any head's score to [0, 1] (ReST-MCTS* values, Best-of-N / beam aggregation), `signed` to [-1, 1]
(rStar-Math's Q). Qwen2.5-Math-PRM folders (`Qwen2ForProcessRewardModel`: a two-layer score head, no record)
load as kind prm with input format `qwen-prm` (steps joined by `<extra_0>` in a chat template); the project's own
heads read the `steps` format of `reward.encode_steps`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from rstar_jax.models.config import ModelConfig
from rstar_jax.models.llama import linear, padded_forward
from rstar_jax.models.params import Params

HEAD_KINDS = {"ppm": 1, "value": 1, "prm": 2}  # kind -> labels of its score head
INPUT_FORMATS = ("steps", "qwen-prm")
PPM_SCALE = 5.0
HEAD_KEY = "rstar_jax_reward_head"  # the config.json entry recording a project reward model's head
QWEN_PRM_ARCH = "Qwen2ForProcessRewardModel"


class HeadError(ValueError):
    """A reward head that cannot be read (the message names the source and the value)."""


@dataclasses.dataclass(frozen=True)
class RewardHead:
    kind: str  # ppm | value | prm
    ppm_scale: float = PPM_SCALE  # ppm only: the score is tanh(raw / ppm_scale)
    input_format: str = "steps"  # how a (prompt, steps) item becomes tokens: steps | qwen-prm

    def __post_init__(self):
        if self.kind not in HEAD_KINDS:
            raise HeadError(f"reward head kind {self.kind!r}: must be one of {', '.join(HEAD_KINDS)}")
        if not (math.isfinite(self.ppm_scale) and self.ppm_scale > 0):
            raise HeadError(f"reward head ppm_scale={self.ppm_scale!r}: must be a finite number > 0")
        if self.input_format not in INPUT_FORMATS:
            raise HeadError(f"reward head input_format {self.input_format!r}: must be one of "
                            f"{', '.join(INPUT_FORMATS)}")

    @property
    def num_labels(self) -> int:
        return HEAD_KINDS[self.kind]

    @property
    def low(self) -> float:
        """The lowest score (the highest is 1)."""
        return -1.0 if self.kind == "ppm" else 0.0

    def read(self, logits_xC: jax.Array) -> jax.Array:
        """The reported score of head outputs [..., C] (module docstring)."""
        if self.kind == "prm":
            return jax.nn.softmax(logits_xC, axis=-1)[..., 1]
        raw = logits_xC[..., 0]
        return jnp.tanh(raw / self.ppm_scale) if self.kind == "ppm" else jnp.clip(raw, 0.0, 1.0)

    def unit(self, score: float) -> float:
        return (score - self.low) / (1.0 - self.low)

    def signed(self, score: float) -> float:
        return 2.0 * self.unit(score) - 1.0

    def to_hf(self) -> dict[str, Any]:
        return {HEAD_KEY: dataclasses.asdict(self)}

    @classmethod
    def from_hf(cls, hf_config: dict[str, Any], num_labels: int, source: str) -> "RewardHead":
        """The head of a saved reward model: its record, else what its architecture implies (2 labels: a PRM)."""
        if QWEN_PRM_ARCH in (hf_config.get("architectures") or []):
            return cls("prm", input_format="qwen-prm")
        record = hf_config.get(HEAD_KEY)
        if record is None:
            if num_labels == 2:
                return cls("prm")
            raise HeadError(f"{source}: a {num_labels}-label reward head without a {HEAD_KEY!r} entry; add "
                            f'"{HEAD_KEY}": {{"kind": "ppm"}} or {{"kind": "value"}} to say how to read it')
        if not isinstance(record, dict) or set(record) - {f.name for f in dataclasses.fields(cls)}:
            raise HeadError(f"{source}: {HEAD_KEY} must be an object with keys kind, ppm_scale, input_format; "
                            f"got {record!r}")
        try:
            head = cls(**record)
        except (HeadError, TypeError) as e:
            raise HeadError(f"{source}: {e}") from None
        if head.num_labels != num_labels:
            raise HeadError(f"{source}: a {head.kind} head has {head.num_labels} labels, the weights have {num_labels}")
        return head


def reward_logits(
    params: Params,
    cfg: ModelConfig,
    input_ids_BxT: jax.Array,
    attention_mask_BxT: jax.Array | None = None,
    compute_dtype: Any = jnp.float32,
    **forward_kw: Any,
) -> jax.Array:
    """Head outputs [B, T, C] in fp32 at every position."""
    h = padded_forward(params, cfg, input_ids_BxT, attention_mask_BxT, compute_dtype, **forward_kw)
    return score_head(params, h)


def score_head(params: Params, hidden: jax.Array) -> jax.Array:
    """The score layer on hidden states [..., D] -> [..., C] in fp32: one linear layer (the project's heads), or
    Linear -> ReLU -> Linear (Qwen2ForProcessRewardModel's `score.0` / `score.2`)."""
    h = hidden.astype(jnp.float32)
    head = params["score"]
    if "0" in head:
        return linear(jax.nn.relu(linear(h, head["0"])), head["2"])
    return linear(h, head)


def gather_positions(x_BxTxC: jax.Array, index_BxP: jax.Array) -> jax.Array:
    """x at per-row positions: [B, P, C]."""
    return jnp.take_along_axis(x_BxTxC, index_BxP[..., None], axis=1)
