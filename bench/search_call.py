"""One search-shaped policy call, three ways: as the sampler runs it (running samples gathered into fewer rows,
each chunk attending to a window of the new-token slots), with every chunk attending to all slots, and also
without gathering.

The call is what `rstar-jax search --method mcts` makes at its defaults: `--batch` synthetic problems, each
prompted with the 2-shot block (prefilled once and cached) and sampled `--candidates` times at temperature 0.8 up
to `--max-new-tokens` tokens, stopping at the step-end strings. `--path-tokens N` makes it a call deeper in the
tree: N tokens of each problem's reference solution follow its question, as a path of steps would. Each sample
keeps its key and positions, so all sides draw the same tokens up to float rounding: another batch shape or
window can round a logit differently, and a sample whose draw sits on a boundary then goes another way (the same
happens between batch sizes). The table counts the samples identical to the first side's. Each side runs once
untimed (compilation), then `--repeats` times alternating, best kept.

    python bench/search_call.py [--batch 8] [--candidates 8] [--max-new-tokens 256] [--path-tokens 0] [--repeats 2]
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
    ap.add_argument("--path-tokens", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()

    lm = load_model(a.model)
    params = sampling.prepare_params(lm.params)
    env = StepEnv(None, None, lm.tokenizer, None, step_len=a.max_new_tokens, few_shot=few_shot_text(a.problems, 2))
    problems = load_problems(a.problems, limit=a.batch)
    path = [lm.tokenizer.encode(p.solution * 4, add_special_tokens=False)[: a.path_tokens] for p in problems]
    prompts = [env.question_ids(p) + tuple(ids) for p, ids in zip(problems, path)]
    settings = sampling.SamplingConfig(max_new_tokens=a.max_new_tokens, temperature=0.8,
                                       num_samples=a.candidates, stop=STOP_STRINGS)
    window, whole = sampling.suffix_window, lambda t_end, suffix_len: suffix_len
    sides = {"gathering, suffix windows": (sampling.GATHER_MIN_ROWS, window),
             "gathering, whole suffix": (sampling.GATHER_MIN_ROWS, whole),
             "every row to the end, whole suffix": (1 << 30, whole)}

    def call(min_rows: int, suffix_window):
        sampling.GATHER_MIN_ROWS, sampling.suffix_window = min_rows, suffix_window
        t = time.perf_counter()
        out = sampling.generate(params, lm.cfg, lm.tokenizer, prompts, settings, jax.random.key(0),
                                shared_prefix=env.shared_prefix_ids)
        return time.perf_counter() - t, [[c.token_ids for c in row] for row in out]

    best, outputs = {}, {}
    for side, how in sides.items():
        _, outputs[side] = call(*how)
    for _ in range(a.repeats):
        for side, how in sides.items():
            s, _ = call(*how)
            best[side] = min(best.get(side, s), s)
    first = outputs[next(iter(sides))]
    flat = lambda out: [t for row in out for t in row]  # noqa: E731
    lengths = [len(t) for t in flat(first)]
    print(f"{a.batch} prompts ({min(map(len, prompts))}-{max(map(len, prompts))} tokens) x {a.candidates} samples; "
          f"{sum(n == a.max_new_tokens for n in lengths)} of {len(lengths)} ran to the {a.max_new_tokens}-token limit\n")
    print("| decode | s per call | tokens | tokens/s | identical samples | ratio |\n|---|---:|---:|---:|---:|---:|")
    base = best["every row to the end, whole suffix"]
    for side, s in best.items():
        tokens = sum(map(len, flat(outputs[side])))
        same = sum(x == y for x, y in zip(flat(outputs[side]), flat(first)))
        print(f"| {side} | {s:.1f} | {tokens} | {tokens / s:.0f} | {same}/{len(lengths)} | {base / s:.2f}x |")

if __name__ == "__main__":
    main()
