"""The engine's shape, fixed at start: slots, prompt entries, lanes, cache sizes, chunk sizes.

Legend (arrays are named by shape): D data groups (the mesh's `data` axis; each group is one data shard with
its own slots and entries), S slots per group (samples decoded at once), P prompt entries per group (a request's
prompt keys/values, shared by its samples), K lanes per entry (samples of a request that share one entry),
N blocks of an entry's prompt cache, W block width, T suffix capacity (new tokens per sample), R prefill rows per
group, C prefill chunk, M stop sequences on device, J tokens per stop sequence.
"""

from __future__ import annotations

import dataclasses
import math


class EngineConfigError(ValueError):
    """A bad engine setting (the message names it, its value and what is allowed)."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    slots: int = 64  # samples decoded at once, over all data groups
    lanes: int = 8  # samples of one request that share its prompt cache (a request with more uses more entries)
    entries: int = 0  # prompt caches over all data groups; 0: 2 * slots / lanes (room for requests waiting a slot; slots with one lane)
    max_prompt: int = 4096  # tokens of a request's prompt after the shared prefix
    max_new_tokens: int = 256  # most tokens one sample generates (its own cache)
    block: int = 512  # prompt-cache block: the unit that decode and prefill skip (CPU) or bucket (GPU/TPU)
    prefill_chunk: int = 256  # prompt tokens per prefill row
    prefill_rows: int = 4  # prefill rows per data group and call
    decode_steps: int = 16  # decode steps per call; the host looks at the results between calls
    stops: int = 16  # stop token sequences matched on device
    stop_len: int = 8  # most tokens of one such sequence

    def __post_init__(self):
        for name in ("slots", "lanes", "max_prompt", "max_new_tokens", "block", "prefill_chunk", "prefill_rows",
                     "decode_steps", "stops", "stop_len"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise EngineConfigError(f"engine.{name}={value!r}: must be an integer >= 1")
        if not (isinstance(self.entries, int) and self.entries >= 0):
            raise EngineConfigError(f"engine.entries={self.entries!r}: must be an integer >= 0 (0: automatic)")

    def layout(self, groups: int) -> "Layout":
        """Per-group sizes for `groups` data groups; each group gets an equal share of slots and entries."""
        if self.slots % groups:
            raise EngineConfigError(f"engine.slots={self.slots}: must be a multiple of the mesh's data axis ({groups})")
        # every entry is read at every decode step, running lanes or not: as few as keep the slots fed (twice the
        # slots' worth, so requests wait prefilled; one lane per entry already gives each slot its own entry)
        entries = self.entries or max(groups, (2 if self.lanes > 1 else 1) * self.slots // self.lanes)
        blocks = -(-self.max_prompt // self.block)
        return Layout(groups=groups, slots=self.slots // groups, entries=-(-entries // groups), lanes=self.lanes,
                      blocks=blocks, block=self.block, suffix=self.max_new_tokens, rows=self.prefill_rows,
                      chunk=self.prefill_chunk, steps=self.decode_steps, stops=self.stops, stop_len=self.stop_len)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static shapes of the engine's state and programs (hashable: a static argument of every program)."""

    groups: int  # D
    slots: int  # S per group
    entries: int  # P per group
    lanes: int  # K
    blocks: int  # N blocks of W tokens: an entry's prompt capacity is N * W
    block: int  # W
    suffix: int  # T
    rows: int  # R prefill rows per group
    chunk: int  # C
    steps: int  # decode steps per call
    stops: int  # M
    stop_len: int  # J

    @property
    def max_prompt(self) -> int:
        return self.blocks * self.block

    def bucket(self, tokens: int) -> int:
        """Blocks a program reads to cover `tokens` prompt tokens: a power of two (at most N), so a few programs
        serve every length on backends that read whole buckets."""
        need = max(1, -(-tokens // self.block))
        return min(self.blocks, 1 << math.ceil(math.log2(need)))
