"""The `search` job: problems in; per problem a saved tree, a results line; a summary; resumable.

    DIR/config.json     the run's settings, written once every input is checked (a rerun with other settings
                        into the same DIR is refused, naming the differing key)
    DIR/trees/          one saved tree per problem (`tree_io`), written before its results line
    DIR/results.jsonl   one line per finished problem: id, answer, gold, correct, solved, tokens, sandbox
                        calls, wall seconds and the per-phase seconds (its share of its batch)
    DIR/summary.json    accuracy, tokens per problem, problems per hour, tokens/s, time split; rewritten
                        after every batch from all of results.jsonl
    DIR/batch_state.npz the MCTS / ReST-MCTS* batch in flight, removed when its results are written

Problems are searched `batch` at a time. A rerun with the same DIR skips every id already in results.jsonl. MCTS
(after every policy call) and ReST-MCTS* (after every iteration) also save the batch in flight
(`DIR/batch_state.npz`, `batch_state.BatchCheckpoint`), and a rerun continues it from there with the same trees as
an unbroken run; a killed baseline loses its batch in flight (at most `max_depth` policy calls). Problem b's
sampling key is fold_in(seed, crc32(id)), so a problem's key does not depend on its batch. The sandbox pool is
started before JAX initialises a backend. The few-shot prompt uses reference solutions of synthetic problems drawn
with a different seed than any evaluated synthetic set (`FEW_SHOT_SEED`, or the next seed if the evaluated set uses
it)."""

from __future__ import annotations

import dataclasses
import functools
import sys
import zlib
from pathlib import Path
from typing import Any, Literal

from rstar_jax.config import InferenceConfig, SandboxSection, at_least, section
from rstar_jax.jsonl import InputError, ResumableJsonl, keep_settings, write_json
from rstar_jax.search.baselines import BaselineConfig
from rstar_jax.search.mcts import MCTSConfig
from rstar_jax.search.mcts_star import StarSearchConfig
from rstar_jax.search.policy import PHASES

FEW_SHOT_SEED = 9173


class SearchJobError(InputError):
    """A bad `search` argument (one line naming it)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SearchSettings(InferenceConfig):
    """How problems are searched, whatever the policy and method: shared by `search` and `eval`."""

    limit: int = 0  # the first this many problems (0: all)
    batch: int = 8  # problems searched together
    seed: int = 0
    max_depth: int = 16  # steps per trajectory
    max_new_tokens: int = 256  # per step
    few_shot: int = 2  # synthetic reference solutions in the prompt
    prompt_file: str = ""  # a file whose text is the few-shot prompt instead
    sandbox: SandboxSection = SandboxSection()
    mcts: MCTSConfig = section(MCTSConfig(), fixed=("mode",))
    baseline: BaselineConfig = section(BaselineConfig(), fixed=("method",))

    def __post_init__(self):
        at_least(0, limit=self.limit, few_shot=self.few_shot)
        at_least(1, batch=self.batch, max_depth=self.max_depth, max_new_tokens=self.max_new_tokens)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SearchConfig(SearchSettings):
    model: str  # the policy: HF folder, .gguf, alias, or an exported checkpoint folder
    problems: str  # a problem jsonl or a synthetic spec "synth:levels=1-2,n=32,seed=0"
    method: Literal["mcts", "mcts-star", "greedy", "maj", "bon", "beam"]
    out: str  # output folder; rerun the same command to resume
    mode: Literal["terminal", "ppm", "inference"] = "terminal"  # mcts / mcts-star: what the gold answer is used for
    reward_model: str | None = None  # PPM / value / PRM folder
    mcts_star: StarSearchConfig = section(StarSearchConfig(), fixed=("mode",))

    def __post_init__(self):
        super().__post_init__()
        if self.tree_search and self.mode == "ppm" and self.reward_model is None:
            raise SearchJobError("mode ppm (--mode ppm): needs a reward model (--reward-model)")
        if getattr(self.driver_config, "needs_reward_model", False) and self.reward_model is None:
            raise SearchJobError(f"method {self.method} (--method): needs a reward model (--reward-model)")

    @property
    def tree_search(self) -> bool:
        return self.method in ("mcts", "mcts-star")

    @property
    def driver_config(self) -> MCTSConfig | StarSearchConfig | BaselineConfig:
        """The method's own config, as its driver takes it."""
        if self.method == "mcts":
            return dataclasses.replace(self.mcts, mode=self.mode)
        if self.method == "mcts-star":
            return dataclasses.replace(self.mcts_star, mode=self.mode)
        return dataclasses.replace(self.baseline, method=self.method)


def few_shot_text(problems_spec: str, n: int) -> str:
    """`n` synthetic reference solutions as demonstrations."""
    from rstar_jax.data import generate as synth
    from rstar_jax.data import parse_synth_spec
    from rstar_jax.math.steps import few_shot_prefix

    if n <= 0:
        return ""
    seed = FEW_SHOT_SEED
    if problems_spec.startswith("synth:") and parse_synth_spec(problems_spec).seed == seed:
        seed += 1
    return few_shot_prefix([(p.question, p.solution) for p in synth([1, 2], n, seed)])


def summarize(records: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    n = len(records)
    wall = sum(r["wall_s"] for r in records)
    tokens = sum(r["tokens"] for r in records)
    phases = {p: round(sum(r["seconds"].get(p, 0.0) for r in records), 3) for p in PHASES}
    solved = [r["solved"] for r in records if r["solved"] is not None]
    return {
        "method": settings["method"], "mode": settings.get("mode"), "model": settings["model"],
        "problems": n,
        "accuracy": sum(r["correct"] for r in records) / n if n else None,
        "solved_rate": sum(solved) / len(solved) if solved else None,  # some candidate answer correct (pass@k)
        "gold_used_in_search": settings["gold_used_in_search"],
        "tokens_per_problem": tokens / n if n else None,
        "sandbox_calls_per_problem": sum(r["sandbox_calls"] for r in records) / n if n else None,
        "problems_per_hour": 3600 * n / wall if wall else None,
        "tokens_per_s": tokens / wall if wall else None,
        "wall_s": round(wall, 3),
        "time_split_s": phases | {"other": round(max(wall - sum(phases.values()), 0.0), 3)},
    }


def _graded(grader, problem, result):
    """`solved` for a search that did not use the gold answer: is any answer in its tree correct (pass@tree)."""
    if result.solved is not None:
        return result
    answers = [n["answer"] for n in result.tree.nodes if n.get("kind") == "answer_terminal"]
    return dataclasses.replace(result, solved=any(grader.equivalent_many([(problem.answer, a) for a in answers])))


def check_models(cfg: SearchSettings, model: str, reward_model: str | None) -> None:
    """The policy is a causal LM, the reward model a reward model, and a step fits the policy's context: checked
    from their config files before any work (and before the sandbox forks: nothing here starts JAX)."""
    from rstar_jax.models.hf_io import model_config

    policy = model_config(model, reward=False, name="--model")
    policy.check_positions(cfg.max_new_tokens, f"max_new_tokens={cfg.max_new_tokens} (per step)")
    if reward_model is not None:
        model_config(reward_model, reward=True, name="--reward-model")


def prompt_text(cfg: SearchConfig) -> str:
    """The few-shot text the policy is prompted with."""
    if not cfg.prompt_file:
        return few_shot_text(cfg.problems, cfg.few_shot)
    try:
        return Path(cfg.prompt_file).read_text(encoding="utf-8")
    except OSError as e:
        raise SearchJobError(f"prompt_file {cfg.prompt_file!r}: cannot read ({e.strerror})") from None


def run_search(cfg: SearchConfig, *, progress: bool = True, pool=None) -> dict[str, Any]:
    """Run `cfg.method` over `cfg.problems` into `cfg.out`; returns the summary. Every input is checked before the
    folder's config.json is written. `pool`: a running SandboxPool to use (a driver running many searches starts
    one, before JAX)."""
    from rstar_jax.data import load_problems
    from rstar_jax.sandbox import SandboxPool

    problems = load_problems(cfg.problems, limit=cfg.limit or None)
    few_shot = prompt_text(cfg)
    check_models(cfg, cfg.model, cfg.reward_model)
    settings = {"model": cfg.model, "reward_model": cfg.reward_model, "problems": cfg.problems, "method": cfg.method,
                "mode": cfg.mode if cfg.tree_search else "inference", "max_depth": cfg.max_depth, "seed": cfg.seed,
                "max_new_tokens": cfg.max_new_tokens, "few_shot": few_shot if cfg.prompt_file else cfg.few_shot,
                "dtype": cfg.dtype, "config": dataclasses.asdict(cfg.driver_config),
                "gold_used_in_search": cfg.tree_search and cfg.mode != "inference"}
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise SearchJobError(f"--out {cfg.out}: exists and is not a folder")
    keep_settings(Path(cfg.out) / "config.json", settings, cfg.out, "a search")

    run = functools.partial(_run, cfg, problems, few_shot, settings, progress)
    if pool is not None:
        return run(pool)
    # the sandbox forks its workers before JAX starts a backend (loading problems and model configs does not)
    with SandboxPool.from_section(cfg.sandbox) as own:
        return run(own)


def _run(cfg: SearchConfig, problems, few_shot: str, settings: dict[str, Any], progress: bool, pool) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    from rstar_jax.math.grading import Grader
    from rstar_jax.math.steps import StepRunner
    from rstar_jax.models.hf_io import load_model
    from rstar_jax.sampling import prepare_params
    from rstar_jax.search import baselines, mcts, mcts_star, tree_io
    from rstar_jax.search.batch_state import BatchCheckpoint
    from rstar_jax.search.policy import LMProposer, RewardScorer, Stats, StepEnv

    out_dir = Path(cfg.out)
    method_cfg = cfg.driver_config
    results = ResumableJsonl(out_dir / "results.jsonl")
    done = {r["id"] for r in results.records}
    todo = [p for p in problems if p.id not in done]
    compute_dtype = jnp.dtype(cfg.dtype)
    lm = load_model(cfg.model, dtype="float32")
    proposer = LMProposer(prepare_params(lm.params, compute_dtype), lm.cfg, lm.tokenizer, cfg.max_new_tokens)
    scorer = None
    if cfg.reward_model is not None:
        rm = load_model(cfg.reward_model, dtype="float32")
        scorer = RewardScorer(rm.params, rm.cfg, rm.tokenizer, rm.num_labels, compute_dtype=compute_dtype)
    # tree searches: driver, and the config field counting their outer iterations (saved and shown one by one)
    tree_search = {"mcts": (mcts.search, "rollouts"), "mcts-star": (mcts_star.search, "iterations")}
    driver, outer = tree_search.get(cfg.method, (baselines.search, None))
    root_key = jax.random.key(cfg.seed)
    with Grader() as grader, tqdm(total=len(problems), initial=len(problems) - len(todo), unit="problem",
                                  desc=f"search {cfg.method}", file=sys.stderr, disable=not progress) as bar:
        def show_batch_progress():  # a batch can take an hour: show where it is as policy calls come back
            where = f"rollout {env.stats.rollout}/{getattr(method_cfg, outer)}, " if outer else ""
            bar.set_postfix_str(f"batch: {where}{env.stats.policy_calls} calls, "
                                f"{sum(env.stats.tokens.values())} tokens", refresh=True)

        env = StepEnv(proposer, StepRunner(pool.run, cfg.max_depth), lm.tokenizer, grader,
                      step_len=cfg.max_new_tokens + 64, scorer=scorer, few_shot=few_shot,
                      on_expand=show_batch_progress)
        for start in range(0, len(todo), cfg.batch):
            chunk = todo[start : start + cfg.batch]
            env.stats = Stats()
            checkpoint = BatchCheckpoint(out_dir / "batch_state.npz",
                                         {"ids": [p.id for p in chunk], "settings": settings})
            keys = [jax.random.fold_in(root_key, zlib.crc32(p.id.encode())) for p in chunk]
            resumable = {"checkpoint": checkpoint} if outer else {}
            found = driver(env, chunk, keys, method_cfg, meta={"model": cfg.model}, **resumable)
            share = checkpoint.elapsed() / len(chunk)
            correct = grader.equivalent_many([(p.answer, r.answer) for p, r in zip(chunk, found)])
            found = [_graded(grader, p, r) for p, r in zip(chunk, found)]
            for p, r, ok in zip(chunk, found, correct):
                path = tree_io.save(r.tree, out_dir / "trees")
                results.append({
                    "id": p.id, "answer": r.answer, "best_answer": r.best_answer, "gold": p.answer,
                    "correct": ok, "solved": r.solved, "tokens": env.stats.tokens[p.id],
                    "sandbox_calls": env.stats.programs[p.id], "wall_s": round(share, 3),
                    "seconds": {k: round(env.stats.seconds[k] / len(chunk), 4) for k in PHASES},
                    "tree": str(path.relative_to(out_dir)),
                })
            checkpoint.clear()
            write_json(out_dir / "summary.json", summarize(results.records, settings))
            bar.update(len(chunk))
    results.close()
    summary = summarize(results.records, settings)
    write_json(out_dir / "summary.json", summary)
    return summary
