"""The `evolve` run configuration: a strict YAML file (see `rstar_jax/config.py` for the loader's rules).

Training sections are lists of sources for the training config (`.yaml` paths, resolved relative to the evolve
config file, then `key=value` overrides), checked when the run starts so a typo fails before the first search.
The `search` section is the MCTS config of the training searches (`search/mcts.py`'s keys, its mode set by the
round) plus how problems are searched; the `eval` section sets the budget of the evaluation MCTS, which otherwise
searches as `search` does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from rstar_jax.config import InferenceConfig, RunConfigError, at_least, load_config, require, section
from rstar_jax.labels.ppm_pairs import PairConfig
from rstar_jax.search.mcts import MCTSConfig


@dataclasses.dataclass(frozen=True)
class ProblemsSection:
    train: str = "synth:levels=1-3,n=32,seed=1"  # searched each round (a problem file or a synth: spec)
    heldout: str = "synth:levels=1-3,n=32,seed=2"  # evaluated each round, never searched for training


@dataclasses.dataclass(frozen=True)
class SearchSection(MCTSConfig):
    """MCTS that generates the training trees, in each round's mode (`modes`): every key of `MCTSConfig`
    (rollouts, candidates, temperature, c, ...) and these."""

    # round k searches in modes[k - 1] (the last entry for later rounds). rStar-Math's schedule: terminal-guided in
    # rounds 1-2, while the PPM is not yet reliable; PPM-augmented from round 3 on, with the previous round's PPM
    modes: tuple[Literal["terminal", "ppm"], ...] = ("terminal", "terminal", "ppm", "ppm")
    bootstrap_rollouts: int = 8  # round 1 (rStar-Math's bootstrap round)
    max_depth: int = 16
    max_new_tokens: int = 256  # per step
    in_flight: int = 0  # problems searched at a time (0: enough to fill the engine's slots twice)
    few_shot: int = 2  # synthetic reference solutions prompting the base policy (SFT'd policies: zero-shot)
    prompt_file: str = ""  # a configured few-shot text for the base policy instead (relative to this file)

    def __post_init__(self):
        super().__post_init__()
        at_least(1, bootstrap_rollouts=self.bootstrap_rollouts, max_depth=self.max_depth,
                 max_new_tokens=self.max_new_tokens)
        at_least(0, in_flight=self.in_flight)
        at_least(0, few_shot=self.few_shot)
        require(bool(self.modes) and self.modes[0] == "terminal", "modes", list(self.modes),
                "a list that starts with terminal (round 1 has no PPM yet)")

    def round_mode(self, k: int) -> str:
        """The search mode of round k (from 1)."""
        return self.modes[min(k, len(self.modes)) - 1]

    def mcts(self, **changes) -> MCTSConfig:
        """The driver config of a search: this section's MCTS keys, then `changes` (mode, a budget)."""
        return MCTSConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(MCTSConfig)} | changes)


@dataclasses.dataclass(frozen=True)
class LabelsSection:
    sft_per_problem: int = 2  # top correct trajectories per problem
    sft_min_accuracy: float = 0.0  # drop problems whose trajectory accuracy is below this
    ppm_min_gap: float = 0.5
    ppm_min_edit_distance: int = 20
    ppm_heldout_fraction: float = 0.2  # share of problems whose pairs are kept out of PPM training (pair accuracy)
    accumulate: bool = True  # train on every round's data so far (else this round's only)

    def __post_init__(self):
        at_least(1, sft_per_problem=self.sft_per_problem)
        require(0 <= self.sft_min_accuracy <= 1, "sft_min_accuracy", self.sft_min_accuracy, "in [0, 1]")
        require(0 <= self.ppm_heldout_fraction < 1, "ppm_heldout_fraction", self.ppm_heldout_fraction, "in [0, 1)")
        _ = self.pairs  # PairConfig checks the pair filters

    @property
    def pairs(self) -> PairConfig:
        return PairConfig(min_gap=self.ppm_min_gap, min_edit=self.ppm_min_edit_distance)


@dataclasses.dataclass(frozen=True)
class EvalSection:
    rollouts: int = 8  # MCTS at evaluation (inference mode: no gold answer)
    candidates: int = 4
    max_depth: int = 16
    in_flight: int = 0  # problems evaluated at a time (0: enough to fill the engine's slots twice)
    # also MCTS without the PPM at the same budget (the PPM's contribution): in every round or the last only
    without_ppm: Literal["every", "last", "never"] = "last"

    def __post_init__(self):
        at_least(1, rollouts=self.rollouts, candidates=self.candidates, max_depth=self.max_depth)
        at_least(0, in_flight=self.in_flight)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvolveConfig(InferenceConfig):  # dtype, mesh: of the searches and evaluations
    model: str = "smollm2-135m"  # the base policy (every round's SFT starts from it, as in rStar-Math)
    rounds: int = 2
    seed: int = 0
    sandbox_workers: int = 0  # 0: one per core
    # training checkpoints (params + AdamW state: ~2 GB each for SmolLM2-135M) once the stage exported hf/;
    # every round trains from the base model, so nothing later resumes from them
    keep_checkpoints: bool = False
    problems: ProblemsSection = ProblemsSection()
    search: SearchSection = section(SearchSection(), fixed=("mode",))
    labels: LabelsSection = LabelsSection()
    eval: EvalSection = EvalSection()
    policy_train: tuple[str, ...] = ()  # training config sources for policy SFT
    ppm_train: tuple[str, ...] = ()  # ... for the PPM (trained from the round's new policy)

    def __post_init__(self):
        at_least(1, rounds=self.rounds)
        at_least(0, sandbox_workers=self.sandbox_workers)


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
