"""The pure, sharded training step: TrainState in, TrainState and metrics out; and its evaluation twin.

Precision: fp32 master params and AdamW state, compute in `model.dtype` (bf16 for real runs), logits
and loss in fp32. A step accumulates gradients over `micro_batches` slices of the global batch and
divides by the number of target tokens in the whole batch, so it equals one big-batch step exactly
(up to summation order). A step whose gradients are not finite changes nothing but `skipped`.

Batches are dicts of [B, T] int arrays: `tokens`, `positions`, `segment_ids` (0 = padding) and
`loss_mask` (1 where the token is a training target). Token t+1 is the target at position t, never
across a document boundary.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mellama_jax.config import TrainConfig
from mellama_jax.model import lora
from mellama_jax.model.llama import Llama, abstract_model, with_params
from mellama_jax.model.sharding import activation_mesh, batch_sharding, shardings

log = logging.getLogger(__name__)

BATCH_KEYS = ("tokens", "positions", "segment_ids", "loss_mask")


class TrainState(struct.PyTreeNode):
    step: jax.Array  # [] int32, optimiser steps taken (skipped ones included)
    params: dict  # nested dict, as `nnx.to_pure_dict` gives it; frozen when `lora` holds adapters
    opt_state: optax.OptState  # over the trained tree only (`lora.trainable`): params, or the adapters
    rng: jax.Array  # a raw uint32 PRNG key, for stochastic parts of training
    skipped: jax.Array  # [] int32, steps whose gradients were not finite (not applied)
    lora: dict  # LoRA adapters, {target: {"a": [L, *in, r], "b": [L, r, *out]}}; {} for full fine-tuning


def schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup over `warmup_ratio` of the steps, then cosine decay to `min_lr`."""
    o = cfg.optim
    warmup = round(o.warmup_ratio * cfg.steps)
    return optax.warmup_cosine_decay_schedule(0.0, o.lr, warmup, max(cfg.steps, warmup + 1), o.min_lr)


def optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Clip, then AdamW's direction with decoupled weight decay; `train_step` scales it by the schedule.

    The learning rate follows `TrainState.step` (skipped steps included), not the optimizer's own
    count, so a skipped step neither advances Adam's bias correction nor shifts the schedule.
    """
    o = cfg.optim

    def decay_mask(params):  # RMSNorm scales (paths ending in "scale") are decayed only if asked
        return jax.tree_util.tree_map_with_path(lambda path, _: o.decay_vectors or path[-1].key != "scale", params)

    return optax.chain(
        optax.clip_by_global_norm(o.clip_norm),
        optax.scale_by_adam(o.b1, o.b2, o.eps),
        optax.add_decayed_weights(o.weight_decay, mask=decay_mask),
    )


def loss_sums(cfg: TrainConfig, params: dict, batch: dict, adapters: dict | None = None) -> tuple[jax.Array, jax.Array]:
    """(sum of next-token cross-entropy over target tokens, number of target tokens), in fp32."""
    tokens, segments = batch["tokens"], batch["segment_ids"]
    scale = lora.scale(cfg.lora) if cfg.lora else 1.0
    logits, _ = with_params(cfg.model, params)(
        tokens, batch["positions"], segments, adapters=adapters, lora_scale=scale
    )
    targets = jnp.roll(tokens, -1, axis=1)
    same_doc = (jnp.roll(segments, -1, axis=1) == segments) & (segments != 0)
    not_last = jnp.arange(tokens.shape[1]) < tokens.shape[1] - 1
    weight = (jnp.roll(batch["loss_mask"], -1, axis=1) != 0) & same_doc & not_last
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    weight = weight.astype(jnp.float32)
    return (ce * weight).sum(), weight.sum()


def micro_batches(batch: dict, m: int) -> dict:
    """[B, T] arrays as [m, B/m, T]: row r goes to micro-batch r % m, so each device's rows stay on it,
    whatever the batch sharding."""
    return jax.tree.map(lambda x: x.reshape(-1, m, *x.shape[1:]).swapaxes(0, 1), batch)


def train_step(cfg: TrainConfig, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    """One optimiser step over the global batch, accumulated over `cfg.micro_batches` slices.

    Only `lora.trainable(cfg)`'s tree (all params, or the LoRA adapters) is differentiated and updated."""
    m, part = cfg.micro_batches, lora.trainable(cfg)
    trained = part.get(state)
    sums_and_grads = jax.value_and_grad(lambda t, mb: loss_sums(cfg, *part.split(state, t, mb)), has_aux=True)

    def accumulate(carry, mb):
        grads, loss_sum, count = carry
        (s, n), g = sums_and_grads(trained, mb)
        return (jax.tree.map(jnp.add, grads, g), loss_sum + s, count + n), None

    if m == 1:
        (loss_sum, count), grads = sums_and_grads(trained, batch)
    else:
        zeros = (jax.tree.map(jnp.zeros_like, trained), jnp.zeros(()), jnp.zeros(()))
        (grads, loss_sum, count), _ = jax.lax.scan(accumulate, zeros, micro_batches(batch, m))
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    grad_norm = optax.tree.norm(grads)
    lr = schedule(cfg)(state.step)
    finite = jnp.isfinite(grad_norm)

    def apply() -> tuple[dict, optax.OptState]:
        direction, opt_state = optimizer(cfg).update(grads, state.opt_state, trained)
        return jax.tree.map(lambda p, d: p - lr * d, trained, direction), opt_state

    # A cond, not a select: the skipped branch costs nothing, and a taken step no extra pass over the state.
    trained, opt_state = jax.lax.cond(finite, apply, lambda: (trained, state.opt_state))
    new_state = part.put(state, trained).replace(
        step=state.step + 1, opt_state=opt_state, skipped=state.skipped + (~finite).astype(jnp.int32)
    )
    metrics = {
        "loss": loss_sum / count,
        "grad_norm": grad_norm,
        "lr": lr,
        "target_tokens": count,
        "skipped": new_state.skipped,
    }
    return new_state, metrics


def eval_step(cfg: TrainConfig, params: dict, batch: dict, adapters: dict) -> tuple[jax.Array, jax.Array]:
    """`loss_sums` over a global batch, a micro-batch at a time as `train_step` does (so it fits where training
    does); no gradients, no optimizer."""

    def add(carry, mb):
        s, n = loss_sums(cfg, params, mb, adapters)
        return (carry[0] + s, carry[1] + n), None

    (loss_sum, count), _ = jax.lax.scan(add, (jnp.zeros(()), jnp.zeros(())), micro_batches(batch, cfg.micro_batches))
    return loss_sum, count


def _init(cfg: TrainConfig, seed: jax.Array, params: dict | None = None) -> TrainState:
    key = jax.random.PRNGKey(seed)
    init_key, rng = jax.random.split(key)
    if params is None:
        params = nnx.to_pure_dict(nnx.state(Llama(cfg.model, rngs=nnx.Rngs(init_key)), nnx.Param))
    # the adapters' key is split off the model's: a LoRA run draws the same base params as a full one
    adapters = lora.init_adapters(cfg.lora, params["layers"], jax.random.fold_in(init_key, 1)) if cfg.lora else {}
    zero = jnp.zeros((), jnp.int32)
    state = TrainState(step=zero, params=params, opt_state=(), rng=rng, skipped=zero, lora=adapters)
    return state.replace(opt_state=optimizer(cfg).init(lora.trainable(cfg).get(state)))


def state_shardings(cfg: TrainConfig, mesh: Mesh):
    """NamedShardings for every TrainState leaf: params and their AdamW moments by logical name, the rest replicated."""
    abstract = jax.eval_shape(functools.partial(_init, cfg), 0)
    logical = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(abstract_model(cfg.model), nnx.Param)))
    params = shardings(abstract.params, logical, mesh)
    adapters = shardings(abstract.lora, lora.logical_names(cfg.lora, logical["layers"]), mesh) if cfg.lora else {}
    replicated = NamedSharding(mesh, PartitionSpec())
    state = TrainState(step=replicated, params=params, opt_state=(), rng=replicated, skipped=replicated, lora=adapters)
    opt_state = optax.tree_map_params(
        optimizer(cfg),
        lambda _, s: s,
        abstract.opt_state,
        lora.trainable(cfg).get(state),
        transform_non_params=lambda _: replicated,
    )
    return state.replace(opt_state=opt_state)


def abstract_state(cfg: TrainConfig, mesh: Mesh) -> TrainState:
    """The TrainState's shapes, dtypes and shardings, as ShapeDtypeStructs: nothing is allocated."""
    shapes = jax.eval_shape(functools.partial(_init, cfg), 0)
    to_struct = lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh)  # noqa: E731
    return jax.tree.map(to_struct, shapes, state_shardings(cfg, mesh))


def init_state(cfg: TrainConfig, mesh: Mesh, params: dict | None = None) -> TrainState:
    """A fresh TrainState created already sharded: no parameter is ever whole on one device. With `params`
    (restored onto the state's shardings: `init_from`), those are its weights, taken over in place, and no
    random ones are drawn; the rest (adapters, optimizer state, rng) is what a random start would have."""
    init = jax.jit(functools.partial(_init, cfg), out_shardings=state_shardings(cfg, mesh), donate_argnums=1)
    return init(cfg.seed) if params is None else init(cfg.seed, params)


def compile_step(cfg: TrainConfig, mesh: Mesh) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """`train_step` jitted with explicit shardings; the input state is donated (updated in place)."""
    state_sh = state_shardings(cfg, mesh)
    batch_sh = {k: batch_sharding(mesh) for k in BATCH_KEYS}
    replicated = NamedSharding(mesh, PartitionSpec())
    step = jax.jit(
        functools.partial(train_step, cfg),
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, replicated),
        donate_argnums=0,
    )

    def on_mesh(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        with activation_mesh(mesh):  # traced here: the model's activations are pinned onto the mesh
            return step(state, batch)

    def lower(state, batch):  # ShapeDtypeStructs in: compiled and measured, never run (plan, benchmarks)
        with activation_mesh(mesh):
            return step.lower(state, batch)

    on_mesh.lower = lower
    return on_mesh


def compile_eval(cfg: TrainConfig, mesh: Mesh) -> Callable[[dict, dict], tuple[jax.Array, jax.Array]]:
    """`eval_step` jitted over the train step's shardings of params, batch and adapters; its sums come out
    replicated. `adapters` is the TrainState's `lora` ({} for full fine-tuning)."""
    batch_sh = {k: batch_sharding(mesh) for k in BATCH_KEYS}
    replicated, state_sh = NamedSharding(mesh, PartitionSpec()), state_shardings(cfg, mesh)
    step = jax.jit(
        functools.partial(eval_step, cfg),
        in_shardings=(state_sh.params, batch_sh, state_sh.lora),
        out_shardings=(replicated, replicated),
    )

    def on_mesh(params: dict, batch: dict, adapters: dict | None = None) -> tuple[jax.Array, jax.Array]:
        with activation_mesh(mesh):
            return step(params, batch, {} if adapters is None else adapters)

    return on_mesh
