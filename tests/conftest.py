"""Shared test setup: fake CPU devices, a tiny tokenizer, tiny random HF models (nothing downloaded)."""

# --- 8 fake CPU devices for the sharding tests (train). Runs before any test module starts a JAX backend. ---
import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("RSTAR_JAX_XLA_CACHE", "0")  # tests compile tiny models; keep the on-disk XLA cache clean
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", int(os.environ["JAX_NUM_CPU_DEVICES"]))
# --- end of the fake-device block ---

# --- tiny tokenizer and tiny random HF models (models / hf_io tests) ---
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_TOKENIZER_VOCAB = 400
_CORPUS = [
    "The capital of France is Paris. 12 + 30 = 42, and 7 * 6 = 42 as well.",
    "def solve(x):\n    return x ** 2 - 3 * x + 2  # roots at 1 and 2\n",
    "Let $f(x) = \\frac{1}{x}$. Then \\boxed{f(2) = 0.5}.",
    "Natalia sold clips to 48 of her friends in April, and then half as many in May.",
    "Über naïve café: ½ of 10 is 5; 三角形 has 3 sides.",
]


def build_tiny_tokenizer():
    """A SmolLM2-style byte-level BPE (digits split one by one) trained on a few sentences; ChatML template."""
    import tokenizers
    from tokenizers import decoders, pre_tokenizers, processors, trainers

    from rstar_jax.models.tokenizer import Tokenizer

    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_TOKENIZER_VOCAB, special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return Tokenizer(backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
                     chat_template=CHATML_TEMPLATE, source="tiny tokenizer")


@pytest.fixture
def tiny_tokenizer():
    return build_tiny_tokenizer()


def _randomize(model, seed: int) -> None:
    """Replace HF's small init (std 0.02) by larger values so that wiring bugs move logits far beyond 1e-4."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.2 * noise)
            else:
                p.copy_(0.15 * noise)


def build_tiny_hf_model(arch: str = "llama", tie: bool = False, num_labels: int | None = None, seed: int = 0):
    """A random torch `{Llama,Qwen2}For{CausalLM,TokenClassification}` with GQA (4 query heads, 2 kv heads)."""
    torch = pytest.importorskip("torch")
    import transformers

    kind = "ForCausalLM" if num_labels is None else "ForTokenClassification"
    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[arch]
    extra = {"num_labels": num_labels} if num_labels is not None else {}
    config = config_cls(
        vocab_size=TINY_TOKENIZER_VOCAB + 16, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=500.0, rms_norm_eps=1e-5,
        max_position_embeddings=128, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        **extra,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, ("Llama" if arch == "llama" else "Qwen2") + kind)(config).eval()
    _randomize(model, seed)
    return model


@pytest.fixture
def tiny_hf_folder(tmp_path):
    """Factory: save a tiny random HF model plus the tiny tokenizer; returns (folder, torch model)."""

    def make(arch="llama", tie=False, num_labels=None, seed=0, max_shard_size=None, dtype=None, name="hf", head=None):
        """`head`: a RewardHead to record in config.json (a 1-label head says whether it is a PPM or a value model)."""
        import json

        model = build_tiny_hf_model(arch, tie, num_labels, seed)
        if dtype is not None:
            model = model.to(dtype)
        folder = tmp_path / name
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(folder, **kwargs)
        build_tiny_tokenizer().save(folder)
        if head is not None:
            config = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps(config | head.to_hf()))
        return folder, model

    return make

_GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}
_GGUF_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                   "lm_head.weight": "output.weight"}


def _llama_cpp_permute(w, n_heads: int):
    """What llama.cpp's converter does to llama q/k rows: each head's two halves become interleaved pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, model, tokenizer, arch="llama", pre="smollm", add_bos=False, tokenizer_model="gpt2"):
    """Write a torch HF model as llama.cpp would: F32 norms/biases, F16 embeddings, Q8_0 in layer 0, Q4_1 in
    layer 1, llama q/k rows permuted, tokenizer in the metadata. Returns the HF-layout weights a correct reader
    must recover (the library's own quantize -> dequantize round trip of each source tensor)."""
    import json

    import gguf
    import numpy as np

    Q = gguf.GGMLQuantizationType
    cfg = model.config
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    spec = json.loads(tokenizer.backend.to_str())
    tokens = [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])]
    tokens += [f"<unused{i}>" for i in range(cfg.vocab_size - len(tokens))]  # GGUF vocab = embedding rows
    special = {a["content"] for a in spec["added_tokens"]}
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]])
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(tokenizer.chat_template)
    expected = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        arr = tensor.float().numpy()
        if hf_name.endswith(("norm.weight", ".bias")):
            qtype = Q.F32
        elif hf_name == "model.embed_tokens.weight":
            qtype = Q.F16
        else:
            qtype = Q.Q4_1 if ".layers.1." in hf_name else Q.Q8_0
        if qtype in (Q.F32, Q.F16):
            expected[hf_name] = arr.astype(np.float16 if qtype == Q.F16 else np.float32).astype(np.float32)
        else:
            expected[hf_name] = gguf.quants.dequantize(gguf.quants.quantize(arr, qtype), qtype)
        if arch == "llama" and ("q_proj" in hf_name or "k_proj" in hf_name):
            arr = _llama_cpp_permute(arr, cfg.num_attention_heads if "q_proj" in hf_name else cfg.num_key_value_heads)
        if hf_name.startswith("model.layers."):
            _, _, i, sub = hf_name.split(".", 3)
            name = f"blk.{i}.{_GGUF_LAYER_NAMES[sub]}"
        else:
            name = _GGUF_TOP_NAMES[hf_name]
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(name, arr.astype(np.float16 if qtype == Q.F16 else np.float32))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected
# --- end of the tiny-model block ---
