"""Search throughput at a fixed budget: problems/hour, tokens/s and where the time goes.

Runs `rstar-jax search` (the library call behind it) for each method on the same problems and prints one table
row per method plus the share of wall time spent in sampling, sandbox, grading, reward model and tree ops.

    python bench/search.py --model smollm2-135m --problems synth:levels=1-2,n=8,seed=0 \
        --methods mcts greedy --rollouts 4 --candidates 4 --in-flight 8

An existing --out/<method> run is resumed, not redone (delete it to measure again).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from rstar_jax.search.baselines import BaselineConfig
from rstar_jax.search.job import SearchConfig, run_search
from rstar_jax.search.mcts import MCTSConfig
from rstar_jax.search.mcts_star import StarSearchConfig
from rstar_jax.search.policy import PHASES


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--reward-model")
    p.add_argument("--problems", default="synth:levels=1-2,n=8,seed=0")
    p.add_argument("--methods", nargs="+", default=["mcts", "greedy"])
    p.add_argument("--mode", default="terminal")
    p.add_argument("--rollouts", type=int, default=4)
    p.add_argument("--candidates", type=int, default=4)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-depth", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--in-flight", type=int, default=0)
    p.add_argument("--limit", type=int)
    p.add_argument("--out", help="run folders go here (default: a temporary folder)")
    a = p.parse_args()
    out = Path(a.out or tempfile.mkdtemp(prefix="bench_search_"))
    rows = []
    for method in a.methods:
        s = run_search(SearchConfig(
            model=a.model, problems=a.problems, method=method, out=str(out / method), reward_model=a.reward_model,
            mode=a.mode, max_depth=a.max_depth, in_flight=a.in_flight, limit=a.limit or 0, max_new_tokens=a.max_new_tokens,
            mcts=MCTSConfig(rollouts=a.rollouts, candidates=a.candidates),
            mcts_star=StarSearchConfig(iterations=a.rollouts, branch=a.candidates),
            baseline=BaselineConfig(samples=a.samples, candidates=a.candidates)))
        rows.append((method, s))
        print(json.dumps({"method": method, **s}), flush=True)
    print(f"\nmodel {a.model}, problems {a.problems}, rollouts {a.rollouts}, candidates {a.candidates}, "
          f"samples {a.samples}, max depth {a.max_depth}, batch {a.batch}; outputs in {out}\n")
    head = ["method", "problems", "accuracy", "solved", "problems/h", "tokens/s", "tokens/problem"]
    head += [f"{ph} %" for ph in (*PHASES, "other")]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for method, s in rows:
        split = s["time_split_s"]
        wall = s["wall_s"] or 1.0
        cells = [method, s["problems"], f"{s['accuracy']:.3f}",
                 "-" if s["solved_rate"] is None else f"{s['solved_rate']:.3f}",
                 f"{s['problems_per_hour']:.1f}", f"{s['tokens_per_s']:.1f}", f"{s['tokens_per_problem']:.0f}"]
        cells += [f"{100 * split[ph] / wall:.1f}" for ph in (*PHASES, "other")]
        print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
