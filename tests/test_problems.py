"""Problem loaders: GSM8K / MATH / generic jsonl auto-detection, bad lines, synthetic specs."""

import json
from pathlib import Path

import pytest

from rstar_jax.data import Problem, ProblemFormatError, SynthSpecError, load_jsonl, load_problems

SHARED = Path(__file__).resolve().parents[2] / "shared"
MATH_DEV = SHARED / "data" / "math_dev.jsonl"


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_gsm8k(tmp_path):
    f = write_jsonl(tmp_path / "gsm.jsonl", [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
        {"question": "Big?", "answer": "so many\n#### 1,250"},
    ])
    a, b = load_problems(f)
    assert a == Problem("gsm-1", "Tom has 3 apples and buys 4. How many?", "7", None, "3 + 4 = <<3+4=7>>7", "gsm8k")
    assert b.answer == "1250" and b.id == "gsm-2"


def test_math_and_generic(tmp_path):
    f = write_jsonl(tmp_path / "m.jsonl", [
        {"problem": "P1", "solution": r"so $\boxed{\frac{1}{2}}$.", "level": "Level 4", "idx": 7},
        {"problem": "P2", "solution": r"\boxed{1} no wait \boxed{2}", "answer": "2", "level": "Level ?"},
    ])
    p1, p2 = load_problems(f)
    assert (p1.id, p1.answer, p1.level, p1.source) == ("7", r"\frac{1}{2}", 4, "math")
    assert (p2.answer, p2.level) == ("2", None)
    g = write_jsonl(tmp_path / "g.jsonl", [{"id": "a", "question": "Q", "answer": 12, "level": 2, "solution": "S"}])
    assert load_problems(g) == [Problem("a", "Q", "12", 2, "S", "jsonl")]


def test_bad_lines_name_file_and_line(tmp_path):
    rows = [{"question": "Q1", "answer": "1\n#### 1"}, "{not json", {"question": "Q3", "answer": "no hashes"},
            {"question": "Q4", "answer": "4\n#### 4"}]
    f = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ProblemFormatError, match=r"bad\.jsonl:2: "):
        load_problems(f)
    problems, skipped = load_jsonl(f, skip_bad=True)
    assert [p.question for p in problems] == ["Q1", "Q4"] and skipped == 2
    assert load_problems(f, limit=1, skip_bad=True)[0].question == "Q1"

    cases = {
        "nomath.jsonl": ([{"problem": "P", "solution": "no box"}], r":1: MATH record has no 'answer'"),
        "unknown.jsonl": ([{"text": "hello"}], r":1: unrecognised record"),
        "dup.jsonl": ([{"id": 1, "question": "Q", "answer": "1"}] * 2, r":2: duplicate id '1'"),
        "array.jsonl": (["[1, 2]"], r":1: line is not a JSON object"),
        "empty.jsonl": (["", "  "], r"no problems found"),
    }
    for name, (rows, message) in cases.items():
        with pytest.raises(ProblemFormatError, match=message):
            load_problems(write_jsonl(tmp_path / name, rows))
    with pytest.raises(ProblemFormatError, match="no such problem file"):
        load_problems(str(tmp_path / "missing.jsonl"))


def test_synth_spec():
    ps = load_problems("synth:levels=1,3,n=6,seed=2")
    assert [p.level for p in ps] == [1, 3, 1, 3, 1, 3] and all(p.source == "synth" and p.solution for p in ps)
    assert len(load_problems("synth:n=10", limit=4)) == 4
    for bad, message in [("synth:levels=0-2,n=3", "within 1-5"), ("synth:levels=1-2", "missing n"),
                         ("synth:n=3,foo=1", "unknown key 'foo'"), ("synth:n=x", "integers"),
                         ("synth:n=3,levels=a", "expected a list")]:
        with pytest.raises(SynthSpecError, match=message):
            load_problems(bad)


@pytest.mark.skipif(not MATH_DEV.exists(), reason="../shared/data/math_dev.jsonl not present")
def test_real_math_file():
    problems = load_problems(str(MATH_DEV))
    assert len(problems) == 4500 and all(p.source == "math" and p.answer for p in problems)
    assert {p.level for p in problems} <= {1, 2, 3, 4, 5, None}
    assert sum(p.level is None for p in problems) < 10
    assert len(load_problems(str(MATH_DEV), limit=25)) == 25
