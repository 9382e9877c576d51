"""Consensus filtering: the critique prompt, parsing the judge, keeping only MC / judge agreement, resuming."""

import json
import re

import jax
import pytest

from rstar_jax.labels.consensus import (ConsensusConfig, ConsensusError, consensus_filter, critique_prompt,
                                        parse_judgement, run_consensus)

# (MC first error, judge output) per record; every solution has 3 steps
CASES = [
    (-1, "All paragraphs are fine. \\boxed{-1}"),  # agree: no error      -> kept
    (1, "Paragraph 1 miscounts. \\boxed{1}"),  # agree: error at 1        -> kept
    (2, "\\boxed{0}"),  # judge earlier
    (-1, "\\boxed{2}"),  # judge earlier (MC says no error)
    (0, "\\boxed{-1}"),  # judge later (misses the error)
    (1, "I think paragraph 1 is wrong."),  # no box: unparsed
    (-1, "\\boxed{7}"),  # out of range: unparsed
]


def _records():
    return [{"id": f"r{i}", "question": f"q{i}", "prompt": f"q{i}", "steps": ["a = 1", "b = 2", "\\boxed{3}"],
             "labels": [1.0, 1.0, 1.0], "hard_labels": [1, 1, 1], "first_error": fe} for i, (fe, _) in enumerate(CASES)]


class FakeJudge:
    def __init__(self):
        self.prompts = []

    def __call__(self, prompts):
        self.prompts += prompts
        return [CASES[int(re.search(r"Problem:\nq(\d+)\n", p).group(1))][1] for p in prompts]


def test_critique_prompt_lists_numbered_paragraphs():
    p = critique_prompt("  What is 1 + 2?  ", ["\n# one\na = 1\n<end_of_step>", "So \\boxed{3}"])
    assert "Problem:\nWhat is 1 + 2?\n" in p
    assert "<paragraph_0>\n# one\na = 1\n<end_of_step>\n</paragraph_0>\n\n<paragraph_1>\nSo \\boxed{3}\n</paragraph_1>" in p
    assert "give -1" in p and "\\boxed{}" in p


def test_parse_judgement():
    assert parse_judgement("the first error is in \\boxed{2}", 3) == 2
    assert parse_judgement("\\boxed{1} ... no, \\boxed{-1}", 3) == -1
    assert parse_judgement("\\boxed{3}", 3) is None and parse_judgement("\\boxed{-2}", 3) is None
    assert parse_judgement("\\boxed{paragraph 1}", 3) is None and parse_judgement("1", 3) is None


def test_keeps_only_agreement_and_reports_counts(tmp_path):
    judge = FakeJudge()
    kept, report = consensus_filter(_records(), judge, out=tmp_path / "kept.jsonl", batch_size=3)
    assert [r["id"] for r in kept] == ["r0", "r1"] and [r["judge_first_error"] for r in kept] == [-1, 1]
    assert report == {"records": 7, "kept": 2, "kept_pct": pytest.approx(200 / 7), "kept_without_error": 1,
                      "kept_with_error": 1, "unparsed": 2, "judge_earlier": 2, "judge_later": 1}
    assert [json.loads(line)["id"] for line in (tmp_path / "kept.jsonl").read_text().splitlines()] == ["r0", "r1"]
    assert json.loads((tmp_path / "kept.jsonl.report.json").read_text()) == report


def test_resumes_from_judged_file(tmp_path):
    out = tmp_path / "kept.jsonl"
    first = FakeJudge()
    consensus_filter(_records()[:4], first, out=out, batch_size=2)
    again = FakeJudge()
    kept, report = consensus_filter(_records(), again, out=out, batch_size=2)
    assert len(again.prompts) == 3 and report["records"] == 7 and report["kept"] == 2  # only r4..r6 judged now
    with pytest.raises(ConsensusError, match="do not match these records"):
        consensus_filter(_records()[::-1], FakeJudge(), out=out)


def test_bad_mc_file_is_one_line_error(tmp_path):
    bad = tmp_path / "mc.jsonl"
    bad.write_text(json.dumps({"question": "q", "steps": ["a"], "labels": [1.0]}) + "\n")
    with pytest.raises(ConsensusError, match=r"mc.jsonl:1: needs 'hard_labels'"):
        run_consensus(ConsensusConfig(judge="unused-model", mc=str(bad), out=str(tmp_path / "out.jsonl")))


def test_real_tiny_judge_end_to_end(tmp_path, tiny_tokenizer):
    from rstar_jax.models.config import ModelConfig
    from rstar_jax.models.hf_io import save_causal_lm
    from rstar_jax.models.params import init_params

    cfg = ModelConfig(model_type="llama", vocab_size=420, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    folder = save_causal_lm(tmp_path / "judge", cfg, init_params(cfg, jax.random.key(0), std=0.3), tiny_tokenizer)
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps(r) + "\n" for r in _records()[:3]))
    report = run_consensus(ConsensusConfig(judge=str(folder), mc=str(mc), out=str(tmp_path / "kept.jsonl"),
                                           max_new_tokens=6, batch_size=2))
    judged = [json.loads(line) for line in (tmp_path / "kept.jsonl.judged.jsonl").read_text().splitlines()]
    # a random model writes no boxed index: every record is unparsed, nothing is kept
    assert [j["id"] for j in judged] == ["r0", "r1", "r2"] and all(j["judge_output"] for j in judged)
    assert report["unparsed"] == 3 and report["kept"] == 0
    assert (tmp_path / "kept.jsonl").read_text() == ""
