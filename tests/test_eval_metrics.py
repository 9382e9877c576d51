"""`eval --samples`: pass@1, maj@N, BoN@N (min / product / last), pass@N and tokens against hand-computed values."""

import json

import matplotlib.image
import pytest

from rstar_jax.evaluate.metrics import eval_samples, read_samples
from rstar_jax.jsonl import InputError

# Problem 1: gold 3; answers 3, 5, 5, 3 (correct: T F F T); step scores give
#   min     [0.2, 0.7, 0.6, 0.5]    product [0.18, 0.56, 0.6, 0.475]    last [0.2, 0.7, 0.6, 0.95]
# Problem 2: gold 1/2 written as LaTeX; answers from text: 0.5, 1/2, 7, 0.50 (T T F T); one score per sample.
PROBLEMS = [
    {"id": "p1", "gold": "3", "greedy": {"answer": "3", "num_tokens": 8}, "samples": [
        {"answer": "3", "step_scores": [0.9, 0.2], "num_tokens": 10},
        {"answer": "5", "step_scores": [0.8, 0.7], "num_tokens": 20},
        {"answer": "5", "step_scores": [0.6], "num_tokens": 30},
        {"answer": "3", "step_scores": [0.5, 0.95], "num_tokens": 40}]},
    {"id": "p2", "gold": "\\frac{1}{2}", "greedy": {"text": "so \\boxed{3}", "num_tokens": 4}, "samples": [
        {"text": "x = 1/2 so \\boxed{0.5}", "score": 0.1, "num_tokens": 5},
        {"text": "#### 1/2", "score": 0.9, "num_tokens": 5},
        {"text": "\\boxed{7}", "score": 0.3, "num_tokens": 5},
        {"text": "the answer is 0.50", "score": 0.3, "num_tokens": 5}]},
]

# Per N, (problem 1, problem 2) accuracies over the disjoint groups, worked by hand:
#   N=1: P1 1/2 right, P2 3/4 right
#   N=2 groups {0,1} {2,3}: maj P1 = [tie 3/5 -> 3: T, tie 5/3 -> 5: F], P2 = [0.5~1/2: T, tie 7/0.50 -> 7: F]
#   bon_min P1 = [idx1 F, idx2 F], bon_last P1 = [idx1 F, idx3 T], bon P2 = [idx1 T, score tie -> idx2 F]
#   N=4: maj P1 tie 3/5 -> 3: T, P2 {0.5, 1/2, 0.50}: T
EXPECTED = {
    1: {"maj": 62.5, "pass": 62.5, "bon_min": 62.5, "bon_product": 62.5, "bon_last": 62.5, "tokens": (25 + 5) / 2},
    2: {"maj": 50, "pass": 100, "bon_min": 25, "bon_product": 25, "bon_last": 50, "tokens": (50 + 10) / 2},
    4: {"maj": 100, "pass": 100, "bon_min": 50, "bon_product": 50, "bon_last": 100, "tokens": (100 + 20) / 2},
}


def _write(path, problems):
    path.write_text("".join(json.dumps(p) + "\n" for p in problems))
    return path


def test_metrics_match_hand_computation(tmp_path):
    m = eval_samples(_write(tmp_path / "s.jsonl", PROBLEMS), tmp_path / "out")
    assert m["problems"] == 2 and m["samples_per_problem"] == 4
    assert m["pass@1"] == 62.5 and m["greedy"] == 50 and m["greedy_tokens"] == 6
    assert [row["N"] for row in m["by_n"]] == [1, 2, 4]
    for row in m["by_n"]:
        for key, want in EXPECTED[row["N"]].items():
            assert row[key] == pytest.approx(want), (row["N"], key)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["by_n"] == m["by_n"]
    table = (tmp_path / "out" / "metrics.md").read_text()
    assert "| 4 | 100.0 | 100.0 | 50.0 | 50.0 | 100.0 | 60.0 |" in table
    for png in ("accuracy_vs_n.png", "accuracy_vs_tokens.png"):
        assert matplotlib.image.imread(tmp_path / "out" / png).shape[0] > 100


def test_without_scores_or_tokens_only_vote_metrics(tmp_path):
    problems = [{"gold": "4", "samples": [{"answer": a} for a in ["4", "4", "1"]]}]
    m = eval_samples(_write(tmp_path / "s.jsonl", problems), tmp_path / "out")
    # 3 samples: N in {1, 2}; N=2 uses one group {0, 1} (the third sample is left over)
    assert [set(r) for r in m["by_n"]] == [{"N", "maj", "pass"}] * 2
    assert m["pass@1"] == pytest.approx(200 / 3) and m["by_n"][0]["maj"] == pytest.approx(200 / 3)
    assert m["by_n"][1]["maj"] == 100
    assert not (tmp_path / "out" / "accuracy_vs_tokens.png").exists()


@pytest.mark.parametrize("problems, message", [
    ([{"gold": "1", "samples": [{"answer": "1", "score": 1.0}, {"answer": "2"}]}],
     "some samples have scores and some do not"),
    ([{"gold": "1", "samples": [{"score": 1.0}]}], ":1: sample 0: a sample needs 'answer' or 'text'"),
    ([{"gold": "1", "samples": [{"answer": "1", "step_scores": []}]}], "'step_scores' must be a non-empty list"),
    ([{"gold": "", "samples": [{"answer": "1"}]}], ":1: 'gold' must be a non-empty string"),
    ([{"gold": "1"}], ":1: missing key 'samples'"),
])
def test_bad_samples_files_are_one_line_errors(tmp_path, problems, message):
    with pytest.raises(InputError, match=message):
        read_samples(_write(tmp_path / "s.jsonl", problems))


def test_lessons_best_of_n_protocol_is_one_config_file(tmp_path):
    """configs/eval/bon_lessons.yaml: N = 8 samples at the protocol's temperature and top-p for a policy run, and
    BoN@8 (min / product / last), maj@8 and pass@8 from one scored samples file."""
    from pathlib import Path

    from rstar_jax.cli import build_parser, command_config, main

    config = str(Path(__file__).resolve().parents[1] / "configs" / "eval" / "bon_lessons.yaml")
    argv = ["eval", config, "--model", "M", "--problems", "P", "--out", "o"]
    args, args.overrides = build_parser(argv).parse_known_args(argv)
    run = command_config(args).search_config("samples")
    assert (run.baseline.samples, run.baseline.temperature, run.top_p, run.max_new_tokens) == (8, 0.7, 0.8, 256)
    # 3 problems x 8 samples: the min-aggregated best is wrong on problem b, the last-step best right
    rows = [{"id": "a", "gold": "1", "samples": [{"answer": "1", "step_scores": [0.9, 0.9]}] + [
                {"answer": "2", "step_scores": [0.5, 0.1]}] * 7},
            {"id": "b", "gold": "5", "samples": [{"answer": "5", "step_scores": [0.2, 0.99]}, {"answer": "6", "step_scores": [0.6, 0.5]}] + [
                {"answer": "6", "step_scores": [0.1, 0.1]}] * 6},
            {"id": "c", "gold": "7", "samples": [{"answer": "8", "step_scores": [0.5]}] * 8}]
    samples = _write(tmp_path / "scored.jsonl", rows)
    assert main(["eval", config, "--samples", str(samples), "--out", str(tmp_path / "out")]) in (0, None)
    at8 = next(r for r in json.loads((tmp_path / "out" / "metrics.json").read_text())["by_n"] if r["N"] == 8)
    want = {"bon_min": 100 / 3, "bon_product": 100 / 3, "bon_last": 200 / 3, "maj": 0, "pass": 200 / 3}
    assert {k: at8[k] for k in want} == pytest.approx(want)
