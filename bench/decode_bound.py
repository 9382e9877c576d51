"""What bounds a batch-16 decode step of SmolLM2-135M on this CPU (fp32): the step's matmuls alone against the
whole step, and the same matmuls in torch (the kernels transformers decodes with).

- machine: a 2048^3 fp32 matmul (compute peak) and a jitted sum over 540 MB (memory bandwidth);
- matmuls alone: the 30 layers' 7 projections and the head at 16 rows, chained so each layer waits for the last,
  with the real weights, through `llama.linear` / `llama.lm_head` (JAX) or `x @ W.T` (torch);
- whole step: the engine's `generate` at batch 16 (greedy, EOS ignored), (time of 64 new tokens - time of 16) / 48.

    python bench/decode_bound.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from rstar_jax.models.hf_io import load_model
from rstar_jax.models.llama import linear, lm_head
from rstar_jax.engine import SamplingConfig, generate, prepare

from generate import PROMPTS

ROWS = 16


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    lm = load_model(a.model)
    cfg, tok = lm.cfg, lm.tokenizer
    model = prepare(lm.params, cfg)
    params = model.params
    layers = params["model"]["layers"]
    weight_count = sum(x.size for x in jax.tree.leaves(params))
    # every weight is one multiply-add per row, the embedding only where it is also the head
    flop = 2 * ROWS * (weight_count - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size))

    big = jnp.ones((2048, 2048), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    peak = 2 * 2048**3 / best_ms(lambda: mm(big).block_until_ready(), a.repeats) * 1e-6
    stream = jnp.ones((135_000_000,), jnp.float32)
    total = jax.jit(jnp.sum)
    bandwidth = stream.nbytes / best_ms(lambda: total(stream).block_until_ready(), a.repeats) * 1e-6
    del stream

    x_RxD = jnp.asarray(np.random.default_rng(0).standard_normal((ROWS, cfg.hidden_size)), jnp.float32)
    groups = cfg.num_attention_heads // cfg.num_key_value_heads

    @jax.jit
    def matmuls(params, x):
        for layer in params["model"]["layers"]:
            at, mlp = layer["self_attn"], layer["mlp"]
            q, k, v = (linear(x, at[n]) for n in ("q_proj", "k_proj", "v_proj"))
            x = x + 1e-3 * linear(q + jnp.tile(k + v, groups), at["o_proj"])
            x = x + 1e-3 * linear(jax.nn.silu(linear(x, mlp["gate_proj"])) * linear(x, mlp["up_proj"]), mlp["down_proj"])
        return lm_head(params, cfg, x)

    ours_mm = best_ms(lambda: matmuls(params, x_RxD).block_until_ready(), a.repeats)

    hf_w = [{n: torch.from_numpy(np.asarray(p["weight_t"]).T.copy()) for n, p in {**layer["self_attn"], **layer["mlp"]}.items()}
            for layer in layers]
    head = torch.from_numpy(np.array(params["model"]["embed_tokens" if cfg.tie_word_embeddings else "lm_head"]["weight"]))
    xt = torch.from_numpy(np.asarray(x_RxD))

    def torch_matmuls():
        with torch.inference_mode():
            x = xt
            for w in hf_w:
                q, k, v = x @ w["q_proj"].T, x @ w["k_proj"].T, x @ w["v_proj"].T
                x = x + 1e-3 * ((q + (k + v).repeat(1, groups)) @ w["o_proj"].T)
                h = torch.nn.functional.silu(x @ w["gate_proj"].T) * (x @ w["up_proj"].T)
                x = x + 1e-3 * (h @ w["down_proj"].T)
            return x @ head.T

    theirs_mm = best_ms(torch_matmuls, a.repeats)

    ids = [tok.encode(p, add_special_tokens=True) for p in PROMPTS[:ROWS]]
    calls = {n: SamplingConfig(max_new_tokens=n, temperature=0.0, ignore_eos=True) for n in (16, 64)}
    gen_ms = {n: best_ms(lambda: generate(model, tok, ids, s, jax.random.key(0)), a.repeats) for n, s in calls.items()}
    step = (gen_ms[64] - gen_ms[16]) / 48

    print(f"SmolLM2-135M, batch {ROWS}, fp32, CPU ({os.cpu_count()} cores), best of {a.repeats}\n")
    print(f"machine: matmul peak {peak:.0f} GFLOP/s, memory {bandwidth:.1f} GB/s; a step is {flop / 1e9:.2f} GFLOP "
          f"over {weight_count * 4 / 1e6:.0f} MB of weights: >= {flop / peak * 1e-6:.1f} ms at peak, "
          f">= {weight_count * 4 / bandwidth * 1e-6:.1f} ms to stream\n")
    print("| what | ms per step | GFLOP/s |")
    print("|---|---:|---:|")
    print(f"| rstar-jax: the step's matmuls alone | {ours_mm:.1f} | {flop / ours_mm * 1e-6:.0f} |")
    print(f"| torch: the same matmuls (`x @ W.T`) | {theirs_mm:.1f} | {flop / theirs_mm * 1e-6:.0f} |")
    print(f"| rstar-jax: whole decode step | {step:.1f} | {flop / step * 1e-6:.0f} |")
    print(f"\nmatmuls alone / torch's: {theirs_mm / ours_mm:.2f}x; whole step = matmuls + {step - ours_mm:.1f} ms")


if __name__ == "__main__":
    main()
