"""Shared by the training tests: tiny random-model overrides and small synthetic record files."""

from __future__ import annotations

import json
import random
from pathlib import Path

TINY = [
    "model.arch.vocab_size=264",
    "model.arch.hidden_size=64",
    "model.arch.intermediate_size=128",
    "model.arch.num_hidden_layers=2",
    "model.arch.num_attention_heads=4",
    "model.arch.num_key_value_heads=2",
    "data.seq_len=64",
    "data.batch_size=8",
    "data.eval_fraction=0",
    "train.log_every=1",
    "train.async_checkpoints=false",
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def sft_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        out.append({"prompt": f"Q: {a}+{b}?\nA:", "response": f" x = {a} + {b}\nprint(x) # {a + b}"})
    return out


def step_records(kind: str, n: int, seed: int = 0) -> list[dict]:
    """prm / value records: a correct step, then a step whose correctness varies."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        good = rng.random() < 0.5
        steps = [f"x = {a} + {b}\n", f"y = x * 2 # {2 * (a + b) if good else 2 * (a + b) + 1}\n"]
        targets = [1.0, 1.0 if good else 0.0]
        if kind == "value":
            targets = [0.5, 1.0 if good else 0.0]
        out.append({"prompt": f"Q: ({a}+{b})*2?\n", "steps": steps, ("labels" if kind == "prm" else "values"): targets})
    return out


def ppm_records(n: int, seed: int = 0) -> list[dict]:
    """Positive: the reference step; negative: the same step with a wrong operation or a wrong number."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(1, 9)
        op, word = rng.choice([("+", "add"), ("-", "sub"), ("*", "mul")])
        pos = f"t = {a} {op} {b}"
        if rng.random() < 0.5:
            neg = f"t = {a} {rng.choice([o for o in '+-*' if o != op])} {b}"
        else:
            neg = f"t = {a} {op} {rng.choice([c for c in range(1, 10) if c != b])}"
        out.append({"prompt": f"{word} {a} {b}\n", "pos": pos, "neg": neg, "pos_count": 2, "neg_count": 1})
    return out
