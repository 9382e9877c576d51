"""rStar-Math MCTS over code-augmented steps, one tree per problem on device, steps from `StepEnv`.

A rollout is one descent from the root that expands as it goes (rStar-Math's code): `select` from the root
to a childless node, expand it with K candidates, then `select` again from that node (so among its new
children) and expand, until the descent can expand nothing more (every child terminal, the depth limit,
the tree full). Answer terminals are backed up to the root as soon as they are created. An expansion with an
answer among its samples keeps that answer alone (rStar-Math's rule, `StepEnv.expand(one_answer=True)`), so its
node is then exhausted and the descent ends there. Each problem is searched on its own (`problem_search`, a
generator for `scheduler.run`): it submits its next leaf as soon as its last expansion returns, while other
problems' expansions are decoding; its jitted `select` / `gather_path` / `expand` / `backup` run on its own
tree (B = 1).

Modes (what the gold answer and the reward model are used for):
* terminal:  answer terminals get +1 / -1 from the gold answer; new nodes start with no value (rounds 1-2).
* ppm:       as terminal, and every new non-terminal node starts with the PPM's score as one visit
             (rStar's `node.update(value)`; rounds 3-4).
* inference: no gold answer; the PPM scores answer terminals (their backed-up reward) and new nodes.
             Without a reward model every score is 0, so the pick below is a plain majority.
Reward-model scores enter the tree in [-1, 1] (`StepEnv.signed_value`): a PPM's tanh(raw / 5) as it is read
(`models/heads.py`), a value model's or PRM's [0, 1] score as 2 s - 1.

The answer: among the answer terminals, the `top_n` with the highest Q vote, each weighted by (Q + 1) / 2,
over equivalence classes (`answer`); the single highest-Q answer is reported too (`best_answer`).
In terminal and ppm modes Q comes from the gold answer, so that pick is not a fair accuracy: those modes
generate training trees; `solved` (some answer terminal is correct) is what they measure.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rstar_jax.data import Problem
from rstar_jax.math.grading import Grader
from rstar_jax.math.steps import StepKind
from rstar_jax.search import tree_io
from rstar_jax.search.batch_state import BatchCheckpoint, LoopState
from rstar_jax.search import scheduler
from rstar_jax.search.policy import Child, Request, Stats, StepEnv
from rstar_jax.search.scheduler import Expand, ProblemSearch
from rstar_jax.search.tree import Expansion, Tree, TreeConfig, backup, expand, gather_path, new_tree, select

MODES = ("terminal", "ppm", "inference")


class SearchConfigError(ValueError):
    """A bad search setting (the message names it)."""


def check_positive(owner: str, **values: float) -> None:
    for name, v in values.items():
        if not v > 0:
            raise SearchConfigError(f"{owner}.{name}={v!r}: must be > 0")


def check_nonnegative(owner: str, **values: float) -> None:
    for name, v in values.items():
        if v < 0:
            raise SearchConfigError(f"{owner}.{name}={v!r}: must be >= 0")


def check_choice(label: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise SearchConfigError(f"{label} {value!r}: must be one of {', '.join(options)}")


@dataclasses.dataclass(frozen=True)
class MCTSConfig:
    mode: str = "terminal"
    rollouts: int = 16  # descents from the root per problem (rStar-Math: 16; 8 in the bootstrap round)
    candidates: int = 8  # K candidate steps per expansion
    temperature: float = 0.8
    c: float = 2.0  # UCT exploration constant
    unvisited_score: float = 0.0  # UCT score of an unvisited child (rStar's code: 0)
    top_n: int = 8  # answers (by Q) that take part in the weighted vote
    max_nodes: int = 0  # tree capacity; 0 = room for every rollout to expand every level

    def __post_init__(self):
        check_choice("mode", self.mode, MODES)
        check_positive("MCTSConfig", rollouts=self.rollouts, candidates=self.candidates, top_n=self.top_n)
        check_nonnegative("MCTSConfig", temperature=self.temperature)

    def num_nodes(self, max_depth: int) -> int:
        return self.max_nodes or 1 + self.rollouts * max_depth * self.candidates


@dataclasses.dataclass(frozen=True)
class ProblemResult:
    answer: str | None  # the method's pick
    best_answer: str | None  # highest-value answer (MCTS / ReST-MCTS*), else equal to `answer`
    solved: bool | None  # some candidate answer is correct (None when nothing was graded)
    tree: tree_io.SavedTree


def request_key(key: jax.Array, *path: int) -> jax.Array:
    for i in path:
        key = jax.random.fold_in(key, i)
    return key


def tree_kind(child: Child) -> int:
    return {StepKind.ANSWER_TERMINAL: Tree.ANSWER, StepKind.INVALID: Tree.INVALID}.get(child.kind, Tree.NOT_TERMINAL)


def pack(rows: dict[int, list[Child]], B: int, K: int, T: int, reward_of, value_of) -> Expansion:
    """Host children of some rows -> a device Expansion [B, K]; `value_of(child)` is (value, counts as visit)."""
    tokens = np.zeros((B, K, T), np.int32)
    length = np.zeros((B, K), np.int32)
    term = np.zeros((B, K), np.int8)
    reward = np.zeros((B, K), np.float32)
    correct = np.full((B, K), Tree.UNKNOWN, np.int8)
    value = np.zeros((B, K), np.float32)
    visit = np.zeros((B, K), bool)
    valid = np.zeros((B, K), bool)
    for b, children in rows.items():
        for k, ch in enumerate(children[:K]):
            tokens[b, k, : len(ch.token_ids)] = ch.token_ids
            length[b, k] = len(ch.token_ids)
            term[b, k] = tree_kind(ch)
            reward[b, k] = reward_of(ch) if term[b, k] == Tree.ANSWER else 0.0
            correct[b, k] = Tree.UNKNOWN if ch.correct is None else int(ch.correct)
            value[b, k], visit[b, k] = value_of(ch)
            valid[b, k] = True
    return Expansion(*map(jnp.asarray, (tokens, length, term, reward, correct, value, visit, valid)))


def record_children(nodes: list[list[dict]], rows: dict[int, list[Child]], child_BxK: np.ndarray) -> None:
    """Host node records in node-id order (`expand` gives written children consecutive ids)."""
    for b, children in rows.items():
        for k, ch in enumerate(children[: child_BxK.shape[1]]):
            if child_BxK[b, k] >= 0:
                assert child_BxK[b, k] == len(nodes[b]), "host and device node ids diverged"
                nodes[b].append(ch.to_json())


def choose_answer(grader: Grader, answers: Sequence[str], values: Sequence[float], weights: Sequence[float],
                  top_n: int) -> tuple[str | None, str | None]:
    """(weighted vote over the top_n answers by value, highest-value answer); first found wins ties."""
    if not answers:
        return None, None
    order = sorted(range(len(answers)), key=lambda i: -values[i])[:top_n]
    vote = grader.majority_vote([answers[i] for i in order])
    totals: dict[int, float] = {}
    for i, cls in zip(order, vote.class_of):
        if cls >= 0:
            totals[cls] = totals.get(cls, 0.0) + weights[i]
    if not totals:
        return None, answers[order[0]]
    best_cls = max(totals, key=lambda c: (totals[c], -c))
    pick = next(answers[i] for i, cls in zip(order, vote.class_of) if cls == best_cls)
    return pick, answers[order[0]]


def answer_nodes(saved: tree_io.SavedTree) -> list[int]:
    return [i for i, n in enumerate(saved.nodes) if n["kind"] == StepKind.ANSWER_TERMINAL.value]


def tree_result(saved: tree_io.SavedTree, grader: Grader, top_n: int, weight_of) -> ProblemResult:
    """Pick the answer of a saved tree from its answer terminals' values (see the module docstring)."""
    idx = answer_nodes(saved)
    values = [float(saved.arrays["value"][i]) for i in idx]
    answer, best = choose_answer(grader, [saved.nodes[i]["answer"] for i in idx], values,
                                 [weight_of(v) for v in values], top_n)
    graded = [saved.nodes[i]["correct"] for i in idx if saved.nodes[i]["correct"] is not None]
    solved = any(graded) if graded else None
    meta = saved.meta | {"answer": answer, "best_answer": best}
    return ProblemResult(answer, best, solved, dataclasses.replace(saved, meta=meta))


def problem_search(env: StepEnv, problem: Problem, key: jax.Array, cfg: MCTSConfig, stats: Stats,
                   meta: dict[str, Any] | None = None, checkpoint: BatchCheckpoint | None = None) -> ProblemSearch:
    """MCTS for one problem, drawing its candidates with keys derived from `key` (a generator for `scheduler.run`).
    With `checkpoint`, the search continues from its saved state and saves after every expansion (one at the
    default budget is ~10 s of decoding on a 2-core CPU; a rollout is up to 16 of them)."""
    problems, keys = [problem], [key]
    B, K, T = len(problems), cfg.candidates, env.step_len
    tcfg = TreeConfig(c=cfg.c, unvisited_score=cfg.unvisited_score, max_depth=env.max_depth)
    gold = cfg.mode != "inference"
    score_nodes = cfg.mode != "terminal"
    state = checkpoint.load(stats) if checkpoint else None
    if state is None:
        with stats.timed("tree"):
            state = LoopState(0, new_tree(B, cfg.num_nodes(env.max_depth), K, T),
                              [[dict(tree_io.ROOT_NODE)] for _ in problems], {})
    tree, nodes = state.tree, state.nodes
    question_ids = [env.question_ids(p) for p in problems]

    def reward_of(ch: Child) -> float:
        if gold:
            return 1.0 if ch.correct else -1.0
        return env.signed_value(ch.score)

    def value_of(ch: Child) -> tuple[float, bool]:
        if score_nodes and ch.score is not None and ch.kind != StepKind.ANSWER_TERMINAL:
            return env.signed_value(ch.score), True
        return 0.0, False

    for r in range(state.done, cfg.rollouts):
        stats.rollout = r + 1
        cut = r == state.done and state.level > 0  # the rollout a crash cut short goes on from its last leaves
        start_B = jnp.asarray(state.flags["start_B"]) if cut else jnp.zeros((B,), jnp.int32)
        active = np.array(state.flags["active"]) if cut else np.ones(B, bool)
        for level in range(state.level if cut else 0, env.max_depth):
            with stats.timed("tree"):
                tree, leaf_B, expandable_B = select(tree, tcfg, start_B)
                active &= np.asarray(expandable_B)
            if not active.any():
                break
            with stats.timed("tree"):
                requests = leaf_requests(tree, tcfg, leaf_B, active, problems, nodes, question_ids,
                                         lambda b: request_key(keys[b], r, level))
            expanded = yield Expand(requests, K, cfg.temperature, grade=gold, score=score_nodes, one_answer=True)
            rows = {req.row: children for req, children in zip(requests, expanded)}
            with stats.timed("tree"):
                exp = pack(rows, B, K, T, reward_of, value_of)
                tree, child_BxK = expand(tree, tcfg, leaf_B, exp, jnp.asarray(active))
                is_answer = (exp.terminal_BxK == Tree.ANSWER) & (child_BxK >= 0)
                tree = backup(tree, child_BxK, exp.reward_BxK, is_answer)
                child = np.asarray(child_BxK)
            record_children(nodes, rows, child)
            start_B = leaf_B
            if checkpoint:
                checkpoint.save(LoopState(r, tree, nodes, {"start_B": np.asarray(start_B), "active": active},
                                          level + 1), stats)
        if checkpoint:
            checkpoint.save(LoopState(r + 1, tree, nodes, {}), stats)

    info = {"problem": {"id": problem.id, "question": problem.question, "answer": problem.answer}, "method": "mcts",
            "mode": cfg.mode, "config": dataclasses.asdict(cfg)} | (meta or {})
    return tree_result(tree_io.from_device(tree, 0, nodes[0], info), env.grader, cfg.top_n, lambda q: (q + 1.0) / 2.0)


def search(env: StepEnv, problems: Sequence[Problem], keys: Sequence[jax.Array], cfg: MCTSConfig,
           meta: dict[str, Any] | None = None, checkpoint_of: Callable[[Problem], BatchCheckpoint] | None = None,
           in_flight: int | None = None) -> list[ProblemResult]:
    """MCTS for every problem (`problem_search`), `in_flight` of them at a time (default: all); each problem's tree
    is the one it gets searched alone."""
    return scheduler.search_all(env, [functools.partial(problem_search, env, p, k, cfg, meta=meta,
                                                        checkpoint=checkpoint_of(p) if checkpoint_of else None)
                                      for p, k in zip(problems, keys)], in_flight)



def leaf_requests(tree: Tree, tcfg: TreeConfig, leaf_B: jax.Array, active_B: np.ndarray,
                  problems: Sequence[Problem], nodes: list[list[dict]], question_ids: Sequence[tuple[int, ...]],
                  key_of) -> list[Request]:
    """One request per active problem: its leaf's step texts and prompt ids (question + path tokens gathered on
    device); `key_of(b)` is problem b's key for this call."""
    prefix_BxP, length_B = gather_path(tree, tcfg, leaf_B)
    leaf, prefix, length = np.asarray(leaf_B), np.asarray(prefix_BxP), np.asarray(length_B)
    parent_BxN = np.asarray(tree.parent_BxN)
    return [Request(int(b), problems[b], path_texts(nodes[b], parent_BxN[b], int(leaf[b])),
                    question_ids[b] + tuple(prefix[b, : length[b]]), key_of(int(b)))
            for b in np.flatnonzero(active_B)]


def path_texts(nodes: list[dict], parent_N: np.ndarray, node: int) -> tuple[str, ...]:
    texts = []
    while node > Tree.ROOT:
        texts.append(nodes[node]["text"])
        node = int(parent_N[node])
    return tuple(reversed(texts))
