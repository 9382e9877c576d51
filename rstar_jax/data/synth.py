"""Synthetic arithmetic word problems in five difficulty levels, with step-format reference solutions.

Levels (one quantity - money, water, flour or rope - changed by a chain of operations):
  1: one operation (+ - x or exact division) on numbers up to 20; integer answer
  2: two such operations, numbers up to 50; integer answer
  3: three operations, numbers up to 100, division may leave a fraction; a fraction-of step allowed
  4: three or four operations including at least one fraction or percentage
  5: four to six operations including fractions, percentages or a unit conversion (asked in
     cents / milliliters / grams / centimeters)

Answers are exact rationals written as Python prints a `Fraction`: "12", "7/2" (never negative). The
grader accepts them against `\\frac{7}{2}`, `3.5`, etc. Each problem's `solution` is a complete
step-format trajectory (see rstar_jax.math.steps) whose final code prints exactly the answer string.

Deterministic by seed: problem i draws from `random.Random(f"rstar-synth:{seed}:{i}:{level}")`
(string seeds hash with SHA-512, independent of PYTHONHASHSEED); no set or dict order is used.
`n` is the total number of problems; levels are assigned round-robin in the order given.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from fractions import Fraction
from pathlib import Path

from rstar_jax.data.problems import Problem
from rstar_jax.jsonl import write_jsonl
from rstar_jax.math.steps import ANSWER, ANSWER_END, CODE, CODE_END, FINAL_CODE_COMMENT, STEP_END, observation_text

LEVELS = (1, 2, 3, 4, 5)
_MAX_ATTEMPTS = 200


class SynthSpecError(ValueError):
    """A bad synthetic-problem specification (message names the input)."""


# --------------------------------------------------------------------------------------------
# Specs


def parse_levels(spec: str) -> list[int]:
    """ "1-5" -> [1, 2, 3, 4, 5]; "1,3" -> [1, 3]; "1-2,5" -> [1, 2, 5] (order kept, no repeats)."""
    levels: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if m is None:
            raise SynthSpecError(f"levels {spec!r}: expected a list like '1-5' or '1,3'")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if lo > hi or lo not in LEVELS or hi not in LEVELS:
            raise SynthSpecError(f"levels {spec!r}: levels must be ascending ranges within 1-5")
        levels += [lv for lv in range(lo, hi + 1) if lv not in levels]
    return levels


@dataclasses.dataclass(frozen=True)
class SynthSpec:
    levels: tuple[int, ...]
    n: int
    seed: int


def parse_synth_spec(spec: str) -> SynthSpec:
    """ "synth:levels=1-2,n=32,seed=0" (a comma inside levels=1,3 is allowed; defaults levels=1-5, seed=0)."""
    if not spec.startswith("synth:"):
        raise SynthSpecError(f"synthetic spec {spec!r}: must start with 'synth:'")
    fields: dict[str, str] = {}
    last = ""
    for token in spec[len("synth:"):].split(","):
        if "=" in token:
            last, value = (s.strip() for s in token.split("=", 1))
            if last not in ("levels", "n", "seed"):
                raise SynthSpecError(f"synthetic spec {spec!r}: unknown key {last!r} (use levels, n, seed)")
            fields[last] = value
        elif last == "levels" and token.strip():
            fields[last] += "," + token.strip()
        else:
            raise SynthSpecError(f"synthetic spec {spec!r}: expected key=value, got {token!r}")
    if "n" not in fields:
        raise SynthSpecError(f"synthetic spec {spec!r}: missing n=<count>")
    try:
        n, seed = int(fields["n"]), int(fields.get("seed", "0"))
    except ValueError:
        raise SynthSpecError(f"synthetic spec {spec!r}: n and seed must be integers") from None
    if n < 1:
        raise SynthSpecError(f"synthetic spec {spec!r}: n must be >= 1")
    return SynthSpec(tuple(parse_levels(fields.get("levels", "1-5"))), n, seed)


# --------------------------------------------------------------------------------------------
# Stories

_NAMES = (("Mia", "She", "her"), ("Leo", "He", "his"), ("Ava", "She", "her"), ("Omar", "He", "his"),
          ("Zoe", "She", "her"), ("Ravi", "He", "his"), ("Lena", "She", "her"), ("Tom", "He", "his"))

# Sentence templates per scenario. Placeholders: {name} {P} (pronoun) {pos} (possessive) {k} {p} {q}.
_SCENARIOS = (
    dict(var="money", intro="{name} has {a} dollars.",
         add="{P} earns {k} more dollars.", sub="{P} spends {k} dollars on a gift.",
         mul="Then {pos} money grows to {k} times as much.",
         div="{P} divides {pos} money into {k} equal parts and keeps one part.",
         frac_use="{P} spends {p}/{q} of {pos} money.", frac_keep="{P} keeps only {p}/{q} of {pos} money.",
         pct_down="{P} spends {p}% of {pos} money.", pct_up="{P} gets {p}% more money.",
         ask="How many dollars does {name} have now?",
         unit=("cents", 100, "1 dollar = 100 cents", "How many cents does {name} have now?")),
    dict(var="water", intro="A tank holds {a} liters of water.",
         add="Then {k} more liters of water are poured in.", sub="Then {k} liters of water are drained.",
         mul="Then the amount of water becomes {k} times as large.",
         div="The water is split equally into {k} barrels, and only one barrel is kept.",
         frac_use="Then {p}/{q} of the water is used.", frac_keep="Then only {p}/{q} of the water is kept.",
         pct_down="Then {p}% of the water evaporates.", pct_up="Then the amount of water increases by {p}%.",
         ask="How many liters of water are in the tank now?",
         unit=("milliliters", 1000, "1 liter = 1000 milliliters",
               "How many milliliters of water are in the tank now?")),
    dict(var="flour", intro="{name} has {a} kilograms of flour.",
         add="{P} buys {k} more kilograms of flour.", sub="{P} uses {k} kilograms of flour to bake bread.",
         mul="{P} then has {k} times as much flour as before.",
         div="{P} packs the flour equally into {k} bags and keeps one bag.",
         frac_use="{P} uses {p}/{q} of the flour for cakes.", frac_keep="{P} keeps {p}/{q} of the flour.",
         pct_down="{P} gives away {p}% of the flour.", pct_up="{P} adds {p}% more flour.",
         ask="How many kilograms of flour does {name} have now?",
         unit=("grams", 1000, "1 kilogram = 1000 grams", "How many grams of flour does {name} have now?")),
    dict(var="rope", intro="{name} has a rope that is {a} meters long.",
         add="{P} ties on another {k} meters of rope.", sub="{P} cuts {k} meters off the rope.",
         mul="{P} swaps it for a rope {k} times as long.",
         div="{P} cuts the rope into {k} equal pieces and keeps one piece.",
         frac_use="{P} cuts off {p}/{q} of the rope.", frac_keep="{P} keeps {p}/{q} of the rope.",
         pct_down="{P} cuts off {p}% of the rope.", pct_up="{P} makes the rope {p}% longer.",
         ask="How many meters long is {pos} rope now?",
         unit=("centimeters", 100, "1 meter = 100 centimeters", "How many centimeters long is {pos} rope now?")),
)


@dataclasses.dataclass(frozen=True)
class _LevelRule:
    ops: tuple[int, int]  # min, max number of operations
    start: tuple[int, int]  # range of the starting amount
    hi: int  # largest operand of + and -
    kinds: tuple[str, ...]
    need: tuple[str, ...]  # at least one operation of these kinds (empty: no requirement)
    exact: bool  # integer arithmetic only (levels 1-2)
    max_den: int  # largest denominator allowed in the answer


_RULES = {
    1: _LevelRule((1, 1), (2, 20), 20, ("add", "sub", "mul", "div"), (), True, 1),
    2: _LevelRule((2, 2), (5, 50), 50, ("add", "sub", "mul", "div"), (), True, 1),
    3: _LevelRule((3, 3), (10, 100), 100, ("add", "sub", "mul", "div", "frac"), (), False, 60),
    4: _LevelRule((3, 4), (20, 200), 100, ("add", "sub", "mul", "div", "frac", "pct"), ("frac", "pct"), False, 400),
    5: _LevelRule((4, 6), (20, 300), 150, ("add", "sub", "mul", "div", "frac", "pct", "unit"),
                  ("frac", "pct", "unit"), False, 2000),
}
_PERCENTS = (5, 10, 12, 15, 20, 25, 30, 40, 50, 60, 75)


@dataclasses.dataclass(frozen=True)
class _Op:
    sentence: str  # part of the question ("" for the unit conversion, which changes the question)
    comment: str
    code: str
    value: Fraction


def _draw_op(kind: str, rng: random.Random, rule: _LevelRule, sc: dict, words: dict, x: Fraction) -> _Op | None:
    """One operation of `kind` applied to the current amount `x`, or None if it does not fit."""
    v = sc["var"]

    def say(key: str, **kw: int) -> str:
        return sc[key].format(**words, **kw)

    if kind == "add":
        k = rng.randint(1, rule.hi)
        return _Op(say("add", k=k), say("add", k=k), f"{v} = {v} + {k}", x + k)
    if kind == "sub":
        if x <= 1:
            return None
        k = rng.randint(1, min(rule.hi, math.ceil(x) - 1))
        return _Op(say("sub", k=k), say("sub", k=k), f"{v} = {v} - {k}", x - k)
    if kind == "mul":
        k = rng.randint(2, 5 if rule.exact else 6)
        return _Op(say("mul", k=k), say("mul", k=k), f"{v} = {v} * {k}", x * k)
    if kind == "div":
        choices = [k for k in range(2, 13) if not rule.exact or x % k == 0]
        if not choices:
            return None
        k = rng.choice(choices)
        return _Op(say("div", k=k), say("div", k=k), f"{v} = {v} {'//' if rule.exact else '/'} {k}", x / k)
    if kind == "frac":
        q = rng.randint(2, 8)
        p = rng.choice([p for p in range(1, q) if math.gcd(p, q) == 1])
        f = Fraction(p, q)
        if rng.random() < 0.5:
            return _Op(say("frac_use", p=p, q=q), say("frac_use", p=p, q=q),
                       f"{v} = {v} - {v} * Fraction({p}, {q})", x - x * f)
        return _Op(say("frac_keep", p=p, q=q), say("frac_keep", p=p, q=q), f"{v} = {v} * Fraction({p}, {q})", x * f)
    if kind == "pct":
        p = rng.choice(_PERCENTS)
        if rng.random() < 0.5:
            return _Op(say("pct_down", p=p), say("pct_down", p=p), f"{v} = {v} - {v} * Fraction({p}, 100)",
                       x * (1 - Fraction(p, 100)))
        return _Op(say("pct_up", p=p), say("pct_up", p=p), f"{v} = {v} + {v} * Fraction({p}, 100)",
                   x * (1 + Fraction(p, 100)))
    if kind == "unit":
        unit, factor, relation, _ = sc["unit"]
        return _Op("", f"Convert to {unit}: {relation}", f"{v} = {v} * {factor}", x * factor)
    raise AssertionError(kind)


def _try_problem(rng: random.Random, level: int) -> tuple[str, Fraction, str] | None:
    rule = _RULES[level]
    sc = rng.choice(_SCENARIOS)
    name, pronoun, possessive = rng.choice(_NAMES)
    words = dict(name=name, P=pronoun, pos=possessive)
    a = rng.randint(*rule.start)
    n_ops = rng.randint(*rule.ops)
    kinds = [rng.choice(rule.kinds) for _ in range(n_ops)]
    if "unit" in kinds[:-1]:  # a unit conversion happens at most once, as the last step
        return None
    if rule.need and not set(kinds) & set(rule.need):
        return None
    x = Fraction(a)
    ops: list[_Op] = []
    for kind in kinds:
        op = _draw_op(kind, rng, rule, sc, words, x)
        if op is None or op.value <= 0 or op.value.numerator > 10**7:
            return None
        ops.append(op)
        x = op.value
    if x.denominator > rule.max_den:
        return None
    ask = sc["unit"][3] if kinds[-1] == "unit" else sc["ask"]
    sentences = [sc["intro"].format(a=a, **words)] + [op.sentence for op in ops if op.sentence]
    question = " ".join(sentences + [ask.format(**words)])
    if not rule.exact:
        question += " Give the exact answer as a whole number or a fraction."
    return question, x, _reference_solution(sc["var"], a, sc["intro"].format(a=a, **words), ops, rule.exact, x)


def _reference_solution(var: str, a: int, intro: str, ops: list[_Op], exact: bool, answer: Fraction) -> str:
    setup = f"{var} = {a}" if exact else f"from fractions import Fraction\n{var} = Fraction({a})"
    steps = [f"{CODE}\n# {intro}\n{setup}\n{STEP_END}"]
    steps += [f"\n# {op.comment}\n{op.code}\n{STEP_END}" for op in ops]
    steps.append(f"\n{FINAL_CODE_COMMENT}\nprint({var})\n{CODE_END}")
    steps.append(observation_text(str(answer)))
    steps.append(f"\n{ANSWER}From the result, the answer is \\boxed{{{answer}}}.{ANSWER_END}")
    return "".join(steps)


def generate(levels: list[int], n: int, seed: int) -> list[Problem]:
    """`n` problems, levels assigned round-robin; the same arguments always give the same problems."""
    if not levels or any(lv not in LEVELS for lv in levels):
        raise SynthSpecError(f"levels {levels!r}: must be a non-empty list within 1-5")
    if n < 1:
        raise SynthSpecError(f"n: must be >= 1, got {n}")
    problems = []
    for i in range(n):
        level = levels[i % len(levels)]
        rng = random.Random(f"rstar-synth:{seed}:{i}:{level}")
        for _ in range(_MAX_ATTEMPTS):
            drawn = _try_problem(rng, level)
            if drawn is not None:
                break
        else:
            raise AssertionError(f"synthetic level {level}: no valid problem in {_MAX_ATTEMPTS} draws")
        question, answer, solution = drawn
        problems.append(Problem(f"synth-s{seed}-{i:06d}", question, str(answer), level, solution, "synth"))
    return problems


def problem_record(p: Problem) -> dict:
    return {"id": p.id, "question": p.question, "answer": p.answer, "level": p.level, "solution": p.solution}


def write_synth_file(levels: list[int], n: int, seed: int, out: str | Path) -> None:
    """Write `generate(levels, n, seed)` as jsonl (id, question, answer, level, solution), atomically."""
    write_jsonl(out, [problem_record(p) for p in generate(levels, n, seed)])
