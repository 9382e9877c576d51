"""Training throughput: rstar-jax's sharded train step vs a PyTorch loop over the same model, on this machine.

    python bench/train.py [--model smollm2-135m] [--batch 4] [--seq 256] [--steps 3] [--dtype float32|bfloat16]

Both sides: the same HF weights, the same random token batch, causal-LM loss on every token, AdamW, fp32 master
weights; compute in fp32, or in bf16 (rstar-jax's `model.compute_dtype`, PyTorch's CPU autocast). The two sides'
timed steps alternate and each reports its median step, so a machine whose speed drifts during the run slows both
alike. Prints tokens/s, model FLOPs utilisation against the matmul peak of that dtype measured in this run, and
the ratio.
Model FLOPs per token = 6 x (matmul parameters incl. lm_head) + 3 x attention (4 x T x H x E per layer, causal
half not subtracted, as in the PaLM MFU convention).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def matmul_peak(dtype: str, n: int = 2048, reps: int = 10) -> float:
    """Best FLOP/s of an n x n matmul chain in `dtype` under jax.jit (the machine's attainable matmul peak)."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32) / np.sqrt(n), dtype)
    mm = lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32).astype(dtype)  # as `llama.linear`
    f = jax.jit(lambda x: mm(mm(mm(mm(x, a), a), a), a))
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 4 * 2 * n**3 / best


def model_flops_per_token(cfg, seq: int) -> float:
    D, F, L, H, G, E, V = (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads,
                           cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size)
    matmul_params = L * (D * H * E * 2 + D * G * E * 2 + 3 * D * F) + V * D
    return 6 * matmul_params + 3 * L * 4 * seq * H * E


def jax_stepper(spec: str, ids: np.ndarray, steps: int, dtype: str) -> Callable[[], float]:
    """rstar-jax's own train step on a 1-device mesh, compiled and warmed up: each call runs one step and returns
    its loss."""
    from rstar_jax.config import load_config
    from rstar_jax import sharding
    from rstar_jax.train.model_source import load_for_training
    from rstar_jax.train.state import abstract_params, compile_step, init_state, make_optimizer, make_train_step, state_shardings

    B, T = ids.shape
    cfg = load_config([f"data.batch_size={B}", f"data.seq_len={T}", "mesh.data=1", "optim.schedule=constant",
                       "optim.learning_rate=1e-5", "optim.weight_decay=0.01", "optim.clip_norm=0",
                       f"model.compute_dtype={dtype}"])
    mc, params, _ = load_for_training(spec, "sft", cfg)
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    opt = make_optimizer(cfg.optim, steps + 1)
    sh = state_shardings(abstract_params(mc, "sft"), opt, mesh, cfg.mesh.min_shard_elements)
    batch = {
        "input_ids": ids[None], "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (1, B, T)).copy(),
        "segment_ids": np.ones((1, B, T), np.int32), "targets": np.roll(ids, -1, axis=1)[None],
        "weights": np.concatenate([np.ones((B, T - 1)), np.zeros((B, 1))], 1).astype(np.float32)[None],
    }
    with jax.set_mesh(mesh):
        state = init_state(params, opt, sh)
        step = compile_step(make_train_step("sft", mc, cfg, opt, steps + 1), sh, mesh, batch)
        dev_batch = sharding.put_batch(batch, mesh)

    def run() -> float:
        nonlocal state
        with jax.set_mesh(mesh):
            state, m = step(state, dev_batch)
            return float(m["loss"])  # waits for the step

    run()  # compile + warm-up
    return run


def torch_stepper(folder, ids: np.ndarray, dtype: str) -> Callable[[], float]:
    """The same step in PyTorch (transformers `LlamaForCausalLM`, torch AdamW), warmed up."""
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    x = torch.tensor(ids, dtype=torch.long)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        return loss.item()

    step()  # warm-up
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    args = ap.parse_args()

    from rstar_jax.models.hf_io import load_model
    from rstar_jax.models.registry import resolve

    folder = resolve(args.model)
    cfg = load_model(args.model).cfg
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(args.batch, args.seq)).astype(np.int32)
    tokens = args.batch * args.seq
    flops_tok = model_flops_per_token(cfg, args.seq)
    peak = matmul_peak(args.dtype)
    print(f"machine: {os.cpu_count()} CPUs, {jax.devices()[0].platform}; {args.dtype} matmul peak {peak / 1e9:.1f} GFLOP/s (jax, 2048^2)")
    print(f"model {args.model}: {flops_tok / 1e9:.3f} GFLOP per trained token; batch {args.batch} x {args.seq}, {args.steps} timed steps")
    sides = {"rstar-jax": jax_stepper(args.model, ids, args.steps, args.dtype),
             "pytorch": torch_stepper(folder, ids, args.dtype)}
    times: dict[str, list[float]] = {name: [] for name in sides}
    losses: dict[str, float] = {}
    for _ in range(args.steps):  # alternate, so drift in the machine's speed hits both sides alike
        for name, step in sides.items():
            t = time.perf_counter()
            losses[name] = step()
            times[name].append(time.perf_counter() - t)
    rows = []
    for name in sides:
        sec = float(np.median(times[name]))
        rows.append((name, tokens / sec, tokens * flops_tok / sec / peak, sec, losses[name]))
    print("\n| impl | tokens/s | MFU (of measured peak) | s/step (median) | loss |\n|---|---|---|---|---|")
    for name, tps, mfu, sec, loss in rows:
        print(f"| {name} | {tps:,.0f} | {mfu:.1%} | {sec:.2f} | {loss:.4f} |")
    print(f"\nrstar-jax / pytorch tokens/s: {rows[0][1] / rows[1][1]:.2f}x")


if __name__ == "__main__":
    main()
