"""Synthetic generator: determinism, level structure, and the acceptance check that every level's
reference solutions reproduce their answers through the sandbox and the grader."""

import json
import os
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

from rstar_jax.data.synth import generate, parse_levels, write_synth_file
from rstar_jax.math.grading import Grader
from rstar_jax.math.steps import STEP_END, StepKind, StepRunner, replay_solutions
from rstar_jax.sandbox import SandboxPool

REPO = Path(__file__).resolve().parents[1]


def test_parse_levels():
    assert parse_levels("1-5") == [1, 2, 3, 4, 5]
    assert parse_levels("1,3") == [1, 3]
    assert parse_levels("4, 1-2, 2") == [4, 1, 2]


def test_same_seed_same_bytes(tmp_path):
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    write_synth_file([1, 2, 3, 4, 5], 200, 0, a)
    # a fresh interpreter with a different hash seed must write the same bytes
    code = ("import sys; from rstar_jax.data.synth import write_synth_file; "
            "write_synth_file([1, 2, 3, 4, 5], 200, 0, sys.argv[1])")
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-c", code, str(b)], check=True, env=env, cwd=tmp_path)
    write_synth_file([1, 2, 3, 4, 5], 200, 1, c)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    assert len(rows) == 200 and list(rows[0]) == ["id", "question", "answer", "level", "solution"]
    assert len({r["id"] for r in rows}) == 200 and len({r["question"] for r in rows}) > 190


def test_level_structure():
    problems = generate([1, 2, 3, 4, 5], 500, seed=3)
    for p in problems:
        ops = p.solution.count(STEP_END) - 1  # the first step only sets up the starting amount
        value = Fraction(p.answer)
        assert value > 0 and str(value) == p.answer  # exact, in lowest terms, as Python prints a Fraction
        numbers = [int(n) for n in re.findall(r"\d+", p.question)]
        if p.level == 1:
            assert ops == 1 and value.denominator == 1 and max(numbers) <= 20
        elif p.level == 2:
            assert ops == 2 and value.denominator == 1 and max(numbers) <= 50
        elif p.level == 3:
            assert ops == 3
        elif p.level == 4:
            assert ops in (3, 4) and ("/" in p.question or "%" in p.question)
        else:
            assert 4 <= ops <= 6 and re.search(r"\d/\d|%|cents|milliliters|grams|centimeters", p.question)
    by_level = {lv: [p for p in problems if p.level == lv] for lv in range(1, 6)}
    assert all(len(ps) == 100 for ps in by_level.values())
    assert any(Fraction(p.answer).denominator > 1 for p in by_level[5])  # fractions do occur
    assert any("cents" in p.question or "grams" in p.question for p in by_level[5])  # so do unit conversions


def test_every_level_reproduces_through_sandbox_and_grader():
    problems = generate([1, 2, 3, 4, 5], 150, seed=0)  # 30 per level
    with SandboxPool(workers=2, timeout_s=5.0) as pool:
        replays = replay_solutions(StepRunner(pool.run), [p.solution for p in problems])
    with Grader() as grader:
        printed = grader.equivalent_many([(p.answer, r[-2].observation) for p, r in zip(problems, replays)])
        boxed = grader.equivalent_many([(p.answer, r[-1].answer) for p, r in zip(problems, replays)])
    for level in range(1, 6):
        idx = [i for i, p in enumerate(problems) if p.level == level]
        for i in idx:
            kinds = [o.kind for o in replays[i]]
            assert kinds[-2:] == [StepKind.CODE_TERMINAL, StepKind.ANSWER_TERMINAL], (problems[i].id, replays[i][-1])
            assert set(kinds[:-2]) == {StepKind.INTERMEDIATE}
            assert "".join(o.text for o in replays[i]) == problems[i].solution
        assert all(printed[i] and boxed[i] for i in idx), f"level {level}"
