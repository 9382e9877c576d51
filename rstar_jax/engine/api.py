"""What goes into the engine and what comes out: the seam at which another engine could plug in.

A caller submits `Request`s and receives, for each, its samples as `Completion`s once all of them finished
(`Engine.submit` / `Engine.completions`). Anything that implements these two calls (a vLLM or sglang-jax server
behind a client, say) can stand in for `rstar_jax.engine.Engine` in the search (BUILD_NOTES, "Engine seam").
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence


class RequestError(ValueError):
    """A request the engine cannot run (the message names the setting, its value and what is allowed)."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    num_samples: int = 1
    stop: tuple[str, ...] = ()  # the text is cut right after the first one
    ignore_eos: bool = False  # always produce max_new_tokens (benchmarks)

    def __post_init__(self):
        checks = [
            ("max_new_tokens", isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "an integer >= 1"),
            ("temperature", math.isfinite(self.temperature) and self.temperature >= 0, "a finite number >= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0"),
            ("num_samples", isinstance(self.num_samples, int) and self.num_samples >= 1, "an integer >= 1"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise RequestError(f"sampling: {name}={getattr(self, name)!r}: must be {allowed}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise RequestError(f"sampling: stop={self.stop!r}: stop strings must be non-empty")


@dataclasses.dataclass(frozen=True)
class Request:
    """K samples of one prompt. `key`: a typed PRNG key; sample k draws token t with fold_in(fold_in(key, k), t).
    `tag` is the caller's, handed back with the completions."""

    prompt: Sequence[int]
    sampling: SamplingConfig
    key: Any
    tag: Any = None


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
