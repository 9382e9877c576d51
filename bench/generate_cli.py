"""A user's whole command: `rstar-jax generate` on 16 prompts (greedy, 128 new tokens) as a process of its own
(start-up, model load, compilation or the persistent compilation cache, generation), against a transformers
script doing the same, each timed from process start to exit.

The first rstar-jax run starts from an empty compilation cache (cold); the later ones find it warm, as a user's
second run does. The transformers script loads the same converted HF folder and generates for the same prompts
as one padded batch.

    python bench/generate_cli.py [--runs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import PROMPTS  # noqa: E402

HF_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, prompts, n = sys.argv[1], [l.strip() for l in open(sys.argv[2])], int(sys.argv[3])
torch.set_num_threads(torch.get_num_threads())
tok = AutoTokenizer.from_pretrained(folder)
tok.padding_side = "left"
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
import json
texts = [json.loads(p)["prompt"] for p in prompts]
batch = tok(texts, return_tensors="pt", padding=True)
with torch.inference_mode():
    out = model.generate(**batch, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
for row in out:
    print(json.dumps(tok.decode(row[batch["input_ids"].shape[1]:], skip_special_tokens=True)))
"""


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"{cmd[0]} failed:\n{r.stderr[-2000:]}")
    return wall, r.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=2, help="rstar-jax runs after the cold one, and transformers runs")
    a = ap.parse_args()
    from rstar_jax.models.registry import resolve

    folder = resolve(a.model)
    work = Path(tempfile.mkdtemp(prefix="generate_cli_"))
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    env = {**os.environ, "RSTAR_JAX_XLA_CACHE": str(work / "xla")}  # a fresh compilation cache: the first run is cold
    ours = [sys.executable, "-m", "rstar_jax.cli", "generate", "--model", a.model, "--prompts", str(prompts),
            "--max-new-tokens", str(a.new_tokens), "--temperature", "0"]
    theirs = [sys.executable, "-c", HF_SCRIPT, str(folder), str(prompts), str(a.new_tokens)]
    rows = []
    for i in range(a.runs + 1):
        wall, _ = timed(ours, env)
        rows.append(("rstar-jax generate" + (" (cold cache)" if i == 0 else " (warm cache)"), wall))
        print(f"{rows[-1][0]}: {wall:.1f} s", flush=True)
    for _ in range(a.runs):
        wall, _ = timed(theirs, env)
        rows.append(("transformers script", wall))
        print(f"transformers script: {wall:.1f} s", flush=True)
    hf = min(w for name, w in rows if name.startswith("transformers"))
    print(f"\n16 prompts, greedy, {a.new_tokens} new tokens, whole processes, {os.cpu_count()} cores; ratio = the "
          f"fastest transformers run / this run\n")
    print("| run | wall s | ratio |")
    print("|---|---:|---:|")
    for name, wall in rows:
        print(f"| {name} | {wall:.1f} | {hf / wall:.2f}x |")


if __name__ == "__main__":
    main()
