"""Tokenizer wrapper vs transformers; chat templates; added special tokens with an embedding resize."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SHARED, TINY_SPECIAL_TOKENS
from rstar_jax.models.config import ModelConfig
from rstar_jax.models.llama import causal_lm_logits
from rstar_jax.models.params import init_params
from rstar_jax.models.tokenizer import load_tokenizer
from rstar_jax.models.vocab import RSTAR_STEP_TOKENS, add_special_tokens

TEXTS = [
    "The capital of France is Paris.",
    "  leading spaces, 2024 digits, and\ttabs\n\nnewlines",
    "Unicode: naïve café, ½, 三角形, emoji 🙂",
    "special <|im_start|>user\nhi<|im_end|> inline",
    "",
]
MESSAGES = [
    {"role": "system", "content": "Solve step by step."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And 4*4?"},
]


def _cfg(vocab: int, tie: bool) -> ModelConfig:
    return ModelConfig(model_type="llama", vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=tie)


def test_encode_decode_and_chat_template_match_transformers(tiny_tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    tiny_tokenizer.save(tmp_path)
    ours, hf = load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts = list(TEXTS)
    if (SHARED / "data" / "math_dev.jsonl").is_file():  # real math text when the shared data is present
        with open(SHARED / "data" / "math_dev.jsonl") as f:
            texts += [json.loads(next(f))["problem"] for _ in range(5)]
    for text in texts:
        ids = ours.encode(text)
        assert ids == hf(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ids) == text == hf.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert ours.encode("<|im_end|>") == [ours.eos_token_id] == [hf.eos_token_id]
    assert (ours.bos_token_id, ours.pad_token_id) == (hf.bos_token_id, hf.pad_token_id)
    assert ours.vocab_size == len(hf)
    for gen_prompt in (True, False):
        expected = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen_prompt)
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=gen_prompt) == expected
    assert ours.apply_chat_template(MESSAGES[:2]).endswith("<|im_start|>assistant\n")


def test_chat_template_is_read_from_chat_template_jinja(tiny_tokenizer, tmp_path):
    template = tiny_tokenizer.chat_template
    tiny_tokenizer.chat_template = None
    tiny_tokenizer.save(tmp_path)
    assert "chat_template" not in json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "chat_template.jinja").write_text(template.replace("<|im_start|>", "<<"))
    assert load_tokenizer(tmp_path).apply_chat_template(MESSAGES[1:2]) == "<<user\nWhat is 2+3?<|im_end|>\n<<assistant\n"


def test_added_special_tokens_are_atomic_and_survive_save(tiny_tokenizer, tmp_path):
    before = tiny_tokenizer.vocab_size
    assert tiny_tokenizer.add_special_tokens(list(RSTAR_STEP_TOKENS)) == len(RSTAR_STEP_TOKENS)
    assert tiny_tokenizer.add_special_tokens(["<end_of_step>", TINY_SPECIAL_TOKENS[0]]) == 0
    assert tiny_tokenizer.vocab_size == before + len(RSTAR_STEP_TOKENS)
    text = "x = 1\nprint(x)<end_of_step><output>1<end_of_output><answer>\\boxed{1}<end_of_answer>"
    ids = tiny_tokenizer.encode(text)
    assert tiny_tokenizer.token_to_id("<end_of_step>") in ids and tiny_tokenizer.token_to_id("<answer>") in ids
    assert tiny_tokenizer.decode(ids) == text
    tiny_tokenizer.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.vocab_size == tiny_tokenizer.vocab_size and again.encode(text) == ids


@pytest.mark.parametrize("tie", [False, True])
def test_embedding_resize_keeps_existing_rows_and_logits(tiny_tokenizer, tie):
    old_vocab = tiny_tokenizer.vocab_size
    cfg = _cfg(old_vocab, tie)
    params = init_params(cfg, jax.random.key(0), std=0.2)
    new_params, new_cfg = add_special_tokens(tiny_tokenizer, params, cfg, pad_to_multiple_of=8)
    assert new_cfg.vocab_size == -(-(old_vocab + len(RSTAR_STEP_TOKENS)) // 8) * 8 >= tiny_tokenizer.vocab_size
    names = ["embed"] + ([] if tie else ["lm_head"])
    for name in names:
        old = params["model"]["embed_tokens"]["weight"] if name == "embed" else params["lm_head"]["weight"]
        new = new_params["model"]["embed_tokens"]["weight"] if name == "embed" else new_params["lm_head"]["weight"]
        assert new.shape == (new_cfg.vocab_size, cfg.hidden_size)
        np.testing.assert_array_equal(new[:old_vocab], old)
        step_id = tiny_tokenizer.token_to_id("<end_of_step>")
        np.testing.assert_allclose(new[step_id], old.mean(axis=0), rtol=1e-6)
    ids = jnp.asarray([tiny_tokenizer.encode("The capital of France is Paris.")])
    np.testing.assert_allclose(
        causal_lm_logits(new_params, new_cfg, ids)[..., :old_vocab], causal_lm_logits(params, cfg, ids), atol=1e-6
    )


def test_spare_rows_are_used_before_growing(tiny_tokenizer):
    old_vocab = tiny_tokenizer.vocab_size
    cfg = _cfg(old_vocab + 64, tie=False)  # like Qwen: the matrix has unused rows past the tokenizer
    params = init_params(cfg, jax.random.key(1), std=0.2)
    new_params, new_cfg = add_special_tokens(tiny_tokenizer, params, cfg, tokens=("<code>", "<end_of_code>"))
    assert new_cfg.vocab_size == cfg.vocab_size
    new_embed, old_embed = new_params["model"]["embed_tokens"]["weight"], params["model"]["embed_tokens"]["weight"]
    np.testing.assert_array_equal(new_embed[:old_vocab], old_embed[:old_vocab])
    np.testing.assert_array_equal(new_embed[old_vocab + 2:], old_embed[old_vocab + 2:])
    np.testing.assert_allclose(new_embed[old_vocab], old_embed[:old_vocab].mean(axis=0), rtol=1e-6)
