"""The `search` job end to end on a tiny random HF model: outputs, resume after a crash, bad arguments."""

import json
import re

import pytest

from rstar_jax.config import SandboxSection
from rstar_jax.models.hf_io import load_model
from rstar_jax.search import tree_io
from rstar_jax.search.baselines import BaselineConfig
from rstar_jax.search.batch_state import BatchCheckpoint
from rstar_jax.models.heads import RewardHead
from rstar_jax.search.job import SearchConfig, SearchJobError, run_search
from rstar_jax.search.mcts import MCTSConfig
from rstar_jax.search.mcts_star import StarSearchConfig
from rstar_jax.search.policy import RewardScorer
from rstar_jax.search.view import write_html

SPEC = "synth:levels=1-2,n=4,seed=0"


def job(folder, out, method="mcts", rollouts=1, candidates=2, samples=8, in_flight=2, **kw):
    cfg = SearchConfig(model=str(folder), problems=SPEC, method=method, out=str(out), max_depth=3, max_new_tokens=6,
                       few_shot=0, in_flight=in_flight, sandbox=SandboxSection(workers=1, allow_insecure=True),
                       mcts=MCTSConfig(rollouts=rollouts, candidates=candidates),
                       mcts_star=StarSearchConfig(iterations=rollouts, branch=candidates),
                       baseline=BaselineConfig(samples=samples, candidates=candidates), **kw)
    return run_search(cfg, progress=False)


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_search_writes_trees_results_summary_and_resumes(tiny_hf_folder, tmp_path):
    folder, _ = tiny_hf_folder()
    out = tmp_path / "run"
    summary = job(folder, out, limit=3)
    recs = lines(out / "results.jsonl")
    assert [r["id"] for r in recs] == [f"synth-s0-00000{i}" for i in range(3)]
    for r in recs:
        assert set(r) >= {"id", "answer", "gold", "correct", "tokens", "sandbox_calls", "wall_s", "tree"}
        assert r["tokens"] > 0 and r["wall_s"] > 0 and r["correct"] is False  # a random model solves nothing
        t = tree_io.load(out / r["tree"])
        assert t.meta["problem"]["id"] == r["id"] and t.num_nodes >= 2 and t.nodes[0]["kind"] == "root"
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["problems"] == 3 and summary["accuracy"] == 0.0 and summary["gold_used_in_search"]
    assert summary["tokens_per_problem"] == sum(r["tokens"] for r in recs) / 3 and summary["problems_per_hour"] > 0
    assert summary["tokens_per_s"] > 0 and 0 <= summary["host_wait_share"] < 1 and summary["host_seconds"]["sandbox"] > 0
    assert summary["engine_busy_share"] == 1 - summary["host_wait_share"] and len(summary["processes"]) == 1

    # a crash mid-write: the last line torn; the rerun keeps the 2 whole lines and searches the rest
    text = (out / "results.jsonl").read_text().splitlines(keepends=True)
    (out / "results.jsonl").write_text("".join(text[:2]) + text[2][:25])
    job(folder, out)  # no limit now: problems 2 and 3 remain
    again = lines(out / "results.jsonl")
    assert [r["id"] for r in again] == [f"synth-s0-00000{i}" for i in range(4)]
    assert again[:2] == recs[:2]
    # problem 2's key is its own whatever runs beside it: same samples, same result
    assert again[2]["answer"] == recs[2]["answer"] and again[2]["tokens"] == recs[2]["tokens"]
    assert json.loads((out / "summary.json").read_text())["problems"] == 4
    assert not list((out / "inflight").glob("*.npz"))  # removed once its batch's results are written


def test_search_killed_mid_batch_continues_the_batch(tiny_hf_folder, tmp_path, monkeypatch):
    folder, _ = tiny_hf_folder()
    whole = job(folder, tmp_path / "whole", rollouts=2, limit=2)
    save = BatchCheckpoint.save

    def save_then_die(self, state, stats):
        save(self, state, stats)
        raise KeyboardInterrupt  # killed right after the first rollout's state was written

    monkeypatch.setattr(BatchCheckpoint, "save", save_then_die)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        job(folder, out, rollouts=2, limit=2)
    assert list((out / "inflight").glob("*.npz")) and not (out / "results.jsonl").read_text()
    monkeypatch.setattr(BatchCheckpoint, "save", save)
    resumed = job(folder, out, rollouts=2, limit=2)
    assert not list((out / "inflight").glob("*.npz"))
    keep = ("id", "answer", "tokens", "sandbox_calls", "tree")
    assert [{k: r[k] for k in keep} for r in lines(out / "results.jsonl")] == \
        [{k: r[k] for k in keep} for r in lines(tmp_path / "whole" / "results.jsonl")]
    assert resumed["tokens_per_problem"] == whole["tokens_per_problem"]


def test_search_baseline_and_bad_arguments(tiny_hf_folder, tmp_path):
    folder, _ = tiny_hf_folder()
    s = job(folder, tmp_path / "greedy", method="greedy", limit=2)
    assert s["problems"] == 2 and s["method"] == "greedy" and not s["gold_used_in_search"]
    rec = lines(tmp_path / "greedy" / "results.jsonl")[0]
    page = write_html(tmp_path / "greedy" / rec["tree"], tmp_path / "g.html").read_text()
    assert page.count("<details") == tree_io.load(tmp_path / "greedy" / rec["tree"]).num_nodes
    s = job(folder, tmp_path / "star", method="mcts-star", mode="inference", rollouts=2, limit=1)
    assert s["problems"] == 1 and s["solved_rate"] == 0.0 and not s["gold_used_in_search"]
    rm, _ = tiny_hf_folder(num_labels=1, seed=1, name="rm", head=RewardHead("ppm"))
    s = job(folder, tmp_path / "bon", method="bon", reward_model=str(rm), samples=2, limit=1)
    rec = lines(tmp_path / "bon" / "results.jsonl")[0]
    assert s["problems"] == 1 and s["method"] == "bon" and rec["tokens"] > 0
    loaded = load_model(str(rm))
    scorer = RewardScorer(loaded.params, loaded.cfg, loaded.tokenizer, loaded.head)
    [scores] = scorer([("Q: 1 + 1?", ["x = 1 + 1\n<end_of_step>", "print(x)\n<end_of_code>"])])
    assert scorer.head.low == -1.0 and len(scores) == 2 and all(-1 < v < 1 for v in scores) and scores[0] != scores[1]
    with pytest.raises(ValueError, match="not a reward model"):
        job(folder, tmp_path / "bon2", method="bon", reward_model=str(folder), limit=1)
    assert not (tmp_path / "bon2").exists()  # inputs are checked before the folder is written
    with pytest.raises(ValueError, match="method='greedy', not 'maj'"):
        job(folder, tmp_path / "greedy", method="maj", limit=2)
    with pytest.raises(ValueError, match="method 'dfs'"):
        job(folder, tmp_path / "x", method="dfs")
    with pytest.raises(SearchJobError, match="needs a reward model"):
        job(folder, tmp_path / "y", method="bon")
    with pytest.raises(ValueError, match="in_flight=-1"):
        job(folder, tmp_path / "z", in_flight=-1)
    with pytest.raises(ValueError, match="mode 'x'"):
        job(folder, tmp_path / "w", mode="x")


def test_search_and_view_tree_through_the_cli(tiny_hf_folder, tmp_path, capsys):
    from rstar_jax.cli import main

    folder, _ = tiny_hf_folder()
    out = tmp_path / "cli"
    argv = ["search", "--model", str(folder), "--problems", "synth:levels=1,n=2,seed=0", "--method", "mcts",
            "--rollouts", "1", "--candidates", "2", "--max-depth", "2", "--max-new-tokens", "8", "--few-shot", "0",
            "--out", str(out)]
    assert main(argv) == 0
    assert re.search(r"\d+ in flight, [1-9]\d* expansions, [1-9]\d* tokens, \d+ tok/s", capsys.readouterr().err)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problems"] == 2 and len((out / "results.jsonl").read_text().splitlines()) == 2
    tree = sorted((out / "trees").glob("*.json"))[0]
    assert main(["view-tree", str(tree), "--out", str(tmp_path / "t.html")]) == 0
    assert (tmp_path / "t.html").read_text().lstrip().lower().startswith("<!doctype html")
    capsys.readouterr()
    assert main(["search", "--model", str(folder), "--problems", "synth:levels=9,n=2,seed=0", "--method", "greedy",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "levels" in capsys.readouterr().err
