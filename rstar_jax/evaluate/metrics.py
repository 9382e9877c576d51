"""Accuracy metrics from a file of scored samples: pass@1, maj@N, Best-of-N (min / product / last), pass@N.

Samples file (JSONL, one problem per line):
    {"id": str (optional),
     "gold": str,                                  the reference answer
     "samples": [                                  the same sampling run's N solutions, in the order drawn
        {"answer": str | null,                     the final answer; or instead
         "text": str,                              the solution text (answer = last \\boxed{}, #### N, or last number)
         "step_scores": [float] | "score": float,  reward-model scores (optional; all samples or none)
         "num_tokens": int},                       generated tokens (optional; all samples or none)
        ...],
     "greedy": {"answer" | "text", "num_tokens"}}  the greedy solution (optional; all problems or none)

Every metric at N is estimated from the same samples: each problem's samples are cut into floor(n / N) disjoint
consecutive groups of N, the metric is averaged over the groups, then over problems. N runs over 1, 2, 4, ... up to
the fewest samples any problem has.
  pass@1     share of correct samples
  maj@N      the group's most common answer (equivalence classes by the grader; ties: the class seen first)
  bon_X@N    the answer of the group's best sample by aggregated step score X (min / product / last; a sample with
             a single "score" uses it for every X; ties: the first sample)
  pass@N     some sample in the group is correct (the ceiling for any selection rule)
  tokens@N   generated tokens per problem for a group (needs num_tokens)

Outputs in `out_dir`: metrics.json, metrics.md (one table), accuracy_vs_n.png and, with num_tokens,
accuracy_vs_tokens.png.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from rstar_jax.jsonl import InputError, iter_jsonl
from rstar_jax.math.grading import Grader, extract_answer
from rstar_jax.plots import plot_accuracy
from rstar_jax.scoring import AGGREGATIONS, aggregate


@dataclasses.dataclass(frozen=True)
class Sample:
    answer: str | None
    scores: tuple[float, ...] | None  # step scores (a lone "score" is a one-element tuple)
    num_tokens: int | None


@dataclasses.dataclass(frozen=True)
class Problem:
    id: str
    gold: str
    samples: tuple[Sample, ...]
    greedy: Sample | None


# ---------------------------------------------------------------------------------------------
# Reading


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _sample(obj: Any, where: str) -> Sample:
    if not isinstance(obj, dict):
        raise InputError(f"{where}: a sample must be a JSON object, got {type(obj).__name__}")
    if "answer" in obj:
        answer = obj["answer"]
        if answer is not None and not isinstance(answer, str):
            raise InputError(f"{where}: 'answer' must be a string or null")
    elif isinstance(obj.get("text"), str):
        answer = extract_answer(obj["text"])
    else:
        raise InputError(f"{where}: a sample needs 'answer' or 'text'")
    scores = None
    if "step_scores" in obj:
        scores = obj["step_scores"]
        if not isinstance(scores, list) or not scores or not all(_number(s) for s in scores):
            raise InputError(f"{where}: 'step_scores' must be a non-empty list of finite numbers")
        scores = tuple(float(s) for s in scores)
    elif "score" in obj:
        if not _number(obj["score"]):
            raise InputError(f"{where}: 'score' must be a finite number")
        scores = (float(obj["score"]),)
    tokens = obj.get("num_tokens")
    if tokens is not None and (not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0):
        raise InputError(f"{where}: 'num_tokens' must be a non-negative integer")
    return Sample(answer, scores, tokens)


def read_samples(path: str | Path) -> list[Problem]:
    """Problems of a samples file (format in the module docstring); the first bad line is a one-line error."""
    problems: list[Problem] = []
    for n, obj in iter_jsonl(path, required=("gold", "samples")):
        where = f"{path}:{n}"
        gold = str(obj["gold"]) if _number(obj["gold"]) else obj["gold"]
        if not isinstance(gold, str) or not gold.strip():
            raise InputError(f"{where}: 'gold' must be a non-empty string")
        if not isinstance(obj["samples"], list) or not obj["samples"]:
            raise InputError(f"{where}: 'samples' must be a non-empty list")
        samples = tuple(_sample(s, f"{where}: sample {i}") for i, s in enumerate(obj["samples"]))
        greedy = _sample(obj["greedy"], f"{where}: greedy") if "greedy" in obj else None
        problems.append(Problem(str(obj.get("id", n)), gold, samples, greedy))
    for label in ("scores", "num_tokens"):
        if len({getattr(s, label) is None for p in problems for s in p.samples}) > 1:
            raise InputError(f"{path}: some samples have {label} and some do not (give them for all or none)")
    if len({p.greedy is not None for p in problems}) > 1:
        raise InputError(f"{path}: some problems have 'greedy' and some do not (give it for all or none)")
    return problems


# ---------------------------------------------------------------------------------------------
# Metrics


def sample_budgets(problems: Sequence[Problem]) -> list[int]:
    n = min(len(p.samples) for p in problems)
    return [1 << i for i in range(n.bit_length())]


def _groups(n: int, size: int) -> list[range]:
    return [range(g * size, (g + 1) * size) for g in range(n // size)]


def majority_correct(class_of: Sequence[int], correct: Sequence[bool], group: range) -> bool:
    """Is the group's most common answer class correct? Ties go to the class seen first in the group."""
    counts = Counter(class_of[i] for i in group if class_of[i] >= 0)
    if not counts:
        return False
    first = {}
    for i in group:
        first.setdefault(class_of[i], i)
    winner = max(counts, key=lambda c: (counts[c], -first[c]))
    return correct[first[winner]]


def best_of_n_correct(scores: Sequence[float], correct: Sequence[bool], group: range) -> bool:
    """Is the group's highest-scored sample correct? Ties go to the first."""
    best = max(group, key=lambda i: (scores[i], -i))
    return correct[best]


def compute_metrics(problems: Sequence[Problem], grader: Grader) -> dict[str, Any]:
    """Every metric of the module docstring (accuracies in %), per N where they depend on N."""
    pairs = [(p.gold, s.answer) for p in problems for s in p.samples]
    flat = iter(grader.equivalent_many(pairs))
    correct = [[next(flat) for _ in p.samples] for p in problems]
    class_of = [grader.majority_vote([s.answer for s in p.samples]).class_of for p in problems]
    has_scores = problems[0].samples[0].scores is not None
    has_tokens = problems[0].samples[0].num_tokens is not None

    def mean_over(per_problem: Sequence[float]) -> float:
        return 100.0 * sum(per_problem) / len(per_problem)

    out: dict[str, Any] = {
        "problems": len(problems),
        "samples_per_problem": min(len(p.samples) for p in problems),
        "pass@1": mean_over([sum(c) / len(c) for c in correct]),
    }
    if problems[0].greedy is not None:
        greedy = grader.equivalent_many([(p.gold, p.greedy.answer) for p in problems])
        out["greedy"] = mean_over(greedy)
        if has_tokens:
            out["greedy_tokens"] = sum(p.greedy.num_tokens or 0 for p in problems) / len(problems)
    rows = []
    for N in sample_budgets(problems):
        acc: dict[str, list[float]] = {"maj": [], "pass": []}
        acc.update({f"bon_{how}": [] for how in AGGREGATIONS} if has_scores else {})
        tokens = []
        for p, c, cls in zip(problems, correct, class_of):
            groups = _groups(len(p.samples), N)
            acc["maj"].append(sum(majority_correct(cls, c, g) for g in groups) / len(groups))
            acc["pass"].append(sum(any(c[i] for i in g) for g in groups) / len(groups))
            if has_scores:
                for how in AGGREGATIONS:
                    agg = [aggregate(s.scores, how) for s in p.samples]
                    acc[f"bon_{how}"].append(sum(best_of_n_correct(agg, c, g) for g in groups) / len(groups))
            if has_tokens:
                tokens.append(sum(sum(p.samples[i].num_tokens for i in g) for g in groups) / len(groups))
        row = {"N": N, **{k: mean_over(v) for k, v in acc.items()}}
        if has_tokens:
            row["tokens"] = sum(tokens) / len(tokens)
        rows.append(row)
    out["by_n"] = rows
    return out


# ---------------------------------------------------------------------------------------------
# Report


def _table(m: dict[str, Any]) -> str:
    cols = [k for k in m["by_n"][0] if k != "N"]
    lines = [f"{m['problems']} problems, {m['samples_per_problem']} samples each; pass@1 {m['pass@1']:.1f}%"
             + (f", greedy {m['greedy']:.1f}%" if "greedy" in m else ""), "",
             "| N | " + " | ".join(f"{c}@N" if c != "tokens" else "tokens" for c in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for row in m["by_n"]:
        lines.append(f"| {row['N']} | " + " | ".join(f"{row[c]:.1f}" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def eval_samples(samples_path: str | Path, out_dir: str | Path, *, grader: Grader | None = None,
                 grader_workers: int = 1) -> dict[str, Any]:
    """`rstar-jax eval --samples`: read, grade, write metrics.json / metrics.md / PNGs into `out_dir`."""
    problems = read_samples(samples_path)
    own = grader is None
    grader = Grader(workers=grader_workers) if own else grader
    try:
        m = compute_metrics(problems, grader)
    finally:
        if own:
            grader.close()
    m["samples"] = str(samples_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(m, indent=2) + "\n")
    (out / "metrics.md").write_text(_table(m))
    points = [("greedy", m["greedy"], m.get("greedy_tokens"))] if "greedy" in m else []
    plot_accuracy(m["by_n"], points, "N", out / "accuracy_vs_n.png")
    if "tokens" in m["by_n"][0]:
        plot_accuracy(m["by_n"], points, "tokens", out / "accuracy_vs_tokens.png")
    return m
