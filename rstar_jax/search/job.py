"""The `search` job: problems in; per problem a saved tree, a results line; a summary; resumable.

    DIR/config.json     the run's settings (a rerun with other settings into the same DIR is refused)
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
import json
import sys
import time
import zlib
from pathlib import Path
from typing import Any

from rstar_jax.jsonl import InputError, ResumableJsonl, write_json
from rstar_jax.search.policy import PHASES

METHODS = ("mcts", "mcts-star", "greedy", "maj", "bon", "beam")
FEW_SHOT_SEED = 9173


class SearchJobError(InputError):
    """A bad `search` argument (one line naming it)."""


def method_config(method: str, mode: str, rollouts: int | None, candidates: int | None, samples: int | None,
                  temperature: float | None, aggregation: str):
    """The driver config of `method`, with each unset budget at its method's default."""
    from rstar_jax.search.baselines import BaselineConfig
    from rstar_jax.search.mcts import MCTSConfig
    from rstar_jax.search.mcts_star import StarSearchConfig

    def given(**kw: Any) -> dict[str, Any]:
        return {k: v for k, v in kw.items() if v is not None}

    if method == "mcts":
        return MCTSConfig(mode=mode, **given(rollouts=rollouts, candidates=candidates, temperature=temperature))
    if method == "mcts-star":
        return StarSearchConfig(mode=mode, **given(iterations=rollouts, branch=candidates, temperature=temperature))
    if method in ("greedy", "maj", "bon", "beam"):
        return BaselineConfig(method=method, aggregation=aggregation,
                              **given(samples=samples, candidates=candidates, temperature=temperature))
    raise SearchJobError(f"--method {method!r}: must be one of {', '.join(METHODS)}")


def few_shot_text(problems_spec: str, n: int | str) -> str:
    """`n` synthetic reference solutions as demonstrations; a string `n` is a configured few-shot text itself."""
    from rstar_jax.data import generate as synth
    from rstar_jax.data import parse_synth_spec
    from rstar_jax.math.steps import few_shot_prefix

    if isinstance(n, str):
        return n
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


def run_search(model: str, problems: str, method: str, out: str, *, reward_model: str | None = None,
               rollouts: int | None = None, candidates: int | None = None, samples: int | None = None,
               max_depth: int = 16, mode: str = "terminal", limit: int | None = None, batch: int = 8, seed: int = 0,
               temperature: float | None = None, max_new_tokens: int = 256, few_shot: int | str = 2,
               aggregation: str = "min", sandbox_workers: int | None = None, sandbox_timeout: float = 5.0,
               allow_insecure_sandbox: bool = False, dtype: str = "float32", progress: bool = True,
               pool=None) -> dict[str, Any]:
    """Run `method` over `problems` (a jsonl path or a "synth:..." spec) into `out`; returns the summary.
    `pool`: a running SandboxPool to use (a driver running many searches starts one, before JAX)."""
    from rstar_jax.sandbox import SandboxPool

    for name, v in (("--batch", batch), ("--max-depth", max_depth), ("--max-new-tokens", max_new_tokens)):
        if v < 1:
            raise SearchJobError(f"{name}={v}: must be >= 1")
    if limit is not None and limit < 1:
        raise SearchJobError(f"--limit={limit}: must be >= 1")
    if mode not in ("terminal", "ppm", "inference"):
        raise SearchJobError(f"--mode {mode!r}: must be one of terminal, ppm, inference")
    method_cfg = method_config(method, mode, rollouts, candidates, samples, temperature, aggregation)
    if mode == "ppm" and method in ("mcts", "mcts-star") and reward_model is None:
        raise SearchJobError("--mode ppm: needs --reward-model")
    if getattr(method_cfg, "needs_reward_model", False) and reward_model is None:
        raise SearchJobError(f"--method {method}: needs --reward-model")
    settings = {"model": model, "reward_model": reward_model, "problems": problems, "method": method,
                "mode": mode if method in ("mcts", "mcts-star") else "inference", "max_depth": max_depth,
                "seed": seed, "max_new_tokens": max_new_tokens, "few_shot": few_shot,
                "config": dataclasses.asdict(method_cfg),
                "gold_used_in_search": method in ("mcts", "mcts-star") and mode != "inference"}
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / "config.json"
    if config_path.is_file():
        old = json.loads(config_path.read_text())
        if old != settings:
            diff = next(k for k in settings if old.get(k) != settings[k])
            raise SearchJobError(f"{out}: holds a run with another {diff} ({old.get(diff)!r}); choose another --out")
    else:
        write_json(config_path, settings)

    run = functools.partial(_run, settings=settings, method_cfg=method_cfg, problems_spec=problems, out_dir=out_dir,
                            limit=limit, batch=batch, seed=seed, max_depth=max_depth, max_new_tokens=max_new_tokens,
                            few_shot=few_shot, dtype=dtype, progress=progress)
    if pool is not None:
        return run(pool)
    # the sandbox forks its workers before JAX starts a backend (loading problems and models does not)
    with SandboxPool(workers=sandbox_workers, timeout_s=sandbox_timeout, allow_insecure=allow_insecure_sandbox) as own:
        return run(own)


def _run(pool, settings, method_cfg, problems_spec, out_dir, limit, batch, seed, max_depth, max_new_tokens,
         few_shot, dtype, progress) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    from rstar_jax.data import load_problems
    from rstar_jax.math.grading import Grader
    from rstar_jax.math.steps import StepRunner
    from rstar_jax.models.hf_io import load_model
    from rstar_jax.engine import prepare
    from rstar_jax.search import baselines, mcts, mcts_star, tree_io
    from rstar_jax.search.batch_state import BatchCheckpoint
    from rstar_jax.search.policy import LMProposer, RewardScorer, Stats, StepEnv

    problems = load_problems(problems_spec, limit=limit)
    results = ResumableJsonl(out_dir / "results.jsonl")
    done = {r["id"] for r in results.records}
    todo = [p for p in problems if p.id not in done]
    compute_dtype = jnp.dtype(dtype)
    lm = load_model(settings["model"], dtype="float32")
    proposer = LMProposer(prepare(lm.params, lm.cfg, compute_dtype), lm.tokenizer, max_new_tokens)
    scorer = None
    if settings["reward_model"] is not None:
        rm = load_model(settings["reward_model"], dtype="float32")
        if rm.num_labels is None:
            raise SearchJobError(f"--reward-model {settings['reward_model']!r}: not a reward model "
                                 "(expected a *ForTokenClassification folder)")
        scorer = RewardScorer(rm.params, rm.cfg, rm.tokenizer, rm.head, compute_dtype=compute_dtype)
    # tree searches: driver, and the config field counting their outer iterations (saved and shown one by one)
    tree_search = {"mcts": (mcts.search, "rollouts"), "mcts-star": (mcts_star.search, "iterations")}
    driver, outer = tree_search.get(settings["method"], (baselines.search, None))
    root_key = jax.random.key(seed)
    with Grader() as grader, tqdm(total=len(problems), initial=len(problems) - len(todo), unit="problem",
                                  desc=f"search {settings['method']}", file=sys.stderr, disable=not progress) as bar:
        def show_batch_progress():  # a batch can take an hour: show where it is as policy calls come back
            where = f"rollout {env.stats.rollout}/{getattr(method_cfg, outer)}, " if outer else ""
            bar.set_postfix_str(f"batch: {where}{env.stats.policy_calls} calls, "
                                f"{sum(env.stats.tokens.values())} tokens", refresh=True)

        env = StepEnv(proposer, StepRunner(pool.run, max_depth), lm.tokenizer, grader,
                      step_len=max_new_tokens + 64, scorer=scorer, few_shot=few_shot_text(problems_spec, few_shot),
                      on_expand=show_batch_progress)
        for start in range(0, len(todo), batch):
            chunk = todo[start : start + batch]
            env.stats = Stats()
            states = {p.id: BatchCheckpoint(out_dir / "inflight" / f"{tree_io.tree_stem(p.id)}.npz",
                                            {"id": p.id, "settings": settings}) for p in chunk}
            keys = [jax.random.fold_in(root_key, zlib.crc32(p.id.encode())) for p in chunk]
            resumable = {"checkpoint_of": lambda p: states[p.id]} if outer else {}
            t0 = time.perf_counter()
            found = driver(env, chunk, keys, method_cfg, meta={"model": settings["model"]}, **resumable)
            share = (time.perf_counter() - t0) / len(chunk)
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
            for state in states.values():
                state.clear()
            write_json(out_dir / "summary.json", summarize(results.records, settings))
            bar.update(len(chunk))
    results.close()
    summary = summarize(results.records, settings)
    write_json(out_dir / "summary.json", summary)
    return summary
