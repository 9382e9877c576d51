"""Policy SFT records from problems that carry a reference step-format solution (the synthetic generator's)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from rstar_jax.data.problems import Problem
from rstar_jax.jsonl import InputError, write_jsonl
from rstar_jax.math.steps import build_prompt


def reference_sft_records(problems: Sequence[Problem]) -> list[dict[str, str]]:
    """`{prompt, response}` in the training format: the zero-shot step-format prompt and the reference solution."""
    missing = [p.id for p in problems if not p.solution]
    if missing:
        raise InputError(f"problem {missing[0]!r} has no reference solution to train on")
    return [{"prompt": build_prompt(p.question), "response": p.solution} for p in problems]


def write_reference_sft(problems: Sequence[Problem], out: str | Path) -> None:
    write_jsonl(out, reference_sft_records(problems))
