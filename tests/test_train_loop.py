"""run_training end to end on tiny random models: SFT learns, PPM ranks held-out pairs, PRM/value train, bf16/remat."""

import json

import numpy as np
import pytest

from rstar_jax.config import RunConfigError
from rstar_jax.train import run_training
from rstar_jax.train.data import DataFormatError

from train_fixtures import TINY, ppm_records, sft_records, step_records, write_jsonl

FAST = [*TINY, "train.save_every=1000", "mesh.data=8"]


def _train_losses(out):
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"], [r for r in rows if r["split"] == "eval"]


def test_sft_lowers_heldout_loss_and_writes_metrics(tmp_path, capsys):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_records(200))
    out = tmp_path / "run"
    last = run_training("sft", "random", str(data), str(out),
                        [*FAST, "data.eval_fraction=0.2", "train.max_steps=40", "optim.learning_rate=3e-3", "train.log_every=5"])
    losses, evals = _train_losses(out)
    assert len(losses) == 8 and [e["step"] for e in evals] == [0, 40]  # baseline, then the end
    assert evals[1]["loss"] < evals[0]["loss"] - 1.5  # held-out loss well below the untrained model's
    assert last["eval"]["loss"] == evals[1]["loss"] and last["tokens_per_s"] > 0
    assert json.loads((out / "run.json").read_text())["kind"] == "sft"
    err = capsys.readouterr().err
    assert "step 40/40 loss" in err and "tok/s" in err


@pytest.mark.slow
def test_ppm_ranks_heldout_pairs(tmp_path):
    """Positive = reference step, negative = the step with a wrong operation or a wrong number."""
    data = write_jsonl(tmp_path / "ppm.jsonl", ppm_records(1200))
    last = run_training("ppm", "random", str(data), str(tmp_path / "run"),
                        [*FAST, "data.eval_fraction=0.2", "data.batch_size=32", "train.max_steps=300",
                         "optim.learning_rate=3e-3", "optim.warmup_steps=20", "data.max_eval_batches=100"])
    print("held-out PPM pair accuracy:", last["eval"]["correct"])
    assert last["eval"]["correct"] >= 0.9


@pytest.mark.parametrize("kind", ["prm", "value"])
def test_step_reward_models_train(tmp_path, kind):
    data = write_jsonl(tmp_path / f"{kind}.jsonl", step_records(kind, 64))
    run_training(kind, "random", str(data), str(tmp_path / "run"),
                 [*FAST, "train.max_steps=30", "optim.learning_rate=3e-3", "data.layout=bucket"])
    losses, _ = _train_losses(tmp_path / "run")
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3])


def test_prm_trains_on_the_labels_the_labeller_wrote(tiny_tokenizer):
    """Hard MC labels at threshold 1 (Math-Shepherd): 1 correct completion of 8 is label 1 although its soft label
    is 0.125. Training takes the record's labels; no second rounding rule can be switched on."""
    from rstar_jax.config import DataSection, load_config
    from rstar_jax.train.data import tokenize

    rec = {"prompt": "Q: 2+3?\n", "steps": ["x = 2 + 3\n", "print(x)\n"], "labels": [1.0, 0.0],
           "soft_labels": [0.125, 0.0], "hard_labels": [1, 0]}
    [ex] = tokenize([rec], "prm", tiny_tokenizer, DataSection())
    assert ex.targets[ex.weights > 0].tolist() == [1.0, 0.0]
    with pytest.raises(RunConfigError, match="unknown config key 'data.prm_soft_labels'"):
        load_config(["data.prm_soft_labels=false"])


def test_bf16_remat_scan_track_fp32(tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_records(32))
    runs = {}
    for name, extra in {"fp32": [], "remat_scan": ["model.remat=true", "model.scan_layers=true"],
                        "bf16": ["model.compute_dtype=bfloat16", "model.remat=true"]}.items():
        run_training("sft", "random", str(data), str(tmp_path / name), [*FAST, "train.max_steps=3", "optim.learning_rate=3e-3", *extra])
        runs[name] = np.array(_train_losses(tmp_path / name)[0])
    np.testing.assert_allclose(runs["remat_scan"], runs["fp32"], rtol=1e-5)
    np.testing.assert_allclose(runs["bf16"], runs["fp32"], rtol=2e-2)
    assert not np.array_equal(runs["bf16"], runs["fp32"])


def test_step_count_from_epochs_min_steps_and_max_steps():
    from rstar_jax.config import load_config
    from rstar_jax.train.loop import total_steps

    def steps(*overrides):
        return total_steps(load_config(["train.min_steps=0", *overrides]), steps_per_epoch=2)

    assert steps("train.epochs=4") == 8
    assert steps("train.epochs=4", "train.min_steps=12") == 12  # few records: at least min_steps
    assert steps("train.epochs=4", "train.min_steps=5") == 8
    assert steps("train.epochs=4", "train.min_steps=12", "train.max_steps=3") == 3


def test_bad_inputs_are_one_line_errors(tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_records(4))
    with pytest.raises(RunConfigError, match="training kind 'dpo'"):
        run_training("dpo", "random", str(data), str(tmp_path / "a"), TINY)
    with pytest.raises(RunConfigError, match=r"data.grad_accum=3: must be a divisor of batch_size=8"):
        run_training("sft", "random", str(data), str(tmp_path / "b"), [*TINY, "data.grad_accum=3"])
    with pytest.raises(RunConfigError, match="model.arch"):
        run_training("sft", "random", str(data), str(tmp_path / "c"), [])
    with pytest.raises(RunConfigError, match=r"train.min_steps=-1: must be >= 0"):
        run_training("sft", "random", str(data), str(tmp_path / "e"), [*TINY, "train.min_steps=-1"])
    with pytest.raises(DataFormatError, match=r"sft.jsonl:1: ppm record is missing 'pos'"):
        run_training("ppm", "random", str(data), str(tmp_path / "d"), TINY)
