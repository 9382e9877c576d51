"""Problem records and jsonl loaders (GSM8K, MATH, generic), format auto-detected per file.

  GSM8K:   {"question", "answer": "...rationale...\\n#### 72"}          answer = text after ####
  MATH:    {"problem", "solution", ["answer"], ["level": "Level 3"]}   answer = `answer`, else the last
                                                                         \\boxed{} of `solution`
  generic: {"question", "answer", ["id"], ["level"], ["solution"]}     (the synthetic generator's files)

The first record of a file decides its format. A malformed line raises ProblemFormatError naming the
file and line, or with `skip_bad=True` is skipped and counted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any, Callable

from rstar_jax.math.grading import gsm8k_answer, last_boxed

log = logging.getLogger(__name__)


class ProblemFormatError(ValueError):
    """A problem file or record that cannot be loaded (message names file and line)."""


@dataclasses.dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: str  # gold final answer (LaTeX or plain)
    level: int | None  # difficulty (MATH 1-5, synthetic 1-5), None if unknown
    solution: str | None  # reference solution (MATH text, GSM8K rationale, or step format)
    source: str  # "gsm8k" | "math" | "jsonl" | "synth"


def _text(rec: dict, key: str) -> str:
    value = rec.get(key)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
        raise ValueError(f"field {key!r} must be a non-empty string or number")
    return str(value).strip()


def _level(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(?:Level\s*)?(\d+)\s*", str(value))
    return int(m.group(1)) if m else None  # MATH has a few "Level ?" rows


def _record_id(rec: dict, default: str) -> str:
    for key in ("id", "unique_id", "idx"):
        if rec.get(key) is not None:
            return str(rec[key])
    return default


def _gsm8k(rec: dict, default_id: str) -> Problem:
    rationale = _text(rec, "answer")
    answer = gsm8k_answer(rationale)
    if answer is None:
        raise ValueError("GSM8K answer has no '#### N' final line")
    solution = rationale[: rationale.rfind("####")].strip()
    return Problem(_record_id(rec, default_id), _text(rec, "question"), answer, _level(rec.get("level")),
                   solution or None, "gsm8k")


def _math(rec: dict, default_id: str) -> Problem:
    solution = rec.get("solution") if isinstance(rec.get("solution"), str) else None
    if rec.get("answer") is not None:
        answer = _text(rec, "answer")
    else:
        answer = last_boxed(solution or "")
        if not answer:
            raise ValueError("MATH record has no 'answer' and no \\boxed{} in 'solution'")
    return Problem(_record_id(rec, default_id), _text(rec, "problem"), answer, _level(rec.get("level")), solution,
                   "math")


def _generic(rec: dict, default_id: str) -> Problem:
    solution = rec.get("solution")
    if solution is not None and not isinstance(solution, str):
        raise ValueError("field 'solution' must be a string")
    return Problem(_record_id(rec, default_id), _text(rec, "question"), _text(rec, "answer"),
                   _level(rec.get("level")), solution, "jsonl")


def detect_format(rec: dict) -> Callable[[dict, str], Problem]:
    if "problem" in rec:
        return _math
    if "question" in rec and "answer" in rec:
        return _gsm8k if "####" in str(rec["answer"]) else _generic
    raise ValueError("unrecognised record: expected keys question+answer (GSM8K/generic) or problem+solution (MATH)")


def load_jsonl(path: str | Path, limit: int | None = None, skip_bad: bool = False) -> tuple[list[Problem], int]:
    """Problems of a jsonl file and the number of malformed lines skipped (always 0 unless skip_bad)."""
    path = Path(path)
    if not path.is_file():
        raise ProblemFormatError(f"{path}: no such problem file")
    parse: Callable[[dict, str], Problem] | None = None
    problems: list[Problem] = []
    seen: set[str] = set()
    skipped = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(problems) >= limit:
                break
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("line is not a JSON object")
                parse = parse or detect_format(rec)
                problem = parse(rec, f"{path.stem}-{lineno}")
                if problem.id in seen:
                    raise ValueError(f"duplicate id {problem.id!r}")
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                if not skip_bad:
                    raise ProblemFormatError(f"{path}:{lineno}: {e}") from None
                skipped += 1
                continue
            seen.add(problem.id)
            problems.append(problem)
    if skipped:
        log.warning("%s: skipped %d malformed line(s)", path, skipped)
    if not problems:
        raise ProblemFormatError(f"{path}: no problems found")
    return problems, skipped
