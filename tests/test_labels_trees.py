"""Labels from saved trees: step Q-values and SFT selection, PPM pairs, ReST-MCTS* value targets, trees folders."""

import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rstar_jax.config import DataSection
from rstar_jax.labels.job import (LabelError, PPMLabelConfig, SFTLabelConfig, TreesLabelConfig, label_ppm, label_sft,
                                  label_value, load_trees)
from rstar_jax.labels.ppm_pairs import PairConfig, answer_pairs, edit_distance, step_pairs
from rstar_jax.labels.trajectories import outcomes_below, sft_records, trajectories
from rstar_jax.labels.value_targets import distance_to_correct, value_records
from rstar_jax.math.steps import StepKind, build_prompt
from rstar_jax.search import tree_io
from rstar_jax.search.policy import Child

QUESTION = "Mia has 12 dollars and earns 5. How many now?"
I, C, A, X = StepKind.INTERMEDIATE, StepKind.CODE_TERMINAL, StepKind.ANSWER_TERMINAL, StepKind.INVALID


def text(name: str) -> str:
    """A step text at edit distance 30 from the text of any other one-letter name."""
    return f"<code>\n{name * 30}\n<end_of_step>"


def build(spec, pid="p", question=QUESTION):
    """spec: (parent, name or text, kind, Q, correct) rows; node i + 1 is row i. Returns a SavedTree."""
    b = tree_io.TreeBuilder()
    for parent, name, kind, q, correct in spec:
        body = text(name) if len(name) == 1 else name
        b.add(parent, Child(body, (), kind, "x" if kind == A else None, correct), q)
    return b.build({"problem": {"id": pid, "question": question, "answer": "17"}})


def pairs_of(records):
    return [(r["node"], r["pos_node"], r["neg_node"], r["pos_count"], r["neg_count"]) for r in records]


# ---------------------------------------------------------------------------------------------
# Trajectories and SFT


def test_step_q_values_and_sft_top2_with_min_q_tie_break():
    tree = build([
        (0, "a", I, 0.25, None), (1, "b", A, 1.0, True),  # T1 leaf 2: Q [.25, 1]     mean .625 min .25
        (0, "c", I, 0.5, None), (3, "d", C, 0.375, None), (4, "e", A, 1.0, True),  # T2 leaf 5: mean .625 min .375
        (0, "f", I, 0.75, None), (6, "g", A, 1.0, True),  # T3 leaf 7: mean .875
        (6, "h", A, -1.0, False),  # wrong, highest-ranked path prefix
        (0, "i", X, -1.0, None),  # invalid: no trajectory
    ])
    trajs = trajectories(tree)
    assert [t.leaf for t in trajs] == [2, 5, 7, 8]
    assert [t.q for t in trajs[:2]] == [(0.25, 1.0), (0.5, 0.375, 1.0)]
    assert trajs[0].mean_q == trajs[1].mean_q == 0.625 and (trajs[0].min_q, trajs[1].min_q) == (0.25, 0.375)
    records, reason = sft_records(tree)
    assert reason is None
    assert [r["leaf"] for r in records] == [7, 5]  # T2 beats T1 on min Q although T1 comes first
    assert records[1]["prompt"] == build_prompt(QUESTION)
    assert records[1]["response"] == text("c") + text("d") + text("e")
    assert records[0]["accuracy"] == 0.75 and records[0]["mean_q"] == 0.875


def test_sft_accuracy_threshold_and_drop_reasons(tmp_path):
    quarter = build([(0, "a", A, 1.0, True), (0, "b", A, -1.0, False), (0, "c", A, -1.0, False),
                     (0, "d", A, -1.0, False)], pid="quarter")
    wrong = build([(0, "a", A, -1.0, False)], pid="wrong")
    empty = build([(0, "a", I, 0.0, None), (1, "b", X, -1.0, None)], pid="empty")
    for t in (quarter, wrong, empty):
        tree_io.save(t, tmp_path / "run" / "trees")
    out = tmp_path / "sft.jsonl"
    s = label_sft(SFTLabelConfig(trees=str(tmp_path / "run"), out=str(out), min_accuracy=0.3))
    assert (s["problems"], s["trajectories"], s["records"]) == (3, 5, 0)
    assert s["dropped"] == {"low_accuracy": 2, "no_answers": 1} and s["kept"] == {"problems": 0}
    s = label_sft(SFTLabelConfig(trees=str(tmp_path / "run"), out=str(out), min_accuracy=0.25))
    assert s["dropped"] == {"low_accuracy": 1, "no_answers": 1} and s["kept"] == {"problems": 1}
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["quarter"]
    assert label_sft(SFTLabelConfig(trees=str(tmp_path / "run"), out=str(out)))["dropped"] == {"no_answers": 1, "no_correct": 1}


# ---------------------------------------------------------------------------------------------
# PPM pairs


def _two_by_two():
    return build([
        (0, "C", I, 0.9, None), (1, "a", A, 1.0, True), (1, "b", A, 1.0, True),  # 1-3: only correct below C
        (0, "D", A, 0.7, True),  # 4
        (0, "M", I, 0.2, None), (5, "c", A, 1.0, True), (5, "d", A, -1.0, False),  # 5-7: both below M
        (0, "W", I, -0.9, None), (8, "e", A, -1.0, False), (8, "f", A, -1.0, False),  # 8-10: only wrong below W
        (0, "V", A, -0.6, False), (0, "U", A, -0.3, False),  # 11, 12
        (0, "Z", X, -1.0, None),  # 13
    ])


def test_ppm_two_by_two_and_nodes_with_one_outcome_give_nothing():
    tree = _two_by_two()
    has_correct, has_wrong = outcomes_below(tree)
    assert has_correct[[0, 1, 5]].all() and has_wrong[[0, 5, 8]].all() and not has_wrong[1] and not has_correct[8]
    records = step_pairs(tree)
    # root: best 2 reaching a correct answer (C .9, D .7; M .2 has both below, so it is on that side, third)
    # vs worst 2 reaching a wrong one (W -.9, V -.6; M is on this side too, but not among the worst 2);
    # M: its two answers, one against one
    assert pairs_of(records) == [(0, 1, 8, 2, 2), (0, 1, 11, 2, 2), (0, 4, 8, 2, 2), (0, 4, 11, 2, 2),
                                 (5, 6, 7, 1, 1)]
    root, at_m = records[0], records[-1]
    assert root["prompt"] == at_m["prompt"] == build_prompt(QUESTION)
    assert (root["pos"], root["neg"]) == ([text("C")], [text("W")])
    assert (at_m["pos"], at_m["neg"]) == ([text("M"), text("c")], [text("M"), text("d")])
    assert root["pos_q"] == pytest.approx(0.9) and root["neg_q"] == pytest.approx(-0.9)


def test_ppm_one_vs_four_fallbacks():
    one_good = build([(0, "a", A, 0.9, True)] + [(0, n, A, q, False) for n, q in
                                                 zip("bcdef", (-0.2, -0.9, -0.5, -0.7, -0.8))])
    assert pairs_of(step_pairs(one_good)) == [(0, 1, k, 1, 4) for k in (3, 6, 5, 4)]  # worst 4 of 5 wrong
    one_bad = build([(0, n, A, q, True) for n, q in zip("abcde", (0.2, 0.9, 0.5, 0.7, 0.8))]
                    + [(0, "f", A, -0.9, False)])
    assert pairs_of(step_pairs(one_bad)) == [(0, k, 6, 4, 1) for k in (2, 5, 4, 3)]  # best 4 of 5 correct


def test_ppm_filters_gap_and_edit_distance_but_keep_counts():
    near = "<code>\nx = 12 + 5\nprint(x)\n<end_of_step>"
    tree = build([(0, "a", A, 0.3, True), (0, "b", A, -0.1, False),  # gap 0.4 < 0.5
                  (0, "c", I, 0.9, None), (3, near, A, 1.0, True), (3, near.replace("5", "6"), A, -1.0, False)])
    counts = Counter()
    records = step_pairs(tree, PairConfig(), counts)
    # root: good c (.9), a (.3); bad b (-.1), c (.9: a wrong answer below too) -> (a, b), (a, c) fail the gap and
    # c is not paired with itself
    assert pairs_of(records) == [(0, 3, 2, 2, 2)]
    assert counts == {"q_gap": 2, "edit_distance": 1}  # at c: the two answers differ by one character
    assert len(step_pairs(tree, PairConfig(min_gap=0.4, min_edit=1))) == 3
    assert len(step_pairs(tree, PairConfig(min_gap=0.0, min_edit=0))) == 3  # equal Q is no preference


def test_ppm_rejected_side_and_mean_q_of_the_continuations_as_rstar_math():
    """rStar-Math's extra_rm_file.py: a child with a wrong answer below is a rejected candidate even when a correct
    one is below it too, and a pair needs the chosen continuation's mean Q above the rejected one's."""
    tree = build([
        (0, "x", I, 0.5, None), (1, "p", I, -0.9, None), (2, "q", A, 0.2, True),  # 1-3: X, correct below
        (0, "y", I, -0.2, None), (4, "r", I, 0.9, None), (5, "s", A, 0.5, False),  # 4-6: Y, wrong below
        (0, "z", I, 0.9, None), (7, "t", A, 1.0, True),  # 7-8: Z, correct below
        (0, "w", I, 0.3, None), (9, "u", A, 1.0, True), (9, "v", A, -1.0, False),  # 9-11: W, both below
    ])
    counts = Counter()
    records = step_pairs(tree, PairConfig(), counts)
    # root: chosen Z (.9), X (.5) of Z, X, W; rejected Y (-.2), W (.3). Continuations' mean Q: Z -> t .95,
    # X -> p -> q (.5 - .9 + .2) / 3, Y -> r -> s .4, W -> v (the lowest child reaching a wrong answer) -.35.
    # (X, Y): gap .7 but X's continuation is below Y's; (X, W): gap .2. W: u against v.
    assert pairs_of(records) == [(0, 7, 4, 2, 2), (0, 7, 9, 2, 2), (9, 10, 11, 1, 1)]
    assert counts == {"mean_q": 1, "q_gap": 1}
    assert records[0]["pos_mean_q"] == pytest.approx(0.95) and records[0]["neg_mean_q"] == pytest.approx(0.4)
    assert records[1]["neg_mean_q"] == pytest.approx(-0.35)


def test_answer_step_pairs_are_whole_trajectories():
    tree = _two_by_two()
    records = answer_pairs(tree)
    # correct trajectories by mean Q: a, b (.95, tie -> node order), D (.7), c (.6); wrong: e, f (-.95), ...
    assert pairs_of(records) == [(0, 2, 9, 2, 2), (0, 2, 10, 2, 2), (0, 3, 9, 2, 2), (0, 3, 10, 2, 2)]
    assert records[0]["prompt"] == build_prompt(QUESTION) and records[0]["level"] == "answer"
    assert (records[0]["pos"], records[0]["neg"]) == ([text("C"), text("a")], [text("W"), text("e")])
    assert records[0]["pos_q"] == pytest.approx(0.95) and records[0]["neg_q"] == pytest.approx(-0.95)
    assert answer_pairs(build([(0, "a", A, 1.0, True)])) == []


def _naive_levenshtein(a, b):
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


@settings(max_examples=200, deadline=None)
@given(st.text("abc\n", max_size=12), st.text("abc\n", max_size=12), st.integers(1, 8))
def test_edit_distance_matches_plain_dp(a, b, cap):
    d = _naive_levenshtein(a, b)
    assert edit_distance(a, b) == d
    assert edit_distance(a, b, cap) == min(d, cap)


def test_pair_tokens_in_training_match_the_scorer(tiny_tokenizer):
    """The PPM at search time encodes the question prompt and every step separately (reward.encode_steps);
    pair records list the steps, which train/data.py encodes the same way, so training sees the same ids."""
    from rstar_jax.models.registry import cache_dir
    from rstar_jax.models.tokenizer import load_tokenizer
    from rstar_jax.reward import encode_steps
    from rstar_jax.train.data import tokenize

    s1 = "<code>\n# Mia has 12 dollars.\nmoney = 12\n<end_of_step>"
    good = ["\n# She earns 5 more dollars.\nmoney = money + 5\n<end_of_step>",
            "\n# Now print the final answer\nprint(money)\n<end_of_code>\n<output>17<end_of_output>",
            "\n<answer>The answer is \\boxed{17}.<end_of_answer>"]
    bad = ["\n# Then she loses her wallet and spends 5.\nmoney = money - 5\n<end_of_step>",
           "\n# Now print the final answer\nprint(money)\n<end_of_code>\n<output>7<end_of_output>",
           "\n<answer>So Mia now has \\boxed{7} dollars.<end_of_answer>"]
    tree = build([(0, s1, I, 0.0, None), (1, good[0], I, 0.8, None), (2, good[1], C, 1.0, None),
                  (3, good[2], A, 1.0, True), (1, bad[0], I, -0.8, None), (5, bad[1], C, -1.0, None),
                  (6, bad[2], A, -1.0, False)])
    records = step_pairs(tree) + answer_pairs(tree)
    assert len(records) == 2  # at node 1 (step) and the answer step
    smollm2 = cache_dir() / "models" / "smollm2-135m"
    tokenizers = [tiny_tokenizer] + ([load_tokenizer(smollm2)] if (smollm2 / "tokenizer.json").is_file() else [])
    for tok in tokenizers:
        pairs = tokenize(records, "ppm", tok, DataSection())
        for steps, pair in zip([[s1, good[0]], [s1, *good]], pairs):
            assert pair.pos.tolist() == encode_steps(tok, build_prompt(QUESTION), steps)[0]
        assert pairs[0].neg.tolist() == encode_steps(tok, build_prompt(QUESTION), [s1, bad[0]])[0]


# ---------------------------------------------------------------------------------------------
# ReST-MCTS* value targets


def test_value_targets_hand_computed():
    tree = build([
        (0, "a", I, 0.0, None), (1, "b", C, 0.0, None), (2, "c", A, 1.0, True),  # 1-3 correct: m = 2, 1, 0
        (1, "d", I, 0.0, None), (4, "e", I, 0.0, None), (5, "f", A, -1.0, False),  # 4-6 wrong branch below a
        (0, "g", A, -1.0, False),  # 7 wrong at depth 1
    ])
    assert distance_to_correct(tree).tolist() == [3, 2, 1, 0, -1, -1, -1, -1]
    by_leaf = {r["leaf"]: r for r in value_records(tree)}
    assert list(by_leaf) == [3, 6, 7]
    # correct: v1 = 0 + 1 * 1/3; v2 = 1/3 + 2/3 * 1/2 = 2/3; v3 = 2/3 + 1/3 * 1/1 = 1
    assert by_leaf[3]["values"] == pytest.approx([1 / 3, 2 / 3, 1.0])
    # wrong branch: a is on a path to a correct answer (r=+1, m=2) -> 1/3; d: r=-1, m = 2 steps to f:
    # 1/3 - 2/3 * 1/3 = 1/9; e: m=1: 1/9 - 8/9 * 1/2 < 0 -> 0; f: 0
    assert by_leaf[6]["values"] == pytest.approx([1 / 3, 1 / 9, 0.0, 0.0])
    assert by_leaf[7]["values"] == [0.0]
    assert by_leaf[6]["steps"] == [text(n) for n in "adef"] and by_leaf[6]["prompt"] == build_prompt(QUESTION)


# ---------------------------------------------------------------------------------------------
# Trees folders


def test_jobs_read_trees_folder_in_id_order_and_write_training_formats(tmp_path):
    from rstar_jax.train.data import read_records

    trees = tmp_path / "trees"
    tree_io.save(build([(0, "a", A, 1.0, True), (0, "b", A, -1.0, False)], pid="a/z"), trees)  # file a_z-...
    tree_io.save(_two_by_two(), trees)  # id "p", file p-...
    (trees / ".half.tmp.json").write_text("{")  # an unfinished write is not a tree
    assert [t.meta["problem"]["id"] for t in load_trees(trees)] == ["a/z", "p"]
    s = label_ppm(PPMLabelConfig(trees=str(tmp_path), out=str(tmp_path / "ppm.jsonl")))
    recs = read_records(tmp_path / "ppm.jsonl", "ppm")
    assert [r["id"] for r in recs] == ["a/z"] * 2 + ["p"] * 9 and s["records"] == 11
    assert [r["level"] for r in recs[:2]] == ["step", "answer"]
    assert s["kept"] == {"step_pairs": 6, "answer_pairs": 5} and s["dropped"] == {}
    assert label_ppm(PPMLabelConfig(trees=str(tmp_path), out=str(tmp_path / "ppm.jsonl"),
                                    pairs=PairConfig(answer_pairs=False)))["records"] == 6
    s = label_value(TreesLabelConfig(trees=str(trees), out=str(tmp_path / "value.jsonl")))
    assert len(read_records(tmp_path / "value.jsonl", "value")) == s["records"] == s["trajectories"] == 11
    assert s["kept"] == {"correct": 5, "wrong": 6} and s["problems"] == 2
    label_sft(SFTLabelConfig(trees=str(trees), out=str(tmp_path / "sft.jsonl")))
    assert [r["id"] for r in read_records(tmp_path / "sft.jsonl", "sft")] == ["a/z", "p", "p"]


def test_bad_trees_folder_is_one_line_error(tmp_path):
    with pytest.raises(LabelError, match="no such folder"):
        load_trees(tmp_path / "missing")
    (tmp_path / "trees").mkdir()
    with pytest.raises(LabelError, match="no saved trees"):
        load_trees(tmp_path)
