"""Outputs are never lost or silently stale: exec appends and resumes, generate and search refuse a rerun with other
settings and name the setting, a typo'd first run leaves nothing a corrected one trips over, and an --out that
cannot be written is one line naming --out, with no temporary files left behind."""

import json
from pathlib import Path

import pytest

from rstar_jax.cli import main

REPO = Path(__file__).resolve().parents[1]


def _run(capsys, *argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.err.strip().splitlines()


def _programs(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"id": i, "code": f"print({i} * 7)"}) + "\n" for i in range(n)))
    return path


def test_exec_appends_resumes_and_never_empties_its_output(capsys, tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    sandbox = ["--workers", "1", "--allow-insecure-sandbox"]
    assert _run(capsys, "exec", "--programs", _programs(tmp_path / "p2.jsonl", 2), "--out", out, *sandbox)[0] == 0
    first = out.read_text()
    assert [json.loads(x)["last_line"] for x in first.splitlines()] == ["0", "7"]

    from rstar_jax.sandbox import isolation
    from rstar_jax.sandbox.results import SandboxError

    def no_sandbox(allow_insecure):
        raise SandboxError("sandbox: cannot start (test)")

    with monkeypatch.context() as m:  # a sandbox that fails to start keeps the earlier results
        m.setattr(isolation, "detect", no_sandbox)
        code, err = _run(capsys, "exec", "--programs", _programs(tmp_path / "p3.jsonl", 3), "--out", out, *sandbox)
    assert code == 2 and out.read_text() == first
    # the rerun runs only the program not yet done and appends its result
    assert _run(capsys, "exec", "--programs", tmp_path / "p3.jsonl", "--out", out, *sandbox)[0] == 0
    text = out.read_text()
    assert text.startswith(first) and [json.loads(x)["id"] for x in text.splitlines()] == [0, 1, 2]
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": "x", "code": "print(1)"}) + "\n")
    code, err = _run(capsys, "exec", "--programs", other, "--out", out, *sandbox)
    assert code == 2 and len(err) == 1 and "--out" in err[0] and out.read_text() == text


def test_generate_records_its_settings_and_refuses_other_ones(capsys, tmp_path, tiny_hf_folder):
    folder, _ = tiny_hf_folder()
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--model", folder, "--prompt", "12 + 30 =", "--max-new-tokens", "4", "--temperature", "0.5",
            "--out", out]
    assert _run(capsys, *argv)[0] == 0
    first = out.read_text()
    code, err = _run(capsys, *argv[:-4], "--temperature", "0.7", "--out", out)
    assert code == 2 and len(err) == 1 and "sampling.temperature=0.5, not 0.7" in err[0], err
    code, err = _run(capsys, *argv, "--seed", "3")
    assert code == 2 and "seed=0, not 3" in err[0]
    assert out.read_text() == first
    assert _run(capsys, *argv)[0] == 0 and out.read_text() == first  # the same settings: nothing to do


def test_a_typo_in_a_first_search_does_not_poison_its_folder(capsys, tmp_path, tiny_hf_folder):
    folder, _ = tiny_hf_folder()
    out = tmp_path / "run"
    argv = ["search", "--model", folder, "--method", "greedy", "--max-depth", "1", "--max-new-tokens", "4",
            "--few-shot", "0", "--sandbox-workers", "1", "--allow-insecure-sandbox", "--out", out]
    code, err = _run(capsys, *argv, "--problems", "synth:levels=9,n=1,seed=0")
    assert code == 2 and "levels" in err[0] and not (out / "config.json").exists()
    assert _run(capsys, *argv, "--problems", "synth:levels=1,n=1,seed=0")[0] == 0
    code, err = _run(capsys, *argv, "--problems", "synth:levels=1,n=1,seed=0", "--temperature", "0.3")
    assert code == 2 and len(err) == 1 and "config.temperature=0.8, not 0.3" in err[0], err


def test_an_evolve_rerun_with_another_config_names_the_key(capsys, tmp_path, tiny_hf_folder, monkeypatch):
    import rstar_jax.sandbox

    folder, _ = tiny_hf_folder()
    cfg = tmp_path / "evolve.yaml"
    cfg.write_text(json.dumps({"model": str(folder), "rounds": 1, "search": {"max_new_tokens": 8}}))

    def no_sandbox(*args, **kwargs):
        raise rstar_jax.sandbox.SandboxError("sandbox: cannot start (test)")

    monkeypatch.setattr(rstar_jax.sandbox, "SandboxPool", no_sandbox)  # config.json written, then nothing runs
    assert _run(capsys, "evolve", "--config", cfg, "--out", tmp_path / "run")[0] == 2
    assert (tmp_path / "run" / "config.json").is_file()
    code, err = _run(capsys, "evolve", "--config", cfg, "--out", tmp_path / "run", "search.rollouts=3")
    assert code == 2 and len(err) == 1 and "config.search.rollouts=16, not 3" in err[0], err


@pytest.mark.parametrize("argv", [
    ["problems", "synth", "--levels", "1", "--n", "2"],
    ["label", "sft", "--trees", "TREES"],
    ["label", "value", "--trees", "TREES"],
    ["generate", "--model", "MODEL", "--prompt", "hi"],
    ["exec", "--programs", "PROGRAMS", "--allow-insecure-sandbox"],
])
@pytest.mark.parametrize("target", ["folder", "text file"])
def test_an_unwritable_out_is_one_line_naming_out_and_leaves_no_temporary_file(capsys, tmp_path, tiny_hf_folder,
                                                                               argv, target):
    from rstar_jax.math.steps import StepKind
    from rstar_jax.search import tree_io
    from rstar_jax.search.policy import Child

    b = tree_io.TreeBuilder()
    b.add(0, Child("\n<answer>\\boxed{2}<end_of_answer>", (), StepKind.ANSWER_TERMINAL, "2", True), 1.0)
    tree_io.save(b.build({"problem": {"id": "q", "question": "1 + 1?", "answer": "2"}}), tmp_path / "trees")
    names = {"TREES": tmp_path / "trees", "PROGRAMS": _programs(tmp_path / "p.jsonl", 1),
             "MODEL": tiny_hf_folder()[0] if "MODEL" in argv else None}
    out = tmp_path / "target"
    if target == "folder":
        out.mkdir()
    else:
        out.write_text("my notes, not JSONL\n")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, err = _run(capsys, *[names.get(a, a) for a in argv], "--out", out)
    assert code == 2 and len(err) == 1 and f"--out {out}" in err[0], err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no .tmp, nothing else
    assert target == "folder" or out.read_text() == "my notes, not JSONL\n"
