"""CLI: wrong inputs give one clear line and a non-zero exit, with nothing written; generate runs and resumes."""

import json
import subprocess
import sys

import pytest

from rstar_jax.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize(
    "model, expect",
    [("/nonexistent/model", "/nonexistent/model"), ("no-such-alias", "no-such-alias")],
)
def test_bad_model_is_one_line(capsys, tmp_path, model, expect):
    out = tmp_path / "o.jsonl"
    code, err = _run(capsys, "generate", "--model", model, "--prompt", "hi", "--out", str(out))
    assert code == 2 and len(err) == 1 and expect in err[0] and err[0].startswith("rstar-jax generate: error:")
    assert not out.exists()


@pytest.mark.parametrize(
    "content, expect",
    [("", "empty"), ('{"prompt": "a"}\n{"prompt": \n', ":2: not valid JSON"), ('{"text": "a"}\n', "missing key 'prompt'"),
     ('{"prompt": ""}\n', "non-empty string"), ("[1, 2]\n", "expected a JSON object")],
)
def test_bad_prompts_file_is_one_line(capsys, tmp_path, content, expect):
    f = tmp_path / "prompts.jsonl"
    f.write_text(content)
    out = tmp_path / "o.jsonl"
    code, err = _run(capsys, "generate", "--model", "smollm2-135m", "--prompts", str(f), "--out", str(out))
    assert code == 2 and len(err) == 1 and str(f) in err[0] and expect in err[0]
    assert not out.exists()


def test_generate_writes_jsonl_and_resumes(tiny_hf_folder, tmp_path, capsys):
    folder, _ = tiny_hf_folder()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["12 + 30 =", "The capital", "def solve(x):"]))
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--model", str(folder), "--prompts", str(prompts), "--max-new-tokens", "6", "--temperature",
            "0.8", "--num-samples", "2", "--batch-size", "2", "--out", str(out)]
    assert main(argv) == 0
    full = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["prompt"] for r in full] == ["12 + 30 =", "The capital", "def solve(x):"]
    assert all(len(r["completions"]) == 2 and r["completions"][0]["finish_reason"] in ("stop", "length") for r in full)
    # A crash after the first record, mid-way through writing the second: the rerun keeps record 1, redoes the rest.
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + lines[1][:10])
    assert main(argv) == 0
    assert [json.loads(x) for x in out.read_text().splitlines()] == full


def test_console_script_help():
    r = subprocess.run([sys.executable, "-m", "rstar_jax.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "generate" in r.stdout and "exec" in r.stdout


def test_problems_sft_writes_training_records(tmp_path, capsys):
    from rstar_jax.train.data import read_records

    out = tmp_path / "sft.jsonl"
    assert main(["problems", "sft", "--problems", "synth:levels=1,n=5,seed=0", "--out", str(out)]) == 0
    recs = read_records(out, "sft")
    assert len(recs) == 5 and all(r["response"].startswith("<code>") and "<|user|>" in r["prompt"] for r in recs)
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"id": "a", "question": "1+1?", "answer": "2"}\n')
    code, err = _run(capsys, "problems", "sft", "--problems", str(plain), "--out", str(tmp_path / "x.jsonl"))
    assert code == 2 and len(err) == 1 and "'a' has no reference solution" in err[0]
    assert not (tmp_path / "x.jsonl").exists()


def test_generate_in_bfloat16(tiny_hf_folder, tmp_path, capsys):
    folder, _ = tiny_hf_folder()
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--model", str(folder), "--prompt", "12 + 30 =", "--max-new-tokens", "5", "--num-samples", "2",
            "--temperature", "0.8", "--dtype", "bfloat16", "--out", str(out)]
    assert main(argv) == 0
    (record,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert [len(c["token_ids"]) >= 1 for c in record["completions"]] == [True, True]
