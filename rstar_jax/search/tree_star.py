"""ReST-MCTS* (MCTS*) tree operations on the shared `Tree` arrays: value-guided selection, rollout value update,
visit-weighted backup.

The tree layout, `expand` and `gather_path` are those of `tree.py`; only the statistics differ. Here a node's
value is ReST-MCTS*'s V = `value_sum / max(visits, 1)`: children are expanded with the value model's score
as their value and no visit (`Expansion.value_visit_BxK = False`), so V starts at that score with N = 0.
Choices, following the authors' code (THUDM/ReST-MCTS, MCTS/mcts.py, defaults of MCTS/task.py):

* Selection: score = V + c * sqrt(2 ln N_parent / N) for visited children and V + `unvisited_bonus`
  (their `inf`, 1.0) for unvisited ones; c = 0.7 (their default; the paper uses 0.4-0.7). Ties go to the
  lowest child slot (theirs is random). Answer terminals compete like any child, as in theirs (`getBestChild`
  ranges over every child, mcts.py:224-235): a selection that ends at an answer expands nothing and only backs
  up from it (their `executeRound` skips expansion and simulation at an `<end>` node, mcts.py:140-161), so the
  answer gains a visit and from then on counts in its parent's mean. Invalid children are never selected; a
  node whose children are all invalid becomes EXHAUSTED (`tree.descend`).
* Rollout update (after a short greedy rollout from the best new child): V <- (1 - alpha) V + alpha max V,
  and that child gains one visit (their `roll_node.numVisits += 1`); alpha = 0.5.
* Backup from the expanded (or selected answer) node to the root: each node on the path gains one visit and, if
  it has valid children with visits, takes V = sum(V_c N_c) / sum(N_c) over them (visit-weighted, their
  `back_propagate`, mcts.py:213-221); a node whose children have no visits yet keeps its V. Invalid children
  take no part: theirs never become children (an empty proposal is dropped, mcts.py:36-38), and a broken step
  says nothing about the steps before it (`tree.py`), so it must not drag its parent down.
* Values live in [low, high] = [0, 1] in the authors' code; set `TreeConfig.invalid_reward` to the low end
  (0.0) when invalid terminals should not leave that range.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from rstar_jax.search.tree import Tree, TreeError, descend


@dataclasses.dataclass(frozen=True)
class StarConfig:
    c: float = 0.7  # exploration constant of V + c * sqrt(2 ln N_parent / N)
    unvisited_bonus: float = 1.0  # an unvisited child scores V + this (the authors' `inf`)
    alpha: float = 0.5  # weight of the rollout's best value in V <- (1 - alpha) V + alpha max V
    end_gate: float = 0.9  # the search may stop once a node's V reaches this

    def __post_init__(self):
        if not (self.c >= 0 and math.isfinite(self.c)):
            raise TreeError(f"StarConfig.c={self.c!r}: must be a finite number >= 0")
        if not math.isfinite(self.unvisited_bonus):
            raise TreeError(f"StarConfig.unvisited_bonus={self.unvisited_bonus!r}: must be finite")
        if not 0.0 <= self.alpha <= 1.0:
            raise TreeError(f"StarConfig.alpha={self.alpha!r}: must be in [0, 1]")
        if not math.isfinite(self.end_gate):
            raise TreeError(f"StarConfig.end_gate={self.end_gate!r}: must be finite")


def star_scores(cfg: StarConfig, parent_visits: jax.Array, visits_K: jax.Array, value_sum_K: jax.Array) -> jax.Array:
    """ReST-MCTS* selection score of K children: V + c * sqrt(2 ln N_parent / N); unvisited: V + bonus."""
    n_K = visits_K.astype(jnp.float32)
    n1_K = jnp.maximum(n_K, 1.0)
    v_K = value_sum_K / n1_K
    log_parent = jnp.log(jnp.maximum(parent_visits, 1).astype(jnp.float32))
    return jnp.where(n_K > 0, v_K + cfg.c * jnp.sqrt(2.0 * log_parent / n1_K), v_K + cfg.unvisited_bonus)


@functools.partial(jax.jit, static_argnames=("cfg",))
def select_star(tree: Tree, cfg: StarConfig, start_B: jax.Array | None = None) -> tuple[Tree, jax.Array, jax.Array]:
    """Value-guided selection; same contract as `tree.select`, except that the leaf may be an answer terminal."""
    return descend(tree, start_B, functools.partial(star_scores, cfg), answers_live=True)


def _set_value(visits: jax.Array, v: jax.Array) -> jax.Array:
    """The value sum that makes `value_sum / max(visits, 1)` equal to v."""
    return v * jnp.maximum(visits, 1).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("cfg",))
def rollout_update(tree: Tree, cfg: StarConfig, node_B: jax.Array, best_value_B: jax.Array,
                   active_B: jax.Array) -> Tree:
    """V <- (1 - alpha) V + alpha * best_value at `node_B`, plus one visit (rows with active_B False unchanged)."""
    B = jnp.arange(tree.batch_size)
    node_B = jnp.maximum(node_B, 0)
    v_B = tree.values()[B, node_B]
    new_v_B = (1.0 - cfg.alpha) * v_B + cfg.alpha * best_value_B.astype(jnp.float32)
    visits_B = tree.visits_BxN[B, node_B] + 1
    visits_B = jnp.where(active_B, visits_B, tree.visits_BxN[B, node_B])
    vsum_B = jnp.where(active_B, _set_value(visits_B, new_v_B), tree.value_sum_BxN[B, node_B])
    return tree.replace(visits_BxN=tree.visits_BxN.at[B, node_B].set(visits_B),
                        value_sum_BxN=tree.value_sum_BxN.at[B, node_B].set(vsum_B))


@jax.jit
def backup_star(tree: Tree, node_B: jax.Array, active_B: jax.Array) -> Tree:
    """Visit-weighted backup from `node_B` to the root (see the module docstring)."""
    def one(t: Tree, node, active):
        def body(state):
            cur, visits_N, vsum_N = state
            kids_K = t.children_BxNxK[cur]
            safe_K = jnp.maximum(kids_K, 0)
            valid_K = (kids_K != Tree.UNVISITED) & (t.terminal_BxN[safe_K] != Tree.INVALID)
            n_K = jnp.where(valid_K, visits_N[safe_K], 0).astype(jnp.float32)
            v_K = vsum_N[safe_K] / jnp.maximum(n_K, 1.0)
            total = n_K.sum()
            old_v = vsum_N[cur] / jnp.maximum(visits_N[cur], 1).astype(jnp.float32)
            new_v = jnp.where(total > 0, (v_K * n_K).sum() / jnp.maximum(total, 1.0), old_v)
            new_visits = visits_N[cur] + 1
            visits_N = visits_N.at[cur].set(new_visits)
            vsum_N = vsum_N.at[cur].set(_set_value(new_visits, new_v))
            return t.parent_BxN[cur], visits_N, vsum_N

        start = jnp.where(active, node, Tree.NO_PARENT).astype(jnp.int32)
        _, visits_N, vsum_N = jax.lax.while_loop(
            lambda s: s[0] != Tree.NO_PARENT, body, (start, t.visits_BxN, t.value_sum_BxN))
        return t.replace(visits_BxN=visits_N, value_sum_BxN=vsum_N)

    return jax.vmap(one)(tree, node_B, active_B)
