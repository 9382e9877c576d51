"""Process preference model (PPM) pairs from a saved search tree, as rStar-Math builds them.

Step pairs, as rStar-Math's `search_all_traces` (microsoft/rStar, branch rStar-math, extra_rm_file.py:40-118): at
every node with both outcomes below it (definitions in `trajectories.py`), the candidates for chosen are its
children reaching a correct answer (the child's subtree holds one) and the candidates for rejected its children
reaching a wrong one (its `final_wrong > 0`), so a child with both outcomes below is a candidate on both sides;
invalid children reach neither. chosen = the top 2 by Q of the first, rejected = the bottom 2 by Q of the second;
when one side has a single child, it is paired with up to 4 of the other side (the best 4 correct, or the worst 4
wrong). pos_count / neg_count = how many were chosen on each side, counted before the filters below, so a
pair's training weight 1 / (pos_count * neg_count) is rStar-Math's. Q ties go to node order. Answer
terminals are children like any other.

Answer-step pairs: per problem, the best 2 correct trajectories against the worst 2 wrong ones (ranked as in
`trajectories.py`), whole trajectories against each other, pos_count / neg_count as above (the paper's final-answer
pairs; the reference code builds none).

Filters: a pair is kept when Q(pos) - Q(neg) >= `min_gap` (0.5; mean step Q for trajectories; rStar-Math's
sample_rm_data.py:21 drops a step margin below 0.5), when the chosen continuation's mean Q beats the rejected
one's (rStar-Math's second condition, extra_rm_file.py:92: from the step, follow the highest-Q child that still
reaches a correct answer, or the lowest-Q child that still reaches a wrong one, to a leaf, and average Q over
the step and those nodes, `build_partial_solution`, extra_rm_file.py:120-136; for trajectories, their mean step
Q), and when the two steps (or trajectories) are at least `min_edit` (20) characters apart in Levenshtein distance.

Record layout (the `ppm` format of `train/data.py`): prompt = build_prompt(question), the PPM's prompt at
inference; pos / neg = lists of step texts: the steps from the root up to the node, then the chosen / rejected
step (a whole trajectory for answer-step pairs). Training encodes the prompt and each step separately, exactly as
the scorer (`reward.encode_steps`) does at search time, so the PPM trains on the ids it is later asked about
(joining them into one string would let SmolLM2's BPE merge across boundaries, e.g. "code." + "<code>" -> ".<").
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Any, Sequence

import numpy as np

from rstar_jax.jsonl import InputError
from rstar_jax.labels.trajectories import (Trajectory, best_first, outcomes_below, path_nodes, question_of,
                                           trajectories, worst_first)
from rstar_jax.math.steps import build_prompt
from rstar_jax.search.tree_io import SavedTree

PER_SIDE = 2  # candidates per side at a node
FALLBACK = 4  # the other side's count when one side has a single candidate


@dataclasses.dataclass(frozen=True)
class PairConfig:
    min_gap: float = 0.5  # Q(pos) - Q(neg) at least this
    min_edit: int = 20  # character edit distance at least this
    answer_pairs: bool = True  # also pair whole trajectories (the final-answer step)

    def __post_init__(self):
        if not self.min_gap >= 0 or self.min_edit < 0:
            raise InputError(f"ppm pairs: need min_gap >= 0 and min_edit >= 0, got {self.min_gap}, {self.min_edit}")


def edit_distance(a: str, b: str, cap: int | None = None) -> int:
    """Levenshtein distance in characters; with `cap`, any distance >= cap is returned as cap (early exit).

    Row-by-row DP, each row in numpy: deletions and substitutions elementwise, insertions as a running minimum
    (row[j] = min_k tmp[k] + j - k). A row whose minimum reaches `cap` ends it: the distance is at least the
    minimum of any row.
    """
    lo = 0
    while lo < min(len(a), len(b)) and a[lo] == b[lo]:
        lo += 1
    a, b = a[lo:], b[lo:]  # a common prefix or suffix never changes the distance
    hi = 0
    while hi < min(len(a), len(b)) and a[-1 - hi] == b[-1 - hi]:
        hi += 1
    a, b = a[: len(a) - hi], b[: len(b) - hi]
    if len(a) < len(b):
        a, b = b, a
    limit = cap if cap is not None else len(a)
    if not b or len(a) - len(b) >= limit:
        return min(len(a), limit)
    b_M = np.fromiter(map(ord, b), np.int64, len(b))
    j_M1 = np.arange(len(b) + 1)
    row_M1 = j_M1.copy()
    for i, ch in enumerate(a, 1):
        tmp_M1 = np.empty_like(row_M1)
        tmp_M1[0] = i
        tmp_M1[1:] = np.minimum(row_M1[:-1] + (b_M != ord(ch)), row_M1[1:] + 1)
        row_M1 = np.minimum.accumulate(tmp_M1 - j_M1) + j_M1
        if row_M1.min() >= limit:
            return limit
    return min(int(row_M1[-1]), limit)


def _choose(good: list[int], bad: list[int]) -> tuple[list[int], list[int]]:
    """(chosen, rejected) from candidates already ranked best-first / worst-first (module docstring)."""
    if len(good) == 1:
        return good, bad[:FALLBACK]
    if len(bad) == 1:
        return good[:FALLBACK], bad
    return good[:PER_SIDE], bad[:PER_SIDE]


# a pair side: (node, steps, Q, mean Q of its continuation)
Side = tuple[int, tuple[str, ...], float, float]


def _pairs(chosen: Sequence[Side], rejected: Sequence[Side], base: dict[str, Any], prefix: tuple[str, ...],
           cfg: PairConfig, counts: Counter) -> list[dict[str, Any]]:
    """Records for every (chosen, rejected) combination that passes the filters (a node is never paired with itself;
    the Q gap must also be positive, as rStar-Math's `step_margin > 0`)."""
    out = []
    for pos_node, pos, pos_q, pos_cont in chosen:
        for neg_node, neg, neg_q, neg_cont in rejected:
            if pos_node == neg_node:
                continue
            if not (pos_q > neg_q and pos_q - neg_q >= cfg.min_gap):
                counts["q_gap"] += 1
            elif not pos_cont > neg_cont:
                counts["mean_q"] += 1
            elif edit_distance("".join(pos), "".join(neg), cfg.min_edit) < cfg.min_edit:
                counts["edit_distance"] += 1
            else:
                out.append(base | {"pos": [*prefix, *pos], "neg": [*prefix, *neg], "pos_count": len(chosen),
                                   "neg_count": len(rejected), "pos_node": pos_node, "neg_node": neg_node,
                                   "pos_q": pos_q, "neg_q": neg_q, "pos_mean_q": pos_cont, "neg_mean_q": neg_cont})
    return out


def continuation_mean_q(saved: SavedTree, node: int, toward_N: np.ndarray, best: bool) -> float:
    """Mean Q of `node` and the nodes below it reached by always taking, among the children with `toward_N`, the
    highest-Q one (`best`) or the lowest-Q one (ties to node order), down to a node with no such child."""
    q_N, kids = saved.arrays["value"], saved.children()
    path = [node]
    while nxt := [c for c in kids[path[-1]] if toward_N[c]]:
        path.append(min(nxt, key=lambda c: (-q_N[c] if best else q_N[c], c)))
    return math.fsum(float(q_N[i]) for i in path) / len(path)


def step_pairs(saved: SavedTree, cfg: PairConfig = PairConfig(), counts: Counter | None = None) -> list[dict[str, Any]]:
    """Step-level pairs of one tree, node by node; `counts` collects the pairs each filter dropped."""
    counts = Counter() if counts is None else counts
    has_correct_N, has_wrong_N = outcomes_below(saved)
    q_N = saved.arrays["value"]
    prompt = build_prompt(question_of(saved))
    out = []
    for node, kids in enumerate(saved.children()):
        good = sorted((c for c in kids if has_correct_N[c]), key=lambda c: (-q_N[c], c))
        bad = sorted((c for c in kids if has_wrong_N[c]), key=lambda c: (q_N[c], c))
        if not good or not bad:
            continue
        chosen, rejected = _choose(good, bad)
        prefix = tuple(saved.nodes[i]["text"] for i in path_nodes(saved, node))
        base = {"prompt": prompt, "id": saved.meta["problem"]["id"], "level": "step", "node": node}

        def side(nodes: list[int], toward_N: np.ndarray, best: bool) -> list[Side]:
            return [(c, (saved.nodes[c]["text"],), float(q_N[c]), continuation_mean_q(saved, c, toward_N, best))
                    for c in nodes]

        out += _pairs(side(chosen, has_correct_N, True), side(rejected, has_wrong_N, False), base, prefix, cfg, counts)
    return out


def answer_pairs(saved: SavedTree, cfg: PairConfig = PairConfig(),
                 counts: Counter | None = None) -> list[dict[str, Any]]:
    """Final-answer pairs of one tree: the best 2 correct against the worst 2 wrong whole trajectories."""
    counts = Counter() if counts is None else counts
    trajs = trajectories(saved)
    chosen = best_first([t for t in trajs if t.correct])[:PER_SIDE]
    rejected = worst_first([t for t in trajs if not t.correct])[:PER_SIDE]
    if not chosen or not rejected:
        return []
    base = {"prompt": build_prompt(question_of(saved)), "id": saved.meta["problem"]["id"], "level": "answer",
            "node": 0}

    def side(ts: list[Trajectory]) -> list[Side]:
        return [(t.leaf, t.steps, t.mean_q, t.mean_q) for t in ts]

    return _pairs(side(chosen), side(rejected), base, (), cfg, counts)


def ppm_pairs(saved: SavedTree, cfg: PairConfig = PairConfig(), counts: Counter | None = None) -> list[dict[str, Any]]:
    """All pairs of one tree: step pairs in node order, then (with `cfg.answer_pairs`) the answer-step pairs."""
    counts = Counter() if counts is None else counts
    return step_pairs(saved, cfg, counts) + (answer_pairs(saved, cfg, counts) if cfg.answer_pairs else [])
