"""New tokens/s of rstar-jax's engine vs transformers `generate` on SmolLM2-135M (CPU, fp32).

Both run in this process on the same converted weights and the same prompts, and produce exactly
`--new-tokens` tokens per sequence (EOS ignored). Timings exclude compilation / warm-up (one untimed run
each) and take the best of `--repeats`.

    python bench/generate.py [--new-tokens 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import torch
from transformers import AutoModelForCausalLM

from rstar_jax.models.hf_io import load_model
from rstar_jax.models.registry import resolve
from rstar_jax.engine import SamplingConfig, generate, prepare

PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips",
    "The capital of France is",
    "def fibonacci(n):",
    "Explain why the sky is blue in one paragraph.",
    "Solve for x: 3x + 7 = 22. First,",
    "Once upon a time, in a small village by the sea,",
    "List three prime numbers greater than 100:",
    "A train travels 120 km in 1.5 hours. Its average speed is",
    "import numpy as np\n# compute the mean of a list",
    "The derivative of x^3 + 2x is",
    "Write a haiku about autumn leaves.",
    "In 1969, Neil Armstrong",
    "Q: What is 17 * 23?\nA:",
    "The quick brown fox",
    "Photosynthesis is the process by which",
    "Let f(x) = x^2 - 4. The roots of f are",
]


def best_of(fn, repeats):
    fn()  # warm-up: compilation for JAX, allocator warm-up for torch
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    folder = resolve(a.model)
    lm = load_model(a.model)
    model = prepare(lm.params, lm.cfg)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = lm.tokenizer
    n = a.new_tokens
    cases = [("batch 1", PROMPTS[:1], 1, 0.0), ("batch 16", PROMPTS, 1, 0.0), ("8 samples of 1 prompt", PROMPTS[:1], 8, 0.7)]
    rows = []
    for name, prompts, k, temp in cases:
        ids = [tok.encode(p, add_special_tokens=True) for p in prompts]
        s = SamplingConfig(max_new_tokens=n, temperature=temp, num_samples=k, ignore_eos=True, top_k=0)
        ours = best_of(lambda: generate(model, tok, ids, s, jax.random.key(0)), a.repeats)

        width = max(map(len, ids))
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        inp = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])

        def run_hf():
            with torch.inference_mode():
                hf.generate(inp, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=temp > 0,
                            temperature=temp or None, top_k=0, top_p=1.0, num_return_sequences=k, pad_token_id=pad)

        theirs = best_of(run_hf, a.repeats)
        total = len(prompts) * k * n
        rows.append((name, total / ours, total / theirs))
    print(f"SmolLM2-135M, CPU ({os.cpu_count()} cores), fp32, {n} new tokens per sequence, best of {a.repeats}\n")
    print("| case | rstar-jax tok/s | transformers tok/s | ratio |")
    print("|---|---:|---:|---:|")
    for name, ours, theirs in rows:
        print(f"| {name} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x |")


if __name__ == "__main__":
    main()
