"""Problems: jsonl loaders and the synthetic generator, behind one entry point."""

from __future__ import annotations

from rstar_jax.data.problems import Problem, ProblemFormatError, load_jsonl
from rstar_jax.data.synth import SynthSpecError, generate, parse_levels, parse_synth_spec, write_synth_file


def load_problems(spec: str, limit: int | None = None, skip_bad: bool = False) -> list[Problem]:
    """A jsonl path (GSM8K / MATH / generic, detected per file) or "synth:levels=1-2,n=32,seed=0"."""
    if spec.startswith("synth:"):
        s = parse_synth_spec(spec)
        return generate(list(s.levels), s.n if limit is None else min(s.n, limit), s.seed)
    return load_jsonl(spec, limit=limit, skip_bad=skip_bad)[0]


__all__ = ["Problem", "ProblemFormatError", "SynthSpecError", "generate", "load_jsonl", "load_problems",
           "parse_levels", "parse_synth_spec", "write_synth_file"]
