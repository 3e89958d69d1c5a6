"""`mellama plan --serve`: what serving a model needs, from the decode step compiled for devices we do not have.

The program is `mellama serve`'s own step (`inference.engine.decode_step`): every slot fed one token, its key and
value written into a cache of slots × context tokens, on the mesh `serve` would use (`generate.decode_mesh`:
tensor parallel as far as the heads divide, replicas over the rest), with the weights as `serve` holds them
(bf16, or int8 / int4 layer weights with their scales, embedding and head in bf16). The compiled executable's
`memory_analysis()` gives the bytes per device: arguments (weights, cache), temporaries (the workspace), and
outputs not written in place. Slots that fit are extrapolated from it: the cache grows linearly with slots ×
context, the rest is measured.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import checkify
from jax.sharding import NamedSharding

from mellama_jax.config import ModelConfig
from mellama_jax.errors import UserError
from mellama_jax.hardware import DeviceKind
from mellama_jax.inference.engine import decode_step
from mellama_jax.inference.generate import decode_mesh
from mellama_jax.model import quant
from mellama_jax.model.llama import CACHE_KV, abstract_model, cache_shape, param_count
from mellama_jax.model.sharding import activation_mesh, shardings, spec
from mellama_jax.planning import devices as dev

GIB = 2**30
COUNTS = (1, 2, 4, 8)  # device counts tried: one host


@dataclasses.dataclass(frozen=True)
class ServeMemory:
    devices: int
    tensor: int
    weights: float  # bytes per device
    cache: float
    workspace: float  # temporaries + outputs not aliased + code

    @property
    def total(self) -> float:
        return self.weights + self.cache + self.workspace


def kv_bytes_per_token(cfg: ModelConfig) -> int:
    """Key and value of every layer for one token, in the cache's dtype."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize


def _bytes(dtype) -> float:
    return 0.5 if jnp.dtype(dtype) in (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4)) else jnp.dtype(dtype).itemsize


def _abstract_weights(cfg: ModelConfig, mode: str | None, mesh) -> dict:
    abstract = nnx.state(abstract_model(cfg), nnx.Param)
    logical = nnx.to_pure_dict(nnx.get_partition_spec(abstract))
    shapes = nnx.to_pure_dict(abstract)
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                          shardings(shapes, logical, mesh))  # fmt: skip
    scales: dict = {}
    if mode is not None:
        dtype = quant.MODES[mode][0]
        for (module, weight), n_in in quant.WEIGHTS.items():
            w, names = params["layers"][module][weight], tuple(logical["layers"][module][weight])
            params["layers"][module][weight] = jax.ShapeDtypeStruct(w.shape, dtype, sharding=w.sharding)
            groups = quant.groups(math.prod(w.shape[1 : 1 + n_in]), mode)
            shape, scale_names = (w.shape[0], groups, *w.shape[1 + n_in :]), (names[0], None, *names[1 + n_in :])
            sharding = NamedSharding(mesh, spec(scale_names))
            scales.setdefault(module, {})[weight] = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
    return {"params": params, "adapters": {}, "scales": scales}


def measure(cfg: ModelConfig, mode: str | None, slots: int, context: int, devices: list) -> ServeMemory:
    """Bytes per device of the decode step for `slots` × `context` on `devices` (compile-only ones work)."""
    mesh = decode_mesh(cfg, devices)
    weights = _abstract_weights(cfg, mode, mesh)
    kv = jax.ShapeDtypeStruct(cache_shape(cfg, slots, context), jnp.dtype(cfg.dtype),
                              sharding=NamedSharding(mesh, spec(CACHE_KV)))  # fmt: skip
    rows = NamedSharding(mesh, spec(("batch",)))
    per_slot = lambda dtype: jax.ShapeDtypeStruct((slots,), dtype, sharding=rows)  # noqa: E731
    cache = {"k": kv, "v": kv, "segment_ids": jax.ShapeDtypeStruct((slots, context), jnp.int32,
             sharding=NamedSharding(mesh, spec(("batch", "length")))), "index": per_slot(jnp.int32)}  # fmt: skip
    args = [per_slot(t) for t in (jnp.int32, jnp.int32, jnp.int32, jnp.float32, jnp.int32, jnp.float32, jnp.int32,
                                  jnp.int32)]  # fmt: skip
    step = jax.jit(checkify.checkify(functools.partial(decode_step, cfg, context), errors=checkify.user_checks),
                   donate_argnums=1)  # fmt: skip
    with activation_mesh(mesh):
        lowered = step.lower(weights, cache, *args)
    write_after = jax.config.jax_persistent_cache_min_compile_time_secs  # as plan.measure: nothing cached
    jax.config.update("jax_persistent_cache_min_compile_time_secs", math.inf)
    try:
        stats = lowered.compile().memory_analysis()
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", write_after)

    def per_device(tree) -> float:  # int4 is stored two to a byte
        return sum(math.prod(x.sharding.shard_shape(x.shape)) * _bytes(x.dtype) for x in jax.tree.leaves(tree))

    w, c = per_device(weights), per_device(cache)
    rest = stats.argument_size_in_bytes - w - c + stats.temp_size_in_bytes
    rest += stats.output_size_in_bytes - stats.alias_size_in_bytes + stats.generated_code_size_in_bytes
    return ServeMemory(len(devices), mesh.shape["tensor"], w, c, rest)


def fitting_slots(m: ServeMemory, slots: int, budget: float) -> int:
    """Slots of the same context that fit the budget, the cache scaled from the measured one (0: none)."""
    room = budget - m.weights - m.workspace
    return max(0, int(room // (m.cache / slots))) if room > 0 else 0


def report(cfg: ModelConfig, kind: DeviceKind, mode: str | None, slots: int, context: int, asked: int) -> list[str]:
    """The lines `mellama plan --serve` prints."""
    if slots < 1 or context < 1:
        raise UserError(f"--slots and --context must be positive, got {slots} and {context}")
    if context > cfg.max_seq_len:
        raise UserError(f"--context {context} exceeds the model's max_seq_len {cfg.max_seq_len}")
    cfg = dataclasses.replace(cfg, dtype="bfloat16", param_dtype="bfloat16", remat="none")  # as served
    budget = kind.budget
    weights_kind = {None: "bf16", "int8": "int8 per channel", "int4": "int4 in groups"}[mode]
    kv = kv_bytes_per_token(cfg)
    lines = [
        f"  model        {param_count(cfg):,} parameters; weights {weights_kind} (embedding and head bf16)",
        f"  KV cache     {kv / 1024:.0f} KiB per token (bf16), {kv * context / GIB:.2f} GiB per {context}-token slot;"
        f" {slots} slots x {context} = {kv * slots * context / GIB:.1f} GiB in all",
        f"  budget       {budget / GIB:.1f} GiB per {kind.name} ({kind.usable:.0%} of"
        f" {kind.memory_bytes / GIB:.1f} GiB)",
        f"  devices  mesh        weights/dev  KV/dev     workspace  total/dev   fits   slots of {context} that fit",
    ]
    fewest = None
    for n in sorted({*COUNTS, asked}):
        if n % min(n, kind.per_host) and n > kind.per_host:
            continue
        try:
            m = measure(cfg, mode, slots, context, dev.compile_only_devices(kind, n))
        except UserError as e:
            lines.append(f"  {n:<8} cannot compile: {e}")
            continue
        fits = m.total <= budget
        fewest = fewest or (n if fits else None)
        sizes = f"{m.weights / GIB:8.1f} GiB {m.cache / GIB:6.1f} GiB {m.workspace / GIB:6.2f} GiB"
        verdict = f"{m.total / GIB:7.1f} GiB  {'yes' if fits else 'no ':<5}  {fitting_slots(m, slots, budget)}"
        lines.append(f"  {n:<8} tensor {m.tensor:<4} {sizes} {verdict}")
    if fewest is None:
        tried = ", ".join(map(str, sorted({*COUNTS, asked})))
        lines.append(f"  fewest       none of {tried} {kind.name} fit {slots} x {context}")
    else:
        lines.append(f"  fewest       {fewest} x {kind.name} hold {slots} slots x {context} tokens")
    return lines
