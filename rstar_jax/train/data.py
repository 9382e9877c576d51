"""Training data: the four JSONL record formats, tokenisation, packing / length bucketing, deterministic order.

Record formats (one JSON object per line):
  sft    {"prompt": str, "response": str}                          loss on response tokens (+ EOS) only
  ppm    {"prompt": str, "pos": str | [str], "neg": str | [str], "pos_count": int, "neg_count": int}
         pos/neg: the chosen / rejected step, or a list of steps (the earlier steps, then the step) encoded one
         by one as the scorer encodes a path; the score is read at the last token. The pair is weighted
         1/(pos_count*neg_count) (rStar-Math: every prefix contributes equally however many pairs it has)
  prm    {"prompt": str, "steps": [str], "labels": [float in [0, 1]]}   hard (0/1) or soft (MC fraction)
  value  {"prompt": str, "steps": [str], "values": [float]}             ReST-MCTS* quality values
Steps are tokenised one by one and concatenated, so each step's last token (where the score is read) is exact.

Order: the held-out split is by a seeded hash of the prompt (all records of a prompt land on the same side);
rows are built once, then every epoch shuffles them with a generator seeded by (seed, epoch). Batch `i` of
epoch `e` is a pure function of (files, config, e, i): resuming needs only the step number.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from rstar_jax.config import DataSection
from rstar_jax.reward import encode_steps


class DataFormatError(ValueError):
    """A malformed training record (message names file and line)."""


class TextEncoder(Protocol):
    def encode(self, text: str) -> list[int]: ...

    @property
    def eos_token_id(self) -> int | None: ...


_FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "sft": {"prompt": str, "response": str},
    "ppm": {"prompt": str, "pos": (str, list), "neg": (str, list), "pos_count": int, "neg_count": int},
    "prm": {"prompt": str, "steps": list, "labels": list},
    "value": {"prompt": str, "steps": list, "values": list},
}


def _check_record(rec: Any, kind: str, where: str) -> dict:
    if not isinstance(rec, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for name, tp in _FIELDS[kind].items():
        if name not in rec:
            raise DataFormatError(f"{where}: {kind} record is missing {name!r} (needs {', '.join(_FIELDS[kind])})")
        if not isinstance(rec[name], tp) or isinstance(rec[name], bool):
            expected = " or ".join(t.__name__ for t in (tp if isinstance(tp, tuple) else (tp,)))
            raise DataFormatError(f"{where}: {name!r} must be {expected}, got {type(rec[name]).__name__}")
    if kind == "ppm" and (rec["pos_count"] < 1 or rec["neg_count"] < 1):
        raise DataFormatError(f"{where}: pos_count and neg_count must be >= 1")
    if kind == "ppm" and any(isinstance(rec[k], list) and (not rec[k] or not all(isinstance(x, str) for x in rec[k]))
                             for k in ("pos", "neg")):
        raise DataFormatError(f"{where}: a list 'pos' / 'neg' must be a non-empty list of step strings")
    if kind in ("prm", "value"):
        targets = rec["labels" if kind == "prm" else "values"]
        if not rec["steps"] or len(targets) != len(rec["steps"]):
            raise DataFormatError(f"{where}: needs one target per step, got {len(rec['steps'])} steps, {len(targets)} targets")
        if not all(isinstance(s, str) for s in rec["steps"]):
            raise DataFormatError(f"{where}: 'steps' must be a list of strings")
        if not all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) for t in targets):
            raise DataFormatError(f"{where}: targets must be finite numbers")
        if kind == "prm" and not all(0.0 <= t <= 1.0 for t in targets):
            raise DataFormatError(f"{where}: PRM labels must lie in [0, 1]")
    return rec


def read_records(path: str | Path, kind: str) -> list[dict]:
    """Parse and validate a JSONL file of `kind` records; the first bad line is a one-line error."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise DataFormatError(f"{path}: cannot read training data ({e.strerror})") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        records.append(_check_record(rec, kind, f"{path}:{n}"))
    if not records:
        raise DataFormatError(f"{path}: no records")
    return records


def split_heldout(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) by a seeded hash of the prompt."""

    def u(prompt: str) -> float:
        digest = hashlib.sha256(f"{seed}\0{prompt}".encode()).digest()
        return int.from_bytes(digest[:8], "little") / 2**64

    held = [u(r["prompt"]) < fraction for r in records]
    return [r for r, h in zip(records, held) if not h], [r for r, h in zip(records, held) if h]


# ---------------------------------------------------------------------------------------------
# Examples: token-aligned arrays (sft / prm / value) or pairs (ppm)


@dataclasses.dataclass(frozen=True)
class Aligned:
    tokens: np.ndarray  # [n] int32
    targets: np.ndarray  # [n] next-token id (sft) or score target at step ends (prm / value)
    weights: np.ndarray  # [n] float32, 0 where no loss


@dataclasses.dataclass(frozen=True)
class Pair:
    pos: np.ndarray  # [n_pos] int32, prompt + positive step
    neg: np.ndarray  # [n_neg] int32, prompt + negative step
    weight: float


def _steps_example(tok: TextEncoder, rec: dict, targets: list[float]) -> Aligned:
    """Targets at each step's last token, located exactly as the inference-time scorer reads them."""
    ids, ends = encode_steps(tok, rec["prompt"], rec["steps"])
    tgt, w = np.zeros(len(ids), np.float32), np.zeros(len(ids), np.float32)
    for end, t in zip(ends, targets):
        if end >= 0:
            tgt[end], w[end] = float(t), 1.0
    return Aligned(np.asarray(ids, np.int32), tgt, w)


def pair_steps(rec: dict, side: str) -> list[str]:
    """A PPM record's `pos` or `neg` as its list of steps (a single string is one step)."""
    return [rec[side]] if isinstance(rec[side], str) else rec[side]


def tokenize(records: list[dict], kind: str, tok: TextEncoder, data: DataSection) -> list[Aligned | Pair]:
    """Examples from records. PRM targets are the record's `labels` as the labeller wrote them, hard or soft
    (`labels/mc.py`, `MCConfig.labels`): the hard rule (>= threshold of k completions correct) is the labeller's."""
    out: list[Aligned | Pair] = []
    for rec in records:
        if kind == "sft":
            prompt, response = tok.encode(rec["prompt"]), tok.encode(rec["response"])
            eos = [] if tok.eos_token_id is None else [tok.eos_token_id]
            ids = np.asarray(prompt + response + eos, np.int32)
            weights = np.zeros(len(ids), np.float32)
            weights[max(len(prompt) - 1, 0) : len(ids) - 1] = 1.0  # position t predicts token t+1
            out.append(Aligned(ids, np.append(ids[1:], 0).astype(np.int32), weights))
        elif kind == "ppm":
            pos, neg = pair_steps(rec, "pos"), pair_steps(rec, "neg")
            out.append(Pair(np.asarray(encode_steps(tok, rec["prompt"], pos)[0], np.int32),
                            np.asarray(encode_steps(tok, rec["prompt"], neg)[0], np.int32),
                            1.0 / (rec["pos_count"] * rec["neg_count"])))
        elif kind == "prm":
            out.append(_steps_example(tok, rec, rec["labels"]))
        else:
            out.append(_steps_example(tok, rec, rec["values"]))
    return out


def example_len(ex: Aligned | Pair) -> int:
    return max(len(ex.pos), len(ex.neg)) if isinstance(ex, Pair) else len(ex.tokens)


# ---------------------------------------------------------------------------------------------
# Rows and batches


def pack(examples: list[Aligned], seq_len: int) -> list[list[Aligned]]:
    """Next-fit packing in the given order: a row takes examples until the next one does not fit."""
    rows: list[list[Aligned]] = []
    used = seq_len
    for ex in examples:
        if used + len(ex.tokens) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(ex)
        used += len(ex.tokens)
    return rows


def bucket_lengths(data: DataSection) -> list[int]:
    return sorted({-(-data.seq_len * (i + 1) // data.num_buckets) for i in range(data.num_buckets)})


def _fill_aligned(rows: list[list[Aligned]], B: int, T: int, kind: str) -> dict[str, np.ndarray]:
    ids = np.zeros((B, T), np.int32)
    pos, seg = np.zeros_like(ids), np.zeros_like(ids)
    tgt = np.zeros((B, T), np.int32 if kind == "sft" else np.float32)
    w = np.zeros((B, T), np.float32)
    for r, row in enumerate(rows):
        off = 0
        for k, ex in enumerate(row, 1):
            n = len(ex.tokens)
            sl = slice(off, off + n)
            ids[r, sl], pos[r, sl], seg[r, sl] = ex.tokens, np.arange(n), k
            tgt[r, sl], w[r, sl] = ex.targets, ex.weights
            off += n
    return {"input_ids": ids, "positions": pos, "segment_ids": seg, "targets": tgt, "weights": w}


def _fill_pairs(rows: list[list[Pair]], B: int, T: int) -> dict[str, np.ndarray]:
    ids = np.zeros((B, 2, T), np.int32)
    pos, seg = np.zeros_like(ids), np.zeros_like(ids)
    last = np.zeros((B, 2), np.int32)
    w = np.zeros((B,), np.float32)
    for r, (ex,) in enumerate(rows):
        for j, seq in enumerate((ex.pos, ex.neg)):
            n = len(seq)
            ids[r, j, :n], pos[r, j, :n], seg[r, j, :n], last[r, j] = seq, np.arange(n), 1, n - 1
        w[r] = ex.weight
    return {"input_ids": ids, "positions": pos, "segment_ids": seg, "last": last, "weights": w}


@dataclasses.dataclass
class Batches:
    """Deterministically ordered batches over fixed rows; each batch is `[A, B/A, ...]` numpy arrays."""

    kind: str
    rows: tuple[tuple[Any, ...], ...]
    row_bucket: tuple[int, ...]  # padded length of each row
    batch_size: int
    grad_accum: int
    seed: int
    dropped: int  # examples longer than seq_len (skipped)
    _plans: dict[int, list[list[int]]] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def steps_per_epoch(self) -> int:
        counts = np.bincount(self.row_bucket) if self.rows else np.zeros(0, int)
        return int(sum(-(-c // self.batch_size) for c in counts if c))

    def plan(self, epoch: int) -> list[list[int]]:
        """Row indices of every batch of `epoch`, in order."""
        rng = np.random.default_rng([self.seed, epoch])
        lengths = np.asarray(self.row_bucket)
        batches = []
        for T in sorted(set(self.row_bucket)):
            idx = np.flatnonzero(lengths == T)
            idx = idx[rng.permutation(len(idx))]
            batches += [idx[i : i + self.batch_size].tolist() for i in range(0, len(idx), self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def batch(self, row_ids: list[int]) -> dict[str, np.ndarray]:
        T = self.row_bucket[row_ids[0]]
        rows = [self.rows[i] for i in row_ids]
        full = _fill_pairs(rows, self.batch_size, T) if self.kind == "ppm" else _fill_aligned(rows, self.batch_size, T, self.kind)
        A = self.grad_accum
        return {k: v.reshape(A, self.batch_size // A, *v.shape[1:]) for k, v in full.items()}

    def at_step(self, step: int) -> dict[str, np.ndarray]:
        epoch, i = divmod(step, self.steps_per_epoch)
        return self.batch(self._cached_plan(epoch)[i])

    def _cached_plan(self, epoch: int) -> list[list[int]]:
        if epoch not in self._plans:
            self._plans.clear()
            self._plans[epoch] = self.plan(epoch)
        return self._plans[epoch]


def build_batches(examples: list[Aligned | Pair], kind: str, data: DataSection) -> Batches:
    """Rows (packed or one example each), each padded to the smallest bucket that holds it."""
    kept = [ex for ex in examples if example_len(ex) <= data.seq_len]
    if kind != "ppm" and data.layout == "pack":
        order = np.random.default_rng([data.seed, 2**31 - 1]).permutation(len(kept))
        rows = [tuple(r) for r in pack([kept[i] for i in order], data.seq_len)]
        buckets = [data.seq_len] * len(rows)
    else:
        rows = [(ex,) for ex in kept]
        lengths = bucket_lengths(data)
        buckets = [next(L for L in lengths if L >= example_len(ex)) for ex in kept]
    return Batches(kind, tuple(rows), tuple(buckets), data.batch_size, data.grad_accum, data.seed, len(examples) - len(kept))
