"""Answer extraction, equivalence (host fast path + math-verify workers) and majority voting."""

import json
import random
import time
from fractions import Fraction
from pathlib import Path

import pytest

from rstar_jax.math.grading import (Grader, GradingError, as_number, extract_answer, gsm8k_answer, last_boxed,
                                    last_number, normalize, quick_equivalent)

SHARED = Path(__file__).resolve().parents[2] / "shared"
MATH_DEV = SHARED / "data" / "math_dev.jsonl"


@pytest.fixture(scope="module")
def grader():
    with Grader(workers=1, timeout_s=2) as g:
        yield g


def test_extraction():
    assert last_boxed(r"first \boxed{1} then \boxed{\frac{1}{\sqrt{2}}}.") == r"\frac{1}{\sqrt{2}}"
    assert last_boxed(r"$\boxed 7$") == "7"
    assert last_boxed(r"\fbox{x+1}") == "x+1"
    assert last_boxed(r"ok \boxed{2} broken \boxed{3") == "2"  # unbalanced last box: fall back
    assert last_boxed("no box here") is None
    assert gsm8k_answer("She pays 2*3=6.\n#### 1,234") == "1234"
    assert gsm8k_answer("no final line") is None
    assert last_number("It costs 3/4 or maybe 2,500.5 dollars") == "2500.5"
    assert extract_answer(r"so \boxed{5}. #### 6 and 7") == "5"
    assert extract_answer("reasoning\n#### 6\nthen 7") == "6"
    assert extract_answer("x is 3, then y is -12.") == "-12"
    assert extract_answer("no answer") is None


def test_as_number_spellings():
    three_quarters = ["3/4", r"\frac{3}{4}", r"\dfrac34", "0.75", r"$0.75$", r"\tfrac{3}{4}", "75\\%"]
    values = [as_number(s) for s in three_quarters]
    assert values[:-1] == [Fraction(3, 4)] * 6 and values[-1] == 75  # percent sign is dropped, not divided
    assert as_number("1,000") == 1000 and as_number(r"\$5") == 5 and as_number(r"90^\circ") == 90
    assert as_number(r"-\frac{1}{2}") == Fraction(-1, 2)
    for not_a_number in ["x+1", r"\sqrt{2}", "(1,2)", "1/0", r"\frac{1}{0}", "1,2", ""]:
        assert as_number(not_a_number) is None, not_a_number


HARD_CASES = [  # (gold, pred, equivalent)
    (r"\frac{3}{4}", "0.75", True),
    ("3/4", r"\dfrac34", True),
    ("1,000", "1000", True),
    (r"\$5.00", "5", True),
    (r"-\frac{1}{2}", "-0.5", True),
    (r"\frac{1}{2}", "-0.5", False),
    ("1/3", "0.3333333", True),  # within rel_tol 1e-6
    ("1/3", "0.3333", False),
    ("5", "6", False),
    (r"2\sqrt{2}", r"\sqrt{8}", True),
    (r"3\sqrt{3}", r"\sqrt{27}", True),
    (r"\frac{\sqrt{3}}{2}", r"\sqrt3/2", True),
    ("x^2+1", "1+x^2", True),
    ("x^2+1", "x^2-1", False),
    (r"\{1,2\}", r"\{2,1\}", True),
    ("[1,3)", "[1, 3)", True),
    ("(1,3)", "[1,3]", False),
    (r"\text{(A)}", "A", True),
    ("x=2", "2", True),
    (r"\dfrac{9}{7}", r"1\frac{2}{7}", True),  # math-verify reads a mixed number
    (r"\dfrac{9}{7}", r"1\frac{3}{7}", False),
]


def test_hard_cases(grader):
    got = grader.equivalent_many([(g, p) for g, p, _ in HARD_CASES])
    wrong = [(g, p, want) for (g, p, want), ok in zip(HARD_CASES, got) if ok != want]
    assert not wrong, wrong
    assert grader.equivalent("5", None) is False and grader.equivalent("5", "  ") is False


def test_host_fast_path_decides_numbers_without_math_verify():
    assert quick_equivalent("12", "12.0", 1e-6) is True
    assert quick_equivalent("12", "13", 1e-6) is False
    assert quick_equivalent(r"\sqrt{2}", "1.41421356", 1e-6) is None  # needs math-verify


def test_no_false_positives_from_tolerance_or_spaces(grader):
    # an integer gold is exact: the decimal tolerance is for rounded golds, float64 noise is still fine
    assert quick_equivalent("1000000", "1000000.4", 1e-6) is False
    assert quick_equivalent("3", "3.0000000000000004", 1e-6) is True
    assert quick_equivalent("1/3", "0.3333333", 1e-6) is True
    # a space between two digits separates two numbers; around operators it means nothing
    assert normalize("1 2") != normalize("12") and normalize("x = 2") == normalize("x=2")
    assert grader.equivalent("12", "1 2") is False and grader.equivalent("x=2", "x = 2") is True
    # MATH writes text units around a time either way
    assert grader.equivalent(r"\text{4:30 p.m.}", r"4:30 \text{ p.m.}") is True
    assert grader.equivalent(r"\text{4:30 p.m.}", r"4:30 \text{ a.m.}") is False


def test_bad_config():
    with pytest.raises(GradingError, match="workers"):
        Grader(workers=0)


def test_math_verify_timeout_and_hard_kill():
    # a power tower makes sympy hang; math-verify's own timeout (1 s) catches it inside the worker
    with Grader(timeout_s=1) as g:
        t0 = time.monotonic()
        assert g.equivalent("9^{9^{9^{9}}}", "2") is False
        assert time.monotonic() - t0 < 8
    # with a hard deadline shorter than that, the worker is killed and replaced; grading goes on
    with Grader(timeout_s=1, deadline_s=0.3) as g:
        assert g.equivalent("2", r"\sqrt{4}") is True  # warm the worker (start-up is not under the deadline)
        pid = g._pool[0].proc.pid
        assert g.equivalent("9^{9^{9^{9}}}", "3") is False
        assert g._pool[0].proc.pid != pid
        assert g.equivalent("2", r"\sqrt{4}") is True


def test_majority_vote_uses_equivalence_classes(grader):
    answers = ["7", "7", r"\frac{1}{2}", None, "0.5", "1/2", ""]
    vote = grader.majority_vote(answers)
    # plain string counting would pick "7" (2 votes); equivalence classes make 1/2 win with 3
    assert (vote.answer, vote.votes, vote.num_classes) == (r"\frac{1}{2}", 3, 2)
    assert vote.class_of == (0, 0, 1, -1, 1, 1, -1)
    tie = grader.majority_vote(["3", r"\sqrt{9}", "4", "4.0"])
    assert (tie.answer, tie.votes) == ("3", 2)  # ties go to the class seen first
    assert grader.majority_vote([None, ""]).answer is None


@pytest.mark.skipif(not MATH_DEV.exists(), reason="../shared/data/math_dev.jsonl not present")
def test_real_math_answers(grader):
    rows = [json.loads(line) for line in MATH_DEV.open()]
    golds = [last_boxed(r["solution"]) for r in rows]
    assert sum(g is not None for g in golds) / len(rows) > 0.99
    rng = random.Random(0)
    sample = rng.sample([g for g in golds if g], 150)

    # the same answer re-spelled (\dfrac -> \frac, spaces, $...$) stays equivalent
    respelled = [(g, "$" + g.replace(r"\dfrac", r"\frac").replace(",", ", ") + "$") for g in sample]
    same = grader.equivalent_many(respelled)
    assert sum(same) / len(same) >= 0.97, [p for p, ok in zip(respelled, same) if not ok]

    # numeric answers: an exact decimal spelling is equivalent, the number plus one is not
    numeric = [(g, as_number(g)) for g in golds if g and as_number(g) is not None][:300]
    assert len(numeric) > 100
    for g, v in numeric:
        if v.denominator in (1, 2, 4, 5, 8, 10, 20, 25, 50, 100):
            assert grader.equivalent(g, str(float(v))), g
        assert not grader.equivalent(g, str(v + 1)), g

    # answers of other problems: equivalent only when truly the same value
    pairs = [(sample[i], sample[(i + 1) % len(sample)]) for i in range(len(sample))]
    cross = grader.equivalent_many(pairs)
    for (g, p), ok in zip(pairs, cross):
        if as_number(g) is not None and as_number(p) is not None:
            assert ok == (as_number(g) == as_number(p)), (g, p)
    assert sum(cross) / len(cross) < 0.1
