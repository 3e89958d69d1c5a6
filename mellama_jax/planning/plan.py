"""What a run costs before it is launched: parameters, FLOPs, and memory per device.

Two answers to "how much memory per device": an estimate from the model's shapes (`estimate`, no compile),
and the real train step compiled for the target devices (`measure`: `train.compile_step` lowered with
ShapeDtypeStructs that carry the shardings, compiled for compile-only A100/H100/TPU devices from
`devices.py`, read with `memory_analysis()`). The compiled figure is the truth; the estimate names where
the bytes go. Its terms, per device, as XLA schedules the step:

- parameters, AdamW's two moments and the batch: the step's arguments (donated, updated in place);
- gradients in fp32: one buffer, two while micro-batches accumulate;
- the update: `train_step` applies AdamW inside a `lax.cond`, whose branch writes new parameters and moments
  beside the old ones, so at that moment temporaries hold gradients + 3 x the parameters' size;
- during the backward pass: the remat checkpoints of every layer, plus the larger of (a) the logits and their
  gradient in fp32 with the output head gathered (bf16) and its full fp32 gradient, and (b) one layer's
  recomputed activations and their gradients (about 7 [T, D] and 4 [T, F] bf16 arrays per token; the xla
  attention adds fp32 scores, probabilities and their gradient, [N, T] per token), with the layer's weights
  gathered (bf16) and their full fp32 gradient before it is reduce-scattered.

FLOPs: XLA's `cost_analysis()` counts a scanned layer once (not L times) and is absent for compile-only GPU
executables, so step time comes from the model FLOPs (`model.llama.train_flops_per_token`) at a stated MFU.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
from flax import nnx

from mellama_jax.config import MeshConfig, ModelConfig, TrainConfig
from mellama_jax.errors import UserError
from mellama_jax.hardware import DeviceKind
from mellama_jax.model import lora
from mellama_jax.model.llama import abstract_model, param_count, train_flops_per_token

GIB = 2**30
MFU = 0.40  # model FLOPs utilisation assumed for step time: what well-tuned LLaMA-2 FSDP runs reach on A100/H100
# FLOPs executed per model FLOP: full remat runs every layer's forward twice (4/3 of forward + backward).
RECOMPUTE = {"full": 4 / 3, "save_dots_no_batch": 1.0, "save_dots": 1.0, "none": 1.0}


def trainable_count(cfg: TrainConfig) -> int:
    """Parameters the optimizer trains: all of them, or with `lora` only the adapters (lora.py)."""
    if cfg.lora is None:
        return param_count(cfg.model)
    layers = nnx.to_pure_dict(nnx.state(abstract_model(cfg.model), nnx.Param))["layers"]
    return lora.count(cfg.lora, layers)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a run lies on its devices: mesh sizes, and the rows of a micro-batch that each device holds."""

    data: int
    fsdp: int
    tensor: int
    micro_batches: int
    rows: int  # sequences per device per micro-batch (rounded up where a micro-batch does not split evenly)

    @property
    def devices(self) -> int:
        return self.data * self.fsdp * self.tensor

    def mesh(self) -> str:
        return f"data {self.data} x fsdp {self.fsdp} x tensor {self.tensor}"

    def overrides(self) -> str:
        mesh = f"mesh.data={self.data} mesh.fsdp={self.fsdp} mesh.tensor={self.tensor}"
        return f"{mesh} micro_batches={self.micro_batches}"


def layout(cfg: TrainConfig, devices: int) -> Layout:
    """The config's mesh (one size may be -1) over `devices`; a UserError when the sizes cannot multiply to it."""
    sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes) or devices % known:
        raise UserError(f"mesh: data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} cannot cover {devices} devices")
    data, fsdp, tensor = (devices // known if s == -1 else s for s in sizes)
    if data * fsdp * tensor != devices:
        raise UserError(f"mesh: data x fsdp x tensor = {data * fsdp * tensor} but there are {devices} devices")
    micro, split = cfg.global_batch // cfg.micro_batches, data * fsdp
    return Layout(data, fsdp, tensor, cfg.micro_batches, -(-micro // split))


def problems(cfg: TrainConfig, lay: Layout) -> list[str]:
    """Why the run cannot be laid out so: model dimensions or batch rows that the mesh axes do not divide."""
    m, found = cfg.model, []
    split = {"d_model (embed)": (m.d_model, lay.fsdp), "n_heads": (m.n_heads, lay.tensor),
             "n_kv_heads": (m.n_kv_heads, lay.tensor), "ffn_dim (mlp)": (m.ffn_dim, lay.tensor),
             "vocab_size": (m.vocab_size, lay.tensor)}  # fmt: skip
    for what, (size, axis) in split.items():
        if size % axis:
            name = "fsdp" if what.startswith("d_model") else "tensor"
            found.append(f"{what} {size} is not a multiple of {name} {axis}")
    if cfg.global_batch % (lay.data * lay.fsdp):
        found.append(f"global_batch {cfg.global_batch} is not a multiple of data x fsdp = {lay.data * lay.fsdp}")
    return found


def uneven(cfg: TrainConfig, lay: Layout) -> str | None:
    """Why a micro-batch's rows do not split evenly over data x fsdp (the step still runs: XLA moves rows)."""
    micro, split = cfg.global_batch // cfg.micro_batches, lay.data * lay.fsdp
    if micro % split:
        return f"a micro-batch of {micro} rows (global_batch / micro_batches) is not a multiple of data x fsdp {split}"
    return None


def dividing_layouts(cfg: TrainConfig, devices: int, max_tensor: int) -> list[Layout]:
    """Every mesh of `devices` (tensor up to `max_tensor`, one host) that divides the model and the global batch,
    with each micro-batch count that splits evenly: most fsdp first."""
    found = []
    for tensor in (t for t in (1, 2, 4, 8) if t <= max_tensor and devices % t == 0):
        for fsdp in (f for f in range(devices // tensor, 0, -1) if devices // tensor % f == 0):
            data = devices // (tensor * fsdp)
            if cfg.global_batch % (data * fsdp):
                continue
            per_device = cfg.global_batch // (data * fsdp)
            for rows in (r for r in range(per_device, 0, -1) if per_device % r == 0):
                lay = Layout(data, fsdp, tensor, per_device // rows, rows)
                if not problems(cfg, lay):
                    found.append(lay)
    return found


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes per device. `parts` splits the temporaries (estimate only)."""

    params: float
    opt_state: float
    batch: float
    temp: float
    outputs: float = 0.0  # outputs not written over donated inputs (the step's metrics)
    code: float = 0.0  # the compiled program itself
    parts: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.params + self.opt_state + self.batch + self.temp + self.outputs + self.code


def resolved_attention(cfg: ModelConfig, platform: str) -> str:
    """What `model.attention` runs as on `platform` (auto: flash on GPU, xla elsewhere; see attention.py)."""
    if cfg.attention == "auto":
        return "flash" if platform in ("cuda", "gpu") else "xla"
    return cfg.attention


def estimate(cfg: TrainConfig, lay: Layout, platform: str = "cuda") -> Memory:
    """Per-device memory of one train step from the model's shapes (module docstring: the terms)."""
    m = cfg.model
    d, f, t, layers = m.d_model, m.ffn_dim, lay.tensor, m.n_layers
    n, k, h, v = m.n_heads, m.n_kv_heads, m.head_dim, m.vocab_size
    act, w = jnp.dtype(m.dtype).itemsize, jnp.dtype(m.param_dtype).itemsize
    params, trained = param_count(m), trainable_count(cfg)
    head = v * d  # the output head, or the tied table used as one
    per_layer = (params - v * d * (1 if m.tie_embeddings else 2) - d) / layers
    shard = lay.fsdp * t
    grads = trained * w / shard  # LoRA: the adapters' alone; the frozen base gets no gradient buffer
    tokens = max(lay.rows, 1) * cfg.seq_len  # per device per micro-batch
    dots = (n * h + 2 * k * h) / t + 2 * d + 2 * f / t  # q, k, v; attention and MLP outputs; gate, up
    saved = {  # per token and layer, in compute-dtype elements: what the backward pass finds stored
        "full": d,  # the layer's input
        "save_dots": dots,
        "save_dots_no_batch": dots,
        # and the rest (within ~15 %): q and k rotated in fp32, kv heads expanded to the query heads, the norms'
        # fp32 insides, SwiGLU's two products, the attention output and the residual
        "none": dots + 4 * (n * h + k * h) / t + 2 * n * h / t + 4 * d + 2 * f / t + 2 * d,
    }
    layer = act * (7 * d + 4 * f / t)
    if resolved_attention(m, platform) == "xla":
        layer += n / t * cfg.seq_len * 10  # fp32 scores, bf16 probabilities, fp32 gradient of the scores
    logits_phase = tokens * 2 * 4 * v / t + head / t * (act + 4)
    layer_phase = tokens * layer + per_layer / t * (act + 4)
    accumulated = lay.micro_batches > 1
    parts = {
        "gradients (fp32" + (", accumulated)" if accumulated else ")"): grads * (2 if accumulated else 1),
        f"remat checkpoints ({m.remat})": tokens * layers * saved[m.remat] * act,
        "logits or one layer's backward, the larger": max(logits_phase, layer_phase),
    }
    backward, update = sum(parts.values()), 4 * grads
    if update > backward:
        parts = {"gradients (fp32)": grads, "new parameters and AdamW moments (the update's cond)": 3 * grads}
    batch = 4 * 4 * cfg.global_batch * cfg.seq_len / (lay.data * lay.fsdp)  # tokens, positions, segments, mask
    frozen = params * w / shard if cfg.lora else 0  # beside the trained (and stored) adapters
    return Memory(frozen + grads, 2 * grads, batch, max(backward, update), parts=parts)


def xla_options(kind: DeviceKind) -> dict[str, bool | int | str] | None:
    """The XLA settings `mellama train` would compile with on `kind`: mellama's GPU flags (gpu_flags.py) unless
    XLA_FLAGS names GPU flags of the user's own (which XLA then reads by itself)."""
    if kind.platform != "cuda" or "--xla_gpu" in os.environ.get("XLA_FLAGS", ""):
        return None
    from mellama_jax.training import gpu_flags

    typed = lambda v: v == "true" if v in ("true", "false") else int(v) if v.isdigit() else v  # noqa: E731
    return {name: typed(value) for name, value in gpu_flags.FLAGS.items()}


def measure(cfg: TrainConfig, mesh: jax.sharding.Mesh, options: dict | None = None) -> Memory:
    """Per-device memory of the real train step compiled for `mesh`'s devices (compile-only devices work)."""
    from mellama_jax.model.sharding import batch_sharding
    from mellama_jax.training.step import BATCH_KEYS, abstract_state, compile_step

    state = abstract_state(cfg, mesh)
    rows = jax.ShapeDtypeStruct((cfg.global_batch, cfg.seq_len), jnp.int32, sharding=batch_sharding(mesh))
    batch = dict.fromkeys(BATCH_KEYS, rows)
    lowered = compile_step(cfg, mesh).lower(state, batch)
    # An executable compiled for devices this host lacks cannot be loaded back: with a persistent compilation cache
    # set (JAX_COMPILATION_CACHE_DIR), a cached one would make jax warn on every later plan. None is written.
    write_after = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", math.inf)
    try:
        stats = lowered.compile(compiler_options=options).memory_analysis()
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", write_after)

    def per_device(tree) -> int:
        return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))

    params, opt_state, batch_bytes = (
        per_device((state.params, state.lora)),
        per_device(state.opt_state),
        per_device(batch),
    )
    scalars = stats.argument_size_in_bytes - params - opt_state - batch_bytes  # step, rng, skipped
    return Memory(
        params, opt_state, batch_bytes + scalars, stats.temp_size_in_bytes,
        outputs=stats.output_size_in_bytes - stats.alias_size_in_bytes,
        code=stats.generated_code_size_in_bytes,
    )  # fmt: skip


def with_layout(cfg: TrainConfig, lay: Layout, **model) -> TrainConfig:
    """`cfg` with `lay`'s mesh and micro-batches (and model fields changed, e.g. remat)."""
    mesh = MeshConfig(lay.data, lay.fsdp, lay.tensor)
    new_model = dataclasses.replace(cfg.model, **model) if model else cfg.model
    return dataclasses.replace(cfg, mesh=mesh, micro_batches=lay.micro_batches, model=new_model)


def step_seconds(cfg: TrainConfig, devices: int, peak_flops: float, mfu: float = MFU) -> float:
    """Time of one optimiser step when the devices deliver `mfu` of their peak as model FLOPs."""
    return train_flops_per_token(cfg.model, cfg.seq_len) * cfg.global_batch * cfg.seq_len / (devices * peak_flops * mfu)


def hardware_flops(cfg: TrainConfig) -> float:
    """FLOPs one step executes: the model's, plus the forward pass that full remat runs again."""
    return train_flops_per_token(cfg.model, cfg.seq_len) * cfg.global_batch * cfg.seq_len * RECOMPUTE[cfg.model.remat]


def traffic(cfg: TrainConfig, lay: Layout) -> float:
    """Bytes each device receives per step: FSDP gathers the bf16 weights twice per micro-batch (forward, and again
    for the backward) and reduce-scatters their bf16 gradients; `data` replicas all-reduce fp32 gradients; `tensor`
    all-reduces each layer's two outputs [tokens, D] forward and backward (and again when remat recomputes)."""
    m = cfg.model
    params, act = param_count(m) / lay.tensor, jnp.dtype(m.dtype).itemsize
    fsdp = 3 * act * params * (lay.fsdp - 1) / lay.fsdp * lay.micro_batches
    data = 2 * 4 * params / lay.fsdp * (lay.data - 1) / lay.data
    tokens = cfg.global_batch * cfg.seq_len / (lay.data * lay.fsdp)
    passes = 6 if m.remat == "full" else 4
    tensor = tokens * m.n_layers * passes * m.d_model * act * 2 * (lay.tensor - 1) / lay.tensor
    return fsdp + data + tensor
