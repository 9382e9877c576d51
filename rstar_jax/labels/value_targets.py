"""ReST-MCTS* quality values v_k of every trajectory of a saved tree, as value-model training data.

ReST-MCTS* (eq. for the process reward / quality value of a partial solution p_k = [s_1 .. s_k]):
    v_0 = 0,   v_k = max(0, v_{k-1} + (1 - v_{k-1}) * r_k / (m_k + 1))
* m_k, the reasoning distance: steps from node k down to the nearest correct answer terminal in its subtree
  (0 at a correct answer, so v = 1 there). A node with no correct answer below has no such distance; there m_k
  = the steps left to this trajectory's own leaf (our choice for wrong branches: the value then falls the
  faster the closer the wrong answer is, and reaches max(0, 2 v - 1) at it).
* r_k, the step's reward: +1 when node k is on a path to a correct answer (its subtree holds one), else -1.
  The paper writes this factor as (1 - 2 r_{s_k}) with r_{s_k} = 0 for a correct step and 1 for a wrong one;
  here r_k is that factor itself.
So a node's value depends on its ancestors, and on a wrong branch also on which of its leaves the trajectory
ends at: the same node can carry different targets in different records.

Records (the `value` format of `train/data.py`): one per trajectory (definitions in `trajectories.py`),
{prompt: build_prompt(question), steps: node texts, values: v_1 .. v_n}, the prompt and steps the scorer reads.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rstar_jax.labels.trajectories import Trajectory, graded_answers, path_nodes, question_of, trajectories
from rstar_jax.math.steps import build_prompt
from rstar_jax.search.tree import Tree
from rstar_jax.search.tree_io import SavedTree

NO_DISTANCE = -1


def distance_to_correct(saved: SavedTree) -> np.ndarray:
    """[N] int: steps from each node down to its nearest correct answer terminal; NO_DISTANCE where none is below."""
    dist_N = np.full(saved.num_nodes, NO_DISTANCE, np.int64)
    for leaf in graded_answers(saved):
        if saved.arrays["correct"][leaf] != Tree.CORRECT:
            continue
        up = (Tree.ROOT, *path_nodes(saved, leaf))[::-1]  # the leaf, its parent, ..., the root
        for d, node in enumerate(up):
            if dist_N[node] == NO_DISTANCE or d < dist_N[node]:
                dist_N[node] = d
    return dist_N


def quality_values(traj: Trajectory, dist_N: np.ndarray) -> list[float]:
    """v_1 .. v_n of one trajectory (module docstring)."""
    v, out = 0.0, []
    for k, node in enumerate(traj.nodes):
        if dist_N[node] != NO_DISTANCE:
            r, m = 1.0, int(dist_N[node])
        else:
            r, m = -1.0, len(traj.nodes) - 1 - k
        v = max(0.0, v + (1.0 - v) * r / (m + 1))
        out.append(v)
    return out


def value_records(saved: SavedTree) -> list[dict[str, Any]]:
    """One value record per trajectory, in node order of the leaves."""
    dist_N = distance_to_correct(saved)
    prompt = build_prompt(question_of(saved))
    return [{"prompt": prompt, "steps": list(t.steps), "values": quality_values(t, dist_N),
             "id": saved.meta["problem"]["id"], "leaf": t.leaf, "correct": t.correct} for t in trajectories(saved)]
