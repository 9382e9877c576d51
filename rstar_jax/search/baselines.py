"""Baselines over the same step environment as MCTS, each under an explicit budget.

* greedy: one chain at temperature 0, at most `max_depth` steps (pass@1).
* maj:    `samples` chains at `temperature`; self-consistency majority over answer equivalence classes (maj@k).
* bon:    `samples` chains ranked by the reward model's step scores aggregated with `aggregation`
          (min / product / last of `scoring.aggregate`); the best chain's answer (Best-of-N).
* beam:   step-level beam search: each of `samples` beams proposes `candidates` steps; the reward model scores
          them and the `samples` best partial solutions (by aggregated step scores) survive; a surviving
          answer terminal leaves the beam as a finished solution. Pick: the best finished solution.

Each problem is searched on its own (`problem_search`, a generator for `scheduler.run`): its chains advance
together, one expansion per step for all its live chains. Reward scores are
mapped to [0, 1] before aggregating (`StepEnv.unit_value`), so `product` is a probability for PPM heads too.
Answers are graded against the gold answer only to record correctness in the saved tree; no pick uses it.
Each problem's chains are saved as one tree (`tree_io.TreeBuilder`): every chain or beam step is a node.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Generator, Sequence

import jax

from rstar_jax.data import Problem
from rstar_jax.math.steps import StepKind
from rstar_jax.scoring import AGGREGATIONS, aggregate
from rstar_jax.search import tree_io
from rstar_jax.search.mcts import (ProblemResult, SearchConfigError, check_choice, check_nonnegative, check_positive,
                                   request_key)
from rstar_jax.search import scheduler
from rstar_jax.search.policy import Child, Request, Stats, StepEnv
from rstar_jax.search.scheduler import Expand, ProblemSearch

METHODS = ("greedy", "maj", "bon", "beam")


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    method: str = "greedy"
    samples: int = 8  # maj@k / Best-of-N N / beam width (greedy: 1)
    candidates: int = 4  # beam: steps proposed per beam
    temperature: float = 0.8  # sampling temperature (greedy: 0)
    aggregation: str = "min"

    def __post_init__(self):
        check_choice("baseline method", self.method, METHODS)
        check_choice("aggregation", self.aggregation, AGGREGATIONS)
        check_positive("BaselineConfig", samples=self.samples, candidates=self.candidates)
        check_nonnegative("BaselineConfig", temperature=self.temperature)

    @property
    def needs_reward_model(self) -> bool:
        return self.method in ("bon", "beam")


@dataclasses.dataclass
class Chain:
    problem: int
    sample: int
    path: list[Child]
    node: int  # its last node in the problem's TreeBuilder
    prompt_ids: tuple[int, ...]
    scores: list[float] = dataclasses.field(default_factory=list)  # unit reward scores of its steps

    @property
    def finished(self) -> bool:
        return bool(self.path) and self.path[-1].kind in (StepKind.ANSWER_TERMINAL, StepKind.INVALID)

    @property
    def answer(self) -> str | None:
        return self.path[-1].answer if self.path and self.path[-1].kind == StepKind.ANSWER_TERMINAL else None

    def extend(self, child: Child, node: int, score: float | None = None) -> "Chain":
        return Chain(self.problem, self.sample, self.path + [child], node, self.prompt_ids + child.token_ids,
                     self.scores + ([] if score is None else [score]))


def _request(env: StepEnv, problems: Sequence[Problem], keys: Sequence[jax.Array], ch: Chain) -> Request:
    return Request(ch.problem, problems[ch.problem], tuple(c.text for c in ch.path), ch.prompt_ids,
                   request_key(keys[ch.problem], ch.sample, len(ch.path)))


def run_chains(env: StepEnv, problems: Sequence[Problem], keys: Sequence[jax.Array], chains: list[Chain],
               builders: list[tree_io.TreeBuilder], temperature: float) -> Generator[Expand, list, list[Chain]]:
    """Advance every chain one step at a time (one policy call per step) until each ends or hits max_depth."""
    for _ in range(env.max_depth):
        live = [i for i, ch in enumerate(chains) if not ch.finished]
        if not live:
            break
        out = yield Expand([_request(env, problems, keys, chains[i]) for i in live], 1, temperature, grade=True,
                           score=False)
        for i, (child,) in zip(live, out):
            ch = chains[i]
            chains[i] = ch.extend(child, builders[ch.problem].add(ch.node, child))
    return chains


def beam_search(env: StepEnv, problems: Sequence[Problem], keys: Sequence[jax.Array], cfg: BaselineConfig,
                builders: list[tree_io.TreeBuilder], question_ids: list[tuple[int, ...]]
                ) -> Generator[Expand, list, list[Chain | None]]:
    """Step-level beam search; per problem the best finished solution (None if no beam reached an answer)."""
    beams = [[Chain(b, 0, [], 0, question_ids[b])] for b in range(len(problems))]  # each starts at its root
    finished: list[list[Chain]] = [[] for _ in problems]
    for _ in range(env.max_depth):
        live = [ch for row in beams for ch in row]
        if not live:
            break
        out = yield Expand([_request(env, problems, keys, ch) for ch in live], cfg.candidates, cfg.temperature,
                           grade=True, score=True)
        pool: list[list[tuple[float, Chain]]] = [[] for _ in problems]
        for ch, children in zip(live, out):
            for child in children:
                unit = env.unit_value(child.score, default=0.0)
                node = builders[ch.problem].add(ch.node, child, unit)
                if child.kind != StepKind.INVALID:
                    new = ch.extend(child, node, unit)
                    pool[ch.problem].append((aggregate(new.scores, cfg.aggregation), new))
        for b, cands in enumerate(pool):
            cands.sort(key=lambda sc: -sc[0])  # stable: earlier beams and candidates win ties
            kept = [ch for _, ch in cands[: cfg.samples]]
            finished[b] += [ch for ch in kept if ch.finished]
            beams[b] = [dataclasses.replace(ch, sample=s) for s, ch in enumerate(kept) if not ch.finished]
    return [max(done, key=lambda ch: aggregate(ch.scores, cfg.aggregation), default=None) for done in finished]


def problem_search(env: StepEnv, problem: Problem, key: jax.Array, cfg: BaselineConfig, stats: Stats,
                   meta: dict[str, Any] | None = None) -> ProblemSearch:
    """The baseline for one problem (a generator for `scheduler.run`): its chains or beams advance together."""
    problems, keys = [problem], [key]
    builders = [tree_io.TreeBuilder() for _ in problems]
    question_ids = [env.question_ids(p) for p in problems]
    picks: list[str | None]
    if cfg.method == "beam":
        best = yield from beam_search(env, problems, keys, cfg, builders, question_ids)
        picks = [ch.answer if ch else None for ch in best]
    else:
        n, temperature = (1, 0.0) if cfg.method == "greedy" else (cfg.samples, cfg.temperature)
        chains = [Chain(b, s, [], 0, question_ids[b]) for b in range(len(problems)) for s in range(n)]
        chains = yield from run_chains(env, problems, keys, chains, builders, temperature)
        per_problem = [[ch for ch in chains if ch.problem == b] for b in range(len(problems))]
        if cfg.method == "bon":
            answered = [ch for ch in chains if ch.answer is not None]
            scores = env.score_paths([(problems[ch.problem], [c.text for c in ch.path]) for ch in answered], stats)
            ranked = {id(ch): aggregate([env.unit_value(s, 0.0) for s in sc], cfg.aggregation)
                      for ch, sc in zip(answered, scores)}
            picks = [max(((ranked[id(ch)], -ch.sample, ch.answer) for ch in row if id(ch) in ranked),
                         default=(0, 0, None))[2] for row in per_problem]
        else:
            picks = [env.grader.majority_vote([ch.answer for ch in row]).answer for row in per_problem]
    info = {"problem": {"id": problem.id, "question": problem.question, "answer": problem.answer},
            "method": cfg.method, "mode": "inference", "config": dataclasses.asdict(cfg), "answer": picks[0]} | (meta or {})
    saved = builders[0].build(info)
    graded = [n["correct"] for n in saved.nodes if n.get("kind") == StepKind.ANSWER_TERMINAL.value]
    solved = any(graded) if any(g is not None for g in graded) else None
    return ProblemResult(picks[0], picks[0], solved, saved)


def search(env: StepEnv, problems: Sequence[Problem], keys: Sequence[jax.Array], cfg: BaselineConfig,
           meta: dict[str, Any] | None = None, in_flight: int | None = None) -> list[ProblemResult]:
    """The baseline for every problem (`problem_search`), `in_flight` at a time (default: all)."""
    if cfg.needs_reward_model and env.scorer is None:
        raise SearchConfigError(f"method {cfg.method}: needs a reward model (--reward-model)")
    return scheduler.search_all(env, [functools.partial(problem_search, env, p, k, cfg, meta=meta)
                                      for p, k in zip(problems, keys)], in_flight)
