"""Monte-Carlo step labels (Math-Shepherd; Qwen's "Lessons of developing PRMs").

For each step of a solution, `k` completions are sampled from the policy starting right after that step and
continued step by step (code run in the sandbox, observations inserted) until an answer or an invalid step.
  soft label  = the fraction of completions whose answer equals the gold answer
  hard label  = 1 when at least `threshold` completions do (Math-Shepherd's hard estimate is threshold 1)
An answer step needs no completions: its label is whether its own answer is right (soft = hard = 0 or 1).

Solutions come from saved search trees (a search's output folder or its trees/; every root-to-answer path, up to
`per_problem` per tree) or from a JSONL file of {"id", "question", "answer" (gold), "steps": [node texts]} (a code
terminal's text includes its `<output>` observation, as trees store it).

Output: one PRM record per solution, the format training reads (`train/data.py`):
    {"prompt", "steps", "labels"} + {"id", "question", "gold", "soft_labels", "hard_labels", "correct_counts",
    "k", "threshold", "first_error"}
`labels` holds the soft or the hard labels (`MCConfig.labels`); `first_error` is the first step with hard label 0,
or -1 (what consensus filtering compares with a judge). The file is appended one solution at a time and a rerun
resumes after the last complete record. Solution i's completions use keys derived from (seed, i), so a resumed
run labels exactly as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Generator, Sequence

import jax
from tqdm import tqdm

from rstar_jax.config import InferenceConfig, SandboxSection, at_least
from rstar_jax.data import Problem
from rstar_jax.jsonl import InputError, ResumableJsonl, check_output_file, iter_jsonl, write_jsonl
from rstar_jax.math.steps import StepKind, parse_step, split_observation
from rstar_jax.search.mcts import path_texts, request_key
from rstar_jax.search import scheduler
from rstar_jax.search.policy import Request, Stats, StepEnv, question_prompt
from rstar_jax.search.scheduler import Expand

UNBOUNDED_STEP = 1 << 30  # rollouts keep no fixed-size token buffer, so no step is too long for one


class MCLabelError(InputError):
    """Bad MC-labelling input or settings (message names what is wrong)."""


@dataclasses.dataclass(frozen=True)
class MCConfig:
    k: int = 8  # completions per step
    threshold: int = 1  # hard label = 1 when at least this many completions are correct
    temperature: float = 0.7
    labels: str = "soft"  # which labels go in the record's "labels": "soft" | "hard"
    batch: int = 64  # rollouts advanced together (one policy call per step)

    def __post_init__(self):
        if self.k < 1 or not 1 <= self.threshold <= self.k:
            raise MCLabelError(f"mc labels: need k >= 1 and 1 <= threshold <= k, got k={self.k}, "
                               f"threshold={self.threshold}")
        if self.labels not in ("soft", "hard"):
            raise MCLabelError(f"mc labels: labels must be 'soft' or 'hard', got {self.labels!r}")
        if self.temperature < 0 or self.batch < 1:
            raise MCLabelError(f"mc labels: need temperature >= 0 and batch >= 1, got {self.temperature}, {self.batch}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MCJobConfig(InferenceConfig):
    """`label mc`: label the solutions of `trees` with completions from `policy`."""

    trees: str  # a search's output folder or its trees/, or a JSONL of {id, question, answer, steps}
    policy: str  # completion model: HF folder, .gguf or alias
    out: str  # output JSONL; rerun the same command to resume
    mc: MCConfig = MCConfig()
    per_problem: int = 4  # trajectories labelled per tree
    seed: int = 0
    max_new_tokens: int = 256  # per step
    max_steps: int = 16
    in_flight: int = 0  # solutions labelled at a time; 0: enough to fill the engine's slots twice
    sandbox: SandboxSection = SandboxSection()

    def __post_init__(self):
        at_least(1, per_problem=self.per_problem, max_new_tokens=self.max_new_tokens, max_steps=self.max_steps)
        at_least(0, in_flight=self.in_flight)


@dataclasses.dataclass(frozen=True)
class Solution:
    problem: Problem
    steps: tuple[str, ...]  # node texts, root (exclusive) to the answer


# ---------------------------------------------------------------------------------------------
# Labelling


def rollouts_correct(env: StepEnv, starts: Sequence[tuple[Problem, tuple[str, ...]]], key: jax.Array,
                     temperature: float, batch: int = 64) -> Generator[Expand, list, list[bool]]:
    """One completion from each (problem, path so far), `batch` advancing together one step per expansion; does it
    reach the gold answer?"""
    correct = [False] * len(starts)
    for lo in range(0, len(starts), batch):
        paths = {i: list(starts[i][1]) for i in range(lo, min(lo + batch, len(starts)))}
        ids = {i: [*env.question_ids(starts[i][0]), *(t for text in paths[i] for t in env.encode(text))] for i in paths}
        depth = 0
        while paths:
            live = list(paths)
            requests = [Request(i, starts[i][0], tuple(paths[i]), tuple(ids[i]), request_key(key, i, depth))
                        for i in live]
            rows = yield Expand(requests, 1, temperature, grade=True, score=False)
            for i, [child] in zip(live, rows):
                if child.kind == StepKind.ANSWER_TERMINAL:
                    correct[i] = bool(child.correct)
                if child.kind in (StepKind.ANSWER_TERMINAL, StepKind.INVALID):
                    del paths[i]
                else:
                    paths[i].append(child.text)
                    ids[i] += child.token_ids
            depth += 1
    return correct


def _answer_of(step_text: str) -> str | None:
    parsed = parse_step(split_observation(step_text)[0])
    return parsed.answer if parsed.kind == StepKind.ANSWER_TERMINAL else None


def label_solution(env: StepEnv, solution: Solution, cfg: MCConfig, key: jax.Array,
                   stats: Stats | None = None) -> Generator[Expand, list, dict[str, Any]]:
    """The PRM record of one solution (see the module docstring); a generator for `scheduler.run`."""
    if env.grader is None:
        raise ValueError("mc labels: the step environment needs a Grader")
    steps = solution.steps
    answers = [_answer_of(s) for s in steps]
    rolled = [i for i, a in enumerate(answers) if a is None]
    starts = [(solution.problem, steps[: i + 1]) for i in rolled for _ in range(cfg.k)]
    outcomes = iter((yield from rollouts_correct(env, starts, key, cfg.temperature, cfg.batch)))
    counts = [0] * len(steps)
    for i in rolled:
        counts[i] = sum(next(outcomes) for _ in range(cfg.k))
    graded = [i for i, a in enumerate(answers) if a is not None]
    for i, ok in zip(graded, env.grader.equivalent_many([(solution.problem.answer, answers[i]) for i in graded])):
        counts[i] = cfg.k if ok else 0  # an answer step is its own (deterministic) completion
    soft = [c / cfg.k for c in counts]
    hard = [int(c >= cfg.threshold) for c in counts]
    p = solution.problem
    return {
        "id": p.id, "prompt": question_prompt(p), "steps": list(steps),
        "labels": soft if cfg.labels == "soft" else [float(h) for h in hard],
        "question": p.question, "gold": p.answer, "soft_labels": soft, "hard_labels": hard,
        "correct_counts": counts, "k": cfg.k, "threshold": cfg.threshold,
        "first_error": hard.index(0) if 0 in hard else -1,
    }


def mc_labels(env: StepEnv, solutions: Sequence[Solution], cfg: MCConfig, key: jax.Array, *,
              out: str | Path | None = None, in_flight: int = 8,
              indices: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """PRM records for `solutions` (or those at `indices`: a process's share), `in_flight` labelled at a time;
    solution i's completions use fold_in(key, i). With `out`, records are appended in order as they finish, and a
    rerun resumes after the last complete one."""
    indices = list(range(len(solutions))) if indices is None else list(indices)
    writer = ResumableJsonl(out) if out is not None else None
    records = list(writer.records) if writer else []
    if [r.get("id") for r in records] != [solutions[i].problem.id for i in indices[: len(records)]]:
        raise MCLabelError(f"{out}: existing records do not match these solutions; choose another output")
    todo = range(len(records), len(indices))
    finished: dict[int, dict[str, Any]] = {}  # solutions finish out of order; records are written in order
    try:
        with tqdm(todo, desc="mc labels", unit="solution", disable=len(todo) < 2, file=sys.stderr) as bar:
            def done(j: int, rec: dict[str, Any], stats: Stats) -> None:
                finished[j] = rec
                while len(records) in finished:
                    records.append(finished.pop(len(records)))
                    if writer:
                        writer.append(records[-1])
                env.stats.add(stats)
                bar.update()

            scheduler.run(env, ((j, label_solution(env, solutions[indices[j]], cfg,
                                                   jax.random.fold_in(key, indices[j])), Stats()) for j in todo),
                          in_flight, done)
    finally:
        if writer:
            writer.close()
    return records


# ---------------------------------------------------------------------------------------------
# Input


def solutions_from_trees(trees_dir: str | Path, per_problem: int = 4) -> list[Solution]:
    """Root-to-answer paths of every saved tree in `trees_dir` or its `trees/` folder (a search's output folder),
    in node order, at most `per_problem` per tree."""
    from rstar_jax.search import tree_io

    folder = Path(trees_dir) / "trees" if (Path(trees_dir) / "trees").is_dir() else Path(trees_dir)
    files = sorted(folder.glob("*.json"))
    if not files:
        raise MCLabelError(f"{trees_dir}: no saved trees (*.json) found")
    out = []
    for path in files:
        saved = tree_io.load(path)
        meta = saved.meta["problem"]
        problem = Problem(str(meta["id"]), meta["question"], str(meta["answer"]), None, None, "tree")
        leaves = [i for i, n in enumerate(saved.nodes) if n["kind"] == StepKind.ANSWER_TERMINAL.value]
        out += [Solution(problem, path_texts(saved.nodes, saved.arrays["parent"], i)) for i in leaves[:per_problem]]
    return out


def solutions_from_jsonl(path: str | Path) -> list[Solution]:
    out = []
    for n, obj in iter_jsonl(path, required=("question", "answer", "steps")):
        steps = obj["steps"]
        if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
            raise MCLabelError(f"{path}:{n}: 'steps' must be a non-empty list of strings")
        out.append(Solution(Problem(str(obj.get("id", n)), str(obj["question"]), str(obj["answer"]), None, None,
                                    "jsonl"), tuple(steps)))
    return out


def load_solutions(source: str | Path, per_problem: int = 4) -> list[Solution]:
    """A trees folder or a solutions JSONL file."""
    return solutions_from_trees(source, per_problem) if Path(source).is_dir() else solutions_from_jsonl(source)


def run_mc_labels(cfg: MCJobConfig) -> dict[str, Any]:
    """`rstar-jax label mc`: check the inputs, load the policy, sandbox and grader, label every solution; returns a
    summary."""
    from rstar_jax.math.grading import Grader
    from rstar_jax.math.steps import StepRunner
    from rstar_jax import runtime
    from rstar_jax.engine.model import load_policy
    from rstar_jax.models.hf_io import model_config
    from rstar_jax.sandbox import SandboxPool
    from rstar_jax.search.policy import LMProposer

    solutions = load_solutions(cfg.trees, cfg.per_problem)
    check_output_file(cfg.out)
    model_config(cfg.policy, reward=False, name="--policy").check_positions(
        cfg.max_new_tokens, f"max_new_tokens={cfg.max_new_tokens} (per step)")
    # the sandbox forks its workers before JAX starts a backend (loading the policy does)
    with SandboxPool.from_section(cfg.sandbox) as pool, Grader() as grader:
        rt = runtime.start(cfg.mesh)
        lm, model = load_policy(cfg.policy, cfg, rt.mesh)
        proposer = LMProposer(model, lm.tokenizer, max_new_tokens=cfg.max_new_tokens, engine=cfg.engine,
                              samples=cfg.mc.k)
        env = StepEnv(proposer, StepRunner(pool.run, max_steps=cfg.max_steps), lm.tokenizer, step_len=UNBOUNDED_STEP,
                      grader=grader)
        mine = rt.share(range(len(solutions)))  # every process labels its share into its own file
        out = Path(cfg.out)
        part = out.with_name(f"{out.stem}{rt.suffix}{out.suffix}")
        records = mc_labels(env, solutions, cfg.mc, jax.random.key(cfg.seed), out=part, indices=mine,
                            in_flight=cfg.in_flight or max(1, 2 * cfg.engine.slots // cfg.mc.k))
        rt.barrier("label mc: every share labelled")
        if rt.process_count > 1:
            shares = [ResumableJsonl.read(out.with_name(f"{out.stem}.p{i}{out.suffix}")) for i in range(rt.process_count)]
            records = [shares[i % rt.process_count][i // rt.process_count] for i in range(len(solutions))]
            if rt.process_index == 0:
                write_jsonl(out, records)
            rt.barrier("label mc: merged")
    steps = [h for r in records for h in r["hard_labels"]]
    return {"solutions": len(records), "steps": len(steps),
            "positive_steps": sum(steps), "solutions_without_error": sum(r["first_error"] == -1 for r in records),
            "out": str(cfg.out)}
