"""`rstar-jax eval --model M --problems FILE --out DIR`: every evaluation method on one problem set, one report.

    DIR/greedy/          `run_search` greedy: one chain at temperature 0 (pass@1)
    DIR/samples/         `run_search` maj with samples=num_samples: ONE set of N chains per problem, the source of
                         maj@N, bon_X@N and pass@N for every N = 1, 2, 4, ... (metrics.py cuts it into groups)
    DIR/beam/            `run_search` beam (needs a reward model; skipped without one)
    DIR/mcts/            `run_search` mcts in inference mode: no gold answer. With a reward model the PPM scores
                         the answer terminals (their backed-up reward) and new nodes; without one every score is 0,
                         so its pick is a plain majority over the tree's answer terminals.
    DIR/samples.jsonl    the samples run's chains in the samples-file format of `metrics` (answer, num_tokens,
                         step_scores with a reward model) plus the greedy chain; one line per problem, resumable
    DIR/report.md, DIR/report.json   one table: greedy, maj@N, pass@N, bon_{min,product,last}@N, beam, mcts with
                         accuracy (%) and policy tokens generated per problem (reward-model forwards not counted);
                         rows that need a reward model say "skipped" without one
    DIR/accuracy_vs_n.png, DIR/accuracy_vs_tokens.png   curves of the samples run; greedy / beam / mcts as lines
                         (against N) and markers (against tokens)

Every part resumes: each run skips the problems in its results.jsonl and samples.jsonl keeps its lines, so rerunning
the command redoes nothing; a rerun into DIR with other settings is refused by the first run whose settings differ
(samples.jsonl alone is rebuilt when the reward model or the greedy run changes).

Why the samples run is `maj`, not `bon`: both draw the same chains (same keys, same temperature), but `bon` keeps
no step scores in its saved nodes (it scores only the answered chains, to rank them). So the samples run does not
depend on the reward model, and this module scores every chain's steps itself through the same `StepEnv.score_paths`
and [0, 1] mapping that `bon` ranks with. Unlike `search --method bon`, which ranks only chains that reached an
answer, bon_X@N here ranks all N chains, so a top-scored chain without an answer counts as wrong.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal, Sequence

from rstar_jax.config import at_least, shared
from rstar_jax.jsonl import InputError, ResumableJsonl, read_jsonl, write_json
from rstar_jax.math.steps import StepKind
from rstar_jax.scoring import AGGREGATIONS
from rstar_jax.search import tree_io
from rstar_jax.search.job import SearchConfig, SearchSettings

METHODS = ("greedy", "samples", "beam", "mcts")
NEEDS_REWARD_MODEL = ("beam",)
SEARCH_METHOD = {"greedy": "greedy", "samples": "maj", "beam": "beam", "mcts": "mcts"}
SKIPPED = "skipped: needs --reward-model"


class EvalSuiteError(InputError):
    """A bad `eval --model` argument (one line naming it)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig(SearchSettings):
    """`eval`: every method of a policy on problems (`model` + `problems`), or the metrics of a `samples` file."""

    out: str  # output folder; rerun the same command to resume
    model: str = ""  # the policy: HF folder, .gguf, alias, or an exported checkpoint folder
    problems: str = ""  # with model: a problem jsonl or a synthetic spec "synth:levels=1-2,n=32,seed=0"
    samples: str = ""  # instead of model: a JSONL of per-problem gold answers and scored samples
    reward_model: str | None = None  # PPM / PRM folder: BoN step scores, beam search, PPM-scored MCTS
    methods: tuple[Literal["greedy", "samples", "beam", "mcts"], ...] = METHODS
    num_samples: int = 64  # one set of samples per problem for maj@N / BoN@N
    beam_width: int = 4
    grader_workers: int = 1

    def __post_init__(self):
        super().__post_init__()
        if bool(self.samples) == bool(self.model):
            raise EvalSuiteError("give either --samples FILE or --model M --problems FILE (not both)")
        if self.model and not self.problems:
            raise EvalSuiteError("--model: needs --problems FILE (a problem jsonl or a synth:... spec)")
        if not self.methods:
            raise EvalSuiteError("methods (--methods): give at least one")
        if self.reward_model is None and all(m in NEEDS_REWARD_MODEL for m in self.methods):
            raise EvalSuiteError(f"--methods {','.join(self.methods)}: every one needs --reward-model")
        at_least(1, num_samples=self.num_samples, beam_width=self.beam_width, grader_workers=self.grader_workers)

    @property
    def runs(self) -> list[str]:
        """The methods that run, in table order (those needing a reward model only with one)."""
        return [m for m in METHODS if m in self.methods and (self.reward_model is not None
                                                              or m not in NEEDS_REWARD_MODEL)]

    def search_config(self, method: str) -> SearchConfig:
        """The `search` job of one method."""
        budget = {"samples": self.num_samples, "beam": self.beam_width}.get(method)
        settings = shared(self, SearchSettings)
        if budget is not None:
            settings["baseline"] = dataclasses.replace(self.baseline, samples=budget)
        return SearchConfig(**settings, model=self.model, problems=self.problems, method=SEARCH_METHOD[method],
                            mode="inference", out=str(Path(self.out) / method),
                            reward_model=self.reward_model if method in ("beam", "mcts") else None)


# ---------------------------------------------------------------------------------------------
# Saved chains -> samples file


def chains(saved: tree_io.SavedTree) -> list[list[int]]:
    """Node ids of each chain of a baseline tree, in sample order (chain s's first step is the root's s-th child)."""
    kids = saved.children()
    out = []
    for first in kids[0]:
        path = [first]
        while kids[path[-1]]:
            path.append(kids[path[-1]][0])  # a chain node has at most one child
        out.append(path)
    return out


def chain_sample(saved: tree_io.SavedTree, path: list[int]) -> dict[str, Any]:
    last = saved.nodes[path[-1]]
    return {"answer": last["answer"] if last["kind"] == StepKind.ANSWER_TERMINAL.value else None,
            "num_tokens": sum(saved.nodes[i]["num_tokens"] for i in path), "node": path[-1]}


def write_samples_file(out: Path, problems_spec: str, reward_model: str | None, with_greedy: bool,
                       dtype: str) -> Path:
    """DIR/samples.jsonl from the saved trees of DIR/samples (and DIR/greedy); adds only problems not yet in it."""
    path = out / "samples.jsonl"
    lines = ResumableJsonl(path)
    if any(r.get("reward_model") != reward_model or ("greedy" in r) != with_greedy for r in lines.records):
        lines.close()  # written for another reward model or without / with greedy: rebuild
        path.unlink()
        lines = ResumableJsonl(path)
    done = {r["id"] for r in lines.records}
    todo = [r for r in read_jsonl(out / "samples" / "results.jsonl") if r["id"] not in done]
    greedy = {r["id"]: r for r in read_jsonl(out / "greedy" / "results.jsonl")} if with_greedy and todo else {}
    env = _score_env(reward_model, dtype) if reward_model is not None and todo else None
    by_id = {}
    if env is not None:
        from rstar_jax.data import load_problems

        by_id = {p.id: p for p in load_problems(problems_spec)}
    with lines:
        for rec in todo:
            saved = tree_io.load(out / "samples" / rec["tree"])
            paths = chains(saved)
            samples = [chain_sample(saved, p) for p in paths]
            if env is not None:
                steps = [[saved.nodes[i]["text"] for i in p] for p in paths]
                scores = env.score_paths([(by_id[rec["id"]], s) for s in steps])
                for sample, sc in zip(samples, scores):
                    sample["step_scores"] = [env.unit_value(s, default=0.0) for s in sc]
            line = {"id": rec["id"], "gold": rec["gold"], "tree": f"samples/{rec['tree']}", "samples": samples,
                    "reward_model": reward_model}
            if with_greedy:
                g = greedy[rec["id"]]
                g_saved = tree_io.load(out / "greedy" / g["tree"])
                [g_path] = chains(g_saved)
                line["greedy"] = chain_sample(g_saved, g_path)
            lines.append(line)
    return path


def _score_env(reward_model: str, dtype: str):
    """A StepEnv holding only a reward scorer: bon's own prompt (no few-shot) and [0, 1] score mapping."""
    import jax.numpy as jnp

    from rstar_jax.models.hf_io import load_model
    from rstar_jax.search.policy import RewardScorer, StepEnv

    rm = load_model(reward_model, dtype="float32")  # checked to be a reward model by `run_eval`
    scorer = RewardScorer(rm.params, rm.cfg, rm.tokenizer, rm.head, compute_dtype=jnp.dtype(dtype))
    return StepEnv(None, None, rm.tokenizer, None, step_len=0, scorer=scorer)


# ---------------------------------------------------------------------------------------------
# Report


def report_rows(m: dict[str, Any] | None, runs: dict[str, dict[str, Any]], methods: Sequence[str],
                has_reward_model: bool) -> list[dict[str, Any]]:
    """One row per method (and per N for the samples run): accuracy in %, generated tokens per problem."""

    def row(method, accuracy=None, tokens=None, n=None, note=""):
        return {"method": method, "N": n, "accuracy": accuracy, "tokens": tokens, "note": note}

    def single(method, note=""):
        s = runs[method]
        return row(method, 100.0 * s["accuracy"], s["tokens_per_problem"], note=note)

    rows = []
    if "greedy" in methods:
        rows.append(single("greedy"))
    if m is not None:
        for key, note in (("maj", ""), ("pass", "some sample correct (the ceiling)")):
            rows += [row(f"{key}@N", r[key], r["tokens"], r["N"], note) for r in m["by_n"]]
        for how in AGGREGATIONS:
            if has_reward_model:
                rows += [row(f"bon_{how}@N", r[f"bon_{how}"], r["tokens"], r["N"]) for r in m["by_n"]]
            else:
                rows.append(row(f"bon_{how}@N", note=SKIPPED))
    if "beam" in methods:
        rows.append(single("beam") if has_reward_model else row("beam", note=SKIPPED))
    if "mcts" in methods:
        rows.append(single("mcts", "" if has_reward_model else "no reward model: majority over answer terminals"))
    return rows


def _markdown(rows: list[dict[str, Any]], problems: int, num_samples: int) -> str:
    def num(x):
        return "" if x is None else f"{x:.1f}"

    lines = [f"{problems} problems; {num_samples} samples per problem for maj / pass / bon", "",
             "| method | N | accuracy (%) | tokens / problem | note |", "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {'' if r['N'] is None else r['N']} | {num(r['accuracy'])} | {num(r['tokens'])} "
              f"| {r['note']} |" for r in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The suite


def run_eval(cfg: EvalConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run `cfg.methods` over `cfg.problems` into `cfg.out` (layout in the module docstring); returns report.json's
    object. Every setting and both models are checked before the first search starts."""
    from rstar_jax.evaluate.metrics import compute_metrics, read_samples
    from rstar_jax.math.grading import Grader
    from rstar_jax.plots import plot_accuracy
    from rstar_jax.sandbox import SandboxPool
    from rstar_jax.search.job import check_models, run_search

    searches = {method: cfg.search_config(method) for method in cfg.runs}
    check_models(cfg, cfg.model, cfg.reward_model)
    out_dir, methods, reward_model = Path(cfg.out), cfg.methods, cfg.reward_model
    runs = {}
    # one sandbox for every run, forked before the first run starts JAX
    with SandboxPool.from_section(cfg.sandbox) as pool:
        for method, search in searches.items():
            runs[method] = run_search(search, progress=progress, pool=pool)

    metrics = None
    if "samples" in runs:
        samples_path = write_samples_file(out_dir, cfg.problems, reward_model, "greedy" in runs, cfg.dtype)
        with Grader(workers=cfg.grader_workers) as grader:
            metrics = compute_metrics(read_samples(samples_path), grader)
    rows = report_rows(metrics, runs, methods, reward_model is not None)
    n_problems = next(iter(runs.values()))["problems"]
    report = {"model": cfg.model, "reward_model": reward_model, "problems": cfg.problems, "num_problems": n_problems,
              "num_samples": cfg.num_samples, "rows": rows, "samples_metrics": metrics, "runs": runs}
    write_json(out_dir / "report.json", report)
    (out_dir / "report.md").write_text(_markdown(rows, n_problems, cfg.num_samples))
    points = [(r["method"], r["accuracy"], r["tokens"]) for r in rows if r["N"] is None and r["accuracy"] is not None]
    by_n = metrics["by_n"] if metrics is not None else []
    if by_n:
        plot_accuracy(by_n, points, "N", out_dir / "accuracy_vs_n.png")
    plot_accuracy(by_n, points, "tokens", out_dir / "accuracy_vs_tokens.png")
    return report
