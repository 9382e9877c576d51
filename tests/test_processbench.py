"""ProcessBench: the official metric, threshold calibration, the published protocol (one threshold, four subsets),
diagnostics, a real reward model end to end, and a Qwen2.5-Math-PRM folder in its own input format."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rstar_jax.evaluate.processbench import (OfficialProtocol, ProcessBenchConfig, ProcessBenchError, Row,
                                             best_threshold, candidate_thresholds, diagnostics, first_error, load_rows,
                                             processbench_metrics, run_official, run_processbench, split_calibration,
                                             sweep)

SHARED_PB = Path(__file__).resolve().parents[2] / "shared" / "data" / "processbench_gsm8k.json"


def _cfg(data, out, reward_model="scorer", **kw):
    return ProcessBenchConfig(reward_model=reward_model, data=str(data), out=str(out), **kw)


def _row(label, n_steps, final_ok=False, rid=None):
    return Row(rid or f"r{label}-{n_steps}", "p", tuple(f"s{i}" for i in range(n_steps)), label, final_ok)


def test_first_error_and_hand_computed_metrics():
    assert first_error([0.9, 0.4, 0.1], 0.5) == 1
    assert first_error([0.9, 0.8], 0.5) == -1
    assert first_error([float("nan"), 0.2], 0.5) == 1  # NaN is never "below"
    # 3 erroneous rows (2 found exactly), 2 correct rows (1 predicted -1)
    m = processbench_metrics([0, 2, 1, -1, -1], [0, 2, 0, -1, 3])
    assert (m.n_error, m.n_correct) == (3, 2)
    assert m.error_acc == pytest.approx(200 / 3) and m.correct_acc == pytest.approx(50.0)
    assert m.f1 == pytest.approx(2 * (200 / 3) * 50 / (200 / 3 + 50))
    assert processbench_metrics([0, -1], [-1, 0]).f1 == 0.0
    with pytest.raises(ProcessBenchError, match="need erroneous and correct rows"):
        processbench_metrics([0, 1], [0, 1])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.lists(st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.7, 1.0]), min_size=1, max_size=5),
                          st.integers(-1, 4)), min_size=2, max_size=12))
def test_sweep_matches_brute_force(data):
    rows, scores = [], []
    for i, (s, lab) in enumerate(data):
        rows.append(_row(min(lab, len(s) - 1), len(s), rid=str(i)))
        scores.append(s)
    labels = [r.label for r in rows]
    if -1 not in labels or all(x == -1 for x in labels):
        rows.append(_row(-1 if -1 not in labels else 0, 1, rid="extra"))
        scores.append([0.5])
    thresholds = candidate_thresholds(scores)
    fast = sweep(rows, scores, thresholds)
    for t, m in zip(thresholds, fast):
        slow = processbench_metrics([r.label for r in rows], [first_error(s, t) for s in scores])
        assert m == slow
    # the candidates cover every outcome: no threshold on a fine grid beats the best candidate
    best_t, best = best_threshold(rows, scores)
    grid = [processbench_metrics([r.label for r in rows], [first_error(s, t) for s in scores]).f1
            for t in np.linspace(-0.05, 1.05, 111)]
    assert max(grid) <= best.f1 + 1e-9
    assert best == processbench_metrics([r.label for r in rows], [first_error(s, best_t) for s in scores])


def test_diagnostics_hand_computed():
    rows = [_row(1, 3, final_ok=True), _row(0, 2, final_ok=True), _row(-1, 2, final_ok=True), _row(2, 3), _row(-1, 1)]
    scores = [[0.9, 0.2, 0.1], [0.8, 0.9], [0.7, 0.6], [0.3, 0.3, 0.3], [0.1]]
    preds = [first_error(s, 0.5) for s in scores]  # [1, -1, -1, 0, 0]
    d = diagnostics(rows, scores, preds)
    assert d["right_answer_wrong_process_rows"] == 2 and d["right_answer_wrong_process_acc"] == 50.0
    # multi-step rows: 4; strictly lowest at the last step: rows 0 and 2 (row 3 ties)
    assert d["multi_step_rows"] == 4 and d["min_score_at_last_step_pct"] == 50.0


def _pb_file(tmp_path) -> Path:
    """The shared ProcessBench file, or a small hand-built one in its format where ../shared is absent."""
    if SHARED_PB.is_file():
        return SHARED_PB
    rows = []
    for i in range(40):
        steps = [f"{i} + {i}", f"= {2 * i}", f"so {2 * i}"][: 1 + i % 3]
        label = (i % 5) - 1 if (i % 5) - 1 < len(steps) else -1
        rows.append({"id": f"t-{i}", "problem": f"What is {i} + {i}?", "steps": steps, "label": label,
                     "final_answer_correct": i % 2 == 0})
    path = tmp_path / "pb.json"
    path.write_text(json.dumps(rows))
    return path


def test_oracle_gets_f1_100_and_constant_gets_the_expected_numbers(tmp_path):
    path = _pb_file(tmp_path)
    rows = load_rows(path)
    by_key = {(r.problem, r.steps): r.label for r in rows}

    def oracle(items):
        out = []
        for problem, steps in items:
            label = by_key[(problem, tuple(steps))]
            out.append([0.0 if label != -1 and i >= label else 1.0 for i in range(len(steps))])
        return out

    report = run_processbench(_cfg(path, tmp_path / "oracle"), oracle)
    assert report["eval"]["f1"] == 100.0 and report["eval_upper_bound"]["f1"] == 100.0
    assert 0.0 < report["calibration"]["threshold"] <= 1.0

    def constant(items):
        return [[0.7] * len(steps) for _, steps in items]

    report = run_processbench(_cfg(path, tmp_path / "const"), constant)
    _, eval_idx = split_calibration(rows, 0.5, 0)
    eval_rows = [rows[i] for i in eval_idx]
    n_err = sum(r.label != -1 for r in eval_rows)
    # every threshold gives F1 = 0; the lowest one flags nothing, so every row is predicted correct
    assert report["eval"] == {"rows": len(eval_rows), "threshold": 0.7, "error_acc": 0.0, "correct_acc": 100.0,
                              "f1": 0.0, "n_error": n_err, "n_correct": len(eval_rows) - n_err}
    assert report["diagnostics"]["min_score_at_last_step_pct"] == 0.0
    preds = [json.loads(line) for line in (tmp_path / "const" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == len(rows) and all(p["prediction"] == -1 for p in preds)


def test_threshold_is_fixed_on_calibration_then_applied(tmp_path):
    """A scorer whose best threshold differs between the two halves: the fixed result is below the upper bound."""
    calib = [{"id": f"c{i}", "problem": f"c{i}", "steps": ["a", "b"], "label": lab}
             for i, lab in enumerate([0, 0, -1, -1])]
    evald = [{"id": f"e{i}", "problem": f"e{i}", "steps": ["a", "b"], "label": lab}
             for i, lab in enumerate([0, 0, -1, -1])]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in calib))
    (tmp_path / "e.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evald))
    first = {"c0": 0.1, "c1": 0.2, "c2": 0.8, "c3": 0.9, "e0": 0.5, "e1": 0.6, "e2": 0.9, "e3": 0.95}

    def scorer(items):
        return [[first[p], 1.0] for p, _ in items]

    report = run_processbench(_cfg(tmp_path / "e.jsonl", tmp_path / "out", calibration=str(tmp_path / "c.jsonl")), scorer)
    assert report["calibration"]["threshold"] == pytest.approx(0.5) and report["calibration"]["f1"] == 100.0
    # at 0.5 on eval: e0 (0.5) is not below -> wrong; e1 wrong; both correct rows right
    assert report["eval"]["error_acc"] == 0.0 and report["eval"]["correct_acc"] == 100.0
    assert report["eval_upper_bound"]["threshold"] == pytest.approx(0.75) and report["eval_upper_bound"]["f1"] == 100.0
    assert "| eval (fixed threshold) | 0.5 | 0.0 | 100.0 | 0.0 |" in (tmp_path / "out" / "report.md").read_text()


def test_bad_rows_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"problem": "p", "steps": ["a"], "label": 3}]))
    with pytest.raises(ProcessBenchError, match=r"bad.json: row 0: 'label' must be -1 or a step index below 1"):
        load_rows(bad)
    bad.write_text(json.dumps([{"problem": "p", "steps": [], "label": -1}]))
    with pytest.raises(ProcessBenchError, match="'steps' must be a non-empty list"):
        load_rows(bad)


@pytest.mark.parametrize("num_labels", [2, 1])  # PRM head (P(correct)) and PPM head (tanh(raw / 5))
def test_real_tiny_reward_model_end_to_end(tmp_path, tiny_tokenizer, num_labels):
    from rstar_jax.math.steps import build_prompt
    from rstar_jax.models.config import ModelConfig
    from rstar_jax.models.heads import RewardHead
    from rstar_jax.models.hf_io import save_reward_model
    from rstar_jax.models.params import init_params
    from rstar_jax.reward import score_steps

    cfg = ModelConfig(model_type="llama", vocab_size=420, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=2048)
    params = init_params(cfg, jax.random.key(0), num_labels=num_labels, std=0.3)
    head = RewardHead("prm" if num_labels == 2 else "ppm")
    folder = save_reward_model(tmp_path / "prm", cfg, params, tiny_tokenizer, head)
    all_rows = sorted(load_rows(_pb_file(tmp_path)), key=lambda r: len(r.problem) + sum(map(len, r.steps)))
    rows = [r for r in all_rows if r.label != -1][:8] + [r for r in all_rows if r.label == -1][:8]  # shortest
    data = tmp_path / "subset.jsonl"
    data.write_text("".join(json.dumps({"id": r.id, "problem": r.problem, "steps": list(r.steps), "label": r.label,
                                        "final_answer_correct": r.final_answer_correct}) + "\n" for r in rows))
    report = run_processbench(_cfg(data, tmp_path / "out", reward_model=str(folder), batch_size=8))
    preds = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert sorted(p["id"] for p in preds) == sorted(r.id for r in rows)
    # the written scores are the reward model's reported scores read at each step's end
    r0 = next(r for r in rows if r.id == preds[0]["id"])
    want = score_steps(params, cfg, tiny_tokenizer, head, [(build_prompt(r0.problem), ["\n" + s for s in r0.steps])])[0]
    np.testing.assert_allclose(preds[0]["scores"], want, atol=1e-5)
    ev = [p for p in preds if p["split"] == "eval"]
    fixed = processbench_metrics([p["label"] for p in ev], [p["prediction"] for p in ev])
    assert report["eval"]["f1"] == pytest.approx(fixed.f1)
    assert report["eval"]["f1"] <= report["eval_upper_bound"]["f1"]
    with pytest.raises(ProcessBenchError, match="not a reward model"):
        from rstar_jax.models.hf_io import save_causal_lm
        lm = save_causal_lm(tmp_path / "lm", cfg, init_params(cfg, jax.random.key(1)), tiny_tokenizer)
        run_processbench(_cfg(data, tmp_path / "out2", reward_model=str(lm)))


def _subset(tmp_path: Path, name: str, labels: list[int]) -> Path:
    rows = [{"id": f"{name}-{i}", "problem": f"{name} problem {i}", "steps": ["a", "b", "c"], "label": lab}
            for i, lab in enumerate(labels)]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(rows))
    return path


def test_official_protocol_one_threshold_for_every_subset_and_the_unweighted_mean(tmp_path):
    """The published protocol: the threshold is the best on GSM8K (here an oracle's, 0.5), then fixed for every
    subset; a subset the scorer knows nothing about (constant 0.9: every row predicted correct) gets F1 0, and the
    average is the plain mean over subsets, not over rows."""
    gsm8k = _pb_file(tmp_path)
    rows = load_rows(gsm8k)
    labels = {(r.problem, r.steps): r.label for r in rows}
    math_file = _subset(tmp_path, "math", [0, 2, 1, -1, -1])

    def scorer(items):
        out = []
        for problem, steps in items:
            label = labels.get((problem, tuple(steps)))
            out.append([0.9] * len(steps) if label is None else
                       [0.0 if label != -1 and i >= label else 1.0 for i in range(len(steps))])
        return out

    report = run_official(scorer, OfficialProtocol(gsm8k=str(gsm8k), math=str(math_file)), tmp_path / "out")
    assert report["threshold"] == 0.5 and report["threshold_from"] == "gsm8k"
    n_err = sum(r.label != -1 for r in rows)
    assert report["subsets"]["gsm8k"] == {"data": str(gsm8k), "error_acc": 100.0, "correct_acc": 100.0, "f1": 100.0,
                                          "n_error": n_err, "n_correct": len(rows) - n_err}
    assert report["subsets"]["math"] == {"data": str(math_file), "error_acc": 0.0, "correct_acc": 100.0, "f1": 0.0,
                                         "n_error": 3, "n_correct": 2}
    assert report["average"] == {"error_acc": 50.0, "correct_acc": 100.0, "f1": 50.0, "subsets": 2}
    table = (tmp_path / "out" / "report.md").read_text()
    assert "| math | 5 | 0.0 | 100.0 | 0.0 |" in table and "| average of 2 | | 50.0 | 100.0 | 50.0 |" in table
    preds = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == len(rows) + 5 and {p["split"] for p in preds} == {"gsm8k", "math"}

    # a fixed threshold (0.5, a PRM's P(correct)): a constant 0.3 flags every first step
    def constant(items):
        return [[0.3] * len(steps) for _, steps in items]

    fixed = run_official(constant, OfficialProtocol(math=str(math_file), threshold_from="fixed"), tmp_path / "fixed")
    assert fixed["threshold"] == 0.5 and list(fixed["subsets"]) == ["math"]
    assert fixed["subsets"]["math"]["error_acc"] == pytest.approx(100 / 3) and fixed["average"]["f1"] == 0.0
    with pytest.raises(ProcessBenchError, match="threshold_from gsm8k needs the gsm8k subset"):
        OfficialProtocol(math=str(math_file)).check()

    # the command: `processbench --protocol official official.gsm8k=F official.math=F`
    from rstar_jax.cli import build_parser, command_config

    argv = ["processbench", "--reward-model", "R", "--out", str(tmp_path / "cli"), "--protocol", "official",
            f"official.gsm8k={gsm8k}", f"official.math={math_file}"]
    args, args.overrides = build_parser(argv).parse_known_args(argv)
    cfg = command_config(args)
    assert cfg.official.subsets == {"gsm8k": str(gsm8k), "math": str(math_file)}
    assert run_processbench(cfg, scorer)["average"] == report["average"]
    with pytest.raises(ProcessBenchError, match="official.gsm8k, official.math"):
        ProcessBenchConfig(reward_model="R", out="o", protocol="official", data=str(gsm8k),
                           official=OfficialProtocol(gsm8k=str(gsm8k)))


def test_rows_without_both_kinds_fail_before_scoring_naming_file_and_split(tmp_path):
    def must_not_score(items):
        raise AssertionError("scored")

    only_errors = _subset(tmp_path, "errors", [0, 1, 2, 0])
    with pytest.raises(ProcessBenchError, match=r"errors.json \(calibration split: calibration_fraction 0.5, "
                                                r"seed 0\): no correct rows \(label -1\)"):
        run_processbench(_cfg(only_errors, tmp_path / "a"), must_not_score)
    mixed = _subset(tmp_path, "mixed", [0, -1, 1, -1])
    with pytest.raises(ProcessBenchError, match=r"errors.json \(calibration\): no correct rows \(label -1\) among"):
        run_processbench(_cfg(mixed, tmp_path / "b", calibration=str(only_errors)), must_not_score)
    with pytest.raises(ProcessBenchError, match=r"errors.json \(subset math\): no correct rows"):
        run_official(must_not_score, OfficialProtocol(math=str(only_errors), threshold_from="fixed"), tmp_path / "c")


def test_a_qwen25_math_prm_folder_is_scored_in_its_own_format(tmp_path):
    """Qwen2ForProcessRewardModel: chat template, every step followed by <extra_0>, P(correct) = softmax over the
    two labels of its Linear-ReLU-Linear head at each separator; checked against the same computation in torch."""
    torch = pytest.importorskip("torch")
    import safetensors.torch

    from conftest import build_tiny_hf_model, build_tiny_tokenizer
    from rstar_jax.evaluate.processbench import reward_model_scorer
    from rstar_jax.models.hf_io import load_model
    from rstar_jax.reward import QWEN_PRM_SEPARATOR, QWEN_PRM_SYSTEM

    backbone = build_tiny_hf_model("qwen2", num_labels=2, seed=3).model
    gen = torch.Generator().manual_seed(4)
    w0, b0 = 0.3 * torch.randn(64, 64, generator=gen), 0.3 * torch.randn(64, generator=gen)
    w2, b2 = 0.3 * torch.randn(2, 64, generator=gen), 0.3 * torch.randn(2, generator=gen)
    folder = tmp_path / "qwen-prm"
    folder.mkdir()
    state = {f"model.{k}": v.contiguous() for k, v in backbone.state_dict().items()}
    state |= {"score.0.weight": w0, "score.0.bias": b0, "score.2.weight": w2, "score.2.bias": b2}
    safetensors.torch.save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(backbone.config.to_dict()
                                                   | {"architectures": ["Qwen2ForProcessRewardModel"]}))
    tok = build_tiny_tokenizer()
    tok.add_special_tokens([QWEN_PRM_SEPARATOR])
    tok.save(folder)
    assert load_model(str(folder)).head.input_format == "qwen-prm"

    items = [("What is 12 + 30?", ["12 + 30 = 42.", "So the answer is 42."]), ("Paris?", ["The capital of France."])]
    got = reward_model_scorer(str(folder))(items)
    sep = tok.token_to_id(QWEN_PRM_SEPARATOR)
    for (problem, steps), scores in zip(items, got):
        chat = [{"role": "system", "content": QWEN_PRM_SYSTEM}, {"role": "user", "content": problem},
                {"role": "assistant", "content": QWEN_PRM_SEPARATOR.join(steps) + QWEN_PRM_SEPARATOR}]
        ids = torch.tensor([tok.encode(tok.apply_chat_template(chat, add_generation_prompt=False))])
        with torch.no_grad():
            h = backbone(input_ids=ids).last_hidden_state[0]
            p = torch.softmax(torch.relu(h @ w0.T + b0) @ w2.T + b2, -1)[:, 1]
        want = p[ids[0] == sep].numpy()
        assert len(want) == len(steps)
        np.testing.assert_allclose(scores, want, atol=1e-4)
