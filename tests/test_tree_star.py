"""ReST-MCTS* tree operations: hand-computed selection, rollout update and visit-weighted backup; jit vs
no-jit; a toy value-guided search that stops at the end gate on the known best answer, batched == alone."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rstar_jax.search.tree import Expansion, Tree, TreeConfig, TreeError, expand, gather_path, new_tree
from rstar_jax.search.tree_star import StarConfig, backup_star, rollout_update, select_star, star_scores

ANS, NT, INV = Tree.ANSWER, Tree.NOT_TERMINAL, Tree.INVALID


def exp_values(values, terminal=None, tokens=None, valid=None):
    K = len(values)
    return Expansion(
        tokens_BxKxT=jnp.asarray([[[t] for t in (tokens or [0] * K)]], jnp.int32),
        token_len_BxK=jnp.ones((1, K), jnp.int32),
        terminal_BxK=jnp.asarray([terminal or [NT] * K], jnp.int8), reward_BxK=jnp.zeros((1, K)),
        correct_BxK=jnp.full((1, K), -1, jnp.int8), value_BxK=jnp.asarray([values], jnp.float32),
        value_visit_BxK=jnp.zeros((1, K), bool),
        valid_BxK=jnp.asarray([valid or [True] * K], bool))


def with_stats(tree, visits, values):
    """Set node visits and values V directly (value_sum = V * max(visits, 1))."""
    n = len(visits)
    v = jnp.asarray(visits, jnp.int32)
    return tree.replace(visits_BxN=tree.visits_BxN.at[0, :n].set(v),
                        value_sum_BxN=tree.value_sum_BxN.at[0, :n].set(
                            jnp.asarray(values, jnp.float32) * jnp.maximum(v, 1)))


def test_select_star_hand_computed():
    cfg = StarConfig()
    t = new_tree(1, 8, 3, 1)
    t, _ = expand(t, TreeConfig(), jnp.array([0]), exp_values([0.4, 0.6, 0.3]))
    np.testing.assert_allclose(np.asarray(t.values()[0, 1:4]), [0.4, 0.6, 0.3])  # V set, no visit yet
    assert t.visits_BxN[0, :4].tolist() == [0, 0, 0, 0]
    t = with_stats(t, [3, 2, 1, 0], [0.5, 0.4, 0.6, 0.3])
    want = [0.4 + 0.7 * math.sqrt(2 * math.log(3) / 2), 0.6 + 0.7 * math.sqrt(2 * math.log(3)), 0.3 + 1.0]
    got = star_scores(cfg, t.visits_BxN[0, 0], t.visits_BxN[0, 1:4], t.value_sum_BxN[0, 1:4])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    _, leaf, ok = select_star(t, cfg)
    assert leaf.tolist() == [2] and ok.tolist() == [True]
    # a larger unvisited bonus makes the unvisited child win; an invalid child is skipped
    _, leaf, _ = select_star(t, StarConfig(unvisited_bonus=2.0))
    assert leaf.tolist() == [3]
    _, leaf, _ = select_star(t.replace(terminal_BxN=t.terminal_BxN.at[0, 2].set(INV)), cfg)
    assert leaf.tolist() == [3]


def test_rollout_update_hand_computed():
    cfg = StarConfig(alpha=0.5)
    t = new_tree(1, 8, 2, 1)
    t, _ = expand(t, TreeConfig(), jnp.array([0]), exp_values([0.4, 0.0]))
    t = rollout_update(t, cfg, jnp.array([1]), jnp.array([0.9]), jnp.array([True]))
    np.testing.assert_allclose(float(t.values()[0, 1]), 0.65)
    assert int(t.visits_BxN[0, 1]) == 1
    t = rollout_update(t, cfg, jnp.array([1]), jnp.array([0.1]), jnp.array([True]))
    np.testing.assert_allclose(float(t.values()[0, 1]), 0.375)
    assert int(t.visits_BxN[0, 1]) == 2
    t2 = rollout_update(t, cfg, jnp.array([1]), jnp.array([1.0]), jnp.array([False]))
    np.testing.assert_array_equal(np.asarray(t2.value_sum_BxN), np.asarray(t.value_sum_BxN))


def test_backup_star_visit_weighted_hand_computed():
    t = new_tree(1, 8, 2, 1)
    t, _ = expand(t, TreeConfig(), jnp.array([0]), exp_values([0.0, 0.0]))  # A=1, B=2
    t, _ = expand(t, TreeConfig(), jnp.array([1]), exp_values([0.0, 0.0]))  # C=3, D=4
    #                 root  A    B    C    D
    t = with_stats(t, [2, 1, 2, 1, 0], [0.3, 0.1, 0.5, 0.8, 0.2])
    t = backup_star(t, jnp.array([1]), jnp.array([True]))
    # A: 2 visits, V = (0.8 * 1 + 0.2 * 0) / 1; root: 3 visits, V = (0.8 * 2 + 0.5 * 2) / 4
    assert t.visits_BxN[0, :5].tolist() == [3, 2, 2, 1, 0]
    np.testing.assert_allclose(np.asarray(t.values()[0, :5]), [0.65, 0.8, 0.5, 0.8, 0.2], rtol=1e-6)
    # a node whose children have no visits keeps its V and gains a visit
    t = backup_star(t, jnp.array([4]), jnp.array([True]))
    np.testing.assert_allclose(float(t.values()[0, 4]), 0.2)
    assert int(t.visits_BxN[0, 4]) == 1


def test_invalid_children_do_not_drag_down_and_answers_are_selected_and_backed_up():
    """The issue's node P: two invalid children and one child rolled to 0.8 is worth 0.8, not (0 + 0 + 0.8) / 3;
    its unvisited answer child (V 0.6) wins the selection, is backed up, and then counts in P's mean."""
    cfg = StarConfig()
    t = new_tree(1, 8, 4, 1)
    t, _ = expand(t, TreeConfig(invalid_reward=0.0), jnp.array([0]),  # P = 1
                  exp_values([0.5, 0, 0, 0], valid=[True, False, False, False]))
    t, _ = expand(t, TreeConfig(invalid_reward=0.0), jnp.array([1]),  # a = 2, b = 3 invalid; c = 4; d = 5 answer
                  exp_values([0.0, 0.0, 0.6, 0.6], terminal=[INV, INV, NT, ANS]))
    t = rollout_update(t, cfg, jnp.array([4]), jnp.array([1.0]), jnp.array([True]))  # c: 0.5 * 0.6 + 0.5 * 1
    t = backup_star(t, jnp.array([1]), jnp.array([True]))
    #                                     root  P    a  b  c    d
    assert t.visits_BxN[0, :6].tolist() == [1, 1, 1, 1, 1, 0]
    np.testing.assert_allclose(np.asarray(t.values()[0, :6]), [0.8, 0.8, 0, 0, 0.8, 0.6], rtol=1e-6)
    # at P (1 visit, so no exploration term): c scores 0.8, unvisited d 0.6 + 1.0; a and b are never candidates
    t, leaf, expandable = select_star(t, cfg)
    assert leaf.tolist() == [5] and expandable.tolist() == [False]
    t = backup_star(t, leaf, jnp.array([True]))
    assert t.visits_BxN[0, :6].tolist() == [2, 2, 1, 1, 1, 1]
    np.testing.assert_allclose(np.asarray(t.values()[0, :6]), [0.7, 0.7, 0, 0, 0.8, 0.6], rtol=1e-6)
    # P's children all invalid: P is exhausted, not selected, and a backup through it keeps its own V
    t2 = new_tree(1, 8, 2, 1)
    t2, _ = expand(t2, TreeConfig(invalid_reward=0.0), jnp.array([0]), exp_values([0.4, 0.0], valid=[True, False]))
    t2, _ = expand(t2, TreeConfig(invalid_reward=0.0), jnp.array([1]), exp_values([0.0, 0.0], terminal=[INV, INV]))
    t2 = backup_star(t2, jnp.array([1]), jnp.array([True]))
    np.testing.assert_allclose(np.asarray(t2.values()[0, :2]), [0.4, 0.4])
    t2, leaf, expandable = select_star(t2, cfg)
    assert leaf.tolist() == [0] and expandable.tolist() == [False] and int(t2.terminal_BxN[0, 1]) == Tree.EXHAUSTED


def test_star_config_errors():
    with pytest.raises(TreeError, match="StarConfig.alpha=1.5"):
        StarConfig(alpha=1.5)


# ---------------------------------------------------------------- toy value-guided search

A, L = 3, 3


def star_search(target_BxL, key_B, iters, cfg_s):
    """ReST-MCTS* on a toy problem: steps are actions, an answer comes after L steps. The synthetic value
    model scores a step by the fraction of target actions matched so far (noisy); the greedy rollout finds
    one more matching step when there is one. Stops a problem once a new child reaches the end gate."""
    B = target_BxL.shape[0]
    cfg_t = TreeConfig(max_depth=L, invalid_reward=0.0)
    tree = new_tree(B, 1 + iters * A, A, 1)

    def body(i, carry):
        tree, done_B = carry
        tree, leaf_B, ok_B = select_star(tree, cfg_s)
        ok_B &= ~done_B
        prefix_BxP, len_B = gather_path(tree, cfg_t, leaf_B)
        k_B = jax.vmap(lambda k: jax.random.fold_in(k, i))(key_B)
        act_BxK = jax.vmap(lambda k: jax.random.permutation(k, A))(k_B)
        noise_BxK = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1), (A,), maxval=0.1))(k_B)
        P = prefix_BxP.shape[1]
        on_B = jnp.all((prefix_BxP == jnp.pad(target_BxL, ((0, 0), (0, P - L)))) | (jnp.arange(P) >= len_B[:, None]), 1)
        hit_BxK = on_B[:, None] & (act_BxK == target_BxL[jnp.arange(B), jnp.minimum(len_B, L - 1)][:, None])
        is_ans = len_B + 1 == L
        v_BxK = jnp.where(hit_BxK, (len_B[:, None] + 1) / L, len_B[:, None] / L * 0.5) - noise_BxK * ~hit_BxK
        exp = Expansion(
            tokens_BxKxT=act_BxK[..., None], token_len_BxK=jnp.ones((B, A), jnp.int32),
            terminal_BxK=jnp.broadcast_to(jnp.where(is_ans, ANS, NT)[:, None], (B, A)).astype(jnp.int8),
            reward_BxK=v_BxK, correct_BxK=jnp.where(is_ans[:, None], hit_BxK, -1).astype(jnp.int8),
            value_BxK=v_BxK, value_visit_BxK=jnp.zeros((B, A), bool), valid_BxK=jnp.ones((B, A), bool))
        tree, child_BxK = expand(tree, cfg_t, leaf_B, exp, ok_B)
        best_k_B = jnp.argmax(jnp.where(child_BxK >= 0, v_BxK, -jnp.inf), axis=1)
        best_B = child_BxK[jnp.arange(B), best_k_B]
        best_v_B = v_BxK[jnp.arange(B), best_k_B]
        roll_B = ok_B & ~is_ans & (best_B >= 0)
        tree = rollout_update(tree, cfg_s, best_B, jnp.where(hit_BxK.any(1), best_v_B + 1 / L, best_v_B), roll_B)
        tree = backup_star(tree, leaf_B, ok_B)
        done_B |= ok_B & ((child_BxK >= 0) & (v_BxK >= cfg_s.end_gate)).any(1)
        return tree, done_B

    return jax.lax.fori_loop(0, iters, body, (tree, jnp.zeros((B,), bool)))


def test_toy_star_search_stops_at_end_gate_on_the_best_answer():
    B, iters = 6, 12
    target = jax.random.randint(jax.random.key(5), (B, L), 0, A)
    keys = jax.random.split(jax.random.key(6), B)
    tree, done = jax.jit(star_search, static_argnums=(2, 3))(target, keys, iters, StarConfig())
    assert done.all()
    values = np.asarray(tree.values())
    for b in range(B):
        answers = np.nonzero(np.asarray(tree.terminal_BxN[b]) == ANS)[0]
        best = answers[np.argmax(values[b, answers])]
        assert int(tree.correct_BxN[b, best]) == Tree.CORRECT and values[b, best] >= 0.9
        path = []
        node = int(best)
        while node > 0:
            path.append(int(tree.tokens_BxNxT[b, node, 0]))
            node = int(tree.parent_BxN[b, node])
        assert path[::-1] == target[b].tolist()
    # value guidance: far fewer nodes than the full tree (1 + 3 + 9 + 27 = 40)
    assert int(tree.num_nodes_B.max()) < 30


def test_star_batched_equals_alone_and_jit_equals_no_jit():
    B, iters = 3, 6
    target = jax.random.randint(jax.random.key(8), (B, L), 0, A)
    keys = jax.random.split(jax.random.key(9), B)
    run = jax.jit(star_search, static_argnums=(2, 3))
    batched = run(target, keys, iters, StarConfig())
    for b in range(B):
        alone = run(target[b:b + 1], keys[b:b + 1], iters, StarConfig())
        for x, y in zip(jax.tree.leaves(batched), jax.tree.leaves(alone)):
            np.testing.assert_array_equal(np.asarray(x)[b:b + 1], np.asarray(y))
    with jax.disable_jit():
        slow = star_search(target[:1], keys[:1], 2, StarConfig())
    fast = run(target[:1], keys[:1], 2, StarConfig())
    for x, y in zip(jax.tree.leaves(slow), jax.tree.leaves(fast)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)
