"""The `evolve` run configuration: a strict YAML file (see `rstar_jax/config.py` for the loader's rules).

Training sections are lists of sources for the training config (`.yaml` paths, resolved relative to the evolve
config file, then `key=value` overrides), checked when the run starts so a typo fails before the first search.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from rstar_jax.config import RunConfigError, load_config


@dataclasses.dataclass(frozen=True)
class ProblemsSection:
    train: str = "synth:levels=1-3,n=32,seed=1"  # searched each round (a problem file or a synth: spec)
    heldout: str = "synth:levels=1-3,n=32,seed=2"  # evaluated each round, never searched for training


@dataclasses.dataclass(frozen=True)
class SearchSection:
    """MCTS that generates the training trees, in each round's mode (`modes`)."""

    # round k searches in modes[k - 1] (the last entry for later rounds). rStar-Math's schedule: terminal-guided in
    # rounds 1-2, while the PPM is not yet reliable; PPM-augmented from round 3 on, with the previous round's PPM
    modes: tuple[Literal["terminal", "ppm"], ...] = ("terminal", "terminal", "ppm", "ppm")
    rollouts: int = 16
    bootstrap_rollouts: int = 8  # round 1 (rStar-Math's bootstrap round)
    candidates: int = 8
    max_depth: int = 16
    temperature: float = 0.8
    max_new_tokens: int = 256  # per step
    batch: int = 8  # problems searched together
    few_shot: int = 2  # synthetic reference solutions prompting the base policy (SFT'd policies: zero-shot)
    prompt_file: str = ""  # a configured few-shot text for the base policy instead (relative to this file)

    def mode(self, k: int) -> str:
        """The search mode of round k (from 1)."""
        return self.modes[min(k, len(self.modes)) - 1]


@dataclasses.dataclass(frozen=True)
class LabelsSection:
    sft_per_problem: int = 2  # top correct trajectories per problem
    sft_min_accuracy: float = 0.0  # drop problems whose trajectory accuracy is below this
    ppm_min_gap: float = 0.5
    ppm_min_edit_distance: int = 20
    ppm_heldout_fraction: float = 0.2  # share of problems whose pairs are kept out of PPM training (pair accuracy)
    accumulate: bool = True  # train on every round's data so far (else this round's only)


@dataclasses.dataclass(frozen=True)
class EvalSection:
    rollouts: int = 8  # MCTS at evaluation (inference mode: no gold answer)
    candidates: int = 4
    max_depth: int = 16
    batch: int = 16
    # also MCTS without the PPM at the same budget (the PPM's contribution): in every round or the last only
    without_ppm: Literal["every", "last", "never"] = "last"


@dataclasses.dataclass(frozen=True)
class EvolveConfig:
    model: str = "smollm2-135m"  # the base policy (every round's SFT starts from it, as in rStar-Math)
    rounds: int = 2
    seed: int = 0
    dtype: Literal["float32", "bfloat16"] = "float32"  # search / evaluation compute dtype
    sandbox_workers: int = 0  # 0: one per core
    # training checkpoints (params + AdamW state: ~2 GB each for SmolLM2-135M) once the stage exported hf/;
    # every round trains from the base model, so nothing later resumes from them
    keep_checkpoints: bool = False
    problems: ProblemsSection = ProblemsSection()
    search: SearchSection = SearchSection()
    labels: LabelsSection = LabelsSection()
    eval: EvalSection = EvalSection()
    policy_train: tuple[str, ...] = ()  # training config sources for policy SFT
    ppm_train: tuple[str, ...] = ()  # ... for the PPM (trained from the round's new policy)

    def __post_init__(self):
        for name, v in (("rounds", self.rounds), ("search.rollouts", self.search.rollouts),
                        ("search.bootstrap_rollouts", self.search.bootstrap_rollouts),
                        ("search.candidates", self.search.candidates), ("search.max_depth", self.search.max_depth),
                        ("search.batch", self.search.batch), ("eval.rollouts", self.eval.rollouts),
                        ("eval.candidates", self.eval.candidates), ("eval.batch", self.eval.batch),
                        ("labels.sft_per_problem", self.labels.sft_per_problem)):
            if v < 1:
                raise RunConfigError(f"evolve config: {name}={v} must be >= 1")
        if not self.search.modes or self.search.modes[0] != "terminal":
            raise RunConfigError(f"evolve config: search.modes={list(self.search.modes)} must start with terminal "
                                 "(round 1 has no PPM yet)")
        if not 0.0 <= self.labels.ppm_heldout_fraction < 1.0:
            raise RunConfigError(f"evolve config: labels.ppm_heldout_fraction={self.labels.ppm_heldout_fraction} "
                                 "must be in [0, 1)")


def load_evolve_config(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> tuple[EvolveConfig, Path]:
    """The config and the folder its relative paths are resolved against."""
    path = Path(path)
    if not path.is_file():
        raise RunConfigError(f"{path}: no such evolve config file")
    cfg = load_config([str(path), *overrides], cls=EvolveConfig)
    return cfg, path.resolve().parent


def training_sources(sources: tuple[str, ...], base: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """Sources for `run_training`: yaml paths made absolute against `base`; every source checked now."""
    from rstar_jax.config import Config

    out = [s if "=" in s or Path(s).is_absolute() else str(base / s) for s in sources] + list(extra)
    load_config(out, cls=Config)
    return out
