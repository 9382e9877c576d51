"""Tree operations alone (no LM): rstar-jax select + expand + backup vs google-deepmind's mctx search.

Both sides run the same number of simulations for the same batch on the same device, fully jitted (the whole
simulation loop inside one `jax.jit`), compile time excluded, timed to `block_until_ready`. A simulation is:
  rstar-jax: UCT select to a leaf, expand it with K children (step tokens, kinds, values), back the K child
             values up to the root;
  mctx:      `mctx.search` with MuZero (PUCT) selection over K actions, expand one node through a trivial
             recurrent_fn, back its value up to the root.
Synthetic values come from `jax.random` on both sides.

    python bench/tree_ops.py [--batch 64] [--sims 64] [--children 8] [--step-len 16] [--repeats 20]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import mctx

from rstar_jax.search.tree import Expansion, TreeConfig, backup, expand, new_tree, select


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def ours(key, batch, sims, children, step_len):
    cfg = TreeConfig()
    B, K, T = batch, children, step_len

    def body(i, tree):
        tree, leaf_B, ok_B = select(tree, cfg)
        k_val, k_term = jax.random.split(jax.random.fold_in(key, i))
        value_BxK = jax.random.uniform(k_val, (B, K), minval=-1.0, maxval=1.0)
        terminal_BxK = (jax.random.uniform(k_term, (B, K)) < 0.1).astype(jnp.int8)  # some answers
        exp = Expansion(
            tokens_BxKxT=jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32) + i, (B, K, T)),
            token_len_BxK=jnp.full((B, K), T, jnp.int32), terminal_BxK=terminal_BxK,
            reward_BxK=jnp.sign(value_BxK), correct_BxK=jnp.full((B, K), -1, jnp.int8),
            value_BxK=jnp.zeros((B, K)), value_visit_BxK=jnp.zeros((B, K), bool), valid_BxK=jnp.ones((B, K), bool))
        tree, child_BxK = expand(tree, cfg, leaf_B, exp, ok_B)
        return backup(tree, child_BxK, value_BxK, child_BxK >= 0)

    return jax.lax.fori_loop(0, sims, body, new_tree(B, 1 + sims * K, K, T))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def theirs(key, batch, sims, children):
    B, K = batch, children

    def recurrent_fn(params, rng, action_B, embedding_B):
        del params
        out = mctx.RecurrentFnOutput(
            reward=jnp.zeros((B,)), discount=jnp.ones((B,)), prior_logits=jnp.zeros((B, K)),
            value=jax.random.uniform(rng, (B,), minval=-1.0, maxval=1.0))
        return out, embedding_B * K + action_B

    root = mctx.RootFnOutput(prior_logits=jnp.zeros((B, K)), value=jnp.zeros((B,)), embedding=jnp.zeros((B,), jnp.int32))
    return mctx.search(params=(), rng_key=key, root=root, recurrent_fn=recurrent_fn,
                       root_action_selection_fn=functools.partial(mctx.muzero_action_selection, depth=0),
                       interior_action_selection_fn=mctx.muzero_action_selection, num_simulations=sims)


def timed(fn, repeats):
    jax.block_until_ready(fn(jax.random.key(0)))  # compile
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(jax.random.key(r + 1)))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--sims", type=int, default=64)
    ap.add_argument("--children", type=int, default=8)
    ap.add_argument("--step-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args(argv)
    B, S, K = a.batch, a.sims, a.children
    t_ours = timed(lambda k: ours(k, B, S, K, a.step_len), a.repeats)
    t_mctx = timed(lambda k: theirs(k, B, S, K), a.repeats)
    rate_ours, rate_mctx = B * S / t_ours, B * S / t_mctx
    print(f"`python bench/tree_ops.py {' '.join(argv if argv is not None else sys.argv[1:])}`".replace(" `", "`"))
    print(f"\ndevice: {jax.devices()[0].device_kind}, jax {jax.__version__}, mctx {mctx.__version__}; "
          f"B={B}, {S} simulations, K={K} children/actions, step buffer T={a.step_len}; median of {a.repeats}\n")
    print("| implementation | search time (ms) | simulations/s | ratio vs mctx |")
    print("|---|---:|---:|---:|")
    print(f"| rstar-jax select+expand+backup | {t_ours * 1e3:.2f} | {rate_ours:,.0f} | {rate_ours / rate_mctx:.2f}x |")
    print(f"| mctx.search (muzero_action_selection) | {t_mctx * 1e3:.2f} | {rate_mctx:,.0f} | 1.00x |")


if __name__ == "__main__":
    main()
