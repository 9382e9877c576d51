"""Consensus filtering (Qwen's "Lessons of developing PRMs"): keep an MC-labelled solution only where an LLM judge
locates the same first wrong step as the Monte-Carlo labels.

The judge (any loadable causal LM, or any function from prompts to texts) reads `CRITIQUE_TEMPLATE`: the problem
and the solution's steps as numbered paragraphs, and answers with the index of the first wrong paragraph, or -1,
in `\\boxed{}`. An answer that is missing, not an integer, or out of range counts as a disagreement ("unparsed").
The MC side is the record's `first_error` (first step with hard label 0, or -1; see `labels/mc.py`).

Files: every judgement is appended to `{out}.judged.jsonl` as it is made (a rerun resumes after the last one);
the kept records (PRM format, plus "judge_first_error") go to `out`; the counts to `{out}.report.json`.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm import tqdm

from rstar_jax.config import InferenceConfig, at_least
from rstar_jax.jsonl import InputError, ResumableJsonl, check_output_file, iter_jsonl, write_json, write_jsonl
from rstar_jax.math.grading import last_boxed

# prompts -> one generated text per prompt
Judge = Callable[[Sequence[str]], list[str]]

CRITIQUE_TEMPLATE = (
    "Below is a math problem and a proposed solution whose steps are numbered paragraphs, starting from 0.\n\n"
    "Problem:\n{problem}\n\n"
    "Solution:\n{paragraphs}\n\n"
    "Check each paragraph in order. Find the earliest paragraph that contains a mistake (a wrong calculation, "
    "a false statement, or a wrong step of logic) and give its index. If every paragraph is correct, give -1. "
    "End with your final answer in \\boxed{{}}."
)


class ConsensusError(InputError):
    """Bad consensus-filter input (message names the file and line)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConsensusConfig(InferenceConfig):
    """`label consensus`: judge the records of `mc` with the causal LM `judge`."""

    mc: str  # MC-label JSONL from `rstar-jax label mc`
    judge: str  # judge model: HF folder, .gguf or alias
    out: str  # kept records (PRM JSONL); judgements resume from OUT.judged.jsonl
    max_new_tokens: int = 512
    batch_size: int = 8
    chat: bool | None = None  # wrap prompts in the chat template; None: when the tokenizer has one
    seed: int = 0

    def __post_init__(self):
        at_least(1, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)


def critique_prompt(problem: str, steps: Sequence[str]) -> str:
    paragraphs = "\n\n".join(f"<paragraph_{i}>\n{s.strip()}\n</paragraph_{i}>" for i, s in enumerate(steps))
    return CRITIQUE_TEMPLATE.format(problem=problem.strip(), paragraphs=paragraphs)


def parse_judgement(text: str, num_steps: int) -> int | None:
    """The judge's first-error index from its last `\\boxed{}`; None when absent, not an integer, or out of range."""
    boxed = last_boxed(text)
    if boxed is None or not re.fullmatch(r"-?\d+", boxed.strip()):
        return None
    index = int(boxed)
    return index if -1 <= index < num_steps else None


def _check(rec: Any, where: str) -> None:
    steps, hard = rec.get("steps"), rec.get("hard_labels")
    if not isinstance(rec.get("question"), str) or not isinstance(steps, list) or not steps:
        raise ConsensusError(f"{where}: not an MC-label record (needs 'question' and a non-empty 'steps'; "
                             f"write it with `rstar-jax label mc`)")
    if not isinstance(hard, list) or len(hard) != len(steps) or not isinstance(rec.get("first_error"), int):
        raise ConsensusError(f"{where}: needs 'hard_labels' (one per step) and 'first_error' from MC labelling")


def consensus_filter(records: Sequence[dict[str, Any]], judge: Judge, *, out: str | Path | None = None,
                     batch_size: int = 8) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(kept records, report) for MC-label records (`labels/mc.py`). With `out`, judgements are appended to
    `{out}.judged.jsonl` and resumed from it."""
    log = ResumableJsonl(f"{out}.judged.jsonl") if out is not None else None
    judged = list(log.records) if log else []
    if [j["id"] for j in judged] != [r.get("id") for r in records[: len(judged)]]:
        raise ConsensusError(f"{out}.judged.jsonl: existing judgements do not match these records; choose another output")
    try:
        starts = range(len(judged), len(records), batch_size)
        for lo in tqdm(starts, desc="consensus", unit="batch", disable=len(starts) < 2, file=sys.stderr):
            batch = records[lo : lo + batch_size]
            texts = judge([critique_prompt(r["question"], r["steps"]) for r in batch])
            for rec, text in zip(batch, texts):
                index = parse_judgement(text, len(rec["steps"]))
                entry = {"id": rec.get("id"), "judge_output": text, "judge_first_error": index,
                         "mc_first_error": rec["first_error"], "keep": index == rec["first_error"]}
                judged.append(entry)
                if log:
                    log.append(entry)
    finally:
        if log:
            log.close()
    kept = [rec | {"judge_first_error": j["judge_first_error"]} for rec, j in zip(records, judged) if j["keep"]]
    report = summarize(judged)
    if out is not None:
        write_jsonl(out, kept)
        write_json(f"{out}.report.json", report)
    return kept, report


def summarize(judged: Sequence[dict[str, Any]]) -> dict[str, Any]:
    total = len(judged)
    kept = sum(j["keep"] for j in judged)
    parsed = [j for j in judged if j["judge_first_error"] is not None]
    return {
        "records": total,
        "kept": kept,
        "kept_pct": 100.0 * kept / total if total else 0.0,
        "kept_without_error": sum(j["keep"] and j["mc_first_error"] == -1 for j in judged),
        "kept_with_error": sum(j["keep"] and j["mc_first_error"] != -1 for j in judged),
        "unparsed": total - len(parsed),
        "judge_earlier": sum(j["judge_first_error"] != -1 and (j["mc_first_error"] == -1
                                                              or j["judge_first_error"] < j["mc_first_error"])
                             for j in parsed),
        "judge_later": sum(j["mc_first_error"] != -1 and (j["judge_first_error"] == -1
                                                         or j["judge_first_error"] > j["mc_first_error"])
                           for j in parsed),
    }


def lm_judge(cfg: ConsensusConfig) -> Judge:
    """Greedy critiques from the causal LM `cfg.judge`."""
    import jax

    from rstar_jax.generation import encode_prompts, use_chat
    from rstar_jax import runtime
    from rstar_jax.engine import SamplingConfig, generate
    from rstar_jax.engine.model import load_policy

    lm, model = load_policy(cfg.judge, cfg, runtime.start(cfg.mesh).mesh)
    chat = use_chat(lm.tokenizer, cfg.chat)
    settings = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0)

    def judge(prompts: Sequence[str]) -> list[str]:
        out: list[str] = []
        ids = encode_prompts(lm.tokenizer, list(prompts), chat)
        for lo in range(0, len(ids), cfg.batch_size):
            results = generate(model, lm.tokenizer, ids[lo : lo + cfg.batch_size], settings, jax.random.key(cfg.seed),
                               base=cfg.engine)
            out += [comps[0].text for comps in results]
        return out

    return judge


def run_consensus(cfg: ConsensusConfig) -> dict[str, Any]:
    """`rstar-jax label consensus`: judge every MC record of `cfg.mc`, keep the agreeing ones; returns the report."""
    from rstar_jax.models.hf_io import model_config

    records = []
    for n, rec in iter_jsonl(cfg.mc):
        _check(rec, f"{cfg.mc}:{n}")
        records.append(rec)
    check_output_file(cfg.out)
    model_config(cfg.judge, reward=False, name="--judge").check_positions(cfg.max_new_tokens,
                                                                          f"max_new_tokens={cfg.max_new_tokens}")
    return consensus_filter(records, lm_judge(cfg), out=cfg.out, batch_size=cfg.batch_size)[1]
