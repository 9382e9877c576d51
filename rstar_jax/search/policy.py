"""The step environment every search method shares: K candidate steps for R open nodes, classified and scored.

An expansion of some open nodes (tree leaves, chain ends or beams) is a proposer request per node (the policy:
K samples of its prompt) and then host work (`StepEnv.children`): identical texts removed, every candidate's
program run in one sandbox batch (`StepRunner`, cached), answers graded against the gold answer when asked, and
the new steps scored by the reward model in one batched forward when one is configured. `StepEnv.expand` does
both in turn; the search scheduler (`scheduler.run`) submits requests to the proposer and runs the host work on
a worker thread, so that the engine decodes meanwhile.

The proposer is injectable (`Proposer`: submit requests, poll the finished ones): `LMProposer` samples from a
causal LM through the inference engine; tests script candidates with plain functions (`SyncProposer`).
A node's tokens are `tokenizer.encode(node_text)` (the step as generated plus, for a code terminal, the
inserted observation), so a node's prompt is the question's tokens followed by its path's node tokens, which
is what `tree.gather_path` assembles on device. Every question's tokens start with the same few-shot tokens
(`StepEnv.shared_prefix_ids`), whose keys/values the sampler computes once and caches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import defaultdict
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from rstar_jax.data import Problem
from rstar_jax.math.grading import Grader
from rstar_jax.math.steps import ANSWER_END, STOP_STRINGS, StepKind, StepRunner, build_prompt
from rstar_jax.engine import Completion, Engine, EngineConfig, InferenceModel, Request as EngineRequest, SamplingConfig
from rstar_jax.models.heads import RewardHead


@dataclasses.dataclass(frozen=True)
class Request:
    """One open node to expand."""

    row: int  # index of its problem in the batch (counts are attributed to it)
    problem: Problem
    path_texts: tuple[str, ...]  # node texts from the root (exclusive) to this node
    prompt_ids: tuple[int, ...]  # question tokens + path node tokens
    key: jax.Array  # this node's sampling key: its samples depend on it alone, not on the rest of the batch
    shared_len: int = 0  # leading prompt_ids shared by every request of the env (few-shot); set by StepEnv.expand


# (requests, samples per request, temperature) -> per request, that many completions
ProposeFn = Callable[[Sequence[Request], int, float], list[list[Completion]]]
# [(prompt text, step texts)] -> per item one score per step; it has a `head` (`RewardHead`) saying how to read them
Scorer = Callable[[Sequence[tuple[str, Sequence[str]]]], list[list[float]]]


@dataclasses.dataclass(frozen=True)
class Child:
    """A candidate step as the environment classified it."""

    text: str  # node text (code terminal: with the observation)
    token_ids: tuple[int, ...]  # tokens of `text`
    kind: StepKind
    answer: str | None = None  # ANSWER_TERMINAL only
    correct: bool | None = None  # graded answers only
    score: float | None = None  # reward-model score of this step, when scored
    observation: str | None = None  # code output, or the failure line of a program that did not run
    reason: str = ""  # INVALID only
    exec_status: str | None = None  # sandbox status of the step's program, if it ran
    num_tokens: int = 0  # tokens the policy generated for this candidate

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("token_ids")
        d["kind"] = self.kind.value
        return d


PHASES = ("sampling", "sandbox", "grading", "reward", "tree")  # where a search's wall time goes


class Stats:
    """Wall seconds per phase and per-problem counts (tokens generated, programs requested from the sandbox)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.tokens: dict[str, int] = defaultdict(int)  # problem id -> tokens generated
        self.programs: dict[str, int] = defaultdict(int)  # problem id -> programs requested (cache hits included)
        self.policy_calls = 0
        self.rollout = 0  # the tree search's current rollout / iteration, from 1 (progress display)

    def add(self, other: "Stats") -> None:
        for mine, theirs in ((self.seconds, other.seconds), (self.tokens, other.tokens), (self.programs, other.programs)):
            for k, v in theirs.items():
                mine[k] += v
        self.policy_calls += other.policy_calls

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - t0


def question_prompt(problem: Problem, few_shot: str = "") -> str:
    return build_prompt(problem.question, (), few_shot)


class Proposer:
    """Candidates for requests, asynchronously: `submit` returns a ticket, `poll` advances the proposer and hands
    back the tickets whose requests all finished, with one list of completions per request."""

    def submit(self, requests: Sequence[Request], num: int, temperature: float) -> int:
        raise NotImplementedError

    def poll(self) -> list[tuple[int, list[list[Completion]]]]:
        raise NotImplementedError

    def __call__(self, requests: Sequence[Request], num: int, temperature: float) -> list[list[Completion]]:
        """Candidates for `requests`, waiting for them."""
        ticket = self.submit(requests, num, temperature)
        while True:
            for got, completions in self.poll():
                if got == ticket:
                    return completions


class SyncProposer(Proposer):
    """A plain function (scripted candidates in tests) as a proposer whose requests finish at once."""

    def __init__(self, fn: ProposeFn):
        self.fn, self.done, self.tickets = fn, [], 0

    def submit(self, requests: Sequence[Request], num: int, temperature: float) -> int:
        self.tickets += 1
        self.done.append((self.tickets, self.fn(requests, num, temperature)))
        return self.tickets

    def poll(self) -> list[tuple[int, list[list[Completion]]]]:
        done, self.done = self.done, []
        return done

    def __getattr__(self, name: str) -> Any:  # the wrapped object's own state (a scripted proposer's call log)
        return getattr(self.__dict__["fn"], name)


class LMProposer(Proposer):
    """Candidate steps sampled from a causal LM through one inference engine, each request with its own key, after
    the requests' shared few-shot prefix (prefilled once, then read by every request)."""

    def __init__(self, model: InferenceModel, tokenizer, max_new_tokens: int = 256, top_p: float = 1.0, top_k: int = 0,
                 engine: EngineConfig = EngineConfig(), samples: int = 0):
        """samples: what one request asks for (0: unknown). A request's samples share one prompt entry of
        `engine.lanes` lanes; lanes beyond them would sit idle in every decode step, so there are no more."""
        self.tokenizer, self.top_p, self.top_k = tokenizer, top_p, top_k
        self.max_new_tokens = max_new_tokens
        lanes = min(engine.lanes, 1 << (samples - 1).bit_length()) if samples else engine.lanes
        self.engine = Engine(model, tokenizer, dataclasses.replace(engine, max_new_tokens=max_new_tokens, lanes=lanes))
        self.tickets: dict[int, list[int | list[Completion]]] = {}  # ticket -> per request its engine id or result
        self.ticket_of: dict[int, tuple[int, int]] = {}  # engine id -> (ticket, index)
        self.next_ticket = 0

    def submit(self, requests: Sequence[Request], num: int, temperature: float) -> int:
        settings = SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=temperature, top_p=self.top_p,
                                  top_k=self.top_k, num_samples=num, stop=STOP_STRINGS)
        self.engine.set_shared_prefix(requests[0].prompt_ids[: requests[0].shared_len])
        self.next_ticket += 1
        ids = [self.engine.submit(EngineRequest(r.prompt_ids, settings, r.key)) for r in requests]
        self.tickets[self.next_ticket] = list(ids)
        for i, rid in enumerate(ids):
            self.ticket_of[rid] = (self.next_ticket, i)
        return self.next_ticket

    def poll(self) -> list[tuple[int, list[list[Completion]]]]:
        done = []
        for fin in self.engine.step():
            ticket, i = self.ticket_of.pop(fin.id)
            slots = self.tickets[ticket]
            slots[i] = fin.completions
            if all(isinstance(x, list) for x in slots):
                done.append((ticket, self.tickets.pop(ticket)))
        return done


class RewardScorer:
    """Step scores from a reward model (`reward.score_steps`), read as its head says (`RewardHead`): PPM in [-1, 1],
    value and PRM in [0, 1]."""

    def __init__(self, params, cfg, tokenizer, head: RewardHead, batch_size: int = 16, compute_dtype: Any = "float32"):
        if head.input_format != "steps":
            raise ValueError(f"reward model with input format {head.input_format!r}: search reads the step format "
                             "only (score such a PRM with processbench)")
        self.params, self.cfg, self.tokenizer, self.head = params, cfg, tokenizer, head
        self.batch_size, self.compute_dtype = batch_size, compute_dtype

    def __call__(self, items: Sequence[tuple[str, Sequence[str]]]) -> list[list[float]]:
        from rstar_jax.reward import score_steps

        return score_steps(self.params, self.cfg, self.tokenizer, self.head, items, batch_size=self.batch_size,
                           compute_dtype=self.compute_dtype)


class StepEnv:
    """Turns open nodes into classified children (see the module docstring)."""

    def __init__(self, propose: Proposer | ProposeFn | None, runner: StepRunner, tokenizer, grader: Grader, *,
                 step_len: int, scorer: Scorer | None = None, few_shot: str = "",
                 stats: Stats | None = None, on_expand: Callable[[], None] | None = None):
        self.propose, self.runner, self.tokenizer = propose, runner, tokenizer
        self.step_len, self.grader, self.scorer, self.few_shot = step_len, grader, scorer, few_shot
        self.stats = stats or Stats()
        self.on_expand = on_expand  # called after every expansion (a job's progress line)
        self.shared_prefix_ids = self._few_shot_ids() if few_shot else ()

    @property
    def propose(self) -> Proposer:
        return self._propose

    @propose.setter
    def propose(self, propose: Proposer | ProposeFn | None) -> None:
        self._propose = propose if propose is None or isinstance(propose, Proposer) else SyncProposer(propose)

    @property
    def max_depth(self) -> int:
        return self.runner.max_steps

    def _few_shot_ids(self) -> tuple[int, ...]:
        """The tokens every question's encoding starts with. Not simply encode(few_shot): BPE can merge across the
        end of a text (SmolLM2 encodes the closing blank line as one token alone, as two before "<|user|>"), so keep
        the tokens that stay the same when the question template follows."""
        alone = self.tokenizer.encode(self.few_shot, add_special_tokens=True)
        followed = self.tokenizer.encode(build_prompt("", (), self.few_shot), add_special_tokens=True)
        n = next((i for i, (a, b) in enumerate(zip(alone, followed)) if a != b), min(len(alone), len(followed)))
        return tuple(alone[:n])

    def question_ids(self, problem: Problem) -> tuple[int, ...]:
        """The question prompt's tokens, exactly as encoded whole; they start with `shared_prefix_ids`."""
        return tuple(self.tokenizer.encode(question_prompt(problem, self.few_shot), add_special_tokens=True))

    def encode(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(text))

    def score_paths(self, items: Sequence[tuple[Problem, Sequence[str]]], stats: Stats | None = None) -> list[list[float]]:
        """Reward-model scores of every step of each (problem, step texts); the prompt has no few-shot part."""
        if self.scorer is None:
            raise ValueError("score_paths: no reward model configured")
        with (stats or self.stats).timed("reward"):
            return self.scorer([(question_prompt(p), steps) for p, steps in items])

    def with_shared_prefix(self, requests: Sequence[Request]) -> list[Request]:
        """The requests marked with how many of their leading tokens are the env's shared few-shot tokens."""
        return [dataclasses.replace(r, shared_len=len(self.shared_prefix_ids)) for r in requests]

    def expand(self, requests: Sequence[Request], num: int, temperature: float, *, grade: bool, score: bool,
               one_answer: bool = False, stats: Stats | None = None) -> list[list[Child]]:
        """`num` candidates per request -> the kept children (identical texts removed); see `children`."""
        if not requests:
            return []
        stats = stats or self.stats
        with stats.timed("sampling"):
            completions = self.propose(self.with_shared_prefix(requests), num, temperature)
        rows = self.children(requests, completions, grade=grade, score=score, one_answer=one_answer, stats=stats)
        if self.on_expand is not None:
            self.on_expand()
        return rows

    def children(self, requests: Sequence[Request], completions: Sequence[Sequence[Completion]], *, grade: bool,
                 score: bool, one_answer: bool = False, stats: Stats | None = None) -> list[list[Child]]:
        """The host work of an expansion: each request's completions -> its kept children (identical texts removed).

        grade: check answers against `problem.answer`; score: reward-model score of every kept child;
        one_answer: rStar-Math's MCTS rule: when a request's samples include one that stopped at `<end_of_answer>`,
        the first of them is its only child and every other sample is dropped before it runs (microsoft/rStar,
        branch rStar-math, rstar_deepthink/llms/llms.py:32-44).
        """
        stats = stats or self.stats
        stats.policy_calls += 1
        texts: list[list[str]] = []
        counts: list[list[int]] = []
        for req, comps in zip(requests, completions):
            seen: dict[str, int] = {}
            for c in comps:
                stats.tokens[req.problem.id] += len(c.token_ids)
                if c.text not in seen:
                    seen[c.text] = len(c.token_ids)
            if one_answer:
                answer = next((t for t in seen if t.rstrip().endswith(ANSWER_END)), None)
                seen = seen if answer is None else {answer: seen[answer]}
            texts.append(list(seen))
            counts.append(list(seen.values()))
        with stats.timed("sandbox"):
            outcomes = self.runner.expand([(req.path_texts, t) for req, t in zip(requests, texts)])
        rows: list[list[Child]] = []
        for req, outs, ns in zip(requests, outcomes, counts):
            row: list[Child] = []
            for out, n in zip(outs, ns):
                if out.program:
                    stats.programs[req.problem.id] += 1
                ids = self.encode(out.text)
                kind, reason = out.kind, out.reason
                if len(ids) > self.step_len:
                    kind, reason = StepKind.INVALID, f"step has {len(ids)} tokens > step buffer {self.step_len}"
                    ids = ids[: self.step_len]  # an invalid leaf's tokens never enter a prompt
                row.append(Child(out.text, ids, kind, out.answer if kind == StepKind.ANSWER_TERMINAL else None,
                                 observation=out.observation, reason=reason,
                                 exec_status=out.result.status if out.result is not None else None, num_tokens=n))
            rows.append(row)
        if grade:
            rows = self._grade(requests, rows, stats)
        if score and self.scorer is not None:
            rows = self._score(requests, rows, stats)
        return rows

    def _grade(self, requests: Sequence[Request], rows: list[list[Child]], stats: Stats) -> list[list[Child]]:
        where = [(i, j) for i, row in enumerate(rows) for j, c in enumerate(row) if c.kind == StepKind.ANSWER_TERMINAL]
        with stats.timed("grading"):
            ok = self.grader.equivalent_many([(requests[i].problem.answer, rows[i][j].answer) for i, j in where])
        for (i, j), good in zip(where, ok):
            rows[i][j] = dataclasses.replace(rows[i][j], correct=good)
        return rows

    def _score(self, requests: Sequence[Request], rows: list[list[Child]], stats: Stats) -> list[list[Child]]:
        where = [(i, j) for i, row in enumerate(rows) for j, c in enumerate(row) if c.kind != StepKind.INVALID]
        items = [(requests[i].problem, [*requests[i].path_texts, rows[i][j].text]) for i, j in where]
        scores = self.score_paths(items, stats) if items else []
        for (i, j), s in zip(where, scores):
            rows[i][j] = dataclasses.replace(rows[i][j], score=float(s[-1]))
        return rows

    def _scored(self, score: float | None) -> bool:
        return score is not None and self.scorer is not None and bool(np.isfinite(score))

    def unit_value(self, score: float | None, default: float = 0.5) -> float:
        """A reward-model score mapped to [0, 1] as its head says (`RewardHead.unit`); `default` when unscored."""
        return self.scorer.head.unit(score) if self._scored(score) else default

    def signed_value(self, score: float | None, default: float = 0.0) -> float:
        """A reward-model score mapped to [-1, 1] (rStar-Math's Q; a PPM's own range); `default` when unscored."""
        return self.scorer.head.signed(score) if self._scored(score) else default
