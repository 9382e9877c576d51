"""Train state, optimizer, and the jitted train / eval steps over a named mesh.

Parameters and Adam moments are float32 (master weights); `model.compute_dtype=bfloat16` only changes
the matmuls inside the forward pass. The step sums loss, weight and gradients over the `A` micro-batches
of a batch (a `lax.scan`) and divides once, so a batch gives the same update however it is split.
"""

from __future__ import annotations

from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from rstar_jax.config import Config, OptimSection
from rstar_jax.models.config import ModelConfig
from rstar_jax.models.params import Params, init_params, logical_axes
from rstar_jax import sharding
from rstar_jax.train.losses import NUM_LABELS, loss_fn


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # [] int32, optimizer steps taken
    params: Params
    opt_state: optax.OptState


def lr_schedule(optim: OptimSection, total_steps: int) -> optax.Schedule:
    peak, warm = optim.learning_rate, optim.warmup_steps
    end = peak * optim.end_lr_fraction
    decay_steps = max(total_steps - warm, 1)
    if optim.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=optim.end_lr_fraction)
    elif optim.schedule == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    else:
        after = optax.constant_schedule(peak)
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(peak / warm, peak, warm - 1), after], [warm])


def make_optimizer(optim: OptimSection, total_steps: int) -> optax.GradientTransformation:
    """AdamW (weight decay on matrices only) after global-norm clipping."""
    adamw = optax.adamw(
        lr_schedule(optim, total_steps),
        b1=optim.b1,
        b2=optim.b2,
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params),
    )
    return optax.chain(optax.clip_by_global_norm(optim.clip_norm), adamw) if optim.clip_norm > 0 else adamw


def abstract_params(model_cfg: ModelConfig, kind: str) -> Params:
    return jax.eval_shape(lambda: init_params(model_cfg, jax.random.key(0), num_labels=NUM_LABELS[kind]))


def state_shardings(
    abstract: Params, optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh, min_shard_elements: int
) -> TrainState:
    """NamedShardings for every leaf of the train state, from the rules table."""
    p_specs = sharding.param_specs(abstract, logical_axes(abstract), mesh, min_shard_elements)
    opt_specs = sharding.opt_state_specs(optimizer, jax.eval_shape(optimizer.init, abstract), p_specs)
    return sharding.named(mesh, TrainState(step=PartitionSpec(), params=p_specs, opt_state=opt_specs))


def init_state(
    params: Params | Callable[[], Params], optimizer: optax.GradientTransformation, shardings: TrainState
) -> TrainState:
    """State created directly sharded: `params` is a host pytree (placed shard by shard) or a jittable builder."""
    if callable(params):
        params = jax.jit(params, out_shardings=shardings.params)()
    else:
        params = jax.tree.map(
            lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx]), params, shardings.params
        )

    fresh = lambda p: _fresh(p, optimizer)  # noqa: E731
    return jax.jit(fresh, in_shardings=(shardings.params,), out_shardings=shardings, donate_argnums=0)(params)


def _fresh(params: Params, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def abstract_state(model_cfg: ModelConfig, kind: str, optimizer: optax.GradientTransformation, shardings: TrainState) -> TrainState:
    """`jax.ShapeDtypeStruct`s with shardings: restore targets, and lowering without allocating anything."""
    shapes = jax.eval_shape(lambda p: _fresh(p, optimizer), abstract_params(model_cfg, kind))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _summed_loss(kind: str, model_cfg: ModelConfig, cfg: Config) -> Callable:
    compute_dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[cfg.model.compute_dtype]
    return loss_fn(
        kind,
        model_cfg,
        compute_dtype=compute_dtype,
        remat=cfg.model.remat,
        scan_layers=cfg.model.scan_layers,
        constrain=sharding.constrain,
    )


def _metrics(loss_sum, weight_sum, stats) -> dict[str, jax.Array]:
    denom = jnp.maximum(weight_sum, 1e-9)
    out = {"loss": loss_sum / denom, "weight": weight_sum}
    out.update({k: v / denom for k, v in stats.items()})
    return out


def make_train_step(
    kind: str, model_cfg: ModelConfig, cfg: Config, optimizer: optax.GradientTransformation, total_steps: int
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """Unjitted step; `compile_step` wraps it with shardings and donation."""
    loss = _summed_loss(kind, model_cfg, cfg)
    schedule = lr_schedule(cfg.optim, total_steps)

    def step(state: TrainState, batch: dict[str, jax.Array]):
        def micro(carry, mb):
            def f(p):
                ls, ws, st = loss(p, mb)
                return ls, (ws, st)

            (ls, (ws, st)), g = jax.value_and_grad(f, has_aux=True)(state.params)
            acc_g, acc_l, acc_w, acc_st = carry
            return (jax.tree.map(jnp.add, acc_g, g), acc_l + ls, acc_w + ws, jax.tree.map(jnp.add, acc_st, st)), None

        first = jax.tree.map(lambda x: x[0], batch)
        stats0 = jax.tree.map(jnp.zeros_like, jax.eval_shape(loss, state.params, first)[2])
        zeros_g = jax.tree.map(jnp.zeros_like, state.params)
        (g, ls, ws, st), _ = jax.lax.scan(micro, (zeros_g, 0.0, 0.0, stats0), batch)
        grads = jax.tree.map(lambda x: x / jnp.maximum(ws, 1e-9), g)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)
        metrics = _metrics(ls, ws, st)
        metrics.update(grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
        return new, metrics

    return step


def make_eval_step(kind: str, model_cfg: ModelConfig, cfg: Config) -> Callable[[Params, dict[str, jax.Array]], dict]:
    """Sums (loss, weight, stats) over one batch's micro-batches; the caller adds batches up."""
    loss = _summed_loss(kind, model_cfg, cfg)

    def step(params: Params, batch: dict[str, jax.Array]):
        outs = jax.lax.map(lambda mb: loss(params, mb), batch)
        return jax.tree.map(lambda x: jnp.sum(x, axis=0), outs)

    return step


def compile_step(step: Callable, shardings: TrainState, mesh: jax.sharding.Mesh, batch_example: dict) -> Callable:
    """`jax.jit` with explicit in/out shardings and the old state donated."""
    batch_sh = sharding.named(mesh, sharding.batch_specs(batch_example, mesh))
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(step, in_shardings=(shardings, batch_sh), out_shardings=(shardings, replicated), donate_argnums=0)
