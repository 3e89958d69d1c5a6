"""Meshes and shardings: the model names its axes logically; this table alone places them on the mesh.

Mesh axes: `data` (pure data parallel: replicas), `fsdp` (data parallel whose replicas each hold a
slice of every parameter and optimizer state, ZeRO-3 style), `tensor` (Megatron-style splits of
heads, MLP width and vocabulary). The batch is split over data × fsdp.

Activations are pinned too (`constrain`), so the compiler never guesses their layout from the params':
the residual stream is split by batch only (`act_embed`), heads and MLP width also over `tensor`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mellama_jax.config import MeshConfig
from mellama_jax.errors import UserError

AXES = ("data", "fsdp", "tensor")
RULES = {  # logical axis -> mesh axes (None: replicated)
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "vocab": "tensor",
    "head_dim": None,
    "layers": None,
    "length": None,
    "act_embed": None,  # the residual stream's width: whole on each device (the params' `embed` is split)
}


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A data × fsdp × tensor mesh over `devices` (default: all); one size may be -1, meaning "the rest"."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise UserError(
            f"mesh: sizes must be positive, with at most one -1; got data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]}"
        )
    known = math.prod(s for s in sizes if s != -1)
    if len(devices) % known:
        raise UserError(f"mesh: data×fsdp×tensor = {known} does not divide the {len(devices)} devices")
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != len(devices):
        raise UserError(f"mesh: data×fsdp×tensor = {math.prod(sizes)} but there are {len(devices)} devices")
    grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def spec(names: Sequence[str | None]) -> PartitionSpec:
    """Logical axis names -> a PartitionSpec over mesh axes."""
    return PartitionSpec(*(RULES[n] if n is not None else None for n in names))


_ACTIVATION_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("activation_mesh", default=None)


@contextlib.contextmanager
def activation_mesh(mesh: Mesh) -> Iterator[None]:
    """While tracing inside this context, `constrain` pins activations onto `mesh`."""
    token = _ACTIVATION_MESH.set(mesh)
    try:
        yield
    finally:
        _ACTIVATION_MESH.reset(token)


def current_mesh() -> Mesh | None:
    """The mesh of the enclosing `activation_mesh`, or None; kernels XLA cannot partition run per shard on it."""
    return _ACTIVATION_MESH.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Pins an activation's layout by logical names inside `activation_mesh`; a no-op outside one.

    A dimension its mesh axes do not divide (a micro-batch smaller than data × fsdp) is left to the compiler.
    """
    mesh = _ACTIVATION_MESH.get()
    if mesh is None:
        return x
    fits = [dim % _size(mesh, axes) == 0 for dim, axes in zip(x.shape, spec(names), strict=True)]
    pspec = [axes if ok else PartitionSpec.UNCONSTRAINED for axes, ok in zip(spec(names), fits, strict=True)]
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*pspec)))


def _axes(axes: str | tuple[str, ...] | None) -> tuple[str, ...]:
    return (axes,) if isinstance(axes, str) else axes or ()


def _size(mesh: Mesh, axes: str | tuple[str, ...] | None) -> int:
    return math.prod(mesh.shape[a] for a in _axes(axes))


def _check_divides(path: str, shape: tuple[int, ...], pspec: PartitionSpec, mesh: Mesh) -> None:
    for dim, axes in zip(shape, pspec, strict=False):
        size = _size(mesh, axes)
        if dim % size:
            raise UserError(
                f"sharding: {path} has a dimension of {dim}, which mesh axes {_axes(axes)} ({size}) do not divide"
            )


def shardings(shapes, logical_specs, mesh: Mesh):
    """NamedShardings for a tree of arrays (or ShapeDtypeStructs) whose logical names are `logical_specs`."""
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731

    def one(path, logical, leaf):
        pspec = spec(tuple(logical))
        _check_divides(jax.tree_util.keystr(path, simple=True, separator="/"), leaf.shape, pspec, mesh)
        return NamedSharding(mesh, pspec)

    return jax.tree_util.tree_map_with_path(one, logical_specs, shapes, is_leaf=is_spec)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[B, T] arrays: rows split over data × fsdp, tokens kept together."""
    return NamedSharding(mesh, spec(("batch", "length")))


def process_rows(mesh: Mesh, global_batch: int) -> tuple[int, int]:
    """(first row, row count) of the global batch that this process's devices hold: the rows it builds."""
    held = batch_sharding(mesh).addressable_devices_indices_map((global_batch, 1)).values()
    first = min(rows.start or 0 for rows, _ in held)
    return first, max(global_batch if rows.stop is None else rows.stop for rows, _ in held) - first
