"""The engine against the previous call-by-call sampler on a stream of MCTS policy requests, in one process.

The requests are the default MCTS run's own (`bench/results/search_default/mcts/trees.tar.xz`): every expanded node of
the first `--problems` problems is one request (the 2-shot prompt, the question and the node's path, as the search
built it), 8 samples at temperature 0.8, 256 new tokens at most, stopped by the step tags. The previous sampler
gets them as the level-synchronous search made its calls: per call, the next expansion of each problem of the
batch; its code is read from git at `--previous` (the commit before the engine) into a private package. The
engine gets the whole stream and keeps its slots busy. Both draw with the same per-request keys. A third run
measures the engine's full-slot rate: every slot decoding (EOS and stops ignored) with nothing else to do.

    python bench/engine.py [--problems 8] [--calls 8] [--slots 64]
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

import jax
import numpy as np

from rstar_jax.data import Problem
from rstar_jax.engine import Engine, EngineConfig, Request, SamplingConfig, prepare
from rstar_jax.math.steps import STOP_STRINGS
from rstar_jax.models.hf_io import load_model
from rstar_jax.search import tree_io
from rstar_jax.search.job import few_shot_text
from rstar_jax.search.mcts import path_texts
from rstar_jax.search.policy import StepEnv

REPO = Path(__file__).resolve().parents[1]
TREES = REPO / "bench" / "results" / "search_default" / "mcts" / "trees.tar.xz"  # its trees/ folder, archived


def tree_files() -> list[Path]:
    """The default MCTS run's saved trees (their .json paths, in name order), unpacked from TREES into a
    temporary folder (each .json next to its .npz, as `tree_io.load` reads them)."""
    folder = Path(tempfile.mkdtemp(prefix="search_default_trees_"))
    with tarfile.open(TREES, "r:xz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith("trees/") and ".." not in m.name]
        tar.extractall(folder, members=members)
    return sorted((folder / "trees").glob("*.json"))


def previous_sampler(commit: str):
    """The sampler module as it was at `commit` (sampling.py with its jit.py and llama.py), importable here."""
    root = Path(tempfile.mkdtemp(prefix="previous_sampler_"))
    pkg = root / "previous_sampler"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for src, dst in [("rstar_jax/sampling.py", "sampling.py"), ("rstar_jax/jit.py", "jit.py"),
                     ("rstar_jax/models/llama.py", "llama.py")]:
        text = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:{src}"], check=True, capture_output=True,
                              text=True).stdout
        text = text.replace("from rstar_jax.jit import", "from previous_sampler.jit import")
        text = text.replace("from rstar_jax.models.llama import", "from previous_sampler.llama import")
        (pkg / dst).write_text(text)
    sys.path.insert(0, str(root))
    return importlib.import_module("previous_sampler.sampling")


def mcts_calls(env: StepEnv, problems: int, calls: int) -> list[list[tuple[tuple[int, ...], int]]]:
    """Per level-synchronous call, (prompt ids, request seed) of each problem's next expansion, in node order."""
    per_problem = []
    for path in tree_files()[:problems]:
        saved = tree_io.load(path)
        meta = saved.meta["problem"]
        question = env.question_ids(Problem(str(meta["id"]), meta["question"], str(meta["answer"]), None, None, "tree"))
        kids = saved.children()
        expanded = sorted((min(k), node) for node, k in enumerate(kids) if k)  # in the order the search made them
        reqs = []
        for _, node in expanded:
            ids = list(question)
            for text in path_texts(saved.nodes, saved.arrays["parent"], node):
                ids += env.encode(text)
            reqs.append((tuple(ids), zlib.crc32(f"{path.stem}:{node}".encode())))
        per_problem.append(reqs)
    return [[reqs[c] for reqs in per_problem if c < len(reqs)] for c in range(calls)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--problems", type=int, default=8, help="problems of the default run whose requests are replayed")
    ap.add_argument("--calls", type=int, default=8, help="level-synchronous calls replayed (one request per problem)")
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--previous", default="d8788b2", help="commit of the previous sampler")
    a = ap.parse_args()
    lm = load_model(a.model)
    env = StepEnv(None, None, lm.tokenizer, None, step_len=0,
                  few_shot=few_shot_text("synth:levels=1-2,n=32,seed=0", 2))
    calls = mcts_calls(env, a.problems, a.calls)
    shared = env.shared_prefix_ids
    settings = SamplingConfig(max_new_tokens=256, temperature=0.8, num_samples=8, stop=STOP_STRINGS)
    key = lambda seed: jax.random.key(seed)  # noqa: E731
    n_req = sum(map(len, calls))
    print(f"{n_req} requests in {len(calls)} calls; prompts {np.mean([len(p) for c in calls for p, _ in c]):.0f} "
          f"tokens on average ({len(shared)} shared)", flush=True)

    old = previous_sampler(a.previous)
    old_params = old.prepare_params(lm.params)
    old_settings = old.SamplingConfig(max_new_tokens=256, temperature=0.8, num_samples=8, stop=STOP_STRINGS)

    def previous_pass():
        t0 = time.perf_counter()
        out = [old.generate(old_params, lm.cfg, lm.tokenizer, [p for p, _ in c], old_settings,
                            [key(s) for _, s in c], shared_prefix=shared) for c in calls]
        return out, time.perf_counter() - t0

    _, cold_s = previous_pass()  # compiles every shape the calls meet, as a fresh search does
    old_out, old_s = previous_pass()  # then again with every program compiled: its best case
    old_tokens = sum(len(x.token_ids) for c in old_out for row in c for x in row)
    print(f"previous sampler: {old_tokens} tokens in {old_s:.1f} s ({cold_s:.1f} s compiling its shapes)", flush=True)

    model = prepare(lm.params, lm.cfg)
    config = EngineConfig(slots=a.slots, lanes=8, max_prompt=2048, max_new_tokens=256)
    engine = Engine(model, lm.tokenizer, config)
    engine.set_shared_prefix(shared)
    engine.run([Request(calls[0][0][0], settings, key(0))])  # compiles
    before = dict(engine.stats)
    t0 = time.perf_counter()
    new_out = engine.run([Request(p, settings, key(s)) for c in calls for p, s in c])
    new_s = time.perf_counter() - t0
    new_tokens = sum(len(x.token_ids) for row in new_out for x in row)
    steps = engine.stats["decode_steps"] - before.get("decode_steps", 0)
    print(f"engine: {new_tokens} tokens in {new_s:.1f} s ({steps} decode steps, "
          f"{engine.stats['prefill_tokens'] - before.get('prefill_tokens', 0)} prefill tokens)", flush=True)
    same = sum(x.token_ids == y.token_ids for c, c_new in zip(old_out, _split(new_out, calls)) for r, r_new in zip(c, c_new)
               for x, y in zip(r, r_new))

    full = EngineConfig(slots=a.slots, lanes=8, max_prompt=2048, max_new_tokens=256)
    engine = Engine(model, lm.tokenizer, full)
    engine.set_shared_prefix(shared)
    long = SamplingConfig(max_new_tokens=256, temperature=0.8, num_samples=8, ignore_eos=True)
    prompts = [p for c in calls for p, _ in c][: a.slots // 8]
    engine.run([Request(p, long, key(i)) for i, p in enumerate(prompts)])  # compiles (same programs)
    t0 = time.perf_counter()
    out = engine.run([Request(p, long, key(i)) for i, p in enumerate(prompts)])
    full_s = time.perf_counter() - t0
    full_rate = sum(len(x.token_ids) for row in out for x in row) / full_s

    old_rate, new_rate = old_tokens / old_s, new_tokens / new_s
    print(f"\nSmolLM2-135M, CPU ({os.cpu_count()} cores), fp32, {n_req} MCTS requests x 8 samples, "
          f"{same}/{8 * n_req} samples identical\n")
    print("| sampler | tokens | s | tokens/s | ratio |")
    print("|---|---:|---:|---:|---:|")
    print(f"| previous, call by call ({a.previous}), shapes compiled | {old_tokens} | {old_s:.1f} | {old_rate:.1f} | "
          "1.00x |")
    print(f"| previous, call by call, compiling its shapes | {old_tokens} | {cold_s:.1f} | {old_tokens / cold_s:.1f} | "
          f"{old_s / cold_s:.2f}x |")
    print(f"| engine, {a.slots} slots, the stream | {new_tokens} | {new_s:.1f} | {new_rate:.1f} | {new_rate / old_rate:.2f}x |")
    print(f"| engine, {a.slots} slots, all busy | | {full_s:.1f} | {full_rate:.1f} | |")
    print(f"\nstream rate / full-slot rate: {new_rate / full_rate:.0%}")


def _split(flat, calls):
    out, i = [], 0
    for c in calls:
        out.append(flat[i : i + len(c)])
        i += len(c)
    return out


if __name__ == "__main__":
    main()
