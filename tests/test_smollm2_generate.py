"""SmolLM2-135M: `rstar-jax generate` greedy equals transformers' greedy generate on the same weights."""

import json

import pytest

PROMPTS = [
    "The capital of France is",
    "Q: Tom has 3 apples and buys 5 more. How many apples does he have?\nA:",
    "def is_prime(n):",
    "Write a short poem about the sea.",
    "Solve 2x + 6 = 14 step by step.",
    "The three laws of motion are",
    "# Python: print the squares of 1..5\n",
    "Translate to French: Good morning, how are you?",
    "A rectangle has sides 4 and 7. Its area is",
    "Once upon a time",
]


@pytest.mark.slow
def test_cli_greedy_matches_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rstar_jax.cli import main
    from rstar_jax.models.registry import resolve

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", "smollm2-135m", "--prompts", str(prompts), "--max-new-tokens", "64",
                 "--temperature", "0", "--no-chat", "--out", str(out)]) == 0
    ours = [json.loads(line)["completions"][0]["token_ids"] for line in out.read_text().splitlines()]

    folder = resolve("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    same = 0
    for p, mine in zip(PROMPTS, ours):
        ids = tok(p, return_tensors="pt")
        with torch.inference_mode():
            ref = hf.generate(**ids, max_new_tokens=64, do_sample=False, pad_token_id=tok.eos_token_id)
        same += ref[0, ids["input_ids"].shape[1]:].tolist() == mine
    assert same >= 9, f"only {same}/10 prompts token-identical"
