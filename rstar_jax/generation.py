"""The `generate` job: prompts in, completions out as JSONL, resumable, in batches with a progress bar.

With `out`, the settings that shape the completions are kept next to it (`OUT.settings.json`) before the first
record is written; a rerun into the same file resumes only with the same settings and prompts.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from rstar_jax.config import InferenceConfig, RunConfigError, at_least, to_dict
from rstar_jax.jsonl import InputError, ResumableJsonl, check_output_file, iter_jsonl, keep_settings
from rstar_jax.engine.api import SamplingConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerateConfig(InferenceConfig):
    model: str  # HF folder, .gguf file, or alias (smollm2-135m)
    prompt: str = ""  # one prompt, or:
    prompts: str = ""  # a JSONL file of {"prompt": ...}
    out: str = ""  # output JSONL (resumable); stdout when empty
    sampling: SamplingConfig = SamplingConfig()
    chat: bool | None = None  # wrap each prompt as a user turn; None: when the tokenizer has a chat template
    seed: int = 0
    batch_size: int = 16  # prompts per sampler call (batch i samples with key fold_in(seed, i))

    def __post_init__(self):
        if bool(self.prompt) == bool(self.prompts):
            raise RunConfigError("generate: give exactly one of prompt (--prompt TEXT) and prompts (--prompts FILE)")
        at_least(1, batch_size=self.batch_size)


def read_prompts(path: str | Path) -> list[str]:
    prompts = []
    for n, obj in iter_jsonl(path, required=("prompt",)):
        if not isinstance(obj["prompt"], str) or not obj["prompt"]:
            raise InputError(f"{path}:{n}: 'prompt' must be a non-empty string")
        prompts.append(obj["prompt"])
    return prompts


def use_chat(tokenizer, chat: bool | None) -> bool:
    """`chat`, or by default whether the tokenizer has a chat template (an instruct model answers a bare prompt
    with its end-of-turn token)."""
    return bool(tokenizer.chat_template) if chat is None else chat


def encode_prompts(tokenizer, prompts: Sequence[str], chat: bool) -> list[list[int]]:
    """Token ids as `tokenizer(text)` gives them in transformers; `chat` wraps each prompt as one user turn."""
    if chat:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]
        return [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    return [tokenizer.encode(p, add_special_tokens=True) for p in prompts]


def _settings(cfg: GenerateConfig, chat: bool) -> dict[str, Any]:
    """What shapes the completions (everything but the input and output paths)."""
    return {k: v for k, v in to_dict(cfg).items() if k not in ("prompt", "prompts", "out")} | {"chat": chat}


def _check_settings(out: str, settings: dict[str, Any]) -> None:
    """Refuse to append to completions made with other settings; record them for a new file."""
    path = Path(f"{out}.settings.json")
    if not path.is_file() and Path(out).is_file() and Path(out).stat().st_size:
        raise InputError(f"--out {out}: holds records with no settings file ({path.name}); choose another --out")
    keep_settings(path, settings, out, "completions made")


def run_generate(cfg: GenerateConfig) -> None:
    """Batch `i` uses key fold_in(seed, i); with `out`, finished batches are kept and a rerun resumes after them."""
    import jax
    from tqdm import tqdm

    from rstar_jax import runtime
    from rstar_jax.engine import generate
    from rstar_jax.engine.model import load_policy

    prompts = [cfg.prompt] if cfg.prompt else read_prompts(cfg.prompts)
    if cfg.out:
        check_output_file(cfg.out)
    rt = runtime.start(cfg.mesh)
    lm, model = load_policy(cfg.model, cfg, rt.mesh)  # before any output, so a bad model leaves no file behind
    chat = use_chat(lm.tokenizer, cfg.chat)
    ids = encode_prompts(lm.tokenizer, prompts, chat)
    lm.cfg.check_positions(max(map(len, ids)) + cfg.sampling.max_new_tokens,
                           f"sampling.max_new_tokens={cfg.sampling.max_new_tokens} after the longest prompt")
    writer = None
    if cfg.out:
        _check_settings(cfg.out, _settings(cfg, chat))
        writer = ResumableJsonl(cfg.out)
    done = len(writer.records) if writer else 0
    if writer and [r.get("prompt") for r in writer.records] != prompts[:done]:
        raise InputError(f"--out {cfg.out}: existing output does not match these prompts; choose another --out")
    key = jax.random.key(cfg.seed)
    starts = range(done - done % cfg.batch_size, len(prompts), cfg.batch_size)
    for start in tqdm(starts, desc="generate", unit="batch", disable=len(starts) < 2, file=sys.stderr):
        batch = ids[start : start + cfg.batch_size]
        results = generate(model, lm.tokenizer, batch, cfg.sampling, jax.random.fold_in(key, start // cfg.batch_size),
                           base=cfg.engine)
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
