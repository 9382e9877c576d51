"""Stops found on device: EOS ids and stop strings as token patterns, matched against each sample's last tokens.

A stop string can come out of the model as more than one token sequence, because BPE merges its first and last
characters with the text around it (SmolLM2 writes `<end_of_step>` as `<`, ` <` or `.<`, then `end _ of _ step`,
then `>`, `>.` or `>\\n`). So a string of n >= 2 tokens (its encoding alone) becomes one pattern: any token whose
text ends with the first token's text, the n - 2 middle tokens exactly, then any token whose text starts with the
last token's text; every match contains the string. A one-token string matches any token whose text contains it.
"Any token whose text ..." is a token class: a boolean row over the vocabulary. EOS ids are one-token patterns.

A sample stops on device as soon as its last tokens match a pattern its request asked for, and frees its slot
without the host reading its tokens. What the table cannot hold (too many patterns or classes, too long a string)
the host still finds: requests with such strings are checked after every decode call (`Engine`). Either way the
finished text is cut right after the first stop string (`finish`), as the strings alone define it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

MAX_CLASSES = 8


class StopTable(NamedTuple):
    """Device patterns, right-aligned in J columns; a column is an exact token, a token class, or free (pad)."""

    exact_MxJ: jax.Array  # int32 token id, -1: not an exact column
    cls_MxJ: jax.Array  # int32 class row, -1: not a class column
    classes_CxV: jax.Array  # bool token classes
    used_M: jax.Array  # bool


@functools.lru_cache(maxsize=4)
def token_texts(tokenizer) -> tuple[str, ...]:
    """Each vocabulary entry decoded alone (once per tokenizer)."""
    return tuple(tokenizer.decode([i]) for i in range(tokenizer.vocab_size))


class StopRegistry:
    """Host side of the table: which row holds which pattern, and which stop strings are fully on device."""

    def __init__(self, tokenizer, rows: int, width: int, vocab_size: int):
        self.tokenizer, self.rows, self.width, self.vocab_size = tokenizer, rows, width, vocab_size
        self.patterns: list[tuple[tuple[str, object], ...]] = []  # ("id", token) | ("class", key) per column
        self.classes: dict[tuple[str, str], np.ndarray] = {}  # (how, text) -> [V] bool
        self.row_of: dict[object, int | None] = {}  # a string or ("eos", id) -> its row (None: host-checked)

    def _class(self, how: str, text: str) -> tuple[str, str] | None:
        key = (how, text)
        if key not in self.classes:
            if len(self.classes) >= MAX_CLASSES:
                return None
            test = {"ends": str.endswith, "starts": str.startswith, "contains": str.__contains__}[how]
            row = np.zeros(self.vocab_size, bool)
            row[[i for i, t in enumerate(token_texts(self.tokenizer)) if test(t, text)]] = True
            self.classes[key] = row
        return key

    def _add(self, key: object, columns: list[tuple[str, object]] | None) -> int | None:
        if key not in self.row_of:
            ok = columns is not None and len(columns) <= self.width and len(self.patterns) < self.rows
            self.row_of[key] = len(self.patterns) if ok else None
            if ok:
                self.patterns.append(tuple(columns))
        return self.row_of[key]

    def eos(self, token: int) -> int | None:
        return self._add(("eos", int(token)), [("id", int(token))])

    def string(self, text: str) -> int | None:
        """The table row of `text`'s pattern, or None when the host has to check it."""
        if text in self.row_of:
            return self.row_of[text]
        ids = self.tokenizer.encode(text)
        if not ids:
            return self._add(text, None)
        if len(ids) == 1:
            cls = self._class("contains", text)
            return self._add(text, None if cls is None else [("class", cls)])
        first, last = self._class("ends", self.tokenizer.decode(ids[:1])), self._class("starts", self.tokenizer.decode(ids[-1:]))
        columns = None if first is None or last is None else [("class", first), *(("id", t) for t in ids[1:-1]), ("class", last)]
        return self._add(text, columns)

    def mask(self, rows: Sequence[int]) -> np.ndarray:
        """[M] bool: the table rows a request's stops use."""
        m = np.zeros(self.rows, bool)
        m[list(rows)] = True
        return m

    def table(self) -> StopTable:
        exact = np.full((self.rows, self.width), -1, np.int32)
        cls = np.full((self.rows, self.width), -1, np.int32)
        keys = list(self.classes)
        for m, columns in enumerate(self.patterns):
            for j, (kind, what) in enumerate(columns, self.width - len(columns)):
                if kind == "id":
                    exact[m, j] = what
                else:
                    cls[m, j] = keys.index(what)
        classes = np.zeros((MAX_CLASSES, self.vocab_size), bool)
        for c, key in enumerate(keys):
            classes[c] = self.classes[key]
        used = np.arange(self.rows) < len(self.patterns)
        return StopTable(*(jnp.asarray(x) for x in (exact, cls, classes, used)))


def matches(table: StopTable, last_NxJ: jax.Array, allowed_NxM: jax.Array) -> jax.Array:
    """[N] whether a row's last J tokens (right-aligned; -1 before its first token) match an allowed pattern."""
    tok = last_NxJ[:, None, :]  # [N, 1, J]
    real = tok >= 0
    exact_ok = (table.exact_MxJ[None] < 0) | (tok == table.exact_MxJ[None])
    in_class = table.classes_CxV[jnp.maximum(table.cls_MxJ, 0)[None], jnp.maximum(tok, 0)]  # [N, M, J]
    cls_ok = (table.cls_MxJ[None] < 0) | (real & in_class)
    free = (table.exact_MxJ < 0) & (table.cls_MxJ < 0)
    col_ok = exact_ok & cls_ok & (real | free[None])
    return (col_ok.all(-1) & table.used_M[None] & allowed_NxM).any(-1)


def finish(tokenizer, ids: list[int], eos: set[int], stops: Sequence[str]) -> tuple[list[int], str, bool]:
    """(token_ids, text, stopped) of a sample's tokens: cut after its first EOS (kept in the ids, not the text) or
    right after its first stop string, whichever comes first in the text."""
    cut = next((i for i, t in enumerate(ids) if t in eos), None)
    body = ids if cut is None else ids[:cut]
    text = tokenizer.decode(body)
    hits = [(text.find(s), s) for s in stops if s in text]
    if hits:
        pos, s = min(hits)
        end = pos + len(s)
        n = next(n for n in range(1, len(body) + 1) if len(tokenizer.decode(body[:n])) >= end)
        return body[:n], text[:end], True
    if cut is not None:
        return ids[: cut + 1], text, True
    return ids, text, False
