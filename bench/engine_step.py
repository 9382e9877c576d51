"""One decode step of the engine with every slot busy, for several engine shapes, in one process.

Each shape gets a filled engine: a 700-token shared prefix, then requests with 200-token prompts and `lanes`
samples each until every slot decodes. Then `--repeats` decode calls (`engine.decode_steps` steps each) are timed
alone. The table gives milliseconds per step, tokens/s at full slots, and each shape's time relative to the
first one.

    python bench/engine_step.py [--shapes 16x8 32x8 32x1] [--max-prompt 1024] [--repeats 3]

Shapes are SLOTSxLANES; entries are the engine's default (2 x slots / lanes; slots with one lane).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from rstar_jax.config import InferenceConfig
from rstar_jax.engine import Engine, EngineConfig, Request, SamplingConfig, programs
from rstar_jax.engine.model import load_policy, single_device_mesh
from rstar_jax.models.registry import resolve

PREFIX, PROMPT = 700, 200


def step_ms(model, tokenizer, cfg: EngineConfig, repeats: int) -> float:
    engine = Engine(model, tokenizer, cfg)
    rng = np.random.default_rng(0)
    prefix = [int(x) for x in rng.integers(100, 20000, PREFIX)]
    engine.set_shared_prefix(prefix)
    settings = SamplingConfig(cfg.max_new_tokens, temperature=1.0, num_samples=cfg.lanes)
    for i in range(cfg.slots // cfg.lanes):
        engine.submit(Request(prefix + [int(x) for x in rng.integers(100, 20000, PROMPT)], settings, jax.random.key(i)))
    for _ in range(6):  # prefill and admission until every slot runs (and the programs are compiled)
        engine.step()
    lay, best = engine.lay, float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.state, rep = programs.decode(model.params, engine.state, engine.shared, engine.table, engine.cancel,
                                            cfg=model.cfg, lay=lay, read=lay.blocks, tuned=model.tuned)
        jax.block_until_ready(rep)
        best = min(best, (time.perf_counter() - t0) * 1000 / lay.steps)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--shapes", nargs="+", default=["16x8", "32x8", "32x1"], help="SLOTSxLANES")
    ap.add_argument("--max-prompt", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    lm, model = load_policy(resolve(a.model), InferenceConfig(), single_device_mesh())
    rows = []
    for shape in a.shapes:
        slots, lanes = (int(x) for x in shape.split("x"))
        cfg = EngineConfig(slots=slots, lanes=lanes, max_prompt=a.max_prompt, max_new_tokens=64)
        ms = step_ms(model, lm.tokenizer, cfg, a.repeats)
        rows.append((shape, cfg.layout(1).entries, ms, slots * 1000 / ms))
        print(f"{shape}: {ms:.1f} ms/step", flush=True)
    print("\n| slots x lanes | entries | ms / step | tokens/s at full slots | time vs first |")
    print("|---|---:|---:|---:|---:|")
    for shape, entries, ms, tps in rows:
        print(f"| {shape} | {entries} | {ms:.1f} | {tps:.0f} | {ms / rows[0][2]:.2f}x |")


if __name__ == "__main__":
    main()
