"""The evolve report from the stage states of a run folder: report.json, report.md and PNG charts.

Per round: coverage (training problems with a correct answer somewhere in their tree), SFT records and PPM pairs,
held-out greedy accuracy, MCTS accuracy with the round's PPM and without it (same budget, inference mode), PPM
accuracy on held-out pairs, greedy and MCTS accuracy per difficulty level, tokens and wall time per stage, and
where each search's time went (`SPEED`: tokens/s, problems/h, engine busy and host-wait shares, sandbox calls/s,
and per process when there are several).
Round 0 is the base policy. Written from whatever has finished, so a partial run has a partial report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rstar_jax.evolve.stages import finished
from rstar_jax.jsonl import write_json
from rstar_jax.plots import bar_chart, line_chart

STAGES = ("search", "sft_data", "policy", "ppm_data", "ppm", "eval")
SPEED = ("tokens_per_s", "problems_per_hour", "engine_busy_share", "host_wait_share", "sandbox_calls_per_s",
         "processes")


def speed(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    """Where a search's time went, from its summary."""
    return None if summary is None else {k: summary.get(k) for k in SPEED}


def _get(d: dict[str, Any] | None, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def collect(run_dir: Path) -> list[dict[str, Any]]:
    rounds = []
    k = 0
    while (run_dir / f"round_{k}").is_dir():
        st = {s: finished(run_dir / f"round_{k}" / s) for s in STAGES}
        ev = st["eval"]
        rounds.append({
            "round": k,
            "policy": _get(ev, "policy") or _get(st["policy"], "model"),
            "ppm": _get(ev, "ppm") or _get(st["ppm"], "model"),
            "search_mode": _get(st["search"], "mode"),
            "coverage": _get(st["search"], "coverage"),
            "sft_records": _get(st["sft_data"], "train_records"),
            "ppm_pairs": _get(st["ppm_data"], "train_pairs"),
            "greedy_accuracy": _get(ev, "greedy", "accuracy"),
            "mcts_accuracy": _get(ev, "mcts", "accuracy"),
            "mcts_no_ppm_accuracy": _get(ev, "mcts_no_ppm", "accuracy"),
            "ppm_pair_accuracy": _get(ev, "ppm_pair_accuracy", "accuracy"),
            "heldout_pairs": _get(ev, "ppm_pair_accuracy", "pairs"),
            "by_level": {m: _get(ev, m, "by_level") for m in ("greedy", "mcts", "mcts_no_ppm") if _get(ev, m)},
            "stages": {s: {"wall_s": _get(r, "wall_s"), "tokens": _get(r, "tokens"), "attempts": _get(r, "attempts")}
                       for s, r in st.items() if r is not None},
            "search_speed": {name: sp for name, sp in [("search", speed(_get(st["search"], "summary")))]
                             + [(f"eval {m}", _get(ev, m, "speed")) for m in ("greedy", "mcts", "mcts_no_ppm")]
                             if sp is not None},
        })
        k += 1
    return rounds


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    rounds = collect(run_dir)
    write_json(run_dir / "report.json", {"rounds": rounds})
    lines = ["# rstar-jax evolve report", "", f"Run folder: `{run_dir}`. Round 0 is the base policy.", "",
             "| round | search | coverage | SFT records | PPM pairs | greedy | MCTS + PPM | MCTS, no PPM | PPM pair acc. |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rounds:
        lines.append(f"| {r['round']} | {r['search_mode'] or '–'} | {_pct(r['coverage'])} | {r['sft_records'] or '–'} "
                     f"| {r['ppm_pairs'] or '–'} | {_pct(r['greedy_accuracy'])} | {_pct(r['mcts_accuracy'])} "
                     f"| {_pct(r['mcts_no_ppm_accuracy'])} | {_pct(r['ppm_pair_accuracy'])} |")
    levels = sorted({lvl for r in rounds for by in r["by_level"].values() if by for lvl in by})
    if levels:
        lines += ["", "Held-out accuracy per difficulty level:", "",
                  "| round | method | " + " | ".join(f"level {lvl}" for lvl in levels) + " |",
                  "|---:|---|" + "---:|" * len(levels)]
        for r in rounds:
            for m, by in r["by_level"].items():
                lines.append(f"| {r['round']} | {m} | " + " | ".join(_pct(by.get(lvl)) for lvl in levels) + " |")
    lines += ["", "Wall seconds (and tokens generated or trained) per stage:", "",
              "| round | " + " | ".join(STAGES) + " |", "|---:|" + "---:|" * len(STAGES)]
    for r in rounds:
        cells = []
        for s in STAGES:
            info = r["stages"].get(s)
            if info is None:
                cells.append("–")
            else:
                tok = f" ({info['tokens']:,} tok)" if info.get("tokens") else ""
                cells.append(f"{info['wall_s']:.0f}{tok}")
        lines.append(f"| {r['round']} | " + " | ".join(cells) + " |")
    lines += ["", "Where the searches' time went:", "",
              "| round | search | tokens/s | problems/h | engine busy | host wait | sandbox calls/s |",
              "|---:|---|---:|---:|---:|---:|---:|"]
    num = lambda x, f: "–" if x is None else format(x, f)  # noqa: E731
    for r in rounds:
        for name, sp in r["search_speed"].items():
            lines.append(f"| {r['round']} | {name} | {num(sp['tokens_per_s'], '.1f')} | {num(sp['problems_per_hour'], '.1f')}"
                         f" | {_pct(sp['engine_busy_share'])} | {_pct(sp['host_wait_share'])} "
                         f"| {num(sp['sandbox_calls_per_s'], '.1f')} |")
    lines += ["", "Charts: `accuracy_by_round.png`, `accuracy_by_level.png`, `time_by_stage.png`.", ""]
    (run_dir / "report.md").write_text("\n".join(lines))

    xs = [r["round"] for r in rounds]
    line_chart(run_dir / "accuracy_by_round.png", "Held-out accuracy by round", "round", "accuracy",
               {"greedy": (xs, [r["greedy_accuracy"] for r in rounds]),
                "MCTS + PPM": (xs, [r["mcts_accuracy"] for r in rounds]),
                "MCTS, no PPM": (xs, [r["mcts_no_ppm_accuracy"] for r in rounds]),
                "coverage (train search)": (xs, [r["coverage"] for r in rounds]),
                "PPM pair accuracy": (xs, [r["ppm_pair_accuracy"] for r in rounds])}, xticks=xs)
    if levels:
        bar_chart(run_dir / "accuracy_by_level.png", "Held-out greedy accuracy per level", "accuracy",
                  [f"level {lvl}" for lvl in levels],
                  {f"round {r['round']}": [(r["by_level"].get("greedy") or {}).get(lvl) for lvl in levels]
                   for r in rounds})
    bar_chart(run_dir / "time_by_stage.png", "Wall time per stage", "seconds", [f"round {x}" for x in xs],
              {s: [_get(r["stages"], s, "wall_s") for r in rounds] for s in STAGES}, stacked=True)
    return run_dir / "report.md"
