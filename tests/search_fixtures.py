"""A toy step environment with a known best path, for the search-driver tests (real sandbox, scripted policy).

Problem "target t": the first step sets x (candidates x = 2, 3, 4, 5 and a failing x = 1 / 0), the second
prints x * 2 or x + 1 (a code terminal), the third boxes the printed output (or, second choice, a wrong 0).
Exactly the paths with x * 2 == t are correct, so the best path is known.
"""

from __future__ import annotations

import pytest
import re

import jax
import numpy as np

from rstar_jax.data import Problem
from rstar_jax.math.steps import split_observation
from rstar_jax.engine import Completion
from rstar_jax.models.heads import RewardHead

FIRST = ["<code>\nx = {}\n<end_of_step>".format(v) for v in (2, 3, 4, 5)] + ["<code>\nx = 1 / 0\n<end_of_step>"]
SECOND = ["print(x * 2)\n<end_of_code>", "print(x + 1)\n<end_of_code>"]


def toy_problem(target: int, pid: str | None = None) -> Problem:
    return Problem(pid or f"toy-{target}", f"Print twice x; the result must be {target}.", str(target), 1, None, "test")


def candidates(path_texts) -> list[str]:
    if not path_texts:
        return list(FIRST)
    if len(path_texts) == 1:
        return list(SECOND)
    _, out = split_observation(path_texts[-1])
    return [f"<answer>\\boxed{{{out}}}<end_of_answer>", "<answer>\\boxed{0}<end_of_answer>"]


class ScriptedProposer:
    """`num` candidates per request from `candidates`; `shuffle` orders them by the request's key."""

    def __init__(self, shuffle: bool = False):
        self.shuffle = shuffle
        self.calls: list[list] = []  # the requests of every call

    def __call__(self, requests, num, temperature):
        self.calls.append(list(requests))
        out = []
        for r in requests:
            cands = candidates(r.path_texts)
            if self.shuffle:
                cands = [cands[i] for i in np.asarray(jax.random.permutation(r.key, len(cands)))]
            if temperature == 0:
                cands = cands[:1]
            out.append([Completion(cands[i % len(cands)], [7] * (i + 1), "stop") for i in range(num)])
        return out


def toy_scorer(good: str):
    """A PPM-like scorer: 0.9 for a step that prints or boxes `good`, or sets x to half of it; else -0.5."""
    half = str(int(good) // 2)

    def score(items):
        out = []
        for _, steps in items:
            last = steps[-1]
            hit = (f"\\boxed{{{good}}}" in last or f"<output>{good}<" in last
                   or re.search(rf"x = {half}\n", last) is not None)
            out.append([0.0] * (len(steps) - 1) + [0.9 if hit else -0.5])
        return out

    score.head = RewardHead("ppm")
    return score


@pytest.fixture(scope="module")
def sandbox():
    from rstar_jax.sandbox import SandboxPool

    with SandboxPool(workers=2, timeout_s=5.0, allow_insecure=True) as pool:
        yield pool


@pytest.fixture(scope="module")
def grader():
    from rstar_jax.math.grading import Grader

    with Grader() as g:
        yield g
