"""Tree arrays and rStar-Math select / expand / backup / path gathering: hand-computed trees, invariants,
batch independence, jit vs no-jit, and a toy environment with a known best path."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rstar_jax.search.tree import (Expansion, Tree, TreeConfig, TreeError, backup, expand, gather_path,
                                   new_tree, path_nodes, select, uct_scores)

NT, ANS, INV, EXH = Tree.NOT_TERMINAL, Tree.ANSWER, Tree.INVALID, Tree.EXHAUSTED


def make_exp(B, K, T, *, tokens=None, lens=None, terminal=None, reward=None, correct=None, value=None,
             value_visit=None, valid=None):
    return Expansion(
        tokens_BxKxT=jnp.asarray(np.zeros((B, K, T)) if tokens is None else tokens, jnp.int32),
        token_len_BxK=jnp.asarray(np.zeros((B, K)) if lens is None else lens, jnp.int32).reshape(B, K),
        terminal_BxK=jnp.asarray(np.zeros((B, K)) if terminal is None else terminal, jnp.int8).reshape(B, K),
        reward_BxK=jnp.asarray(np.zeros((B, K)) if reward is None else reward, jnp.float32).reshape(B, K),
        correct_BxK=jnp.asarray(np.full((B, K), -1) if correct is None else correct, jnp.int8).reshape(B, K),
        value_BxK=jnp.asarray(np.zeros((B, K)) if value is None else value, jnp.float32).reshape(B, K),
        value_visit_BxK=jnp.asarray(np.zeros((B, K)) if value_visit is None else value_visit, bool).reshape(B, K),
        valid_BxK=jnp.asarray(np.ones((B, K)) if valid is None else valid, bool).reshape(B, K),
    )


def one(x):
    return jnp.asarray([x], jnp.int32)


# ---------------------------------------------------------------- hand-computed trees


def test_select_uct_hand_computed():
    cfg = TreeConfig()
    t = new_tree(1, 8, 3, 2)
    t, child = expand(t, cfg, one(0), make_exp(1, 3, 2))
    assert child.tolist() == [[1, 2, 3]]
    # child 1 gets values 0.3 and 0.7, child 2 gets 0.8; child 3 stays unvisited: root has 3 visits.
    t = backup(t, jnp.array([[1, 2]]), jnp.array([[0.3, 0.8]]), jnp.ones((1, 2), bool))
    t = backup(t, jnp.array([[1]]), jnp.array([[0.7]]), jnp.ones((1, 1), bool))
    assert t.visits_BxN[0, :4].tolist() == [3, 2, 1, 0]
    want = [0.5 + 2 * math.sqrt(math.log(3) / 2), 0.8 + 2 * math.sqrt(math.log(3) / 1), 0.0]
    got = uct_scores(cfg, t.visits_BxN[0, 0], t.visits_BxN[0, 1:4], t.value_sum_BxN[0, 1:4])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    _, leaf, ok = select(t, cfg)
    assert leaf.tolist() == [2] and ok.tolist() == [True]
    # classic UCT tries the unvisited child first
    _, leaf, _ = select(t, TreeConfig(unvisited_score=math.inf))
    assert leaf.tolist() == [3]
    # a terminal child is skipped: make node 2 an answer terminal -> node 1 (1.98) beats node 3 (0.0)
    t2 = t.replace(terminal_BxN=t.terminal_BxN.at[0, 2].set(ANS))
    _, leaf, _ = select(t2, cfg)
    assert leaf.tolist() == [1]


def test_select_ties_take_first_slot_and_parent_visits_below_two_give_no_bonus():
    cfg = TreeConfig()
    t = new_tree(1, 8, 3, 1)
    t, _ = expand(t, cfg, one(0), make_exp(1, 3, 1, value=[0.2, 0.5, 0.5], value_visit=[1, 1, 1]))
    # root has 0 visits: scores are the plain Q values; the tie between slots 1 and 2 goes to slot 1
    np.testing.assert_allclose(
        np.asarray(uct_scores(cfg, t.visits_BxN[0, 0], t.visits_BxN[0, 1:4], t.value_sum_BxN[0, 1:4])), [0.2, 0.5, 0.5])
    _, leaf, _ = select(t, cfg)
    assert leaf.tolist() == [2]


def test_all_terminal_children_exhaust_parent_and_selection_backtracks():
    cfg = TreeConfig()
    t = new_tree(1, 16, 2, 1)
    t, (a_b,) = expand(t, cfg, one(0), make_exp(1, 2, 1, value=[0.9, 0.1], value_visit=[1, 1]))
    a, b = a_b.tolist()
    # A (higher Q) gets two children, both terminal (a wrong answer and an invalid step)
    t, _ = expand(t, cfg, one(a), make_exp(1, 2, 1, terminal=[ANS, INV], reward=[-1.0, 0.0], correct=[0, -1]))
    t, leaf, ok = select(t, cfg)
    assert leaf.tolist() == [b] and ok.tolist() == [True]
    assert int(t.terminal_BxN[0, a]) == EXH
    # B's children all terminal as well: the root becomes exhausted and nothing is expandable
    t, _ = expand(t, cfg, one(b), make_exp(1, 2, 1, terminal=[ANS, ANS], reward=[1.0, -1.0], correct=[1, 0]))
    t, leaf, ok = select(t, cfg)
    assert leaf.tolist() == [0] and ok.tolist() == [False]
    assert int(t.terminal_BxN[0, 0]) == EXH and int(t.terminal_BxN[0, b]) == EXH


def test_select_from_start_node_continues_a_rollout():
    cfg = TreeConfig()
    t = new_tree(1, 16, 2, 1)
    t, _ = expand(t, cfg, one(0), make_exp(1, 2, 1, value=[0.9, 0.1], value_visit=[1, 1]))
    t, _ = expand(t, cfg, one(2), make_exp(1, 2, 1, value=[0.0, 0.3], value_visit=[1, 1]))
    _, leaf, _ = select(t, cfg)
    assert leaf.tolist() == [1]  # from the root: the better child, a leaf
    _, leaf, _ = select(t, cfg, one(2))
    assert leaf.tolist() == [4]  # from node 2: its better child


def test_expand_hand_computed():
    cfg = TreeConfig(max_depth=2)
    K, T = 3, 4
    t = new_tree(2, 6, K, T)
    tokens = np.arange(2 * K * T).reshape(2, K, T) + 1
    exp = make_exp(2, K, T, tokens=tokens, lens=[[2, 4, 9], [1, 1, 1]], terminal=[[NT, ANS, INV], [NT, NT, NT]],
                   reward=[[0.0, 1.0, 0.5], [0, 0, 0]], correct=[[-1, 1, -1], [-1, -1, -1]],
                   value=[[0.25, 0.0, 0.7], [0.1, 0.2, 0.3]], value_visit=[[1, 0, 0], [0, 0, 0]],
                   valid=[[1, 1, 1], [1, 0, 1]])
    t, child = expand(t, cfg, jnp.array([0, 0]), exp)
    assert child.tolist() == [[1, 2, 3], [1, -1, 2]]
    assert t.num_nodes_B.tolist() == [4, 3]
    assert t.children_BxNxK[:, 0].tolist() == [[1, 2, 3], [1, 2, -1]]
    assert t.parent_BxN[:, :4].tolist() == [[-1, 0, 0, 0], [-1, 0, 0, -1]]
    assert t.slot_BxN[:, :4].tolist() == [[-1, 0, 1, 2], [-1, 0, 1, -1]]
    assert t.depth_BxN[:, :4].tolist() == [[0, 1, 1, 1], [0, 1, 1, 0]]
    assert t.terminal_BxN[0, :4].tolist() == [NT, NT, ANS, INV]
    # the invalid terminal gets invalid_reward as reward and as its own value, with one visit
    assert t.visits_BxN[0, :4].tolist() == [0, 1, 0, 1]
    np.testing.assert_allclose(np.asarray(t.values()[0, :4]), [0.0, 0.25, 0.0, -1.0])
    np.testing.assert_allclose(np.asarray(t.reward_BxN[0, :4]), [0.0, 0.0, 1.0, -1.0])
    np.testing.assert_allclose(np.asarray(t.first_value_BxN[0, :4]), [0.0, 0.25, 0.0, -1.0])
    assert t.correct_BxN[0, :4].tolist() == [-1, -1, 1, -1]
    assert t.token_len_BxN[0, :4].tolist() == [0, 2, 4, 4]  # 9 clipped to T
    assert t.tokens_BxNxT[1, 2].tolist() == tokens[1, 2].tolist()  # candidate 2 of row 1 went to node 2
    # depth 2 == max_depth: non-terminal children there become invalid (too many steps)
    t, child = expand(t, cfg, jnp.array([1, 1]), make_exp(2, K, T, value=[[0.5] * 3, [0.5] * 3],
                                                         terminal=[[ANS, NT, NT], [NT, NT, NT]],
                                                         valid=[[1, 1, 1], [0, 0, 0]]))
    # row 0 has room for 2 of 3 children (capacity 6): the third is dropped; row 1 had no valid candidate
    assert child.tolist() == [[4, 5, -1], [-1, -1, -1]]
    assert t.terminal_BxN[0, 4:6].tolist() == [ANS, INV]
    assert t.depth_BxN[0, 4:6].tolist() == [2, 2]
    assert int(t.terminal_BxN[1, 1]) == EXH  # an expansion with no valid child exhausts the leaf
    # a leaf that already has children, or an inactive row, is left unchanged
    before = t
    t, child = expand(t, cfg, jnp.array([0, 2]), make_exp(2, K, T), active_B=jnp.array([True, False]))
    assert child.tolist() == [[-1] * 3] * 2
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(t)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_expand_rejects_wrong_shapes():
    t = new_tree(2, 8, 3, 4)
    with pytest.raises(TreeError, match=r"Expansion.tokens_BxKxT has shape \(2, 3, 5\)"):
        expand(t, TreeConfig(), jnp.zeros(2, jnp.int32), make_exp(2, 3, 5))
    with pytest.raises(TreeError, match="TreeConfig.max_depth=0"):
        TreeConfig(max_depth=0)
    with pytest.raises(TreeError, match="num_children=0"):
        new_tree(1, 8, 0, 4)


def test_backup_hand_computed():
    cfg = TreeConfig()
    t = new_tree(1, 16, 2, 1)
    t, _ = expand(t, cfg, one(0), make_exp(1, 2, 1, value=[0.5, 0.0], value_visit=[1, 0]))  # 1, 2
    t, _ = expand(t, cfg, one(1), make_exp(1, 2, 1, terminal=[ANS, ANS]))  # 3, 4
    # both answers of node 1 backed up at once (+1 and -1), then node 2 alone with 0.4
    t = backup(t, jnp.array([[3, 4]]), jnp.array([[1.0, -1.0]]), jnp.ones((1, 2), bool))
    t = backup(t, jnp.array([[2, 4]]), jnp.array([[0.4, 9.0]]), jnp.array([[True, False]]))
    assert t.visits_BxN[0, :5].tolist() == [3, 3, 1, 1, 1]  # node 1: its own initial value + 2 backups
    np.testing.assert_allclose(np.asarray(t.value_sum_BxN[0, :5]), [0.4, 0.5, 0.4, 1.0, -1.0])
    np.testing.assert_allclose(np.asarray(t.values()[0, :5]), [0.4 / 3, 0.5 / 3, 0.4, 1.0, -1.0], rtol=1e-6)
    # first values: the root's first update was the mean of the two answers; node 1 keeps its initial 0.5
    np.testing.assert_allclose(np.asarray(t.first_value_BxN[0, :5]), [0.0, 0.5, 0.4, 1.0, -1.0])


def test_path_gathering_hand_computed():
    cfg = TreeConfig(max_depth=3)
    T = 3
    t = new_tree(2, 16, 2, T)
    toks = lambda a, b: [[a, a + 1, a + 2], [b, b + 1, b + 2]]  # noqa: E731
    t, c1 = expand(t, cfg, jnp.array([0, 0]), make_exp(2, 2, T, tokens=[toks(10, 20), toks(30, 40)],
                                                       lens=[[2, 3], [1, 0]]))
    t, c2 = expand(t, cfg, c1[:, 0], make_exp(2, 2, T, tokens=[toks(50, 60), toks(70, 80)], lens=[[3, 1], [2, 2]]))
    prefix, length = gather_path(t, cfg, c2[:, 1], pad_id=-7)
    assert length.tolist() == [3, 3]
    assert prefix.tolist() == [[10, 11, 60] + [-7] * 6, [30, 80, 81] + [-7] * 6]
    assert path_nodes(t, cfg, c2[:, 1]).tolist() == [[1, 4, -1], [1, 4, -1]]
    prefix, length = gather_path(t, cfg, jnp.array([0, 2]))  # the root: empty; node 2 of row 1: empty step
    assert length.tolist() == [0, 0] and prefix.tolist() == [[0] * 9] * 2


# ---------------------------------------------------------------- a random search loop for the properties

A_TOY = 4  # actions (one token per step) in the toy environments


@functools.partial(jax.jit, static_argnums=0)
def random_step(cfg, tree, key_B, i):
    """One iteration with random candidates: random kinds, validity, rewards in [-1, 1] and initial values."""
    B, K, T = tree.batch_size, tree.num_children, tree.step_len
    tree, leaf_B, ok_B = select(tree, cfg)

    def draw(key):
        k = jax.random.split(jax.random.fold_in(key, i), 6)
        return (jax.random.randint(k[0], (K, T), 0, 50), jax.random.randint(k[1], (K,), 0, T + 1),
                jax.random.choice(k[2], 3, (K,), p=jnp.array([0.6, 0.25, 0.15])).astype(jnp.int8),
                jax.random.uniform(k[3], (K,), minval=-1, maxval=1), jax.random.bernoulli(k[4], 0.5, (K,)),
                jax.random.bernoulli(k[5], 0.8, (K,)))

    tok, ln, kind, val, vvisit, valid = jax.vmap(draw)(key_B)
    reward = jnp.sign(val)
    exp = Expansion(tok, ln, kind, reward, jnp.where(kind == ANS, (reward > 0).astype(jnp.int8), -1).astype(jnp.int8),
                    val, vvisit, valid)
    tree, child = expand(tree, cfg, leaf_B, exp, ok_B)
    is_ans = (child >= 0) & (kind == ANS)
    tree = backup(tree, child, reward, is_ans)
    return tree, leaf_B, child, exp, is_ans


def run_random(seed, B=3, N=40, K=3, T=2, iters=10, cfg=TreeConfig(max_depth=4), keys=None):
    tree = new_tree(B, N, K, T)
    keys = jax.random.split(jax.random.key(seed), B) if keys is None else keys
    log = []
    for i in range(iters):
        tree, leaf, child, exp, is_ans = random_step(cfg, tree, keys, i)
        log.append((leaf, child, exp, is_ans))
    return tree, log


def check_invariants(tree, log):
    B, N = tree.visits_BxN.shape
    visits = np.asarray(tree.visits_BxN)
    parent = np.asarray(tree.parent_BxN)
    init = np.zeros((B, N), int)
    starts = np.zeros((B, N), int)
    for _, child, exp, is_ans in log:
        child, is_ans = np.asarray(child), np.asarray(is_ans)
        vv = np.asarray(exp.value_visit_BxK)
        for b, k in zip(*np.nonzero(child >= 0)):
            init[b, child[b, k]] = int(vv[b, k] or tree.terminal_BxN[b, child[b, k]] == INV)
            starts[b, child[b, k]] += int(is_ans[b, k])
    children = np.asarray(tree.children_BxNxK)
    for b in range(B):
        n_used = int(tree.num_nodes_B[b])
        for n in range(n_used):
            kids = [c for c in children[b, n] if c >= 0]
            assert visits[b, n] == init[b, n] + starts[b, n] + sum(visits[b, c] - init[b, c] for c in kids)
            for s, c in enumerate(children[b, n]):
                if c >= 0:
                    assert parent[b, c] == n and int(tree.slot_BxN[b, c]) == s
                    assert int(tree.depth_BxN[b, c]) == int(tree.depth_BxN[b, n]) + 1
            if kids:  # children are compact: filled slots first
                assert list(children[b, n][: len(kids)]) == kids
        assert (visits[b, n_used:] == 0).all() and (parent[b, n_used:] == -1).all()
    v = np.asarray(tree.values())
    assert (v >= -1 - 1e-6).all() and (v <= 1 + 1e-6).all()


@settings(max_examples=6, deadline=None, database=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_property_visit_counts_structure_and_value_range(seed):
    tree, log = run_random(seed)
    assert int(tree.visits_BxN[:, 0].sum()) > 0 or all(not np.asarray(x[3]).any() for x in log)
    check_invariants(tree, log)


@settings(max_examples=4, deadline=None, database=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_property_batch_elements_independent(seed):
    keys = jax.random.split(jax.random.key(seed), 3)
    tree_a, _ = run_random(seed, keys=keys)
    keys_b = keys.at[1].set(jax.random.key(seed + 1))  # change problem 1's candidates only
    tree_b, _ = run_random(seed, keys=keys_b)
    changed = False
    for x, y in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b)):
        x, y = np.asarray(x), np.asarray(y)
        np.testing.assert_array_equal(x[[0, 2]], y[[0, 2]])
        changed |= not np.array_equal(x[1], y[1])
    assert changed


def test_jit_and_no_jit_agree():
    cfg = TreeConfig(max_depth=4)
    keys = jax.random.split(jax.random.key(3), 2)
    tree_j, log_j = run_random(0, B=2, N=16, keys=keys, iters=4, cfg=cfg)
    with jax.disable_jit():
        tree_n, log_n = run_random(0, B=2, N=16, keys=keys, iters=4, cfg=cfg)
        prefix_n = gather_path(tree_n, cfg, log_n[-1][1][:, 0])
    prefix_j = gather_path(tree_j, cfg, log_j[-1][1][:, 0])
    for x, y in zip(jax.tree.leaves((tree_j, prefix_j)), jax.tree.leaves((tree_n, prefix_n))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)
    assert int(tree_j.num_nodes_B.min()) > 3


# ---------------------------------------------------------------- toy environment with a known best path


def toy_search(target_BxL, key_B, iters, K, ppm, cfg):
    """MCTS on a toy problem with a known best path: a step is one of A_TOY actions and the answer comes after
    L steps, scored by how many actions match the target (reward 2 * matches / L - 1; correct iff all match).
    Candidates are K distinct actions in random order. With `ppm`, new steps also get a noisy synthetic
    score that is higher on the target's prefix (a stand-in for the PPM)."""
    B, L = target_BxL.shape
    tree = new_tree(B, 1 + iters * K, K, 1)

    def body(i, tree):
        tree, leaf_B, ok_B = select(tree, cfg)
        prefix_BxP, len_B = gather_path(tree, cfg, leaf_B)
        k_B = jax.vmap(lambda k: jax.random.fold_in(k, i))(key_B)
        act_BxK = jax.vmap(lambda k: jax.random.permutation(jax.random.fold_in(k, 0), A_TOY)[:K])(k_B)
        noise_BxK = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1), (K,), minval=-0.3, maxval=0.3))(k_B)
        P = prefix_BxP.shape[1]
        on_B = jnp.arange(P)[None] < len_B[:, None]
        matches_B = (on_B & (prefix_BxP == jnp.pad(target_BxL, ((0, 0), (0, P - L))))).sum(axis=1)
        on_path_B = matches_B == len_B
        hit_BxK = act_BxK == target_BxL[jnp.arange(B), jnp.minimum(len_B, L - 1)][:, None]
        is_ans_BxK = jnp.broadcast_to((len_B + 1 == L)[:, None], (B, K))
        reward_BxK = 2.0 * (matches_B[:, None] + hit_BxK) / L - 1.0
        exp = Expansion(
            tokens_BxKxT=act_BxK[..., None], token_len_BxK=jnp.ones((B, K), jnp.int32),
            terminal_BxK=jnp.where(is_ans_BxK, ANS, NT).astype(jnp.int8), reward_BxK=reward_BxK,
            correct_BxK=jnp.where(is_ans_BxK, on_path_B[:, None] & hit_BxK, -1).astype(jnp.int8),
            value_BxK=jnp.where(is_ans_BxK | (not ppm), 0.0,
                                jnp.where(on_path_B[:, None] & hit_BxK, 0.5, -0.5) + noise_BxK),
            value_visit_BxK=~is_ans_BxK & ppm, valid_BxK=jnp.ones((B, K), bool))
        tree, child_BxK = expand(tree, cfg, leaf_B, exp, ok_B)
        return backup(tree, child_BxK, reward_BxK, (child_BxK >= 0) & is_ans_BxK)

    return jax.lax.fori_loop(0, iters, body, tree)


def greedy_path(tree, b):
    """Follow the highest-value visited child from the root; returns (actions, last node)."""
    node, acts = 0, []
    values, visits = np.asarray(tree.values()[b]), np.asarray(tree.visits_BxN[b])
    while True:
        kids = [int(c) for c in tree.children_BxNxK[b, node] if c >= 0 and visits[c] > 0]
        if not kids:
            return acts, node
        node = max(kids, key=lambda c: values[c])
        acts.append(int(tree.tokens_BxNxT[b, node, 0]))


@pytest.mark.parametrize("ppm,iters,c", [(False, 48, 0.5), (True, 8, 2.0)])
def test_toy_environment_search_finds_the_best_path(ppm, iters, c):
    B, L, K = 8, 4, A_TOY  # every action is a candidate, so the best path is always reachable
    cfg = TreeConfig(c=c, max_depth=L)
    target = jax.random.randint(jax.random.key(7), (B, L), 0, A_TOY)
    keys = jax.random.split(jax.random.key(11), B)
    tree = jax.jit(toy_search, static_argnums=(2, 3, 4, 5))(target, keys, iters, K, ppm, cfg)
    for b in range(B):
        acts, leaf = greedy_path(tree, b)
        assert acts == target[b].tolist(), (b, acts, target[b].tolist())
        assert int(tree.terminal_BxN[b, leaf]) == ANS and int(tree.correct_BxN[b, leaf]) == Tree.CORRECT
    # far from exhaustive: a problem has A^L = 256 answers
    n_answers = np.asarray((tree.terminal_BxN == ANS).sum(axis=1))
    assert n_answers.max() <= 0.6 * A_TOY**L, n_answers


def test_batched_search_equals_each_problem_alone():
    B, L, K, iters = 3, 4, 3, 12
    cfg = TreeConfig(max_depth=L)
    target = jax.random.randint(jax.random.key(1), (B, L), 0, A_TOY)
    keys = jax.random.split(jax.random.key(2), B)
    run = jax.jit(toy_search, static_argnums=(2, 3, 4, 5))
    batched = run(target, keys, iters, K, True, cfg)
    for b in range(B):
        alone = run(target[b:b + 1], keys[b:b + 1], iters, K, True, cfg)
        for x, y in zip(jax.tree.leaves(batched), jax.tree.leaves(alone)):
            np.testing.assert_array_equal(np.asarray(x)[b:b + 1], np.asarray(y))
