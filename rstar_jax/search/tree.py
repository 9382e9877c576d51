"""Batched search trees as fixed-shape arrays, and the pure jitted tree operations of rStar-Math's MCTS.

B trees (one per problem) of up to N nodes, each node with up to K children and a step of up to T tokens,
live on device as one `Tree` of preallocated arrays (struct-of-arrays, the style of google-deepmind/mctx).
Node 0 is the root (the question; its token slots are unused). Nodes are allocated in order: an expansion
writes its valid children at `num_nodes_B, num_nodes_B + 1, ...`, compacted into child slots 0, 1, ...

One MCTS iteration, as the driver (`mcts.py`) runs it:

    tree, leaf_B, expandable_B = select(tree, cfg)          # or from the node a rollout stopped at
    prefix_BxP, length_B = gather_path(tree, cfg, leaf_B)   # step tokens root -> leaf, on device
    ... policy samples K steps per leaf; the host parses, runs and grades them; the PPM scores them ...
    tree, child_BxK = expand(tree, cfg, leaf_B, expansion, expandable_B)
    tree = backup(tree, child_BxK, reward_BxK, is_answer_BxK)   # answer terminals, up to the root

Choices, following rStar-Math's code (rstar_deepthink/agents/mcts.py and nodes/mcts_node.py):

* Statistics. A node has a visit count and a value sum; its value is `value_sum / max(visits, 1)`. An
  expansion value given without a visit is a prior (ReST-MCTS*'s V): it is the node's value until the node's
  first backup, which replaces it.
  `visits` counts every value update the node received: its own initial value (if the expansion gave one)
  plus one per backup that passed through it. A child's initial value is NOT propagated to its ancestors
  (rStar's `node.update(v)` for a new node vs `node.update_recursive(v, root)` for an answer), so the
  invariant checked by the tests is
      visits[n] = initial[n] + backups_starting_at[n] + sum over children c of (visits[c] - initial[c]).
  `first_value` is the first value a node received (rStar's `node.value`): its initial value, or else the
  value of the first backup that reached it.
* Selection (UCT). score(child) = Q + c * sqrt(ln N_parent / N) with c = 2 (`TreeConfig.c`), where
  ln N_parent is taken as 0 while N_parent <= 1 (rStar: no exploration term until the parent has visits).
  An unvisited child (N = 0) scores `TreeConfig.unvisited_score`: 0.0 as in rStar's code (its Q and its
  bonus are both 0, so it loses to any child with positive Q), or +inf for classic "try every child once"
  UCT. Ties go to the lowest child slot (rStar takes the first best child). Terminal children are skipped.
* Exhausted nodes. A node whose children are all terminal becomes terminal (kind EXHAUSTED), as in rStar.
  rStar then ends the rollout; here selection instead backs up to the parent and chooses again, so a
  selection only comes back without an expandable leaf when the whole subtree under its start node is
  exhausted (or the tree has no free node left). This wastes no batched policy call.
* Depth. The root has depth 0 and a solution has at most `max_depth` steps: a non-terminal child created at
  depth `max_depth` becomes an INVALID terminal (rStar's TOO_MANY_STEPS; rStar allows one more level).
* Invalid terminals (program error, unparseable step, too many steps) get `invalid_reward` (-1) as their
  own initial value with one visit and are never backed up to their ancestors (rStar's
  `node.update(negative_reward)`): a broken step says nothing about the quality of the steps before it.
  Answer terminals are backed up to the root by the driver (+-1 from the gold answer, or the PPM score in
  inference mode), which is what `backup` does. An expansion that leaves no valid child (all candidates
  pruned or deduplicated) marks its leaf EXHAUSTED, so it is not selected again.

Every function here is pure: it takes a tree and returns a new one; `cfg` is a static (hashable) argument.
The per-problem helpers are written for one tree and vmapped; inside them a Tree's fields lack the B axis.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, ClassVar

import flax.struct
import jax
import jax.numpy as jnp


class TreeError(ValueError):
    """Bad tree shapes or config (the message names the input)."""


@dataclasses.dataclass(frozen=True)
class TreeConfig:
    c: float = 2.0  # UCT exploration constant (rStar-Math: 2)
    unvisited_score: float = 0.0  # UCT score of a child with no visits (rStar's code: 0; classic UCT: inf)
    max_depth: int = 16  # most steps in a solution; the path buffer holds max_depth * T tokens
    invalid_reward: float = -1.0  # reward and own value of an invalid terminal (rStar's negative_reward)

    def __post_init__(self):
        if not (self.c >= 0 and math.isfinite(self.c)):
            raise TreeError(f"TreeConfig.c={self.c!r}: must be a finite number >= 0")
        if math.isnan(self.unvisited_score) or self.unvisited_score == -math.inf:
            raise TreeError(f"TreeConfig.unvisited_score={self.unvisited_score!r}: must be a number > -inf")
        if not (isinstance(self.max_depth, int) and self.max_depth >= 1):
            raise TreeError(f"TreeConfig.max_depth={self.max_depth!r}: must be an integer >= 1")
        if not math.isfinite(self.invalid_reward):
            raise TreeError(f"TreeConfig.invalid_reward={self.invalid_reward!r}: must be finite")


@flax.struct.dataclass
class Tree:
    visits_BxN: jax.Array  # [B, N] int32 value updates received (initial value + backups through it)
    value_sum_BxN: jax.Array  # [B, N] float32 sum of those values; value = value_sum / max(visits, 1)
    first_value_BxN: jax.Array  # [B, N] float32 first value received (rStar's node.value)
    parent_BxN: jax.Array  # [B, N] int32 parent node, NO_PARENT for the root and free nodes
    slot_BxN: jax.Array  # [B, N] int32 child slot in the parent, NO_PARENT for the root and free nodes
    children_BxNxK: jax.Array  # [B, N, K] int32 child node per slot, UNVISITED where empty
    depth_BxN: jax.Array  # [B, N] int32 steps from the root
    terminal_BxN: jax.Array  # [B, N] int8 NOT_TERMINAL | ANSWER | INVALID | EXHAUSTED
    reward_BxN: jax.Array  # [B, N] float32 terminal reward (+-1 from gold, PPM score, invalid_reward)
    correct_BxN: jax.Array  # [B, N] int8 UNKNOWN | WRONG | CORRECT (answer terminals graded on the host)
    tokens_BxNxT: jax.Array  # [B, N, T] int32 the node's step tokens, right-padded
    token_len_BxN: jax.Array  # [B, N] int32 number of valid step tokens
    num_nodes_B: jax.Array  # [B] int32 nodes in use (the next free index)

    ROOT: ClassVar[int] = 0
    NO_PARENT: ClassVar[int] = -1
    UNVISITED: ClassVar[int] = -1
    NOT_TERMINAL: ClassVar[int] = 0
    ANSWER: ClassVar[int] = 1
    INVALID: ClassVar[int] = 2
    EXHAUSTED: ClassVar[int] = 3
    UNKNOWN: ClassVar[int] = -1
    WRONG: ClassVar[int] = 0
    CORRECT: ClassVar[int] = 1

    @property
    def batch_size(self) -> int:
        return self.visits_BxN.shape[0]

    @property
    def capacity(self) -> int:
        return self.visits_BxN.shape[1]

    @property
    def num_children(self) -> int:
        return self.children_BxNxK.shape[2]

    @property
    def step_len(self) -> int:
        return self.tokens_BxNxT.shape[2]

    def values(self) -> jax.Array:
        """[B, N] node values: rStar's Q (mean of received values), ReST-MCTS*'s V."""
        return self.value_sum_BxN / jnp.maximum(self.visits_BxN, 1).astype(self.value_sum_BxN.dtype)


@flax.struct.dataclass
class Expansion:
    """K candidate children per problem, as the host classified and scored them."""

    tokens_BxKxT: jax.Array  # [B, K, T] int32 step tokens, right-padded
    token_len_BxK: jax.Array  # [B, K] int32
    terminal_BxK: jax.Array  # [B, K] int8 NOT_TERMINAL | ANSWER | INVALID
    reward_BxK: jax.Array  # [B, K] float32 terminal reward (ignored for INVALID: invalid_reward is used)
    correct_BxK: jax.Array  # [B, K] int8 UNKNOWN | WRONG | CORRECT
    value_BxK: jax.Array  # [B, K] float32 initial value (PPM / value-model score, or 0)
    value_visit_BxK: jax.Array  # [B, K] bool count the initial value as a visit (rStar's node.update)
    valid_BxK: jax.Array  # [B, K] bool False for pruned or duplicate candidates


def new_tree(batch_size: int, num_nodes: int, num_children: int, step_len: int) -> Tree:
    """An empty tree per problem: only the root, unvisited."""
    for name, v, lo in (("batch_size", batch_size, 1), ("num_nodes", num_nodes, 2),
                        ("num_children", num_children, 1), ("step_len", step_len, 1)):
        if not (isinstance(v, int) and v >= lo):
            raise TreeError(f"new_tree: {name}={v!r} must be an integer >= {lo}")
    B, N, K, T = batch_size, num_nodes, num_children, step_len
    return Tree(
        visits_BxN=jnp.zeros((B, N), jnp.int32),
        value_sum_BxN=jnp.zeros((B, N), jnp.float32),
        first_value_BxN=jnp.zeros((B, N), jnp.float32),
        parent_BxN=jnp.full((B, N), Tree.NO_PARENT, jnp.int32),
        slot_BxN=jnp.full((B, N), Tree.NO_PARENT, jnp.int32),
        children_BxNxK=jnp.full((B, N, K), Tree.UNVISITED, jnp.int32),
        depth_BxN=jnp.zeros((B, N), jnp.int32),
        terminal_BxN=jnp.zeros((B, N), jnp.int8),
        reward_BxN=jnp.zeros((B, N), jnp.float32),
        correct_BxN=jnp.full((B, N), Tree.UNKNOWN, jnp.int8),
        tokens_BxNxT=jnp.zeros((B, N, T), jnp.int32),
        token_len_BxN=jnp.zeros((B, N), jnp.int32),
        num_nodes_B=jnp.ones((B,), jnp.int32),
    )


def uct_scores(cfg: TreeConfig, parent_visits: jax.Array, visits_K: jax.Array, value_sum_K: jax.Array) -> jax.Array:
    """rStar-Math's UCT of K children: Q + c * sqrt(ln N_parent / N); unvisited -> cfg.unvisited_score."""
    n_K = visits_K.astype(jnp.float32)
    n1_K = jnp.maximum(n_K, 1.0)
    log_parent = jnp.log(jnp.maximum(parent_visits, 1).astype(jnp.float32))
    score_K = value_sum_K / n1_K + cfg.c * jnp.sqrt(log_parent / n1_K)
    return jnp.where(n_K > 0, score_K, cfg.unvisited_score)


# A score function maps (parent visits [], child visits [K], child value sums [K]) to child scores [K].
ScoreFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def descend(tree: Tree, start_B: jax.Array | None, score_fn: ScoreFn,
            answers_live: bool = False) -> tuple[Tree, jax.Array, jax.Array]:
    """Walk down from `start_B` (default: the root) by the best-scoring non-terminal child to a childless node.

    Returns (tree with newly EXHAUSTED nodes marked, leaf_B, expandable_B). `expandable_B` is False when the
    subtree under the start node is exhausted or the tree has no free node. Used by `select` and by
    ReST-MCTS*'s `select_star` with their own score functions. With `answers_live` (ReST-MCTS*) answer terminals
    compete like open children, so the walk may end at one (a leaf, not expandable).
    """
    N = tree.capacity
    if start_B is None:
        start_B = jnp.full((tree.batch_size,), Tree.ROOT, jnp.int32)

    def one(t: Tree, start: jax.Array):
        def body(state):
            node, term_N, _, _ = state
            kids_K = t.children_BxNxK[node]
            safe_K = jnp.maximum(kids_K, 0)
            has_kids = kids_K[0] != Tree.UNVISITED
            open_K = (term_N[safe_K] == Tree.NOT_TERMINAL) | (answers_live & (term_N[safe_K] == Tree.ANSWER))
            live_K = (kids_K != Tree.UNVISITED) & open_K
            score_K = score_fn(t.visits_BxN[node], t.visits_BxN[safe_K], t.value_sum_BxN[safe_K])
            best = kids_K[jnp.argmax(jnp.where(live_K, score_K, -jnp.inf))]
            any_live = live_K.any()
            dead_end = has_kids & ~any_live
            term_N = term_N.at[node].set(jnp.where(dead_end, jnp.int8(Tree.EXHAUSTED), term_N[node]))
            at_start = node == start
            done = ~has_kids | (dead_end & at_start)
            expandable = ~has_kids & (term_N[node] == Tree.NOT_TERMINAL)
            nxt = jnp.where(any_live, best, jnp.where(dead_end & ~at_start, t.parent_BxN[node], node))
            return nxt, term_N, done, expandable

        init = (start.astype(jnp.int32), t.terminal_BxN, jnp.array(False), jnp.array(False))
        leaf, term_N, _, expandable = jax.lax.while_loop(lambda s: ~s[2], body, init)
        return term_N, leaf, expandable & (t.num_nodes_B < N)

    term_BxN, leaf_B, expandable_B = jax.vmap(one)(tree, start_B)
    return tree.replace(terminal_BxN=term_BxN), leaf_B, expandable_B


@functools.partial(jax.jit, static_argnames=("cfg",))
def select(tree: Tree, cfg: TreeConfig, start_B: jax.Array | None = None) -> tuple[Tree, jax.Array, jax.Array]:
    """rStar-Math UCT selection from the root (or from `start_B` to continue a rollout)."""
    return descend(tree, start_B, functools.partial(uct_scores, cfg))


@functools.partial(jax.jit, static_argnames=("cfg",))
def expand(tree: Tree, cfg: TreeConfig, leaf_B: jax.Array, exp: Expansion,
           active_B: jax.Array | None = None) -> tuple[Tree, jax.Array]:
    """Write the valid candidates of `exp` as children of `leaf_B`; returns (tree, child_BxK).

    `child_BxK[b, k]` is the node index of candidate k, UNVISITED where it was invalid or did not fit.
    Rows with `active_B` False, or whose leaf already has children or is terminal, are left unchanged.
    """
    B, N, K, T = tree.batch_size, tree.capacity, tree.num_children, tree.step_len
    expected = {"tokens_BxKxT": (B, K, T)} | {f.name: (B, K) for f in dataclasses.fields(Expansion)[1:]}
    for name, shape in expected.items():
        if getattr(exp, name).shape != shape:
            raise TreeError(f"expand: Expansion.{name} has shape {getattr(exp, name).shape}, expected {shape}")
    if active_B is None:
        active_B = jnp.ones((B,), bool)

    def one(t: Tree, leaf, active, e: Expansion):
        ok = active & (t.children_BxNxK[leaf, 0] == Tree.UNVISITED) & (t.terminal_BxN[leaf] == Tree.NOT_TERMINAL)
        valid_K = e.valid_BxK & ok
        rank_K = jnp.cumsum(valid_K) - 1
        node_K = t.num_nodes_B + rank_K
        written_K = valid_K & (node_K < N)
        dest_K = jnp.where(written_K, node_K, N)  # N is out of bounds: the scatter drops it
        child_K = jnp.where(written_K, node_K, Tree.UNVISITED)
        n_written = written_K.sum(dtype=jnp.int32)

        depth = t.depth_BxN[leaf] + 1
        term_K = e.terminal_BxK.astype(jnp.int8)
        term_K = jnp.where((term_K == Tree.NOT_TERMINAL) & (depth >= cfg.max_depth), jnp.int8(Tree.INVALID), term_K)
        invalid_K = term_K == Tree.INVALID
        value_K = jnp.where(invalid_K, cfg.invalid_reward, e.value_BxK).astype(jnp.float32)
        visit_K = (e.value_visit_BxK | invalid_K).astype(jnp.int32)
        reward_K = jnp.where(invalid_K, cfg.invalid_reward, e.reward_BxK).astype(jnp.float32)

        def put(x, v):
            return x.at[dest_K].set(v, mode="drop")

        row_K = jnp.full((K,), Tree.UNVISITED, jnp.int32).at[jnp.where(written_K, rank_K, K)].set(node_K, mode="drop")
        term_N = put(t.terminal_BxN, term_K)
        term_N = term_N.at[leaf].set(jnp.where(ok & (n_written == 0), jnp.int8(Tree.EXHAUSTED), term_N[leaf]))
        new = t.replace(
            visits_BxN=put(t.visits_BxN, visit_K),
            value_sum_BxN=put(t.value_sum_BxN, value_K),
            first_value_BxN=put(t.first_value_BxN, value_K),
            parent_BxN=put(t.parent_BxN, jnp.full((K,), leaf, jnp.int32)),
            slot_BxN=put(t.slot_BxN, rank_K.astype(jnp.int32)),
            children_BxNxK=t.children_BxNxK.at[leaf].set(jnp.where(ok, row_K, t.children_BxNxK[leaf])),
            depth_BxN=put(t.depth_BxN, jnp.full((K,), depth, jnp.int32)),
            terminal_BxN=term_N,
            reward_BxN=put(t.reward_BxN, reward_K),
            correct_BxN=put(t.correct_BxN, e.correct_BxK.astype(jnp.int8)),
            tokens_BxNxT=put(t.tokens_BxNxT, e.tokens_BxKxT.astype(jnp.int32)),
            token_len_BxN=put(t.token_len_BxN, jnp.minimum(e.token_len_BxK, T).astype(jnp.int32)),
            num_nodes_B=t.num_nodes_B + n_written,
        )
        return new, child_K

    return jax.vmap(one)(tree, leaf_B.astype(jnp.int32), active_B, exp)


@jax.jit
def backup(tree: Tree, node_BxM: jax.Array, value_BxM: jax.Array, mask_BxM: jax.Array) -> Tree:
    """Add each masked value to its node and every ancestor up to the root (one visit each): running means.

    M nodes per problem are backed up at once (e.g. M = K children of one expansion). A node that had no
    visits drops its prior value (the expansion's value given without a visit) and takes the mean of the
    values it receives here as its `first_value`.
    """
    N = tree.capacity

    def one(t: Tree, node_M, value_M, mask_M):
        value_M = value_M.astype(jnp.float32)

        def body(state):
            cur_M, visits_N, vsum_N = state
            alive_M = cur_M != Tree.NO_PARENT
            idx_M = jnp.where(alive_M, cur_M, N)
            visits_N = visits_N.at[idx_M].add(1, mode="drop")
            vsum_N = vsum_N.at[idx_M].add(value_M, mode="drop")
            cur_M = jnp.where(alive_M, t.parent_BxN[jnp.maximum(cur_M, 0)], Tree.NO_PARENT)
            return cur_M, visits_N, vsum_N

        start_M = jnp.where(mask_M & (node_M >= 0), node_M, Tree.NO_PARENT).astype(jnp.int32)
        unvisited_N = t.visits_BxN == 0
        _, visits_N, vsum_N = jax.lax.while_loop(  # a first visit replaces an unvisited node's prior value
            lambda s: (s[0] != Tree.NO_PARENT).any(), body,
            (start_M, t.visits_BxN, jnp.where(unvisited_N, 0.0, t.value_sum_BxN)))
        first_N = (visits_N > 0) & unvisited_N
        first_value_N = jnp.where(first_N, vsum_N / jnp.maximum(visits_N, 1), t.first_value_BxN)
        vsum_N = jnp.where(unvisited_N & ~first_N, t.value_sum_BxN, vsum_N)
        return t.replace(visits_BxN=visits_N, value_sum_BxN=vsum_N, first_value_BxN=first_value_N)

    return jax.vmap(one)(tree, node_BxM, value_BxM, mask_BxM)


@functools.partial(jax.jit, static_argnames=("cfg",))
def path_nodes(tree: Tree, cfg: TreeConfig, node_B: jax.Array) -> jax.Array:
    """[B, max_depth] the nodes from depth 1 down to `node_B` (root excluded), UNVISITED past its depth."""
    D = cfg.max_depth

    def one(t: Tree, node):
        def body(_, state):
            cur, path_D = state
            d = t.depth_BxN[cur]
            path_D = path_D.at[jnp.where(cur > Tree.ROOT, d - 1, D)].set(cur, mode="drop")
            return jnp.where(cur > Tree.ROOT, t.parent_BxN[cur], Tree.ROOT), path_D

        _, path_D = jax.lax.fori_loop(0, D, body, (node.astype(jnp.int32), jnp.full((D,), Tree.UNVISITED, jnp.int32)))
        return path_D

    return jax.vmap(one)(tree, node_B)


@functools.partial(jax.jit, static_argnames=("cfg", "pad_id"))
def gather_path(tree: Tree, cfg: TreeConfig, node_B: jax.Array, pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
    """The step tokens from the root to `node_B`, concatenated: (prefix_BxP right-padded with pad_id, length_B).

    P = cfg.max_depth * T. Built on device from the per-node step-token buffer.
    """
    T = tree.step_len
    P = cfg.max_depth * T
    path_BxD = path_nodes(tree, cfg, node_B)

    def one(t: Tree, path_D):
        on_D = path_D != Tree.UNVISITED
        safe_D = jnp.maximum(path_D, 0)
        len_D = jnp.where(on_D, t.token_len_BxN[safe_D], 0)
        offset_D = jnp.cumsum(len_D) - len_D
        dest_DxT = offset_D[:, None] + jnp.arange(T)[None, :]
        dest_DxT = jnp.where(jnp.arange(T)[None, :] < len_D[:, None], dest_DxT, P)
        prefix_P = jnp.full((P,), pad_id, jnp.int32).at[dest_DxT.ravel()].set(
            t.tokens_BxNxT[safe_D].ravel(), mode="drop")
        return prefix_P, len_D.sum(dtype=jnp.int32)

    return jax.vmap(one)(tree, path_BxD)
