"""The `generate` job: prompts in, completions out as JSONL, resumable, in batches with a progress bar."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

import jax
from tqdm import tqdm

from rstar_jax.jsonl import InputError, ResumableJsonl, iter_jsonl
from rstar_jax.engine import SamplingConfig, generate, prepare


def read_prompts(path: str | Path) -> list[str]:
    prompts = []
    for n, obj in iter_jsonl(path, required=("prompt",)):
        if not isinstance(obj["prompt"], str) or not obj["prompt"]:
            raise InputError(f"{path}:{n}: 'prompt' must be a non-empty string")
        prompts.append(obj["prompt"])
    return prompts


def encode_prompts(tokenizer, prompts: Sequence[str], chat: bool) -> list[list[int]]:
    """Token ids as `tokenizer(text)` gives them in transformers; `chat` wraps each prompt as one user turn."""
    if chat:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]
        return [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    return [tokenizer.encode(p, add_special_tokens=True) for p in prompts]


def run_generate(
    model_spec: str,
    prompts: list[str],
    settings: SamplingConfig,
    *,
    chat: bool = False,
    seed: int = 0,
    compute_dtype: Any = "float32",
    out: str | None = None,
    batch_size: int = 16,
) -> None:
    """Batch `i` uses key fold_in(seed, i); with `out`, finished batches are kept and a rerun resumes after them."""
    from rstar_jax.models.hf_io import load_model  # deferred: model I/O pulls in transformers

    lm = load_model(model_spec, dtype="float32")  # first, so a bad model leaves no output file behind
    writer = ResumableJsonl(out) if out else None
    done = len(writer.records) if writer else 0
    if writer and [r.get("prompt") for r in writer.records] != prompts[:done]:
        raise InputError(f"{out}: existing output does not match these prompts; choose another --out")
    model = prepare(lm.params, lm.cfg, compute_dtype)
    ids = encode_prompts(lm.tokenizer, prompts, chat)
    key = jax.random.key(seed)
    starts = range(done - done % batch_size, len(prompts), batch_size)
    for start in tqdm(starts, desc="generate", unit="batch", disable=len(starts) < 2, file=sys.stderr):
        batch = ids[start : start + batch_size]
        results = generate(model, lm.tokenizer, batch, settings, jax.random.fold_in(key, start // batch_size))
        for i, comps in enumerate(results, start):
            if i < done:
                continue
            record = {"prompt": prompts[i], "completions": [c.to_json() for c in comps]}
            if writer:
                writer.append(record)
            else:
                print(json.dumps(record, ensure_ascii=False), flush=True)
    if writer:
        writer.close()
