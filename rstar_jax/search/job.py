"""The `search` job: problems in; per problem a saved tree, a results line; a summary; resumable.

    DIR/config.json     the run's settings, written once every input is checked (a rerun with other settings
                        into the same DIR is refused, naming the differing key)
    DIR/trees/          one saved tree per problem (`tree_io`), written before its results line
    DIR/results.jsonl   one line per finished problem: id, answer, gold, correct, solved, tokens, sandbox calls,
                        its wall seconds from start to end (problems overlap), its host seconds by phase
    DIR/inflight/       the MCTS / ReST-MCTS* state of every problem in flight (`batch_state.BatchCheckpoint`),
                        saved after each expansion (MCTS) or iteration (ReST-MCTS*), removed with its result
    DIR/timing.json     the job's own wall time over all its runs, and how much of it the engine waited on the host
    DIR/summary.json    accuracy, tokens and sandbox calls per problem, problems per hour, tokens/s, engine busy
                        and host-wait shares; rewritten as problems finish

`search.in_flight` problems are searched at a time (default: enough to fill the engine's slots twice); each
problem submits its next expansion as soon as its last one returns (`scheduler.run`). A rerun with the same DIR
skips every problem with a results line and continues every problem in flight from its state file, with the same
trees as an unbroken run; a killed baseline redoes its problems in flight. Problem b's sampling key is
fold_in(seed, crc32(id)), so a problem's tree does not depend on which problems run beside it.

Under `jax.distributed` (the launch scripts' variables) every process runs its own engine over its own devices on
its share of the problems (`runtime.Runtime.share`), writes `results.p{i}.jsonl` and `timing.p{i}.json`, and
process 0 merges them into `results.jsonl` and `summary.json` once all are done. The sandbox pool is started
before JAX initialises a backend. The few-shot prompt uses reference solutions of synthetic problems drawn with a
different seed than any evaluated synthetic set (`FEW_SHOT_SEED`, or the next seed if the evaluated set uses it).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Literal

from rstar_jax.config import InferenceConfig, SandboxSection, at_least, require, section
from rstar_jax.jsonl import InputError, ResumableJsonl, keep_settings, write_json, write_jsonl
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
    in_flight: int = 0  # problems searched at a time; 0: enough to fill the engine's slots twice
    seed: int = 0
    max_depth: int = 16  # steps per trajectory
    max_new_tokens: int = 256  # per step
    top_p: float = 1.0  # nucleus sampling of every sampled step (1: off)
    few_shot: int = 2  # synthetic reference solutions in the prompt
    prompt_file: str = ""  # a file whose text is the few-shot prompt instead
    sandbox: SandboxSection = SandboxSection()
    mcts: MCTSConfig = section(MCTSConfig(), fixed=("mode",))
    baseline: BaselineConfig = section(BaselineConfig(), fixed=("method",))

    def __post_init__(self):
        at_least(0, limit=self.limit, few_shot=self.few_shot)
        at_least(0, in_flight=self.in_flight)
        at_least(1, max_depth=self.max_depth, max_new_tokens=self.max_new_tokens)
        require(0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")


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


def summarize(records: list[dict[str, Any]], settings: dict[str, Any], timing: list[dict[str, float]]) -> dict[str, Any]:
    """The job's summary from its result lines and each process's timing (wall time over all runs)."""
    n = len(records)
    wall = max((t["wall_s"] for t in timing), default=0.0)  # processes run side by side
    tokens = sum(r["tokens"] for r in records)
    calls = sum(r["sandbox_calls"] for r in records)
    host = {p: round(sum(r["seconds"].get(p, 0.0) for r in records), 6) for p in PHASES if p != "sampling"}
    solved = [r["solved"] for r in records if r["solved"] is not None]
    wait = sum(t["host_wait_s"] for t in timing)
    per_process = [{"process": i, "wall_s": round(t["wall_s"], 3), "tokens_per_s": round(t["tokens"] / t["wall_s"], 2)
                    if t["wall_s"] else None, "host_wait_share": round(t["host_wait_s"] / t["wall_s"], 4)
                    if t["wall_s"] else None} for i, t in enumerate(timing)]
    return {
        "method": settings["method"], "mode": settings.get("mode"), "model": settings["model"],
        "problems": n,
        "accuracy": sum(r["correct"] for r in records) / n if n else None,
        "solved_rate": sum(solved) / len(solved) if solved else None,  # some candidate answer correct (pass@k)
        "gold_used_in_search": settings["gold_used_in_search"],
        "tokens_per_problem": tokens / n if n else None,
        "sandbox_calls_per_problem": calls / n if n else None,
        "problems_per_hour": 3600 * n / wall if wall else None,
        "tokens_per_s": tokens / wall if wall else None,
        "sandbox_calls_per_s": calls / wall if wall else None,
        # the engine had requests to decode, or waited because every problem in flight waited on its host work
        "engine_busy_share": 1 - wait / sum(t["wall_s"] for t in timing) if wall else None,
        "host_wait_share": wait / sum(t["wall_s"] for t in timing) if wall else None,
        "wall_s": round(wall, 3),
        "host_seconds": host,  # summed over problems; runs beside the engine's decoding
        "processes": per_process,
    }


def samples_per_expansion(driver_config) -> int:
    """Samples one expansion of a problem asks for (what `in_flight` is sized by)."""
    if isinstance(driver_config, MCTSConfig):
        return driver_config.candidates
    if isinstance(driver_config, StarSearchConfig):
        return driver_config.branch
    if driver_config.method == "greedy":
        return 1
    return driver_config.samples * (driver_config.candidates if driver_config.method == "beam" else 1)


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
    from tqdm import tqdm

    from rstar_jax import runtime
    from rstar_jax.engine.model import load_policy
    from rstar_jax.math.grading import Grader
    from rstar_jax.math.steps import StepRunner
    from rstar_jax.models.hf_io import load_model
    from rstar_jax.search import baselines, mcts, mcts_star, scheduler, tree_io
    from rstar_jax.search.batch_state import BatchCheckpoint
    from rstar_jax.search.policy import LMProposer, RewardScorer, Stats, StepEnv

    rt = runtime.start(cfg.mesh)
    out_dir = Path(cfg.out)
    method_cfg = cfg.driver_config
    done = set(_finished(out_dir))
    todo = [p for p in rt.share(problems) if p.id not in done]
    results = ResumableJsonl(out_dir / f"results{rt.suffix}.jsonl")
    timing_path = out_dir / f"timing{rt.suffix}.json"
    before = json.loads(timing_path.read_text()) if timing_path.is_file() else {"wall_s": 0.0, "host_wait_s": 0.0,
                                                                                 "tokens": 0}
    lm, model = load_policy(cfg.model, cfg, rt.mesh)
    per_expansion = samples_per_expansion(method_cfg)
    proposer = LMProposer(model, lm.tokenizer, cfg.max_new_tokens, top_p=cfg.top_p, engine=cfg.engine,
                          samples=per_expansion)
    scorer = None
    if cfg.reward_model is not None:
        rm = load_model(cfg.reward_model, dtype="float32", mesh=rt.mesh, min_shard_elements=cfg.mesh.min_shard_elements)
        scorer = RewardScorer(rm.params, rm.cfg, rm.tokenizer, rm.head, compute_dtype=cfg.dtype)
    problem_search = {"mcts": mcts.problem_search, "mcts-star": mcts_star.problem_search}.get(
        cfg.method, baselines.problem_search)
    in_flight = cfg.in_flight or max(1, 2 * cfg.engine.slots // per_expansion)
    root_key = jax.random.key(cfg.seed)
    started: dict[str, float] = {}
    state = {p.id: BatchCheckpoint(out_dir / "inflight" / f"{tree_io.tree_stem(p.id)}.npz",
                                   {"id": p.id, "settings": settings}) for p in todo}
    t0 = time.perf_counter()
    timing = scheduler.Timing()

    def write_timing() -> dict[str, float]:
        now = {"wall_s": before["wall_s"] + time.perf_counter() - t0,
               "host_wait_s": before["host_wait_s"] + timing.host_wait_s,
               "tokens": before["tokens"] + sum(r["tokens"] for r in results.records)}
        write_json(timing_path, now)
        return now

    with Grader() as grader, tqdm(total=len(problems), initial=len(done), unit="problem",
                                  desc=f"search {cfg.method}", file=sys.stderr, disable=not progress) as bar:
        def show_progress():  # problems take many minutes: show the work in flight as expansions come back
            rate = timing.tokens / (time.perf_counter() - t0)
            bar.set_postfix_str(f"{len(started)} in flight, {timing.expansions} expansions, {timing.tokens} tokens, "
                                f"{rate:.0f} tok/s", refresh=True)

        env = StepEnv(proposer, StepRunner(pool.run, cfg.max_depth), lm.tokenizer, grader,
                      step_len=cfg.max_new_tokens + 64, scorer=scorer, few_shot=few_shot, on_expand=show_progress)

        def searches():
            for p in todo:
                stats = Stats()
                resumable = {"checkpoint": state[p.id]} if cfg.tree_search else {}
                started[p.id] = time.perf_counter()
                key = jax.random.fold_in(root_key, zlib.crc32(p.id.encode()))
                yield p, problem_search(env, p, key, method_cfg, stats, meta={"model": cfg.model}, **resumable), stats

        def finished(p, r, stats: Stats) -> None:
            ok = grader.equivalent(p.answer, r.answer)
            r = _graded(grader, p, r)
            path = tree_io.save(r.tree, out_dir / "trees")
            results.append({
                "id": p.id, "answer": r.answer, "best_answer": r.best_answer, "gold": p.answer,
                "correct": ok, "solved": r.solved, "tokens": stats.tokens[p.id],
                "sandbox_calls": stats.programs[p.id], "wall_s": round(time.perf_counter() - started.pop(p.id), 3),
                "seconds": {k: round(stats.seconds[k], 6) for k in PHASES},
                "tree": str(path.relative_to(out_dir)),
            })
            state[p.id].clear()
            write_timing()
            bar.update(1)

        timing = scheduler.run(env, searches(), in_flight, finished, timing)
    results.close()
    write_timing()
    rt.barrier("search: every process finished")
    if rt.process_index == 0:
        merged = _merge(out_dir, problems)
        processes = [json.loads(f.read_text()) for f in sorted(out_dir.glob("timing*.json"))]
        write_json(out_dir / "summary.json", summarize(merged, settings, processes))
    rt.barrier("search: merged")
    return json.loads((out_dir / "summary.json").read_text())


def _finished(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Problems finished by any earlier run, of any process count, whose trees are still there (a merged
    results.jsonl may list problems that their process has since lost)."""
    return {r["id"]: r for path in sorted(out_dir.glob("results*.jsonl")) for r in ResumableJsonl.read(path)
            if (out_dir / r["tree"]).is_file()}


def _merge(out_dir: Path, problems) -> list[dict[str, Any]]:
    """Every process's result lines, in problem order, as the job's results.jsonl."""
    by_id = _finished(out_dir)
    merged = [by_id[p.id] for p in problems if p.id in by_id]
    if any(out_dir.glob("results.p*.jsonl")):
        write_jsonl(out_dir / "results.jsonl", merged)
    return merged
