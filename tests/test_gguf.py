"""GGUF -> HF folder: dequantized weights, llama q/k rows un-permuted, tokenizer rebuilt from metadata, cached once."""

import json

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

from conftest import build_tiny_hf_model, build_tiny_tokenizer, write_tiny_gguf  # noqa: E402
from rstar_jax.models.hf_io import load_model, read_weights  # noqa: E402
from rstar_jax.models.registry import resolve  # noqa: E402
from tokenizers import pre_tokenizers  # noqa: E402

TEXTS = ["The capital of France is Paris.", "x = 12 * 3  # 36\n", "naïve café ½ <|im_end|>"]


@pytest.mark.parametrize("arch,tie,pre,add_bos", [("llama", False, "smollm", False), ("qwen2", True, "gpt2", True)])
def test_gguf_converts_to_the_source_weights_and_tokenizer(tmp_path, monkeypatch, arch, tie, pre, add_bos):
    monkeypatch.setenv("RSTAR_JAX_CACHE", str(tmp_path / "cache"))
    model, tokenizer = build_tiny_hf_model(arch, tie), build_tiny_tokenizer()
    path = tmp_path / "tiny.gguf"
    expected = write_tiny_gguf(path, model, tokenizer, arch, pre, add_bos)
    assert any(t.tensor_type == gguf.GGMLQuantizationType.Q8_0 for t in gguf.GGUFReader(path).tensors)

    folder = resolve(str(path))
    assert folder.is_relative_to(tmp_path / "cache")
    m = load_model(str(path))
    assert m.path == folder
    src = model.config
    assert (m.cfg.model_type, m.cfg.num_hidden_layers, m.cfg.hidden_size, m.cfg.num_key_value_heads) == (
        arch, src.num_hidden_layers, src.hidden_size, src.num_key_value_heads)
    assert (m.cfg.head_dim, m.cfg.rope_theta, m.cfg.tie_word_embeddings) == (src.head_dim, src.rope_parameters["rope_theta"], tie)
    assert m.cfg.attention_bias == (arch == "qwen2")

    got = read_weights(folder)
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    raw_q = model.state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy()
    assert np.abs(got["model.layers.0.self_attn.q_proj.weight"] - raw_q).max() < 0.02  # Q8_0 error, rows in place

    ref = build_tiny_tokenizer()
    if pre == "gpt2":  # the GGUF says plain GPT-2 splitting: digits are not split one by one
        ref.backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    for text in TEXTS:
        assert m.tokenizer.encode(text) == ref.encode(text)
        assert m.tokenizer.decode(m.tokenizer.encode(text)) == text
    bos = [ref.bos_token_id] if add_bos else []
    assert m.tokenizer.encode(TEXTS[0], add_special_tokens=True) == bos + ref.encode(TEXTS[0])
    assert (m.tokenizer.eos_token_id, m.tokenizer.pad_token_id) == (ref.eos_token_id, ref.pad_token_id)
    assert m.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == ref.apply_chat_template(
        [{"role": "user", "content": "hi"}])

    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve(str(path)) == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp  # cached
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temp folders left behind


@pytest.mark.slow
def test_smollm2_alias_fetches_converts_and_generates(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("RSTAR_JAX_CACHE", str(tmp_path / "cache"))
    folder = resolve("smollm2-135m")
    config = json.loads((folder / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]) == (30, 576, 9)
    assert (config["num_key_value_heads"], config["vocab_size"], config["tie_word_embeddings"]) == (3, 49152, True)
    assert resolve("smollm2-135m") == folder

    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])
    chat = load_model(str(folder)).tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+3?"}])
    assert chat == tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tok(chat, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "5" in tok.decode(out[0, ids["input_ids"].shape[1]:])
