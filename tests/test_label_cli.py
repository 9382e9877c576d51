"""`rstar-jax label`: files that training reads, a JSON summary on stdout, one-line errors with exit 2."""

import json

import jax
import pytest

from rstar_jax.cli import main
from rstar_jax.math.steps import StepKind
from rstar_jax.search import tree_io
from rstar_jax.search.policy import Child
from rstar_jax.train.data import read_records

S1 = "<code>\n# Mia has 12 dollars.\nmoney = 12\n<end_of_step>"
GOOD = "\n# She earns 5 more, so print the total\nprint(money + 5)\n<end_of_code>\n<output>17<end_of_output>"
BAD = "\n# Now print the final answer\nprint(money)\n<end_of_code>\n<output>12<end_of_output>"


def _save_tree(trees, pid):
    b = tree_io.TreeBuilder()
    s1 = b.add(0, Child(S1, (), StepKind.INTERMEDIATE), 0.0)
    good = b.add(s1, Child(GOOD, (), StepKind.CODE_TERMINAL), 1.0)
    bad = b.add(s1, Child(BAD, (), StepKind.CODE_TERMINAL), -1.0)
    b.add(good, Child("\n<answer>Mia has \\boxed{17} dollars.<end_of_answer>", (), StepKind.ANSWER_TERMINAL, "17",
                      True), 1.0)
    b.add(bad, Child("\n<answer>The answer is \\boxed{12}.<end_of_answer>", (), StepKind.ANSWER_TERMINAL, "12",
                     False), -1.0)
    question = "Mia has 12 dollars and earns 5. How many now?"
    tree_io.save(b.build({"problem": {"id": pid, "question": question, "answer": "17"}}), trees)


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


@pytest.mark.parametrize("kind, train_kind, records", [("sft", "sft", 2), ("ppm", "ppm", 4), ("value", "value", 4)])
def test_label_writes_training_records_and_prints_summary(tmp_path, capsys, kind, train_kind, records):
    for pid in ("q2", "q1"):
        _save_tree(tmp_path / "run" / "trees", pid)
    out = tmp_path / f"{kind}.jsonl"
    code, stdout, err = _run(capsys, "label", kind, "--trees", tmp_path / "run", "--out", out)
    assert code == 0 and err == []
    summary = json.loads(stdout)
    assert summary["kind"] == kind and summary["problems"] == 2 and summary["trajectories"] == 4
    recs = read_records(out, train_kind)
    assert len(recs) == summary["records"] == records
    assert [r["id"] for r in recs] == sorted(r["id"] for r in recs)  # problem-id order


def test_ppm_options_reach_the_filters(tmp_path, capsys):
    _save_tree(tmp_path / "trees", "q1")
    out = tmp_path / "ppm.jsonl"
    code, stdout, _ = _run(capsys, "label", "ppm", "--trees", tmp_path / "trees", "--out", out, "--min-gap", "2.5",
                           "--no-answer-pairs")
    assert code == 0 and json.loads(stdout)["dropped"] == {"q_gap": 1} and out.read_text() == ""


@pytest.mark.parametrize("setup, expect", [("missing", "no such folder"), ("empty", "no saved trees"),
                                           ("torn", "not valid JSON")])
def test_bad_trees_input_is_one_line_exit_2(tmp_path, capsys, setup, expect):
    trees = tmp_path / "trees"
    if setup != "missing":
        trees.mkdir()
    if setup == "torn":
        (trees / "x-00000000.json").write_text('{"format": ')
    out = tmp_path / "o.jsonl"
    code, stdout, err = _run(capsys, "label", "sft", "--trees", trees, "--out", out)
    assert code == 2 and len(err) == 1 and err[0].startswith("rstar-jax label: error:") and expect in err[0]
    assert str(trees) in err[0] and not out.exists() and stdout == ""


@pytest.mark.parametrize("argv, expect", [(["sft", "--top", "0"], "top=0: must be >= 1"),
                                          (["sft", "--min-accuracy", "1.5"], "min_accuracy=1.5: must be in [0, 1]"),
                                          (["ppm", "--min-gap", "-1"], "min_gap >= 0")])
def test_bad_label_settings_are_one_line_exit_2(tmp_path, capsys, argv, expect):
    _save_tree(tmp_path / "trees", "q1")
    out = tmp_path / "o.jsonl"
    code, _, err = _run(capsys, "label", *argv, "--trees", tmp_path / "trees", "--out", out)
    assert code == 2 and len(err) == 1 and expect in err[0] and not out.exists()


def test_label_mc_then_consensus_with_a_tiny_model(tmp_path, capsys, tiny_tokenizer):
    from rstar_jax.models.config import ModelConfig
    from rstar_jax.models.hf_io import save_causal_lm
    from rstar_jax.models.params import init_params

    cfg = ModelConfig(model_type="llama", vocab_size=420, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    lm = save_causal_lm(tmp_path / "lm", cfg, init_params(cfg, jax.random.key(0), std=0.3), tiny_tokenizer)
    _save_tree(tmp_path / "trees", "q1")
    mc = tmp_path / "mc.jsonl"
    code, stdout, err = _run(capsys, "label", "mc", "--trees", tmp_path / "trees", "--policy", lm, "--out", mc,
                             "--k", "1", "--per-problem", "1", "--labels", "hard", "--max-new-tokens", "4",
                             "--max-steps", "3", "--sandbox-workers", "1")
    assert code == 0, err
    assert json.loads(stdout)["solutions"] == 1
    [rec] = read_records(mc, "prm")
    # the first trajectory in node order is the correct one; its answer step is labelled by its own answer
    assert rec["steps"][1] == GOOD and rec["hard_labels"][-1] == 1 and set(rec["labels"]) <= {0.0, 1.0}
    kept = tmp_path / "kept.jsonl"
    code, stdout, err = _run(capsys, "label", "consensus", "--mc", mc, "--judge", lm, "--out", kept,
                             "--max-new-tokens", "4", "--no-chat")
    assert code == 0, err
    report = json.loads(stdout)
    [judged] = [json.loads(line) for line in (tmp_path / "kept.jsonl.judged.jsonl").read_text().splitlines()]
    assert report["records"] == 1 and judged["mc_first_error"] == rec["first_error"]
    assert len(kept.read_text().splitlines()) == report["kept"] == int(judged["keep"])
    code, _, err = _run(capsys, "label", "consensus", "--mc", tmp_path / "nope.jsonl", "--judge", lm, "--out", kept)
    assert code == 2 and len(err) == 1 and "nope.jsonl" in err[0]
