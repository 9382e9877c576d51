"""Answer extraction, equivalence and majority voting.

Equivalence is decided in two tiers:
  1. On the host, without math-verify: identical strings after light normalisation, or two plain
     numbers (integers, decimals, `a/b`, `\\frac{a}{b}`, thousands commas, `$`, `%`, degrees)
     compared as exact rationals (so `0.75 == 3/4 == \\frac34`), with a relative tolerance
     `rel_tol` only when a side is written as a decimal and the gold is not an integer (`0.3333333 == 1/3`,
     but `10**8 != 10**8+1` and `1000000 != 1000000.4`; an integer gold allows only float64 noise,
     `FLOAT_NOISE`). rStar-Math's checker allows rel_tol 1e-4 for any numbers (microsoft/rStar,
     branch rStar-math, utils/math_equal.py:268-275), which grades 1000000.4 correct against 1000000.
     Two plain numbers are decided here in both directions.
  2. Everything else goes to math-verify (gold first: `verify(parse(gold), parse(pred))`), each side
     wrapped in `\\boxed{}` so bare LaTeX is extracted. math-verify's own timeouts use SIGALRM, which
     only works on a process's main thread, so it runs in worker processes. Workers are fresh
     interpreters (`python -c`, i.e. spawn semantics; never fork: the caller may hold JAX/accelerator
     state) talking over a socketpair; unlike multiprocessing's "spawn" this does not re-import the
     caller's `__main__`, so scripts without a main guard work. Each call also has a hard wall-clock
     deadline enforced here: a worker that overruns it is killed and replaced, and the pair counts
     as not equivalent.

This is the only module that imports math_verify (lazily, inside the workers).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import socket
import subprocess
import sys
import time
from collections import OrderedDict
from fractions import Fraction
from multiprocessing.connection import Connection, wait
from typing import Sequence

log = logging.getLogger(__name__)


class GradingError(ValueError):
    """Bad grader configuration (message names the input)."""


# --------------------------------------------------------------------------------------------
# Extraction


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (balanced braces) or `\\boxed 5`; None if absent."""
    starts = [m.start() for m in re.finditer(r"\\(?:boxed|fbox)", text)]
    for start in reversed(starts):
        rest = text[start:].split("\\", 1)[1]
        rest = rest[5:] if rest.startswith("boxed") else rest[4:]
        if rest.startswith("{"):
            depth = 0
            for i, ch in enumerate(rest):
                depth += (ch == "{") - (ch == "}")
                if depth == 0:
                    return rest[1:i].strip()
            continue  # unbalanced: try an earlier box
        m = re.match(r"\s+([^\s$]+)", rest)
        if m:
            return m.group(1)
    return None


def gsm8k_answer(text: str) -> str | None:
    """The `#### N` final answer of a GSM8K rationale (commas and `$` removed); None if absent."""
    m = re.search(r"####\s*([^\n]+?)\s*$", text, flags=re.MULTILINE)
    if m is None:
        return None
    return m.group(1).replace(",", "").replace("$", "").strip() or None


_NUMBER_RE = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def last_number(text: str) -> str | None:
    matches = _NUMBER_RE.findall(text)
    return matches[-1].replace(",", "") if matches else None


def extract_answer(text: str) -> str | None:
    """Final answer of a free-form solution: last `\\boxed{}`, else GSM8K `#### N`, else the last number."""
    for extract in (last_boxed, gsm8k_answer, last_number):
        found = extract(text)
        if found:
            return found
    return None


# --------------------------------------------------------------------------------------------
# Host-side normalisation and numbers


_STRIP_TOKENS = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\displaystyle", "\\$", "$")
_TEXT_RE = re.compile(r"\\(?:text|textrm|mbox|mathrm)\{([^{}]*)\}")
_LONE_SPACE_RE = re.compile(r"(?<!\w) | (?!\w)")  # a space not between two word characters


def normalize(answer: str) -> str:
    """Light canonical form used for exact matching and vote bucketing (not for semantics).

    Text-mode wrappers are unwrapped (`4:30 \\text{ p.m.}` and `\\text{4:30 p.m.}` agree). Whitespace is dropped
    except between two word characters, where it separates tokens: `1 2` is not `12`, `\\pi r` is not `\\pir`.
    """
    s = answer
    for tok in _STRIP_TOKENS:
        s = s.replace(tok, "")
    s = " ".join(_TEXT_RE.sub(r"\1", s).split())
    s = _LONE_SPACE_RE.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return s.rstrip(".")


_DECIMAL_RE = re.compile(r"[+-]?(?:\d+(?:,\d{3})*(?:\.\d*)?|\.\d+)")
_FRAC_RE = re.compile(r"([+-]?)\\frac(?:\{([+-]?\d+)\}|(\d))(?:\{([+-]?\d+)\}|(\d))")
_SLASH_RE = re.compile(r"([+-]?\d+)/([+-]?\d+)")


def as_number(answer: str) -> Fraction | None:
    """Exact value of a plain number in any common spelling, else None (expressions, sets, text...)."""
    s = normalize(answer)
    s = s.replace("\\%", "").replace("%", "")
    s = re.sub(r"\^\{?\\circ\}?$", "", s)
    if _DECIMAL_RE.fullmatch(s):
        return Fraction(s.replace(",", ""))
    m = _FRAC_RE.fullmatch(s)
    if m:
        num, den = int(m.group(2) or m.group(3)), int(m.group(4) or m.group(5))
        return None if den == 0 else Fraction(-num if m.group(1) == "-" else num, den)
    m = _SLASH_RE.fullmatch(s)
    if m and int(m.group(2)) != 0:
        return Fraction(int(m.group(1)), int(m.group(2)))
    return None


FLOAT_NOISE = 1e-12  # relative error a float64 program output may carry (0.1 * 3 * 10 prints 3.0000000000000004)


def numbers_close(a: Fraction, b: Fraction, rel_tol: float) -> bool:
    return a == b or abs(a - b) <= Fraction(rel_tol) * max(abs(a), abs(b))


def quick_equivalent(gold: str, pred: str, rel_tol: float) -> bool | None:
    """Decide equivalence on the host when that is safe; None means "ask math-verify"."""
    if normalize(gold) == normalize(pred):
        return True
    g, p = as_number(gold), as_number(pred)
    if g is None or p is None:
        return None
    if g.denominator == 1:  # an integer gold is exact: a decimal can only differ from it by float noise
        return numbers_close(g, p, FLOAT_NOISE)
    if "." in gold or "." in pred:  # a rounded decimal on either side: compare with tolerance
        return numbers_close(g, p, rel_tol)
    return g == p  # fractions are exact


# --------------------------------------------------------------------------------------------
# math-verify worker processes


def _serve(fd: int) -> None:
    """Worker loop (main thread of a fresh interpreter, so math-verify's SIGALRM timeouts work)."""
    from math_verify import parse, verify

    conn = Connection(fd)
    conn.send("ready")  # imports done: call deadlines start counting from here
    while True:
        try:
            gold, pred, timeout = conn.recv()
        except EOFError:
            return
        try:
            g = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout)
            p = parse(f"\\boxed{{{pred}}}", parsing_timeout=timeout)
            ok = bool(g) and bool(p) and bool(verify(g, p, timeout_seconds=timeout))
        except Exception:  # math-verify raising on odd input means "not shown equivalent"
            ok = False
        conn.send(ok)


_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_STARTUP_TIMEOUT_S = 120.0  # importing sympy + math-verify on a loaded machine
# Ctrl-C in a terminal reaches the whole process group: the parent ends the run, the workers end with its pipe
_WORKER_CMD = ("import signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
               "from rstar_jax.math.grading import _serve; _serve(int(sys.argv[1]))")


@dataclasses.dataclass
class _Worker:
    proc: subprocess.Popen
    conn: Connection


@dataclasses.dataclass(frozen=True)
class Vote:
    answer: str | None  # representative (first seen) answer of the winning class; None if no answers
    votes: int  # size of the winning class
    class_of: tuple[int, ...]  # class index per input answer, -1 for a missing answer
    num_classes: int


class Grader:
    """Equivalence checks and majority votes; a small pool of math-verify worker processes.

    Workers start lazily (first call that needs math-verify) and are closed by `close()` or the
    context manager. Results are memoised per (gold, pred) pair.
    """

    def __init__(self, workers: int = 1, timeout_s: float = 5.0, rel_tol: float = 1e-6, cache_size: int = 65536,
                 deadline_s: float | None = None):
        """`timeout_s`: math-verify's own per-call timeouts (whole seconds, rounded up); `deadline_s`:
        hard wall-clock limit per pair after which the worker is killed (default: parse gold + parse
        pred + verify may each use `timeout_s`, plus 2 s)."""
        if workers < 1:
            raise GradingError(f"grader workers: must be >= 1, got {workers}")
        if not timeout_s > 0:
            raise GradingError(f"grader timeout_s: must be > 0, got {timeout_s}")
        self.workers = workers
        self.rel_tol = rel_tol
        self._inner_timeout = max(1, math.ceil(timeout_s))
        self._deadline_s = 3 * self._inner_timeout + 2.0 if deadline_s is None else deadline_s
        self._pool: list[_Worker] = []
        self._cache: OrderedDict[tuple[str, str], bool] = OrderedDict()
        self._cache_size = cache_size

    # -- lifecycle
    def __enter__(self) -> "Grader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for w in self._pool:
            w.conn.close()  # the worker sees EOF and exits
            try:
                w.proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                self._kill(w)
        self._pool = []

    def _start_worker(self) -> _Worker:
        ours, theirs = socket.socketpair()
        path = [_PACKAGE_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
        proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_CMD, str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env,
        )
        theirs.close()
        worker = _Worker(proc, Connection(ours.detach()))
        try:
            if not worker.conn.poll(_STARTUP_TIMEOUT_S) or worker.conn.recv() != "ready":
                raise EOFError
        except (EOFError, OSError):
            self._kill(worker)
            raise RuntimeError(f"math-verify grading worker did not start within {_STARTUP_TIMEOUT_S:.0f}s "
                               f"(exit code {proc.returncode}); is math-verify installed?") from None
        return worker

    def _kill(self, w: _Worker) -> None:
        w.proc.kill()
        w.proc.wait()
        w.conn.close()

    # -- equivalence
    def equivalent(self, gold: str, pred: str | None) -> bool:
        return self.equivalent_many([(gold, pred)])[0]

    def equivalent_many(self, pairs: Sequence[tuple[str, str | None]]) -> list[bool]:
        """Is each `pred` equivalent to its `gold`? A missing/empty pred is never equivalent."""
        out: list[bool | None] = []
        todo: dict[tuple[str, str], list[int]] = {}
        for i, (gold, pred) in enumerate(pairs):
            if not pred or not pred.strip() or not gold.strip():
                out.append(False)
                continue
            key = (gold, pred)
            known = self._cache.get(key)
            if known is None:
                known = quick_equivalent(gold, pred, self.rel_tol)
            out.append(known)
            if known is None:
                todo.setdefault(key, []).append(i)
        for key, ok in zip(todo, self._verify_remote(list(todo))):
            for i in todo[key]:
                out[i] = ok
        for (gold, pred), ok in zip(pairs, out):
            if pred:
                self._remember((gold, pred), bool(ok))
        return [bool(v) for v in out]

    def _remember(self, key: tuple[str, str], ok: bool) -> None:
        self._cache[key] = ok
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def _verify_remote(self, pairs: list[tuple[str, str]]) -> list[bool]:
        """Run math-verify on `pairs` across the worker pool, each call under a hard deadline."""
        results: list[bool] = [False] * len(pairs)
        pending = list(range(len(pairs)))[::-1]
        busy: dict[int, tuple[int, float]] = {}  # pool slot -> (pair index, deadline)
        while pending or busy:
            while pending and len(busy) < self.workers:
                if len(self._pool) < self.workers:
                    self._pool.append(self._start_worker())
                slot = next(s for s in range(len(self._pool)) if s not in busy)
                idx = pending.pop()
                try:
                    self._pool[slot].conn.send((*pairs[idx], self._inner_timeout))
                except OSError:  # worker died while idle: replace it and retry this pair
                    self._kill(self._pool[slot])
                    self._pool[slot] = self._start_worker()
                    self._pool[slot].conn.send((*pairs[idx], self._inner_timeout))
                busy[slot] = (idx, time.monotonic() + self._deadline_s)
            nearest = min(d for _, d in busy.values())
            ready = wait([self._pool[s].conn for s in busy], timeout=max(0.0, nearest - time.monotonic()))
            now = time.monotonic()
            for slot in list(busy):
                idx, deadline = busy[slot]
                w = self._pool[slot]
                if w.conn in ready:
                    try:
                        results[idx] = bool(w.conn.recv())
                    except (EOFError, OSError):  # worker crashed on this pair
                        log.warning("math-verify worker died grading %r vs %r", *pairs[idx])
                        self._kill(w)
                        self._pool[slot] = self._start_worker()
                    del busy[slot]
                elif now >= deadline:
                    log.warning("math-verify timed out after %.1fs on %r vs %r", self._deadline_s, *pairs[idx])
                    self._kill(w)
                    self._pool[slot] = self._start_worker()
                    del busy[slot]
        return results

    # -- voting
    def majority_vote(self, answers: Sequence[str | None]) -> Vote:
        """Group answers into equivalence classes (each new answer is checked against every class's
        first member, used as gold); the largest class wins, ties go to the class seen first."""
        reps: list[str] = []
        sizes: list[int] = []
        bucket: dict[str, int] = {}  # normalised string -> class, so repeats skip the checks
        class_of: list[int] = []
        for ans in answers:
            if not ans or not ans.strip():
                class_of.append(-1)
                continue
            key = normalize(ans)
            cls = bucket.get(key)
            if cls is None:
                matches = self.equivalent_many([(rep, ans) for rep in reps])
                cls = matches.index(True) if True in matches else len(reps)
                if cls == len(reps):
                    reps.append(ans)
                    sizes.append(0)
                bucket[key] = cls
            sizes[cls] += 1
            class_of.append(cls)
        if not reps:
            return Vote(None, 0, tuple(class_of), 0)
        best = max(range(len(reps)), key=lambda c: (sizes[c], -c))
        return Vote(reps[best], sizes[best], tuple(class_of), len(reps))
