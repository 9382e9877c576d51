"""ProcessBench (Zheng et al., 2024): can a reward model find the first wrong step of a solution?

Data: a JSON list (the official split files) or JSONL of rows
    {"id": str, "problem": str, "steps": [str], "label": int, "final_answer_correct": bool}
where `label` is the index of the first wrong step, or -1 when every step is right.

Prediction (the official rule for step-score models): the first step whose score is below the threshold, -1 when
none is. Metric, as the official evaluation computes it: accuracy (%) on erroneous rows (exact index), accuracy on
correct rows (prediction -1), and F1 = their harmonic mean (0 when both are 0).

Threshold (`run_processbench`): chosen on a calibration set (a separate file, or a seeded `calibration_fraction` of
the rows) to maximise F1, then fixed and applied to the evaluation rows; the best threshold on the evaluation rows
themselves is reported as an upper bound. A NaN score (a step with no tokens) never counts as below the threshold.

The published protocol (`protocol: official`, `run_official`, `OfficialProtocol`): ProcessBench's four subsets (gsm8k, math,
olympiadbench, omnimath) scored with one threshold, the F1-maximising one on the GSM8K subset or a fixed one (0.5
for a PRM's P(correct)), applied to every subset; each subset's error / correct accuracy and F1, and their
unweighted mean over the subsets (the papers' "Avg. F1"), as Qwen's run_eval.py reports per split
(QwenLM/ProcessBench, code/run_eval.py:117-130).

Reward models: a project head reads the problem in the policy's prompt with each step after a newline; a
Qwen2.5-Math-PRM folder reads its own chat format (steps joined by `<extra_0>`, `reward.encode_qwen_prm`). Either
way the head's kind says how scores are read (`models.heads.RewardHead`).

Diagnostics from Qwen's "Lessons of developing PRMs": accuracy on rows whose final answer is right but whose process
is wrong (an outcome-reward model gets these wrong), and the share of solutions (>= 2 steps) whose lowest score is
strictly at the last step (a PRM that behaves like an ORM puts it there).

Outputs in `out_dir`: predictions.jsonl (per row: split or subset, label, prediction, match, scores), report.json,
report.md. Every set of rows is checked for both erroneous and correct rows before anything is scored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
from tqdm import tqdm

from rstar_jax.config import InferenceConfig, at_least
from rstar_jax.jsonl import InputError, iter_jsonl, write_json

# (problem, steps) pairs -> one score per step; higher = more likely correct.
ScoreFn = Callable[[Sequence[tuple[str, Sequence[str]]]], list[list[float]]]

STEP_SEPARATOR = "\n"  # what goes before each natural-language step when a project reward model reads it


class ProcessBenchError(InputError):
    """Bad ProcessBench input (message names the file and row)."""


SUBSETS = ("gsm8k", "math", "olympiadbench", "omnimath")


@dataclasses.dataclass(frozen=True)
class OfficialProtocol:
    """ProcessBench as published: one file per subset (empty: not evaluated) and where the one threshold comes from."""

    gsm8k: str = ""
    math: str = ""
    olympiadbench: str = ""
    omnimath: str = ""
    threshold_from: Literal["gsm8k", "fixed"] = "gsm8k"  # best F1 on the GSM8K subset, or `threshold`
    threshold: float = 0.5  # the fixed threshold (0.5 for a PRM's P(step correct))

    def check(self) -> None:
        """Called when the protocol is chosen (`protocol: official`); the empty default is the calibrated run's."""
        if not self.subsets:
            raise ProcessBenchError(f"processbench official protocol: give at least one of {', '.join(SUBSETS)}")
        if self.threshold_from == "gsm8k" and not self.gsm8k:
            raise ProcessBenchError("processbench official protocol: threshold_from gsm8k needs the gsm8k subset")
        if not math.isfinite(self.threshold):
            raise ProcessBenchError(f"processbench official protocol: threshold={self.threshold!r} must be finite")

    @property
    def subsets(self) -> dict[str, str]:
        """Subset name -> file, in the papers' order."""
        return {name: getattr(self, name) for name in SUBSETS if getattr(self, name)}



@dataclasses.dataclass(frozen=True, kw_only=True)
class ProcessBenchConfig(InferenceConfig):
    reward_model: str  # reward model folder (a name only, when the caller passes its own scorer)
    out: str  # output folder
    protocol: Literal["calibrated", "official"] = "calibrated"  # official: the `official` section's subsets
    data: str = ""  # the calibrated protocol's ProcessBench JSON / JSONL
    calibration: str = ""  # rows to choose the threshold on (default: a seeded share of data)
    calibration_fraction: float = 0.5
    seed: int = 0
    batch_size: int = 16
    official: OfficialProtocol = OfficialProtocol()

    def __post_init__(self):
        at_least(1, batch_size=self.batch_size)
        if self.protocol == "official":
            if self.data or self.calibration:
                raise ProcessBenchError("processbench protocol official: reads its subsets from official.gsm8k, "
                                        "official.math, ... (not --data / --calibration)")
            self.official.check()
        elif not self.data:
            raise ProcessBenchError("processbench: --data is required (or protocol=official with its subsets)")


@dataclasses.dataclass(frozen=True)
class Row:
    id: str
    problem: str
    steps: tuple[str, ...]
    label: int  # first wrong step, -1 if none
    final_answer_correct: bool


@dataclasses.dataclass(frozen=True)
class Metrics:
    error_acc: float  # % of erroneous rows whose first wrong step is found exactly
    correct_acc: float  # % of correct rows predicted -1
    f1: float  # harmonic mean of the two
    n_error: int
    n_correct: int


# ---------------------------------------------------------------------------------------------
# Data


def _check_row(obj: Any, where: str) -> Row:
    if not isinstance(obj, dict):
        raise ProcessBenchError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("problem", "steps", "label"):
        if key not in obj:
            raise ProcessBenchError(f"{where}: missing key {key!r}")
    steps = obj["steps"]
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
        raise ProcessBenchError(f"{where}: 'steps' must be a non-empty list of strings")
    label = obj["label"]
    if not isinstance(label, int) or isinstance(label, bool) or not -1 <= label < len(steps):
        raise ProcessBenchError(f"{where}: 'label' must be -1 or a step index below {len(steps)}, got {label!r}")
    return Row(str(obj.get("id", where)), str(obj["problem"]), tuple(steps), label,
               bool(obj.get("final_answer_correct", False)))


def load_rows(path: str | Path) -> list[Row]:
    """Rows of a ProcessBench file (JSON list or JSONL); the first bad row is a one-line error."""
    p = Path(path)
    if not p.is_file():
        raise ProcessBenchError(f"{p}: no such file")
    text = p.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ProcessBenchError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
        rows = [_check_row(obj, f"{p}: row {i}") for i, obj in enumerate(data)]
    else:
        rows = [_check_row(obj, f"{p}:{n}") for n, obj in iter_jsonl(p)]
    if not rows:
        raise ProcessBenchError(f"{p}: no rows")
    return rows


def split_calibration(rows: Sequence[Row], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(calibration, evaluation) row indices by a seeded hash of the row id (stable under reordering)."""
    if not 0 < fraction < 1:
        raise ProcessBenchError(f"calibration_fraction: must lie in (0, 1), got {fraction}")

    def u(row_id: str) -> float:
        return int.from_bytes(hashlib.sha256(f"{seed}\0{row_id}".encode()).digest()[:8], "little") / 2**64

    calib = [i for i, r in enumerate(rows) if u(r.id) < fraction]
    return calib, [i for i in range(len(rows)) if u(rows[i].id) >= fraction]


def require_both_kinds(rows: Sequence[Row], where: str) -> None:
    """The F1 needs erroneous and correct rows: say which `where` (a file and its split) lacks, before any scoring."""
    n_err = sum(r.label != -1 for r in rows)
    if n_err in (0, len(rows)):
        kind = "erroneous rows (label >= 0)" if n_err == 0 else "correct rows (label -1)"
        raise ProcessBenchError(f"{where}: no {kind} among its {len(rows)} rows; error / correct accuracy and F1 "
                                "need both")


# ---------------------------------------------------------------------------------------------
# Metric


def first_error(scores: Sequence[float], threshold: float) -> int:
    """Index of the first step scored below `threshold`, -1 if none (NaN is never below)."""
    return next((i for i, s in enumerate(scores) if s < threshold), -1)


def processbench_metrics(labels: Sequence[int], preds: Sequence[int]) -> Metrics:
    labels_R, preds_R = np.asarray(labels), np.asarray(preds)
    err = labels_R != -1
    return _metrics(labels_R == preds_R, err)


def _metrics(match_R: np.ndarray, err_R: np.ndarray) -> Metrics:
    n_err, n_ok = int(err_R.sum()), int((~err_R).sum())
    if n_err == 0 or n_ok == 0:
        raise ProcessBenchError(f"ProcessBench rows: need erroneous and correct rows, got {n_err} and {n_ok}")
    e = 100.0 * float(match_R[err_R].mean())
    c = 100.0 * float(match_R[~err_R].mean())
    return Metrics(e, c, 2 * e * c / (e + c) if e + c > 0 else 0.0, n_err, n_ok)


def _match_intervals(rows: Sequence[Row], scores: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the thresholds t with prediction == label form an interval lo < t <= hi.

    With m_i the running minimum of the scores: label -1 needs t <= m_last; label L needs m_L < t <= m_{L-1}.
    """
    lo, hi = np.empty(len(rows)), np.empty(len(rows))
    for r, (row, s) in enumerate(zip(rows, scores)):
        m = np.minimum.accumulate(np.nan_to_num(np.asarray(s, float), nan=np.inf))
        if row.label == -1:
            lo[r], hi[r] = -np.inf, m[-1]
        else:
            lo[r], hi[r] = m[row.label], (m[row.label - 1] if row.label > 0 else np.inf)
    return lo, hi


def candidate_thresholds(scores: Sequence[Sequence[float]]) -> np.ndarray:
    """One threshold per distinct prediction outcome: the lowest score (nothing flagged), the midpoints between
    consecutive distinct scores, and just above the highest (every first step flagged)."""
    v = np.unique([x for s in scores for x in s if math.isfinite(x)])
    if v.size == 0:
        return np.zeros(1)
    return np.concatenate([v[:1], (v[:-1] + v[1:]) / 2, [np.nextafter(v[-1], np.inf)]])


def sweep(rows: Sequence[Row], scores: Sequence[Sequence[float]], thresholds: np.ndarray) -> list[Metrics]:
    """Metrics at every threshold at once (from the match intervals, no per-threshold pass over steps)."""
    lo, hi = _match_intervals(rows, scores)
    match_RxT = (thresholds[None, :] > lo[:, None]) & (thresholds[None, :] <= hi[:, None])
    err_R = np.array([r.label != -1 for r in rows])
    return [_metrics(match_RxT[:, t], err_R) for t in range(len(thresholds))]


def best_threshold(rows: Sequence[Row], scores: Sequence[Sequence[float]]) -> tuple[float, Metrics]:
    """The F1-maximising threshold (ties: the lowest) and its metrics."""
    thresholds = candidate_thresholds(scores)
    results = sweep(rows, scores, thresholds)
    best = max(range(len(results)), key=lambda t: (results[t].f1, -t))
    return float(thresholds[best]), results[best]


def diagnostics(rows: Sequence[Row], scores: Sequence[Sequence[float]], preds: Sequence[int]) -> dict[str, Any]:
    process_errors = [(r, p) for r, p in zip(rows, preds) if r.final_answer_correct and r.label != -1]
    multi = [np.nan_to_num(np.asarray(s, float), nan=np.inf) for s in scores if len(s) >= 2]
    at_last = [bool(s[-1] < s[:-1].min()) for s in multi]
    return {
        "right_answer_wrong_process_rows": len(process_errors),
        "right_answer_wrong_process_acc": (100.0 * sum(r.label == p for r, p in process_errors) / len(process_errors)
                                           if process_errors else None),
        "multi_step_rows": len(multi),
        "min_score_at_last_step_pct": 100.0 * sum(at_last) / len(multi) if multi else None,
    }


# ---------------------------------------------------------------------------------------------
# Running


def reward_model_scorer(spec: str, *, batch_size: int = 16, compute_dtype: Any = "float32", mesh=None) -> ScoreFn:
    """A ScoreFn from a reward model folder: a project head reads the problem in the policy's prompt and each step
    after a newline; a Qwen2.5-Math-PRM reads the raw problem and steps in its own chat format."""
    import jax.numpy as jnp

    from rstar_jax.math.steps import build_prompt
    from rstar_jax.models.hf_io import load_model
    from rstar_jax.reward import score_steps

    model = load_model(spec, mesh=mesh)
    if model.num_labels is None:
        raise ProcessBenchError(f"reward model {spec!r}: has no score head (a causal LM, not a reward model)")
    dtype = jnp.dtype(compute_dtype)

    def score(items: Sequence[tuple[str, Sequence[str]]]) -> list[list[float]]:
        formatted = items if model.head.input_format == "qwen-prm" else [
            (build_prompt(p), [STEP_SEPARATOR + s for s in steps]) for p, steps in items]
        return score_steps(model.params, model.cfg, model.tokenizer, model.head, formatted, batch_size=batch_size,
                           compute_dtype=dtype)

    return score


def score_rows(score: ScoreFn, rows: Sequence[Row], chunk: int = 64, desc: str = "processbench") -> list[list[float]]:
    """Scores per row; rows go to the scorer shortest first, so batches hold similar lengths (little padding)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].problem) + sum(map(len, rows[i].steps)))
    out: list[list[float]] = [[] for _ in rows]
    starts = range(0, len(rows), chunk)
    for start in tqdm(starts, desc=desc, unit="chunk", disable=len(starts) < 2, file=sys.stderr):
        part = order[start : start + chunk]
        got = score([(rows[i].problem, list(rows[i].steps)) for i in part])
        for i, s in zip(part, got):
            if len(s) != len(rows[i].steps):
                raise ProcessBenchError(f"row {rows[i].id}: scorer returned {len(s)} scores for {len(rows[i].steps)} steps")
            out[i] = [float(x) for x in s]
    return out


def run_processbench(cfg: ProcessBenchConfig, score: ScoreFn | None = None) -> dict[str, Any]:
    """Score every row (with `score`, else with `cfg.reward_model`), fix the threshold on the calibration rows,
    evaluate; write outputs; return the report. `protocol: official` runs `run_official` instead."""
    if cfg.protocol == "official":
        return run_official(score or cfg.reward_model, cfg.official, cfg.out, batch_size=cfg.batch_size,
                            compute_dtype=cfg.dtype)
    data_path, seed, calibration_fraction = cfg.data, cfg.seed, cfg.calibration_fraction
    rows = load_rows(data_path)
    if cfg.calibration:
        calib_rows, eval_rows = load_rows(cfg.calibration), rows
        calib_name = cfg.calibration
        require_both_kinds(calib_rows, f"{cfg.calibration} (calibration)")
        require_both_kinds(eval_rows, f"{data_path} (eval)")
    else:
        calib_idx, eval_idx = split_calibration(rows, calibration_fraction, seed)
        calib_rows, eval_rows = [rows[i] for i in calib_idx], [rows[i] for i in eval_idx]
        calib_name = f"{calibration_fraction:g} of {data_path} (seed {seed})"
        for split, part in (("calibration", calib_rows), ("eval", eval_rows)):
            require_both_kinds(part, f"{data_path} ({split} split: calibration_fraction {calibration_fraction:g}, "
                                     f"seed {seed})")
    rt = None
    if score is None:
        from rstar_jax import runtime

        rt = runtime.start(cfg.mesh)
        score = reward_model_scorer(cfg.reward_model, batch_size=cfg.batch_size, compute_dtype=cfg.dtype,
                                    mesh=rt.mesh)
    calib_scores = shared_scores(score, calib_rows, rt, Path(cfg.out) / "calibration", "processbench calibration")
    eval_scores = shared_scores(score, eval_rows, rt, Path(cfg.out) / "eval", "processbench eval")
    if rt is not None and rt.process_index > 0:
        rt.barrier("processbench: report written")
        return json.loads((Path(cfg.out) / "report.json").read_text())

    threshold, calib_metrics = best_threshold(calib_rows, calib_scores)
    eval_preds = [first_error(s, threshold) for s in eval_scores]
    fixed = processbench_metrics([r.label for r in eval_rows], eval_preds)
    upper_threshold, upper = best_threshold(eval_rows, eval_scores)
    report = {
        "data": str(data_path),
        "reward_model": cfg.reward_model,
        "calibration": {"source": calib_name, "rows": len(calib_rows), "threshold": threshold,
                        **dataclasses.asdict(calib_metrics)},
        "eval": {"rows": len(eval_rows), "threshold": threshold, **dataclasses.asdict(fixed)},
        "eval_upper_bound": {"threshold": upper_threshold, **dataclasses.asdict(upper)},
        "diagnostics": diagnostics(eval_rows, eval_scores, eval_preds),
    }
    _write(Path(cfg.out), report, calib_rows, calib_scores, eval_rows, eval_scores, threshold)
    if rt is not None:
        rt.barrier("processbench: report written")
    return report


def shared_scores(score: ScoreFn, rows: Sequence[Row], rt, name: Path, desc: str) -> list[list[float]]:
    """`score_rows` of every row; among several processes (`rt`), each scores its share and reads the others'
    (`{name}.scores.p{i}.json`)."""
    if rt is None or rt.process_count == 1:
        return score_rows(score, rows, desc=desc)
    mine = rt.share(range(len(rows)))
    part = name.with_name(f"{name.name}.scores{rt.suffix}.json")
    write_json(part, dict(zip(map(str, mine), score_rows(score, [rows[i] for i in mine], desc=desc))))
    rt.barrier(f"{desc}: every share scored")
    scores: dict[str, list[float]] = {}
    for i in range(rt.process_count):
        scores |= json.loads(name.with_name(f"{name.name}.scores.p{i}.json").read_text())
    return [scores[str(i)] for i in range(len(rows))]


def run_official(
    reward_model: str | ScoreFn,
    protocol: OfficialProtocol,
    out_dir: str | Path,
    *,
    batch_size: int = 16,
    compute_dtype: Any = "float32",
) -> dict[str, Any]:
    """ProcessBench's published protocol (module docstring): every subset checked, scored, then one threshold for all;
    writes outputs and returns the report."""
    subsets = {name: load_rows(path) for name, path in protocol.subsets.items()}
    for name, rows in subsets.items():
        require_both_kinds(rows, f"{protocol.subsets[name]} (subset {name})")
    score = reward_model if callable(reward_model) else reward_model_scorer(
        reward_model, batch_size=batch_size, compute_dtype=compute_dtype)
    scores = {name: score_rows(score, rows, desc=f"processbench {name}") for name, rows in subsets.items()}
    if protocol.threshold_from == "gsm8k":
        threshold = best_threshold(subsets["gsm8k"], scores["gsm8k"])[0]
    else:
        threshold = protocol.threshold
    per = {name: dataclasses.asdict(processbench_metrics([r.label for r in rows],
                                                         [first_error(s, threshold) for s in scores[name]]))
           for name, rows in subsets.items()}
    report = {
        "protocol": "official", "reward_model": _model_name(reward_model),
        "threshold": threshold, "threshold_from": protocol.threshold_from,
        "subsets": {name: {"data": protocol.subsets[name], **m} for name, m in per.items()},
        "average": {k: float(np.mean([m[k] for m in per.values()])) for k in ("error_acc", "correct_acc", "f1")}
                   | {"subsets": len(per)},
    }
    out = Path(out_dir)
    _write_predictions(out, [(name, rows, scores[name]) for name, rows in subsets.items()], threshold)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    source = "best F1 on the GSM8K subset" if protocol.threshold_from == "gsm8k" else "fixed"
    lines = [f"# ProcessBench (official protocol): {report['reward_model']}", "",
             f"One threshold {threshold:.4g} ({source}), applied to every subset.", "",
             "| subset | rows | error acc | correct acc | F1 |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {m['n_error'] + m['n_correct']} | {m['error_acc']:.1f} | {m['correct_acc']:.1f} | "
              f"{m['f1']:.1f} |" for name, m in per.items()]
    a = report["average"]
    lines += [f"| average of {a['subsets']} | | {a['error_acc']:.1f} | {a['correct_acc']:.1f} | {a['f1']:.1f} |", ""]
    (out / "report.md").write_text("\n".join(lines))
    return report


def _model_name(reward_model: str | ScoreFn) -> str:
    return reward_model if isinstance(reward_model, str) else getattr(reward_model, "__name__", "scorer")


def _write_predictions(out: Path, parts: Sequence[tuple[str, Sequence[Row], Sequence[Sequence[float]]]],
                       threshold: float) -> None:
    """predictions.jsonl: a line per row of every (split or subset, rows, scores) part."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "predictions.jsonl").open("w", encoding="utf-8") as f:
        for split, rows, scores in parts:
            for r, s in zip(rows, scores):
                pred = first_error(s, threshold)
                f.write(json.dumps({"id": r.id, "split": split, "label": r.label, "prediction": pred,
                                    "match": pred == r.label, "final_answer_correct": r.final_answer_correct,
                                    "scores": s}) + "\n")


def _write(out: Path, report: dict[str, Any], calib_rows, calib_scores, eval_rows, eval_scores, threshold) -> None:
    _write_predictions(out, [("calibration", calib_rows, calib_scores), ("eval", eval_rows, eval_scores)], threshold)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    d = report["diagnostics"]

    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.1f}"

    lines = [
        f"# ProcessBench: {report['data']}", "",
        f"Threshold {report['calibration']['threshold']:.4g}, chosen on {report['calibration']['source']} "
        f"({report['calibration']['rows']} rows).", "",
        "| rows | threshold | error acc | correct acc | F1 |", "|---|---|---|---|---|",
    ]
    for name, m in (("calibration", report["calibration"]), ("eval (fixed threshold)", report["eval"]),
                    ("eval (best threshold, upper bound)", report["eval_upper_bound"])):
        lines.append(f"| {name} | {m['threshold']:.4g} | {m['error_acc']:.1f} | {m['correct_acc']:.1f} | {m['f1']:.1f} |")
    lines += [
        "", "PRM-lessons diagnostics (eval rows, fixed threshold):",
        f"- right answer, wrong process ({d['right_answer_wrong_process_rows']} rows): "
        f"{fmt(d['right_answer_wrong_process_acc'])}% first error found",
        f"- lowest step score at the last step: {fmt(d['min_score_at_last_step_pct'])}% of "
        f"{d['multi_step_rows']} multi-step solutions", "",
    ]
    (out / "report.md").write_text("\n".join(lines))
