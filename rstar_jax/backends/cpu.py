"""Everything that exists for XLA:CPU, active only when the backend is CPU (the one switch).

On GPU and TPU the plain code path runs: plain einsums, jnp.argmax, a flat inverse-CDF draw, caches stored in
their dtype, default compiler options, no host-memory housekeeping. On CPU (`tuned()`), these replace it:

* Dots ask for fp32 results over rows flattened to 2-D (`linear`): XLA:CPU runs bf16 dots 2.5x faster that way
  (AVX512-BF16 kernels), a custom VJP keeps the backward dots fp32 too, and 2-D operands spare the weight-gradient
  dots a slow transposing loop fusion (SmolLM2 train step 7.4 -> 6.2 s, docs/xla_cpu.md). Inference weights are
  stored [in, out] (`weight_t`): small-batch matmuls run ~1.4x faster in that layout.
* Caches of half-width floats are stored as unsigned ints (`to_storage`): XLA:CPU runs a bf16 scatter or
  dynamic-update-slice by converting the whole buffer, on integers it writes in place.
* Argmax and the inverse-CDF draw search the vocabulary in two levels of blocks: XLA:CPU's argmax reduction is
  not vectorised (2.6 ms for 16 rows of a 49k vocabulary against 0.15 ms blocked).
* Attention over prompt-cache blocks that no live row reaches is skipped with a conditional (`skip_blocks`): on
  CPU a conditional is a cheap host-side branch, so one decode program serves every context length.
* Inference programs compile at LLVM -O1: a SmolLM2 decode program compiles in ~60% of the time and runs as fast
  (its matmuls are library calls); training keeps -O3.
* XLA_FLAGS: the concurrency-optimised scheduler is off (`configure_flags`, called by the CLI before JAX starts a
  backend): it overlapped the optimizer update with the backward pass and made a SmolLM2 train step 1.55x
  slower. It is a CPU-client flag, so GPU and TPU runs are unaffected.
* glibc keeps memory XLA:CPU frees in its arenas; `release_free_host_memory` hands it back (a long search went
  from 6.1 to 3.4 GB of RSS).

`RSTAR_JAX_CPU_TUNING=0` (or `tuning(False)` while tracing) forces the plain path on CPU; tests use it to check
that both paths produce the same tokens.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp

NEG_INF = -1e30
VOCAB_BLOCK = 256  # vocabulary entries per block of the two-level argmax and CDF search
COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}
SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"

_override: list[bool | None] = [None]


def tuned() -> bool:
    """Whether the XLA:CPU path is active: the backend is CPU, unless turned off."""
    if _override[0] is not None:
        return _override[0]
    if os.environ.get("RSTAR_JAX_CPU_TUNING", "1").lower() in ("0", "off", "false"):
        return False
    return jax.default_backend() == "cpu"


@contextlib.contextmanager
def tuning(on: bool) -> Iterator[None]:
    """Trace with the CPU path on or off (programs take the setting as a static argument and trace inside this)."""
    before = _override[0]
    _override[0] = on
    try:
        yield
    finally:
        _override[0] = before


def configure_flags() -> None:
    """XLA:CPU flags, set before JAX starts a backend; an explicit setting in XLA_FLAGS wins."""
    flags = os.environ.get("XLA_FLAGS", "")
    if SCHEDULER_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {SCHEDULER_FLAG}=false".strip()


def compiler_options(on: bool) -> dict[str, Any] | None:
    """Compiler options for an inference program traced with tuning `on`."""
    return COMPILER_OPTIONS if on else None


def jit_inference(fn: Callable, **jit_kwargs: Any) -> Callable:
    """`jax.jit` for an inference program whose static `tuned` argument selects the path: the CPU path compiles at
    -O1 and traces inside `tuning(True)`. The jit is built per setting on first use (importing starts no backend)."""

    @functools.cache
    def jitted(on: bool) -> Callable:
        def traced(*args, **kwargs):
            with tuning(on):
                return fn(*args, **kwargs)

        return jax.jit(functools.wraps(fn)(traced), compiler_options=compiler_options(on), **jit_kwargs)

    @functools.wraps(fn)
    def call(*args, tuned: bool, **kwargs):
        return jitted(tuned)(*args, **kwargs)

    call.lower = lambda *args, tuned, **kwargs: jitted(tuned).lower(*args, **kwargs)  # ahead-of-time compiles
    return call


# ---------------------------------------------------------------------------------------------
# Dots


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dot_f32(x: jax.Array, w: jax.Array, spec: str) -> jax.Array:
    """einsum with an fp32 result, and a backward pass whose two dots also accumulate and return fp32 (then cast)."""
    return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)


def _dot_f32_fwd(x, w, spec):
    return dot_f32(x, w, spec), (x, w)


def _dot_f32_bwd(spec, res, dy):
    x, w = res
    inputs, c = spec.split("->")
    a, b = inputs.split(",")
    dy = dy.astype(x.dtype)
    dx = jnp.einsum(f"{c},{b}->{a}", dy, w, preferred_element_type=jnp.float32).astype(x.dtype)
    dw = jnp.einsum(f"{c},{a}->{b}", dy, x, preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, dw


dot_f32.defvjp(_dot_f32_fwd, _dot_f32_bwd)


def rows_dot(x: jax.Array, w: jax.Array, spec: str) -> jax.Array:
    """`dot_f32` over x's last axis ("ni,oi->no" for a weight [out, in], "ni,io->no" for [in, out]) with x's
    leading axes flattened into rows, the weight cast to x's dtype; fp32 result."""
    y = dot_f32(x.reshape(-1, x.shape[-1]), w.astype(x.dtype), spec)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def transpose_weights(tree: dict) -> dict:
    """Projection weights as `weight_t` [in, out] (decode layout), recursively; other leaves as they are."""
    if "weight" in tree and getattr(tree["weight"], "ndim", 0) >= 2:
        return {**{k: v for k, v in tree.items() if k != "weight"}, "weight_t": jnp.swapaxes(tree["weight"], -1, -2)}
    return {k: transpose_weights(v) if isinstance(v, dict) else v for k, v in tree.items()}


# ---------------------------------------------------------------------------------------------
# Cache storage


def to_storage(x: jax.Array) -> jax.Array:
    """Half-width floats as unsigned ints of their width (written in place by XLA:CPU); fp32 as it is."""
    return x if x.dtype.itemsize == 4 else jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))


def from_storage(x: jax.Array, dtype: Any) -> jax.Array:
    return x if x.dtype == dtype else jax.lax.bitcast_convert_type(x, dtype)


# ---------------------------------------------------------------------------------------------
# Argmax and the inverse-CDF draw in two levels


def vocab_blocks(x_NxV: jax.Array, fill: float) -> jax.Array:
    """[N, V] -> [N, C, VOCAB_BLOCK], the vocabulary padded with `fill` to whole blocks."""
    N, V = x_NxV.shape
    return jnp.pad(x_NxV, ((0, 0), (0, -V % VOCAB_BLOCK)), constant_values=fill).reshape(N, -1, VOCAB_BLOCK)


def in_block(x_NxCxB: jax.Array, block_N: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x_NxCxB, block_N[:, None, None], axis=1)[:, 0]


def argmax(logits_NxV: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (first maximum wins): a max per block, then an argmax inside the best."""
    x = vocab_blocks(logits_NxV, -jnp.inf)
    block = jnp.argmax(x.max(-1), axis=-1)
    return (block * VOCAB_BLOCK + jnp.argmax(in_block(x, block), axis=-1)).astype(jnp.int32)


def draw(u_N: jax.Array, logits_NxV: jax.Array, temperature_N: jax.Array, first_above: Callable) -> jax.Array:
    """The inverse-CDF draw of `sample.draw` (u in [0, 1) per row) searched in two levels: block masses, then
    inside the chosen block. The temperature is applied inside the exp: dividing the logits first lets XLA:CPU
    fuse the division into the head's matmul, which then runs 3x slower."""
    x = vocab_blocks(logits_NxV.astype(jnp.float32), NEG_INF)
    p_NxCxB = jnp.exp((x - x.max(axis=(-2, -1), keepdims=True)) / temperature_N[:, None, None])
    mass_NxC = p_NxCxB.sum(-1)
    cdf_NxC = jnp.cumsum(mass_NxC, axis=-1)
    target_N = u_N * cdf_NxC[:, -1]
    block = first_above(cdf_NxC, target_N, mass_NxC)
    before_N = jnp.where(block > 0, jnp.take_along_axis(cdf_NxC, jnp.maximum(block - 1, 0)[:, None], 1)[:, 0], 0.0)
    p_NxB = in_block(p_NxCxB, block)
    inner = first_above(before_N[:, None] + jnp.cumsum(p_NxB, axis=-1), target_N, p_NxB)
    return (block * VOCAB_BLOCK + inner).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# Host memory


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        return None


def release_free_host_memory() -> None:
    """Return the pages of freed malloc blocks to the OS (~15 ms per 200 MB kept); a no-op off glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
