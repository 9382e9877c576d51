"""`eval --model --problems`: every method's row, both PNGs, samples.jsonl true to the saved trees, resume, errors."""

import json

import matplotlib.image
import pytest

from rstar_jax.cli import main
from rstar_jax.evaluate.metrics import read_samples
from rstar_jax.evaluate.suite import write_samples_file
from rstar_jax.math.steps import build_prompt
from rstar_jax.models.hf_io import load_model
from rstar_jax.search import tree_io
from rstar_jax.math.steps import StepKind
from rstar_jax.models.heads import RewardHead
from rstar_jax.search.policy import Child, RewardScorer

SPEC = "synth:levels=1,n=2,seed=0"
SMALL = ["--num-samples", "4", "--max-depth", "2", "--max-new-tokens", "8", "--few-shot", "0", "--rollouts", "1",
         "--candidates", "2", "--beam-width", "2", "--in-flight", "2", "--sandbox-workers", "1",
         "--allow-insecure-sandbox"]


def _eval(capsys, *argv):
    code = main(["eval", *argv])
    cap = capsys.readouterr()
    return code, cap.out.strip().splitlines(), cap.err.strip().splitlines()


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _chains(saved):
    """Each chain's node ids, rebuilt from the parent array: leaves walked up to the root, ordered by first step."""
    parent = saved.arrays["parent"]
    leaves = set(range(1, saved.num_nodes)) - set(int(p) for p in parent[1:])
    paths = []
    for leaf in leaves:
        path = [leaf]
        while parent[path[-1]] > 0:
            path.append(int(parent[path[-1]]))
        paths.append(path[::-1])
    return sorted(paths)


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.image.imread(path).shape[0] > 100


def _save_chains(run_dir, pid, steps_per_round):
    """A baseline tree built the way `run_chains` grows one: each round adds one step to every live chain, in order."""
    builder, last = tree_io.TreeBuilder(), {}
    for rnd in steps_per_round:
        for chain, (kind, answer, tokens) in rnd.items():
            child = Child(f"step {chain}", (1,) * tokens, kind, answer, num_tokens=tokens)
            last[chain] = builder.add(last.get(chain, 0), child)
    saved = builder.build({"problem": {"id": pid, "question": "q", "answer": "7"}, "method": "maj"})
    tree = tree_io.save(saved, run_dir / "trees")
    with open(run_dir / "results.jsonl", "a") as f:
        f.write(json.dumps({"id": pid, "gold": "7", "tree": str(tree.relative_to(run_dir))}) + "\n")


def test_samples_file_follows_each_chain_through_interleaved_nodes(tmp_path):
    mid, ans, bad = StepKind.INTERMEDIATE, StepKind.ANSWER_TERMINAL, StepKind.INVALID
    # chain 1 answers in round 1; chains 0 and 2 take a second step (node ids 4 and 5), chain 2 a third (node 6)
    _save_chains(tmp_path / "samples", "p", [{0: (mid, None, 3), 1: (ans, "7", 5), 2: (mid, None, 2)},
                                             {0: (ans, "8", 4), 2: (mid, None, 1)}, {2: (bad, None, 6)}])
    _save_chains(tmp_path / "greedy", "p", [{0: (mid, None, 2)}, {0: (ans, "7", 2)}])
    path = write_samples_file(tmp_path, "unused-without-a-reward-model", None, True, "float32")
    [line] = _lines(path)
    assert [(s["answer"], s["num_tokens"], s["node"]) for s in line["samples"]] == [("8", 7, 4), ("7", 5, 2),
                                                                                      (None, 9, 6)]
    assert line["greedy"] == {"answer": "7", "num_tokens": 4, "node": 2}
    [problem] = read_samples(path)
    assert [s.answer for s in problem.samples] == ["8", "7", None] and problem.greedy.answer == "7"
    # resumed: kept as is; written without greedy once the greedy run is left out
    assert write_samples_file(tmp_path, "", None, True, "float32").read_text() == path.read_text()
    [line] = _lines(write_samples_file(tmp_path, "", None, False, "float32"))
    assert "greedy" not in line and len(line["samples"]) == 3


def test_eval_with_reward_model_reports_every_method_and_resumes(tiny_hf_folder, tmp_path, capsys):
    policy, _ = tiny_hf_folder()
    rm, _ = tiny_hf_folder(num_labels=1, seed=1, name="rm", head=RewardHead("ppm"))
    out = tmp_path / "eval"
    argv = ["--model", str(policy), "--reward-model", str(rm), "--problems", SPEC, "--out", str(out), *SMALL]
    code, stdout, _ = _eval(capsys, *argv)
    assert code == 0 and stdout[-1] == str(out / "report.md")

    report = json.loads((out / "report.json").read_text())
    got = [(r["method"], r["N"]) for r in report["rows"]]
    want = ([("greedy", None)] + [(f"{k}@N", n) for k in ("maj", "pass", "bon_min", "bon_product", "bon_last")
                                  for n in (1, 2, 4)] + [("beam", None), ("mcts", None)])
    assert got == want
    assert all(r["accuracy"] is not None and r["tokens"] > 0 and "skipped" not in r["note"] for r in report["rows"])
    table = (out / "report.md").read_text()
    assert all(f"| {m} | {'' if n is None else n} |" in table for m, n in want)
    assert _is_png(out / "accuracy_vs_n.png") and _is_png(out / "accuracy_vs_tokens.png")

    # samples.jsonl: the samples run's trees, chain by chain (answers, tokens, unit step scores of the reward model)
    lines = _lines(out / "samples.jsonl")
    results = _lines(out / "samples" / "results.jsonl")
    assert [x["id"] for x in lines] == [r["id"] for r in results] and len(lines) == 2
    loaded = load_model(str(rm))
    scorer = RewardScorer(loaded.params, loaded.cfg, loaded.tokenizer, loaded.head)
    for line in lines:
        saved = tree_io.load(out / line["tree"])
        paths = _chains(saved)
        assert len(paths) == len(line["samples"]) == 4
        raw = scorer([(build_prompt(saved.meta["problem"]["question"]), [saved.nodes[i]["text"] for i in p])
                      for p in paths])
        for sample, path, scores in zip(line["samples"], paths, raw):
            last = saved.nodes[path[-1]]
            assert sample["answer"] == (last["answer"] if last["kind"] == "answer_terminal" else None)
            assert sample["num_tokens"] == sum(saved.nodes[i]["num_tokens"] for i in path) > 0
            assert sample["step_scores"] == pytest.approx([(s + 1) / 2 for s in scores], abs=1e-5)
        greedy = tree_io.load(out / "greedy" / next(r["tree"] for r in _lines(out / "greedy" / "results.jsonl")
                                                   if r["id"] == line["id"]))
        assert line["greedy"]["num_tokens"] == sum(n["num_tokens"] for n in greedy.nodes[1:])
    # token counts agree with what each search counted while generating
    by_n = report["samples_metrics"]["by_n"]
    assert by_n[-1]["tokens"] == pytest.approx(report["runs"]["samples"]["tokens_per_problem"])
    assert report["rows"][0]["tokens"] == pytest.approx(sum(x["greedy"]["num_tokens"] for x in lines) / 2)

    # the same command again: nothing is searched or scored again
    files = [out / m / "results.jsonl" for m in ("greedy", "samples", "beam", "mcts")] + [out / "samples.jsonl"]
    before = {f: (f.read_text(), f.stat().st_mtime_ns) for f in files}
    trees = {t: t.stat().st_mtime_ns for t in out.glob("*/trees/*.json")}
    code, _, _ = _eval(capsys, *argv)
    assert code == 0
    assert {f: (f.read_text(), f.stat().st_mtime_ns) for f in files} == before
    assert {t: t.stat().st_mtime_ns for t in out.glob("*/trees/*.json")} == trees and len(trees) == 8
    assert json.loads((out / "report.json").read_text())["rows"] == report["rows"]


def test_eval_without_reward_model_skips_bon_and_beam(tiny_hf_folder, tmp_path, capsys):
    policy, _ = tiny_hf_folder()
    out = tmp_path / "eval"
    code, _, _ = _eval(capsys, "--model", str(policy), "--problems", SPEC, "--out", str(out),
                       "--methods", "samples,beam,mcts", *SMALL)
    assert code == 0
    rows = {r["method"]: r for r in json.loads((out / "report.json").read_text())["rows"]}
    for method in ("bon_min@N", "bon_product@N", "bon_last@N", "beam"):
        assert rows[method]["accuracy"] is None and rows[method]["note"] == "skipped: needs --reward-model"
    assert rows["maj@N"]["accuracy"] is not None and "majority" in rows["mcts"]["note"]
    assert "greedy" not in rows and not (out / "beam").exists() and not (out / "greedy").exists()
    lines = _lines(out / "samples.jsonl")
    assert all("step_scores" not in s and "greedy" not in x for x in lines for s in x["samples"])
    assert "| beam |  |  |  | skipped: needs --reward-model |" in (out / "report.md").read_text()
    assert _is_png(out / "accuracy_vs_n.png") and _is_png(out / "accuracy_vs_tokens.png")


@pytest.mark.parametrize("argv, expect", [
    (["--model", "m"], "--model: needs --problems"),
    (["--model", "m", "--problems", SPEC, "--samples", "s.jsonl"], "either --samples FILE or --model M"),
    ([], "either --samples FILE or --model M"),
    (["--model", "m", "--problems", SPEC, "--methods", "greedy,dfs"], "--methods: methods: 'dfs' is not one of"),
    (["--model", "m", "--problems", SPEC, "--methods", "beam"], "needs --reward-model"),
    (["--model", "m", "--problems", SPEC, "--num-samples", "0"], "samples=0"),
])
def test_bad_eval_arguments_are_one_line(capsys, tmp_path, argv, expect):
    code, _, err = _eval(capsys, *argv, "--out", str(tmp_path / "out"))
    assert code == 2 and len(err) == 1 and err[0].startswith("rstar-jax eval: error:") and expect in err[0], err
    assert not (tmp_path / "out").exists()
