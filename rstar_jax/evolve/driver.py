"""`rstar-jax evolve`: rStar-Math's self-evolution rounds, resumable stage by stage.

Round 1 searches the training problems with terminal-guided MCTS and the base policy (prompted with few-shot
reference solutions of other synthetic problems, or a configured prompt); round k > 1 searches with the previous
round's policy, in the mode `search.modes` gives it: rStar-Math's schedule is terminal-guided in rounds 1-2 and
PPM-augmented (with the previous round's PPM) from round 3 on. A PPM round without a PPM (none could be trained)
searches terminal-guided, and its state says so. From each round's trees come policy SFT data (top trajectories
by mean step Q) and PPM preference pairs (`rstar_jax.labels`). The policy is fine-tuned from the base model every
round (as in the paper), on every round's data so far unless `labels.accumulate` is off; the PPM is trained from
the new policy.
Every round (and the base model, as round 0) is evaluated on held-out problems that are never searched for
training: greedy accuracy, MCTS in inference mode (no gold answer) with the round's PPM and, at the same budget,
without it, and the PPM's accuracy on pairs from held-out training problems.

RUN_DIR layout (each stage folder is finished when it holds state.json, see `stages.py`):
    config.json                    the run's config; a rerun with another config is refused
    round_0/eval/                  the base policy: greedy/, mcts_no_ppm/ (search job folders)
    round_k/search/                MCTS over the training problems (trees/, results.jsonl, summary.json)
    round_k/sft_data/              sft.jsonl (this round's), train.jsonl (what the policy is trained on)
    round_k/policy/                run/ (training run: metrics.jsonl; checkpoints/ only with keep_checkpoints),
                                   hf/ (the exported policy)
    round_k/ppm_data/              pairs.jsonl (this round's), train.jsonl, heldout.jsonl
    round_k/ppm/                   run/, hf/ (the exported PPM, a token-classification reward model)
    round_k/eval/                  greedy/, mcts/, mcts_no_ppm/, pair_accuracy
    report.md, report.json, *.png  rewritten after every round (`report.py`)
Policies and PPMs that could not be trained (no data) are carried over from the round before, and said so.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from rstar_jax.config import InferenceConfig, RunConfigError, shared, to_dict
from rstar_jax.evolve.config import EvolveConfig, load_evolve_config, training_sources
from rstar_jax.evolve.report import speed
from rstar_jax.evolve.stages import run_stage
from rstar_jax.jsonl import keep_settings, read_jsonl, write_jsonl
from rstar_jax.runtime import Runtime
from rstar_jax.search.mcts import MCTSConfig


def run_evolve(config_path: str | Path, out: str | Path, overrides: tuple[str, ...] | list[str] = (), *,
               allow_insecure_sandbox: bool = False) -> Path:
    """Run (or resume) the rounds of `config_path` into `out`; returns the report path. Every input is checked
    before the run folder's config.json is written."""
    from rstar_jax.data import load_problems
    from rstar_jax.models.hf_io import model_config
    from rstar_jax.sandbox import SandboxPool

    cfg, base = load_evolve_config(config_path, overrides)
    policy_sources = training_sources(cfg.policy_train, base)
    ppm_sources = training_sources(cfg.ppm_train, base)
    prompt_file = str(base / cfg.search.prompt_file) if cfg.search.prompt_file else ""
    if prompt_file and not Path(prompt_file).is_file():
        raise RunConfigError(f"{config_path}: search.prompt_file {cfg.search.prompt_file!r} does not exist")
    for key in ("train", "heldout"):
        try:
            load_problems(getattr(cfg.problems, key))
        except ValueError as e:
            raise RunConfigError(f"problems.{key}: {e}") from None
    model_config(cfg.model, reward=False, name="model").check_positions(
        cfg.search.max_new_tokens, f"search.max_new_tokens={cfg.search.max_new_tokens} (per step)")
    run_dir = Path(out)
    saved = {"config": to_dict(cfg), "policy_train": policy_sources, "ppm_train": ppm_sources,
             "prompt": Path(prompt_file).read_text() if prompt_file else ""}
    keep_settings(run_dir / "config.json", saved, str(out), "an evolve run")

    # one sandbox pool for every search, forked before JAX starts a backend
    workers = cfg.sandbox_workers or None
    with SandboxPool(workers=workers, allow_insecure=allow_insecure_sandbox) as pool:
        from rstar_jax import runtime

        rt = runtime.start(cfg.mesh)  # after the sandbox forked, before JAX starts a backend
        return Rounds(cfg, run_dir, pool, policy_sources, ppm_sources, prompt_file, rt).all()


class Rounds:
    """The rounds of one run; every method is one stage or a step of one. Under jax.distributed every process runs
    every stage: searches split their problems, training is one program over all processes; files that are not a
    search's or a training run's own (labels, exports, reports) are written by process 0."""

    def __init__(self, cfg: EvolveConfig, run_dir: Path, pool, policy_sources: list[str], ppm_sources: list[str],
                 prompt_file: str, rt: Runtime):
        self.cfg, self.dir, self.pool, self.rt = cfg, run_dir, pool, rt
        self.policy_sources, self.ppm_sources, self.prompt_file = policy_sources, ppm_sources, prompt_file
        self.lead = rt.process_index == 0

    def all(self) -> Path:
        cfg = self.cfg
        policy = {"model": cfg.model, "trained": False}
        ppm: dict[str, Any] = {"model": None, "trained": False}
        stage = lambda folder, label, work: run_stage(folder, label, work, self.rt)  # noqa: E731
        stage(self.dir / "round_0" / "eval", "round 0: evaluate the base policy", lambda d: self.evaluate(d, policy, ppm))
        self.report()
        for k in range(1, cfg.rounds + 1):
            rd = self.dir / f"round_{k}"
            stage(rd / "search", f"round {k}: MCTS over the training problems", lambda d: self.search(d, k, policy, ppm))
            stage(rd / "sft_data", f"round {k}: policy SFT data", lambda d: self.sft_data(d, k))
            policy = stage(rd / "policy", f"round {k}: policy SFT", lambda d: self.train_policy(d, k, policy))
            self.drop_checkpoints(rd / "policy")
            stage(rd / "ppm_data", f"round {k}: PPM pairs", lambda d: self.ppm_data(d, k))
            ppm = stage(rd / "ppm", f"round {k}: PPM training", lambda d: self.train_ppm(d, k, policy, ppm))
            self.drop_checkpoints(rd / "ppm")
            stage(rd / "eval", f"round {k}: evaluate", lambda d: self.evaluate(d, policy, ppm, k))
            self.report()
        return self.dir / "report.md"

    def report(self) -> None:
        from rstar_jax.evolve.report import write_report

        if self.lead:
            write_report(self.dir)
        self.rt.barrier("evolve: report written")

    # -- helpers

    def drop_checkpoints(self, stage: Path) -> None:
        """After the stage finished (its state.json written), so a crash in between still resumes training."""
        if self.lead and not self.cfg.keep_checkpoints:
            shutil.rmtree(stage / "run" / "checkpoints", ignore_errors=True)

    def _search(self, out: Path, policy: dict[str, Any], problems: str, method: str, *, seed: int, in_flight: int,
                max_depth: int, mcts: MCTSConfig | None = None, mode: str = "inference",
                reward_model: str | None = None) -> dict[str, Any]:
        """A search job; the base policy is prompted with demonstrations, an SFT'd one zero-shot (as trained)."""
        from rstar_jax.search.job import SearchConfig, run_search

        prompt = {"few_shot": 0} if policy["trained"] else {"few_shot": self.cfg.search.few_shot,
                                                             "prompt_file": self.prompt_file}
        cfg = SearchConfig(**shared(self.cfg, InferenceConfig), model=policy["model"], problems=problems,
                           method=method, out=str(out), mode=mode, reward_model=reward_model, seed=seed, in_flight=in_flight,
                           max_depth=max_depth, max_new_tokens=self.cfg.search.max_new_tokens, **prompt,
                           mcts=mcts or MCTSConfig())
        return run_search(cfg, pool=self.pool)

    def _rounds_files(self, k: int, stage: str, name: str) -> list[Path]:
        first = 1 if self.cfg.labels.accumulate else k
        return [self.dir / f"round_{j}" / stage / name for j in range(first, k + 1)]

    # -- stages

    def search(self, d: Path, k: int, policy: dict[str, Any], ppm: dict[str, Any]) -> dict[str, Any]:
        s = self.cfg.search
        mode = s.round_mode(k) if ppm["model"] is not None else "terminal"
        mcts = s.mcts(mode=mode, rollouts=s.bootstrap_rollouts if k == 1 else s.rollouts)
        summary = self._search(d, policy, self.cfg.problems.train, "mcts", seed=self.cfg.seed + k, in_flight=s.in_flight,
                               max_depth=s.max_depth, mcts=mcts, mode=mode,
                               reward_model=ppm["model"] if mode == "ppm" else None)
        return {"mode": mode, "scheduled_mode": s.round_mode(k), "policy": policy["model"], "ppm": ppm["model"],
                "coverage": summary["solved_rate"],
                "problems": summary["problems"], "tokens": round(summary["tokens_per_problem"] * summary["problems"]),
                "summary": summary}

    def sft_data(self, d: Path, k: int) -> dict[str, Any]:
        from rstar_jax.labels.job import SFTLabelConfig, label_sft

        if not self.lead:
            return {}
        lab = self.cfg.labels
        summary = label_sft(SFTLabelConfig(trees=str(self.dir / f"round_{k}" / "search"), out=str(d / "sft.jsonl"),
                                           top=lab.sft_per_problem, min_accuracy=lab.sft_min_accuracy))
        records = _union(self._rounds_files(k, "sft_data", "sft.jsonl"))
        write_jsonl(d / "train.jsonl", records)
        return {"round_records": summary["records"], "train_records": len(records), "label_summary": summary}

    def train_policy(self, d: Path, k: int, previous: dict[str, Any]) -> dict[str, Any]:
        data = self.dir / f"round_{k}" / "sft_data" / "train.jsonl"
        if not _has_records(data):
            return previous | {"carried_over": True}
        metrics = _train_and_export("sft", self.cfg.model, data, d, self.policy_sources, self.rt)
        return {"model": str(d / "hf"), "trained": True, "metrics": metrics, "tokens": metrics.get("tokens_trained", 0)}

    def ppm_data(self, d: Path, k: int) -> dict[str, Any]:
        from rstar_jax.labels.job import PPMLabelConfig, label_ppm

        if not self.lead:
            return {}
        lab = self.cfg.labels
        summary = label_ppm(PPMLabelConfig(trees=str(self.dir / f"round_{k}" / "search"), out=str(d / "pairs.jsonl"),
                                           pairs=lab.pairs))
        pairs = _union(self._rounds_files(k, "ppm_data", "pairs.jsonl"))
        out = [_unit(str(p["id"]), self.cfg.seed) < lab.ppm_heldout_fraction for p in pairs]
        held = [p for p, h in zip(pairs, out) if h]
        train = [p for p, h in zip(pairs, out) if not h]
        write_jsonl(d / "train.jsonl", train)
        write_jsonl(d / "heldout.jsonl", held)
        return {"round_pairs": summary["records"], "train_pairs": len(train), "heldout_pairs": len(held),
                "label_summary": summary}

    def train_ppm(self, d: Path, k: int, policy: dict[str, Any], previous: dict[str, Any]) -> dict[str, Any]:
        data = self.dir / f"round_{k}" / "ppm_data" / "train.jsonl"
        if not _has_records(data):
            return previous | {"carried_over": True}
        metrics = _train_and_export("ppm", policy["model"], data, d, self.ppm_sources, self.rt)
        return {"model": str(d / "hf"), "trained": True, "metrics": metrics, "tokens": metrics.get("tokens_trained", 0)}

    def evaluate(self, d: Path, policy: dict[str, Any], ppm: dict[str, Any], k: int = 0) -> dict[str, Any]:
        """Held-out accuracies of the round's policy (greedy; MCTS with and without its PPM) and PPM pair accuracy."""
        from rstar_jax.data import load_problems

        e = self.cfg.eval
        heldout = self.cfg.problems.heldout
        levels = {p.id: p.level for p in load_problems(heldout)}
        out: dict[str, Any] = {"policy": policy["model"], "ppm": ppm["model"]}
        runs: dict[str, dict[str, Any]] = {"greedy": dict(method="greedy")}
        mcts = dict(method="mcts", mcts=self.cfg.search.mcts(mode="inference", rollouts=e.rollouts,
                                                             candidates=e.candidates))
        if ppm["model"] is not None:
            runs["mcts"] = mcts | {"reward_model": ppm["model"]}
        if ppm["model"] is None or e.without_ppm == "every" or (e.without_ppm == "last" and k == self.cfg.rounds):
            runs["mcts_no_ppm"] = mcts
        for name, kw in runs.items():
            summary = self._search(d / name, policy, heldout, seed=self.cfg.seed, in_flight=e.in_flight,
                                   max_depth=e.max_depth, **kw)
            out[name] = {"accuracy": summary["accuracy"], "tokens_per_problem": summary["tokens_per_problem"],
                         "wall_s": summary["wall_s"], "by_level": _by_level(d / name / "results.jsonl", levels),
                         "speed": speed(summary)}
        if ppm["model"] is not None and k > 0 and self.lead:
            out["ppm_pair_accuracy"] = _pair_accuracy(ppm["model"], self.dir / f"round_{k}" / "ppm_data" / "heldout.jsonl",
                                                      self.cfg.dtype)
        return out


# ---------------------------------------------------------------------------------------------


def _train_and_export(kind: str, model: str, data: Path, d: Path, sources: list[str], rt: Runtime) -> dict[str, Any]:
    """Train (resuming from the run's last checkpoint; every process) and export the final checkpoint to `d/hf`
    (written by process 0)."""
    from rstar_jax.train import export_checkpoint, run_training

    metrics = run_training(kind, model, str(data), str(d / "run"), sources)
    lead, tmp = rt.process_index == 0, d / "hf.tmp"
    if lead:
        shutil.rmtree(tmp, ignore_errors=True)
    export_checkpoint(d / "run", tmp, write=lead)  # every process reads the checkpoint (a collective restore)
    if lead:
        shutil.rmtree(d / "hf", ignore_errors=True)
        tmp.rename(d / "hf")
    rt.barrier(f"{d}: exported")
    return metrics


def _union(files: list[Path]) -> list[dict[str, Any]]:
    """Records of every file in order, each distinct record once."""
    seen, out = set(), []
    for f in files:
        for rec in read_jsonl(f) if _has_records(f) else []:
            key = json.dumps(rec, sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append(rec)
    return out


def _has_records(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def _unit(text: str, seed: int) -> float:
    """A deterministic number in [0, 1) per text (the held-out split by problem)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{text}".encode()).digest()[:8], "little") / 2**64


def _by_level(results: Path, levels: dict[str, int | None]) -> dict[str, float]:
    per: dict[str, list[bool]] = {}
    for r in read_jsonl(results):
        per.setdefault(str(levels.get(r["id"])), []).append(bool(r["correct"]))
    return {lvl: sum(v) / len(v) for lvl, v in sorted(per.items())}


def _pair_accuracy(ppm: str, heldout: Path, dtype: str) -> dict[str, Any]:
    """Share of held-out pairs whose chosen step the PPM scores above the rejected one."""
    from rstar_jax.models.hf_io import load_model
    from rstar_jax.reward import score_steps
    from rstar_jax.train.data import pair_steps

    if not _has_records(heldout):
        return {"pairs": 0, "accuracy": None}
    pairs = read_jsonl(heldout)
    rm = load_model(ppm)
    items = [(p["prompt"], pair_steps(p, side)) for p in pairs for side in ("pos", "neg")]
    scores = score_steps(rm.params, rm.cfg, rm.tokenizer, rm.head, items, compute_dtype=dtype)
    wins = [scores[2 * i][-1] > scores[2 * i + 1][-1] for i in range(len(pairs))]
    return {"pairs": len(pairs), "accuracy": sum(wins) / len(wins)}
