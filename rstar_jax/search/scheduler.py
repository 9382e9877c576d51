"""Asynchronous search: many problems in flight over one engine, host work overlapped with decoding.

Every search method is written per problem as a generator (`ProblemSearch`): it yields an `Expand` (the
requests whose candidates it needs next), receives the classified children, and returns its `ProblemResult`. A
problem's tree is a function of its own key: every request's key comes from (problem, rollout / sample, level), so
it does not matter which problems share the engine or in which order their expansions return.

`run` keeps up to `in_flight` problems going. A problem whose expansion returns selects and submits its next
leaf at once, without waiting for the other problems. The engine decodes on the main thread; the host work of
finished samples (removing duplicates, the sandbox, grading, reward scoring: `StepEnv.children`) runs on one
worker thread meanwhile, in the order samples finished (the sandbox pool is multi-process already, one batch at
a time). The engine is idle only when no problem has a request in it; `Timing.host_wait_s` is the time it spent
waiting on the host then.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from typing import Callable, Generator, Iterable, Sequence

from rstar_jax.search.policy import Child, Request, Stats, StepEnv


@dataclasses.dataclass(frozen=True)
class Expand:
    """`num` candidates for each of `requests`; as `StepEnv.expand` takes them."""

    requests: Sequence[Request]
    num: int
    temperature: float
    grade: bool
    score: bool
    one_answer: bool = False


# A problem's search: yields Expand, receives one row of children per request, returns its result.
ProblemSearch = Generator[Expand, list[list[Child]], object]


@dataclasses.dataclass
class Timing:
    """Where a run's wall time went: the engine busy (requests in it), the engine waiting on host work."""

    wall_s: float = 0.0
    host_wait_s: float = 0.0  # no request in the engine while some problem waits for its host work
    expansions: int = 0
    tokens: int = 0  # generated

    @property
    def host_wait_share(self) -> float:
        return self.host_wait_s / self.wall_s if self.wall_s else 0.0


@dataclasses.dataclass
class _Problem:
    key: object  # the caller's name for it
    search: ProblemSearch
    stats: Stats
    expand: Expand | None = None
    submitted: float = 0.0


def drive(env: StepEnv, search: ProblemSearch) -> object:
    """Run one search to its end, each expansion in turn (`StepEnv.expand`): what `run` does for one problem."""
    rows = None
    try:
        while True:
            e = search.send(rows) if rows is not None else next(search)
            rows = env.expand(e.requests, e.num, e.temperature, grade=e.grade, score=e.score, one_answer=e.one_answer)
    except StopIteration as stop:
        return stop.value


def search_all(env: StepEnv, searches: Sequence[Callable[..., ProblemSearch]], in_flight: int | None = None) -> list:
    """The results of `searches` (each a factory taking `stats=`) in order, `in_flight` at a time (default: all);
    every problem's counts are added to `env.stats`."""
    results: dict[int, object] = {}

    def done(i: int, result: object, stats: Stats) -> None:
        results[i] = result
        env.stats.add(stats)

    jobs = ((i, make(stats=stats), stats) for i, make in enumerate(searches) for stats in [Stats()])
    run(env, jobs, in_flight or max(len(searches), 1), done)
    return [results[i] for i in range(len(searches))]


def run(env: StepEnv, problems: Iterable[tuple[object, ProblemSearch, Stats]], in_flight: int,
        on_result: Callable[[object, object, Stats], None], timing: Timing | None = None) -> Timing:
    """Run every (name, search, stats) to its end, at most `in_flight` at a time; `on_result(name, result, stats)`
    as each finishes (on this thread). `timing` is filled as the run goes (a caller may read it meanwhile)."""
    timing = timing if timing is not None else Timing()
    start = time.perf_counter()
    todo = iter(problems)
    active: dict[int, _Problem] = {}  # ticket -> problem waiting for the engine
    host: dict[concurrent.futures.Future, _Problem] = {}
    running = 0
    propose = env.propose

    def advance(p: _Problem, rows: list[list[Child]] | None) -> None:
        nonlocal running
        try:
            while True:
                exp = p.search.send(rows) if rows is not None else next(p.search)
                if exp.requests:
                    break
                rows = []  # nothing to propose: answer at once
        except StopIteration as stop:
            running -= 1
            on_result(p.key, stop.value, p.stats)
            return
        p.expand, p.submitted = exp, time.perf_counter()
        active[propose.submit(env.with_shared_prefix(exp.requests), exp.num, exp.temperature)] = p

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="host") as pool:
        while True:
            while running < in_flight:
                nxt = next(todo, None)
                if nxt is None:
                    break
                running += 1
                advance(_Problem(*nxt), None)
            if not running:
                break
            for ticket, completions in propose.poll():
                p = active.pop(ticket)
                p.stats.seconds["sampling"] += time.perf_counter() - p.submitted  # in the engine, shared with others
                timing.tokens += sum(len(c.token_ids) for row in completions for c in row)
                e = p.expand
                host[pool.submit(env.children, e.requests, completions, grade=e.grade, score=e.score,
                                 one_answer=e.one_answer, stats=p.stats)] = p
            if not active and host:  # the engine has nothing to do until the host answers
                t0 = time.perf_counter()
                concurrent.futures.wait(host, return_when=concurrent.futures.FIRST_COMPLETED)
                timing.host_wait_s += time.perf_counter() - t0
            for fut in [f for f in host if f.done()]:
                p = host.pop(fut)
                timing.expansions += 1
                if env.on_expand is not None:
                    env.on_expand()
                advance(p, fut.result())
    timing.wall_s = time.perf_counter() - start
    return timing
