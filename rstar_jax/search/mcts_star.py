"""ReST-MCTS* (MCTS*): value-guided selection, greedy roll-forward, visit-weighted backup, one tree per problem.

Each problem is searched on its own (`problem_search`, a generator for `scheduler.run`), one iteration after the
other (defaults from the authors' MCTS_Task: branch 3, c 0.7, alpha 0.5, end gate 0.9, greedy roll-forward of 3
steps, temperature 0.7, unvisited bonus 1.0, values in [0, 1]):

1. `select_star` from the root to a childless node (V + c * sqrt(2 ln N_parent / N); see tree_star.py). When
   that node is an answer terminal, steps 2-4 are skipped: the iteration only backs up from it (step 5).
2. Expand it with `branch` sampled candidate steps; each child's V starts at the value model's score
   mapped to [0, 1], with no visit. Answer terminals: in terminal mode V = 1 / 0 from the gold answer, in
   inference mode the value model's score. Invalid steps: V = 0 (`TreeConfig.invalid_reward`); they are
   leaves that neither selection nor backup reads.
3. End gate: a problem stops searching once one of its answer terminals has V >= end_gate. (The paper stops
   on any node reaching the gate; a non-answer node there would still need a completion, so only answers
   stop the search here.)
4. Roll forward from the best new non-terminal child: up to `rollout_steps` greedy steps (one candidate at
   temperature 0), each scored like a child; the roll-out stops at a terminal. Then
   V <- (1 - alpha) V + alpha * max(roll-out values) on that child (`rollout_update`; a roll-out with no
   valid step leaves V as it is but still counts the visit). Roll-out steps are not added to the tree.
5. `backup_star` from the expanded (or selected answer) node to the root (visit-weighted means over valid
   children).

Without a value model every non-terminal scores 0.5 (neutral), so selection is driven by the exploration
term and the terminal values. The answer: the answer terminals vote with weight V over equivalence classes
(`answer`); the highest-V answer is `best_answer`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Generator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rstar_jax.data import Problem
from rstar_jax.math.steps import StepKind
from rstar_jax.search import tree_io
from rstar_jax.search.batch_state import BatchCheckpoint, LoopState
from rstar_jax.search.mcts import (MODES, ProblemResult, check_choice, check_nonnegative, check_positive,
                                   leaf_requests, pack, record_children, request_key, tree_result)
from rstar_jax.search import scheduler
from rstar_jax.search.policy import Child, Request, Stats, StepEnv
from rstar_jax.search.scheduler import Expand, ProblemSearch
from rstar_jax.search.tree import Tree, TreeConfig, expand, new_tree
from rstar_jax.search.tree_star import StarConfig, backup_star, rollout_update, select_star


@dataclasses.dataclass(frozen=True)
class StarSearchConfig:
    mode: str = "inference"
    iterations: int = 32  # select-expand-roll-backup iterations per problem
    branch: int = 3
    rollout_steps: int = 3
    temperature: float = 0.7
    c: float = 0.7
    alpha: float = 0.5
    end_gate: float = 0.9
    unvisited_bonus: float = 1.0
    top_n: int = 8
    max_nodes: int = 0  # 0 = one expansion per iteration

    def __post_init__(self):
        check_choice("mode", self.mode, MODES)
        check_positive("StarSearchConfig", iterations=self.iterations, branch=self.branch, top_n=self.top_n)
        check_nonnegative("StarSearchConfig", rollout_steps=self.rollout_steps)
        StarConfig(self.c, self.unvisited_bonus, self.alpha, self.end_gate)  # validates those fields

    @property
    def star(self) -> StarConfig:
        return StarConfig(self.c, self.unvisited_bonus, self.alpha, self.end_gate)

    @property
    def num_nodes(self) -> int:
        return self.max_nodes or 1 + self.iterations * self.branch


def problem_search(env: StepEnv, problem: Problem, key: jax.Array, cfg: StarSearchConfig, stats: Stats,
                   meta: dict[str, Any] | None = None, checkpoint: BatchCheckpoint | None = None) -> ProblemSearch:
    """ReST-MCTS* for one problem (keys as in `mcts.problem_search`; a generator for `scheduler.run`);
    `checkpoint` saves after each iteration."""
    problems, keys = [problem], [key]
    B, K, T = len(problems), cfg.branch, env.step_len
    tcfg = TreeConfig(max_depth=env.max_depth, invalid_reward=0.0)
    scfg = cfg.star
    gold = cfg.mode != "inference"
    state = checkpoint.load(stats) if checkpoint else None
    if state is None:
        with stats.timed("tree"):
            state = LoopState(0, new_tree(B, cfg.num_nodes, K, T), [[dict(tree_io.ROOT_NODE)] for _ in problems],
                              {"done": np.zeros(B, bool)})
    tree, nodes, done = state.tree, state.nodes, state.flags["done"]
    question_ids = [env.question_ids(p) for p in problems]

    def value(ch: Child) -> float:
        if ch.kind == StepKind.ANSWER_TERMINAL and gold:
            return 1.0 if ch.correct else 0.0
        return env.unit_value(ch.score)

    for it in range(state.done, cfg.iterations):
        stats.rollout = it + 1
        with stats.timed("tree"):
            tree, leaf_B, expandable_B = select_star(tree, scfg)
            active = np.asarray(expandable_B) & ~done
            at_answer = np.asarray(tree.terminal_BxN[jnp.arange(B), leaf_B] == Tree.ANSWER) & ~done
        if not (active | at_answer).any():
            break
        with stats.timed("tree"):
            requests = leaf_requests(tree, tcfg, leaf_B, active, problems, nodes, question_ids,
                                     lambda b: request_key(keys[b], it))
        expanded = yield Expand(requests, K, cfg.temperature, grade=gold, score=True)
        rows = {req.row: children for req, children in zip(requests, expanded)}
        with stats.timed("tree"):
            exp = pack(rows, B, K, T, value, lambda ch: (value(ch), False))
            tree, child_BxK = expand(tree, tcfg, leaf_B, exp, jnp.asarray(active))
            child = np.asarray(child_BxK)
        record_children(nodes, rows, child)

        # end gate and the child to roll forward from, per problem
        roll: list[tuple[Request, int, Child]] = []
        for req in requests:
            b, children = req.row, rows[req.row]
            kept = [(k, ch) for k, ch in enumerate(children[:K]) if child[b, k] >= 0]
            if any(ch.kind == StepKind.ANSWER_TERMINAL and value(ch) >= cfg.end_gate for _, ch in kept):
                done[b] = True
            open_ = [(k, ch) for k, ch in kept if ch.kind != StepKind.INVALID and ch.kind != StepKind.ANSWER_TERMINAL]
            if open_ and not done[b]:
                k, ch = max(open_, key=lambda kc: value(kc[1]))  # first best on ties
                roll.append((req, int(child[b, k]), ch))
        best = yield from roll_forward(env, roll, cfg, value)
        node_B = np.zeros(B, np.int32)
        rolled = np.zeros(B, bool)
        best_B = np.zeros(B, np.float32)
        for (req, node, _), v in zip(roll, best):
            node_B[req.row], rolled[req.row] = node, True
            best_B[req.row] = v
        with stats.timed("tree"):
            cur = tree.values()[jnp.arange(B), jnp.asarray(node_B)]
            best_v = jnp.where(jnp.asarray(np.isnan(best_B)), cur, jnp.asarray(np.nan_to_num(best_B)))
            tree = rollout_update(tree, scfg, jnp.asarray(node_B), best_v, jnp.asarray(rolled))
            tree = backup_star(tree, leaf_B, jnp.asarray(active | at_answer))
            jax.block_until_ready(tree)
        if checkpoint:
            checkpoint.save(LoopState(it + 1, tree, nodes, {"done": done}), stats)

    info = {"problem": {"id": problem.id, "question": problem.question, "answer": problem.answer},
            "method": "mcts-star", "mode": cfg.mode, "config": dataclasses.asdict(cfg),
            "stopped_by_end_gate": bool(done[0])} | (meta or {})
    return tree_result(tree_io.from_device(tree, 0, nodes[0], info), env.grader, cfg.top_n, lambda v: v)


def search(env: StepEnv, problems: Sequence[Problem], keys: Sequence[jax.Array], cfg: StarSearchConfig,
           meta: dict[str, Any] | None = None, checkpoint_of: Callable[[Problem], BatchCheckpoint] | None = None,
           in_flight: int | None = None) -> list[ProblemResult]:
    """ReST-MCTS* for every problem (`problem_search`), `in_flight` at a time (default: all)."""
    return scheduler.search_all(env, [functools.partial(problem_search, env, p, k, cfg, meta=meta,
                                                        checkpoint=checkpoint_of(p) if checkpoint_of else None)
                                      for p, k in zip(problems, keys)], in_flight)



def roll_forward(env: StepEnv, roll: list[tuple[Request, int, Child]], cfg: StarSearchConfig,
                 value) -> Generator[Expand, list[list[Child]], list[float]]:
    """Greedy roll-outs of `cfg.rollout_steps` steps from each chosen child; the max value of each (NaN if none)."""
    best = [float("nan")] * len(roll)
    live = [(i, req.path_texts + (ch.text,), req.prompt_ids + ch.token_ids) for i, (req, _, ch) in enumerate(roll)]
    for step in range(cfg.rollout_steps):
        live = [(i, path, ids) for i, path, ids in live if len(path) < env.max_depth]
        if not live:
            break
        reqs = [Request(roll[i][0].row, roll[i][0].problem, path, ids, request_key(roll[i][0].key, 1 + step))
                for i, path, ids in live]
        out = yield Expand(reqs, 1, 0.0, grade=cfg.mode != "inference", score=True)
        nxt = []
        for (i, path, ids), children in zip(live, out):
            if not children or children[0].kind == StepKind.INVALID:
                continue
            ch = children[0]
            v = value(ch)
            best[i] = v if np.isnan(best[i]) else max(best[i], v)
            if ch.kind != StepKind.ANSWER_TERMINAL:
                nxt.append((i, path + (ch.text,), ids + ch.token_ids))
        live = nxt
    return best
