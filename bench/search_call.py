"""One search-shaped policy call, with and without gathering the running samples into fewer rows.

The call is what `rstar-jax search --method mcts` makes at its defaults: `--batch` synthetic problems, each
prompted with the 2-shot block (prefilled once and cached) and sampled `--candidates` times at temperature 0.8 up
to `--max-new-tokens` tokens, stopping at the step-end strings. Each sample keeps its key and positions, so both
sides draw the same tokens up to float rounding: a smaller batch can round a logit differently, and a sample
whose draw sits on a boundary then goes another way (the same happens between batch sizes without gathering).
The table counts the identical samples. Each side runs once untimed (compilation), then `--repeats` times
alternating, best kept.

    python bench/search_call.py [--batch 8] [--candidates 8] [--max-new-tokens 256] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time

import jax

from rstar_jax import sampling
from rstar_jax.data import load_problems
from rstar_jax.math.steps import STOP_STRINGS
from rstar_jax.models.hf_io import load_model
from rstar_jax.search.job import few_shot_text
from rstar_jax.search.policy import StepEnv


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--problems", default="synth:levels=1-2,n=32,seed=0")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()

    lm = load_model(a.model)
    params = sampling.prepare_params(lm.params)
    env = StepEnv(None, None, lm.tokenizer, None, step_len=a.max_new_tokens, few_shot=few_shot_text(a.problems, 2))
    prompts = [env.question_ids(p) for p in load_problems(a.problems, limit=a.batch)]
    settings = sampling.SamplingConfig(max_new_tokens=a.max_new_tokens, temperature=0.8,
                                       num_samples=a.candidates, stop=STOP_STRINGS)
    sides = {"gathering running samples": sampling.GATHER_MIN_ROWS, "every row to the end": 1 << 30}

    def call(min_rows: int):
        sampling.GATHER_MIN_ROWS = min_rows
        t = time.perf_counter()
        out = sampling.generate(params, lm.cfg, lm.tokenizer, prompts, settings, jax.random.key(0),
                                shared_prefix=env.shared_prefix_ids)
        return time.perf_counter() - t, [[c.token_ids for c in row] for row in out]

    best, outputs = {}, {}
    for side, min_rows in sides.items():
        _, outputs[side] = call(min_rows)
    for _ in range(a.repeats):
        for side, min_rows in sides.items():
            s, _ = call(min_rows)
            best[side] = min(best.get(side, s), s)
    gathered, full = outputs.values()
    pairs = [(x, y) for row_x, row_y in zip(gathered, full) for x, y in zip(row_x, row_y)]
    same = sum(x == y for x, y in pairs)
    limit = sum(len(y) == a.max_new_tokens for _, y in pairs)
    print(f"{a.batch} prompts x {a.candidates} samples: {same}/{len(pairs)} samples identical on both sides; "
          f"without gathering {limit} samples ran to the {a.max_new_tokens}-token limit\n")
    print("| decode | s per call | tokens | tokens/s | ratio |\n|---|---:|---:|---:|---:|")
    base = best["every row to the end"]
    for side, s in best.items():
        tokens = sum(len(t) for row in outputs[side] for t in row)
        print(f"| {side} | {s:.1f} | {tokens} | {tokens / s:.0f} | {base / s:.2f}x |")

if __name__ == "__main__":
    main()
