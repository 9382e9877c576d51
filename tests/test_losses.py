"""Losses against direct numpy formulas; data records: prompt masking, pair weights, one-line format errors."""

import numpy as np
import pytest

from rstar_jax.config import DataSection
from rstar_jax.train.data import DataFormatError, build_batches, read_records, tokenize
from rstar_jax.train.losses import bradley_terry_loss, causal_lm_loss, step_classification_loss, value_mse_loss
from rstar_jax.train.model_source import byte_tokenizer

from train_fixtures import ppm_records, sft_records, step_records, write_jsonl

rng = np.random.default_rng(0)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_causal_lm_loss_is_masked_token_mean():
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(2, 5)).astype(np.int32)
    weights = np.array([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], np.float32)
    s, w, _ = causal_lm_loss(logits, targets, weights)
    nll = -np.take_along_axis(_log_softmax(logits), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(s / w, (nll * weights).sum() / weights.sum(), rtol=1e-6)
    changed = logits.copy()
    changed[weights == 0] += rng.normal(size=changed[weights == 0].shape).astype(np.float32) * 5
    np.testing.assert_allclose(causal_lm_loss(changed, targets, weights)[0], s, rtol=1e-6)


def test_bradley_terry_is_weighted_mean_and_batch_size_free():
    r_pos, r_neg = rng.normal(size=6).astype(np.float32), rng.normal(size=6).astype(np.float32)
    w = np.array([1 / 4, 1 / 4, 1 / 4, 1 / 4, 1.0, 0.0], np.float32)
    s, ws, stats = bradley_terry_loss(r_pos, r_neg, w)
    expect = (w * np.log1p(np.exp(-(r_pos - r_neg)))).sum() / w.sum()
    np.testing.assert_allclose(s / ws, expect, rtol=1e-6)
    np.testing.assert_allclose(stats["correct"], (w * (r_pos > r_neg)).sum(), rtol=1e-6)
    s2, ws2, _ = bradley_terry_loss(np.tile(r_pos, 3), np.tile(r_neg, 3), np.tile(w, 3))
    np.testing.assert_allclose(s2 / ws2, s / ws, rtol=1e-6)


def test_prm_cross_entropy_hard_and_soft():
    logits = rng.normal(size=(2, 4, 2)).astype(np.float32)
    p = np.array([[0, 1, 0.25, 0], [1, 0.6, 0, 0]], np.float32)
    w = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32)
    s, ws, _ = step_classification_loss(logits, p, w)
    lp = _log_softmax(logits)
    ce = -(p * lp[..., 1] + (1 - p) * lp[..., 0])
    np.testing.assert_allclose(s / ws, (ce * w).sum() / w.sum(), rtol=1e-6)


def test_value_mse():
    v, t = rng.normal(size=(3, 4)).astype(np.float32), rng.uniform(size=(3, 4)).astype(np.float32)
    w = (rng.uniform(size=(3, 4)) > 0.5).astype(np.float32)
    s, ws, _ = value_mse_loss(v, t, w)
    np.testing.assert_allclose(s / ws, (w * (v - t) ** 2).sum() / w.sum(), rtol=1e-6)


def test_sft_examples_mask_the_prompt_and_pack_with_segments(tmp_path):
    tok = byte_tokenizer()
    recs = read_records(write_jsonl(tmp_path / "s.jsonl", sft_records(6)), "sft")
    data = DataSection(seq_len=128, batch_size=2)
    ex = tokenize(recs[:1], "sft", tok, data)[0]
    n_prompt = len(tok.encode(recs[0]["prompt"]))
    # The first weighted position predicts the first response token; the last one predicts EOS.
    assert np.flatnonzero(ex.weights)[0] == n_prompt - 1
    assert ex.targets[np.flatnonzero(ex.weights)[-1]] == tok.eos_token_id
    assert ex.weights.sum() == len(ex.tokens) - n_prompt
    b = build_batches(tokenize(recs, "sft", tok, data), "sft", data).at_step(0)
    assert b["input_ids"].shape == (1, 2, 128)
    assert b["segment_ids"].max() >= 2  # at least one row holds two packed examples
    seg, w = b["segment_ids"][0], b["weights"][0]
    assert np.all(w[seg == 0] == 0)


def test_ppm_pairs_carry_prefix_weights_and_last_token_index(tmp_path):
    tok = byte_tokenizer()
    recs = read_records(write_jsonl(tmp_path / "p.jsonl", ppm_records(4)), "ppm")
    data = DataSection(seq_len=64, batch_size=4, num_buckets=2)
    batches = build_batches(tokenize(recs, "ppm", tok, data), "ppm", data)
    b = batches.at_step(0)
    assert b["input_ids"].shape[1:3] == (4, 2)
    np.testing.assert_allclose(np.sort(b["weights"][0]), [0.5] * 4)
    for r in range(4):
        for j in range(2):
            last = b["last"][0, r, j]
            assert b["segment_ids"][0, r, j, last] == 1 and b["segment_ids"][0, r, j, last + 1 :].sum() == 0


def test_data_order_is_deterministic_and_epochs_differ(tmp_path):
    tok = byte_tokenizer()
    recs = read_records(write_jsonl(tmp_path / "v.jsonl", step_records("value", 40)), "value")
    data = DataSection(seq_len=64, batch_size=4, layout="bucket")
    make = lambda: build_batches(tokenize(recs, "value", tok, data), "value", data)  # noqa: E731
    a, b = make(), make()
    assert a.plan(0) == b.plan(0) and a.plan(0) != a.plan(1)
    np.testing.assert_array_equal(a.at_step(a.steps_per_epoch + 1)["input_ids"], b.at_step(b.steps_per_epoch + 1)["input_ids"])


@pytest.mark.parametrize(
    "kind,line,message",
    [
        ("sft", '{"prompt": "x"}', "missing 'response'"),
        ("ppm", '{"prompt": "x", "pos": "a", "neg": "b", "pos_count": 0, "neg_count": 1}', "pos_count"),
        ("prm", '{"prompt": "x", "steps": ["a", "b"], "labels": [1]}', "one target per step"),
        ("prm", '{"prompt": "x", "steps": ["a"], "labels": [2]}', "[0, 1]"),
        ("value", "{not json", "invalid JSON"),
    ],
)
def test_malformed_records_name_file_and_line(tmp_path, kind, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "response": "r"}\n' * (kind == "sft") + line + "\n")
    with pytest.raises(DataFormatError) as e:
        read_records(path, kind)
    text = str(e.value)
    assert f"{path}:{2 if kind == 'sft' else 1}:" in text and message in text and "\n" not in text
