"""`run_training`: config -> mesh -> sharded state (fresh or restored) -> steps, eval, metrics, checkpoints.

Outputs in `out/`: `metrics.jsonl` (one JSON object per train log / eval), `run.json`, `tokenizer/`,
`checkpoints/<step>/`. Rerunning the same command resumes from the latest finished checkpoint.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from rstar_jax.config import Config, RunConfigError, load_config, to_dict
from rstar_jax.models.config import ModelConfig
from rstar_jax import sharding
from rstar_jax.train.checkpoint import Checkpointer
from rstar_jax.train.data import Batches, build_batches, read_records, split_heldout, tokenize
from rstar_jax.train.losses import KINDS
from rstar_jax.train.model_source import load_for_training
from rstar_jax.train.state import (
    abstract_params,
    abstract_state,
    compile_step,
    init_state,
    make_eval_step,
    make_optimizer,
    make_train_step,
    state_shardings,
)


FEW_STEPS = 10  # a run with fewer optimizer steps barely moves the weights: say so


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    return max(1, cfg.train.min_steps, math.ceil(cfg.train.epochs * steps_per_epoch))


def plan_line(kind: str, cfg: Config, examples: int, train: Batches, steps: int) -> str:
    """The run's first line: examples, rows, steps and epochs, and which setting decided the number of steps."""
    t = cfg.train
    by = (f"train.max_steps={t.max_steps}" if t.max_steps > 0
          else f"train.min_steps={t.min_steps}" if t.min_steps > math.ceil(t.epochs * train.steps_per_epoch)
          else f"train.epochs={t.epochs:g}")
    epochs = steps / train.steps_per_epoch
    return (f"{kind}: {examples} examples in {len(train.rows)} rows of up to {cfg.data.seq_len} tokens "
            f"({train.dropped} longer ones dropped), {train.steps_per_epoch} steps per epoch of data.batch_size="
            f"{cfg.data.batch_size} rows: {steps} step{'s' * (steps != 1)} = {epochs:.3g} epoch{'s' * (epochs != 1)} "
            f"({by})")


class MetricsLog:
    """Appends JSON lines (process 0 only); on resume, drops lines past the restored step."""

    def __init__(self, path: Path, resume_step: int):
        self.path, self.enabled = path, jax.process_index() == 0
        if self.enabled and path.exists():
            kept = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= resume_step]
            path.write_text("".join(l + "\n" for l in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def evaluate(eval_fn, params, data: Batches, mesh, max_batches: int) -> dict[str, float]:
    """Mean loss and stats over up to `max_batches` held-out batches (fixed order)."""
    totals: dict[str, float] = {}
    for row_ids in data.plan(0)[:max_batches]:
        loss_sum, weight_sum, stats = jax.device_get(eval_fn(params, sharding.put_batch(data.batch(row_ids), mesh)))
        for k, v in {"loss": loss_sum, "weight": weight_sum, **stats}.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    w = max(totals.pop("weight", 0.0), 1e-9)
    return {k: v / w for k, v in totals.items()}


def run_training(kind: str, model: str, data: str, out: str, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Train `kind` on the JSONL `data`, writing to `out`; returns the last train and eval metrics and the
    number of tokens trained on over the whole run."""
    if kind not in KINDS:
        raise RunConfigError(f"training kind {kind!r}: expected one of {', '.join(KINDS)}")
    cfg = load_config(list(overrides))
    sharding.init_distributed()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)

    model_cfg, params0, tokenizer = load_for_training(model, kind, cfg)
    train_recs, eval_recs = split_heldout(read_records(data, kind), cfg.data.eval_fraction, cfg.data.seed)
    train = build_batches(tokenize(train_recs, kind, tokenizer, cfg.data), kind, cfg.data)
    held = build_batches(tokenize(eval_recs, kind, tokenizer, cfg.data), kind, cfg.data) if eval_recs else None
    if not train.rows:
        raise RunConfigError(f"{data}: no training example fits data.seq_len={cfg.data.seq_len}")
    steps = total_steps(cfg, train.steps_per_epoch)
    say(plan_line(kind, cfg, len(train_recs), train, steps))
    if steps < FEW_STEPS:
        say(f"warning: only {steps} optimizer step{'s' * (steps != 1)}: the weights will barely move (raise train.min_steps or "
            "train.epochs, or lower data.batch_size)")

    mesh = sharding.make_mesh(cfg.mesh)
    optimizer = make_optimizer(cfg.optim, steps)
    shardings = state_shardings(abstract_params(model_cfg, kind), optimizer, mesh, cfg.mesh.min_shard_elements)
    ckpt = Checkpointer(out_dir / "checkpoints", cfg.train.keep_checkpoints, cfg.train.async_checkpoints)
    if jax.process_index() == 0:
        run_info = {"kind": kind, "model": model, "data": str(data), "model_config": model_cfg.to_hf_dict(), "config": to_dict(cfg)}
        (out_dir / "run.json").write_text(json.dumps(run_info, indent=2) + "\n")
        tokenizer.save(out_dir / "tokenizer")

    with jax.set_mesh(mesh):
        latest = ckpt.latest_step()
        if latest is None:
            state = init_state(params0, optimizer, shardings)
        else:
            state, meta = ckpt.restore(latest, abstract_state(model_cfg, kind, optimizer, shardings))
            if meta["kind"] != kind:
                raise RunConfigError(f"{out_dir}: holds a {meta['kind']} run; cannot resume it as {kind}")
        del params0  # the host copy: the state holds the parameters now
        start = int(jax.device_get(state.step))
        log = MetricsLog(out_dir / "metrics.jsonl", start)
        step_fn = compile_step(make_train_step(kind, model_cfg, cfg, optimizer, steps), shardings, mesh, train.at_step(0))
        replicated = NamedSharding(mesh, PartitionSpec())
        eval_fn = jax.jit(make_eval_step(kind, model_cfg, cfg), in_shardings=(shardings.params, None), out_shardings=replicated)

        def meta_for(step: int) -> dict[str, Any]:
            epoch, index = divmod(step, train.steps_per_epoch)
            return {"kind": kind, "model": model, "data_seed": cfg.data.seed, "epoch": epoch, "batch_index": index,
                    "config": to_dict(cfg)}

        # XLA:CPU can deadlock when two multi-device programs (train, eval) overlap in its in-process collectives.
        sync_each_step = jax.default_backend() == "cpu" and mesh.size > 1
        last: dict[str, Any] = {}
        # tokens of all steps so far, recounted from the deterministic data order when resuming
        total_tokens = sum(int(np.count_nonzero(train.at_step(s)["segment_ids"])) for s in range(start))
        tokens, t0 = 0, time.perf_counter()
        say(f"{kind}: {'resuming at' if start else 'starting'} step {start} of {steps}, mesh {dict(mesh.shape)}")
        if held is not None and start == 0:  # the baseline, so a run shows how far held-out loss moved
            ev = evaluate(eval_fn, state.params, held, mesh, cfg.data.max_eval_batches)
            log.write({"step": 0, "split": "eval", **ev})
            say("eval @ 0: " + " ".join(f"{k} {v:.4f}" for k, v in ev.items()))
        for step in range(start, steps):
            host_batch = train.at_step(step)
            tokens += int(np.count_nonzero(host_batch["segment_ids"]))
            total_tokens += int(np.count_nonzero(host_batch["segment_ids"]))
            state, metrics = step_fn(state, sharding.put_batch(host_batch, mesh))
            if sync_each_step:
                jax.block_until_ready(metrics)
            done = step + 1
            if done % cfg.train.log_every == 0 or done == steps:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                dt = time.perf_counter() - t0
                last = {"step": done, "split": "train", **m, "tokens_per_s": tokens / dt}
                log.write(last)
                say(f"step {done}/{steps} loss {m['loss']:.4f} lr {m['lr']:.2e} gnorm {m['grad_norm']:.3f} "
                    f"tok/s {tokens / dt:,.0f}")
                tokens, t0 = 0, time.perf_counter()
            if held is not None and ((cfg.train.eval_every and done % cfg.train.eval_every == 0) or done == steps):
                ev = evaluate(eval_fn, state.params, held, mesh, cfg.data.max_eval_batches)
                log.write({"step": done, "split": "eval", **ev})
                say(f"eval @ {done}: " + " ".join(f"{k} {v:.4f}" for k, v in ev.items()))
                last["eval"] = ev
            if done % cfg.train.save_every == 0 or done == steps:
                ckpt.save(state, meta_for(done))
        ckpt.wait()
        ckpt.close()
    return last | {"tokens_trained": total_tokens}


def lower_step(cfg: Config, kind: str, model_cfg: ModelConfig, devices: list | None = None) -> jax.stages.Lowered:
    """Lower one train step from abstract state and batch (nothing allocated): catches config typos before a pod run."""
    mesh = sharding.make_mesh(cfg.mesh, devices)
    optimizer = make_optimizer(cfg.optim, 1000)
    shardings = state_shardings(abstract_params(model_cfg, kind), optimizer, mesh, cfg.mesh.min_shard_elements)
    A, b, T = cfg.data.grad_accum, cfg.data.micro_batch_size, cfg.data.seq_len
    rows = (A, b, 2, T) if kind == "ppm" else (A, b, T)
    batch = {k: np.zeros(rows, np.int32) for k in ("input_ids", "positions", "segment_ids")}
    if kind == "ppm":
        batch.update(last=np.zeros((A, b, 2), np.int32), weights=np.zeros((A, b), np.float32))
    else:
        batch.update(targets=np.zeros(rows, np.int32 if kind == "sft" else np.float32), weights=np.zeros(rows, np.float32))
    step = compile_step(make_train_step(kind, model_cfg, cfg, optimizer, 1000), shardings, mesh, batch)
    with jax.set_mesh(mesh):
        abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
        return step.lower(abstract_state(model_cfg, kind, optimizer, shardings), abstract_batch)


def say(line: str) -> None:
    if jax.process_index() == 0:
        print(line, file=sys.stderr, flush=True)
