"""HF weights in and out: logit parity with transformers, exact round trips, sharded and bf16 folders, reward export."""

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rstar_jax.models.heads import RewardHead, reward_logits  # noqa: E402
from rstar_jax.models.hf_io import convert, load_model, save_causal_lm, save_reward_model  # noqa: E402
from rstar_jax.models.llama import causal_lm_logits  # noqa: E402
from rstar_jax.models.params import to_hf_state_dict  # noqa: E402
from rstar_jax.train.losses import causal_lm_loss  # noqa: E402

ARCHS = [("llama", False), ("llama", True), ("qwen2", False), ("qwen2", True)]


def _batch(vocab: int, seed: int = 0):
    """Right-padded batch: row 1 has 4 padding positions."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return ids, mask


def _torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float().numpy()


def _max_diff(ours, ref, mask):
    valid = mask.numpy().astype(bool)
    return float(np.abs(np.asarray(ours) - ref)[valid].max())


def _assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(np.asarray(x).view(np.uint32), np.asarray(y).view(np.uint32))


@pytest.mark.parametrize("arch,tie", ARCHS)
def test_logit_parity_export_reload_and_bitwise_round_trip(tiny_hf_folder, tmp_path, arch, tie):
    folder, model = tiny_hf_folder(arch, tie)
    m = load_model(str(folder))
    assert (m.cfg.model_type, m.cfg.tie_word_embeddings, m.cfg.num_key_value_heads) == (arch, tie, 2)
    assert ("lm_head" in m.params) == (not tie)
    ids, mask = _batch(m.cfg.vocab_size)
    ref = _torch_logits(model, ids, mask)
    assert ref.std() > 0.5  # large enough that a wiring bug could not hide under the 1e-4 tolerance
    ours = causal_lm_logits(m.params, m.cfg, ids.numpy(), mask.numpy())
    assert _max_diff(ours, ref, mask) <= 1e-4

    out = save_causal_lm(tmp_path / "export", m.cfg, m.params, m.tokenizer)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reloaded).__name__ == type(model).__name__
    assert _max_diff(_torch_logits(reloaded, ids, mask), ref, mask) == 0.0
    _assert_bitwise_equal(load_model(str(out)).params, m.params)


@pytest.mark.parametrize("arch,tie", [("llama", True), ("qwen2", False)])
def test_loss_gradients_match_transformers(tiny_hf_folder, arch, tie):
    """The train step's gradients (custom fp32-result VJP of every projection and the head) equal torch
    autograd's on the same weights; bf16 compute stays close to them."""
    folder, model = tiny_hf_folder(arch, tie)
    m = load_model(str(folder))
    ids, _ = _batch(m.cfg.vocab_size)
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    ref = {k: p.grad.numpy() for k, p in model.named_parameters()}
    ids_np = ids.numpy()
    targets, weights = np.roll(ids_np, -1, axis=1), np.ones(ids_np.shape, np.float32)
    weights[:, -1] = 0

    def loss(params, dtype):
        logits = causal_lm_logits(params, m.cfg, ids_np, compute_dtype=dtype)
        total, count, _ = causal_lm_loss(logits, targets, weights)
        return total / count

    for dtype, rel in ((jax.numpy.float32, 1e-4), (jax.numpy.bfloat16, 0.05)):
        ours = to_hf_state_dict(jax.grad(loss)(m.params, dtype), m.cfg)
        assert set(ours) == set(ref)
        for name, g in ref.items():
            err = np.abs(np.asarray(ours[name]) - g).max()
            assert err <= rel * np.abs(g).max() + 1e-7, (dtype, name, err, np.abs(g).max())


def test_exported_tokenizer_loads_in_transformers(tiny_hf_folder, tmp_path):
    folder, _ = tiny_hf_folder("llama")
    m = load_model(str(folder))
    out = save_causal_lm(tmp_path / "export", m.cfg, m.params, m.tokenizer)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "Paris: 12 + 30 = 42 <|im_end|> naïve"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == m.tokenizer.encode(text)
    assert hf_tok.eos_token_id == m.tokenizer.eos_token_id
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 0)


def test_sharded_index_folders_load_and_export(tiny_hf_folder, tmp_path):
    sharded, model = tiny_hf_folder("qwen2", max_shard_size="100KB", name="sharded")
    assert len(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    single, _ = tiny_hf_folder("qwen2", name="single")
    a, b = load_model(str(sharded)), load_model(str(single))
    _assert_bitwise_equal(a.params, b.params)

    out = save_causal_lm(tmp_path / "export", a.cfg, a.params, a.tokenizer, max_shard_bytes=100_000)
    assert len(list(out.glob("model-*.safetensors"))) > 1 and not (out / "model.safetensors").exists()
    ids, mask = _batch(a.cfg.vocab_size)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert _max_diff(_torch_logits(reloaded, ids, mask), _torch_logits(model, ids, mask), mask) == 0.0
    _assert_bitwise_equal(load_model(str(out)).params, a.params)


def test_bfloat16_checkpoint_loads_exactly(tiny_hf_folder):
    folder, model = tiny_hf_folder("qwen2", dtype=torch.bfloat16)
    m = load_model(str(folder))
    q_ref = model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()
    got = np.asarray(m.params["model"]["layers"]["self_attn"]["q_proj"]["weight"][1])
    assert got.dtype == np.float32 and np.array_equal(got, q_ref)
    as_bf16 = load_model(str(folder), dtype=jax.numpy.bfloat16)
    assert as_bf16.params["model"]["norm"]["weight"].dtype == jax.numpy.bfloat16


@pytest.mark.parametrize("arch,num_labels", [("llama", 1), ("qwen2", 2)])
def test_reward_model_export_matches_transformers_token_classification(tiny_hf_folder, tmp_path, arch, num_labels):
    folder, _ = tiny_hf_folder(arch)
    m = load_model(str(folder), num_labels=num_labels)
    assert "lm_head" not in m.params
    assert not np.any(np.asarray(m.params["score"]["weight"]))  # fresh head: neutral until trained
    key_w, key_b = jax.random.split(jax.random.key(0))
    m.params["score"] = {
        "weight": 0.3 * jax.random.normal(key_w, (num_labels, m.cfg.hidden_size)),
        "bias": 0.3 * jax.random.normal(key_b, (num_labels,)),
    }
    head = RewardHead("ppm" if num_labels == 1 else "prm")
    out = save_reward_model(tmp_path / "rm", m.cfg, m.params, m.tokenizer, head)
    hf = transformers.AutoModelForTokenClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == ("Llama" if arch == "llama" else "Qwen2") + "ForTokenClassification"
    assert hf.config.num_labels == num_labels
    ids, mask = _batch(m.cfg.vocab_size)
    ref = _torch_logits(hf, ids, mask)
    ours = reward_logits(m.params, m.cfg, ids.numpy(), mask.numpy())
    assert ours.shape == (2, 12, num_labels) and ref.std() > 0.1
    assert _max_diff(ours, ref, mask) <= 1e-4

    again = load_model(str(out))  # the label count and the head kind are read back from the exported config
    assert again.num_labels == num_labels and again.head == head
    _assert_bitwise_equal(again.params, m.params)


def test_reward_model_from_transformers_loads_with_its_head(tiny_hf_folder):
    folder, model = tiny_hf_folder("llama", num_labels=2)
    m = load_model(str(folder))
    assert m.num_labels == 2 and m.head == RewardHead("prm")  # two labels without a record: a PRM
    ids, mask = _batch(m.cfg.vocab_size)
    ours = reward_logits(m.params, m.cfg, ids.numpy(), mask.numpy())
    assert _max_diff(ours, _torch_logits(model, ids, mask), mask) <= 1e-4


def test_convert_goes_through_the_param_tree(tiny_hf_folder, tmp_path):
    folder, model = tiny_hf_folder("llama", tie=True)
    out = convert(str(folder), tmp_path / "converted")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"
    ]
    ids, mask = _batch(416)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert _max_diff(_torch_logits(reloaded, ids, mask), _torch_logits(model, ids, mask), mask) == 0.0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind
