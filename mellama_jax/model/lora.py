"""LoRA (Hu et al., 2021): low-rank adapters on the frozen base weights, trained alone.

Each target weight W [L, *in, *out] gets A [L, *in, r] (PEFT's kaiming-uniform init) and B [L, r, *out]
(zeros), so training starts from the base model exactly. The forward uses W + (alpha / r)·A·B, formed one
layer at a time inside the model's layer scan (`merge_layer`): never a merged copy of the whole stack.
Dropout on the adapter's input is not supported (LoraConfig refuses dropout > 0), so this merged form is
exact. Adapters carry the base weight's logical axis names plus an unsharded rank axis, so they shard by
the same table.

The train step differentiates one tree, `trainable(cfg)` picks which: the whole `params` (full fine-tuning)
or the `lora` adapters alone; the base then gets no gradient buffers and no optimizer state.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from jax.sharding import PartitionSpec

from mellama_jax.checkpoint import LORA_CONFIG
from mellama_jax.config import LoraConfig, TrainConfig
from mellama_jax.config_file import read_json_object
from mellama_jax.errors import UserError

# target name -> (path of the base weight inside a layer, how many leading axes are its input)
TARGETS = {
    "q": (("attn", "q"), 1),
    "k": (("attn", "k"), 1),
    "v": (("attn", "v"), 1),
    "o": (("attn", "o"), 2),
    "gate": (("mlp", "gate"), 1),
    "up": (("mlp", "up"), 1),
    "down": (("mlp", "down"), 1),
}


def scale(cfg: LoraConfig) -> float:
    """The adapters' multiplier alpha / rank, as PEFT uses it (no rsLoRA)."""
    return cfg.alpha / cfg.rank


def _get(tree: Mapping, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def init_adapters(cfg: LoraConfig, layers: Mapping, key: jax.Array) -> dict:
    """Adapters for the stacked layer params `layers` (leaves [L, ...]): {target: {"a": A, "b": B}}.

    A ~ U(-1/sqrt(in), 1/sqrt(in)) per layer (PEFT: kaiming_uniform with a=sqrt(5) on an [r, in] Linear), B = 0.
    """
    adapters = {}
    for name, k in zip(cfg.targets, jax.random.split(key, len(cfg.targets)), strict=True):
        path, n_in = TARGETS[name]
        w = _get(layers, path)
        l_, ins, outs = w.shape[0], w.shape[1 : 1 + n_in], w.shape[1 + n_in :]
        bound = 1.0 / math.sqrt(math.prod(ins))
        a = jax.random.uniform(k, (l_, *ins, cfg.rank), w.dtype, -bound, bound)
        adapters[name] = {"a": a, "b": jnp.zeros((l_, cfg.rank, *outs), w.dtype)}
    return adapters


def logical_names(cfg: LoraConfig, layer_names: Mapping) -> dict:
    """The adapters' logical axis names (PartitionSpecs of logical names, as the base weights' `layer_names`)."""
    out = {}
    for name in cfg.targets:
        path, n_in = TARGETS[name]
        layers, *axes = tuple(_get(layer_names, path))
        out[name] = {"a": PartitionSpec(layers, *axes[:n_in], None), "b": PartitionSpec(layers, None, *axes[n_in:])}
    return out


def delta(a: jax.Array, b: jax.Array, s: float) -> jax.Array:
    """s·A·B for one layer: a [*in, r], b [r, *out] -> [*in, *out]."""
    return s * jnp.tensordot(a, b, axes=1)


def row_delta(x: jax.Array, ab: Mapping | None, n_in: int = 1) -> jax.Array | int:
    """Each row's own x·A·B: x [B, T, *in], ab {"a": [B, *in, r], "b": [B, r, *out]} (scale in b) -> [B, T, *out].

    0 without adapters. Serving gathers a request's adapter per row, so one batch mixes adapters unmerged.
    """
    if ab is None:
        return 0
    a, b = ab["a"], ab["b"]
    rows, t, rank = x.shape[0], x.shape[1], a.shape[-1]
    xa = jnp.einsum("BTI,BIR->BTR", x.reshape(rows, t, -1), a.reshape(rows, -1, rank).astype(x.dtype))
    out = jnp.einsum("BTR,BRO->BTO", xa, b.reshape(rows, rank, -1).astype(x.dtype))
    return out.reshape(rows, t, *b.shape[2:])


def merge_layer(layer: dict, adapters: Mapping, s: float) -> dict:
    """One layer's params (a pure dict) with every adapted weight replaced by W + s·A·B."""
    merged = jax.tree.map(lambda x: x, layer)  # a new tree: the caller's stays as it was
    for name, ab in adapters.items():
        (module, weight), _ = TARGETS[name]
        w = merged[module][weight]
        merged[module][weight] = w + delta(ab["a"], ab["b"], s).astype(w.dtype)
    return merged


def fold(params: Mapping, adapters: Mapping, s: float) -> dict:
    """The params with every adapter folded into its stacked base weight (W + s·A·B in each layer), for inference."""
    layers = jax.vmap(lambda layer, ab: merge_layer(layer, ab, s))(params["layers"], adapters)
    return {**params, "layers": layers}


def count(cfg: LoraConfig, layers: Mapping) -> int:
    """Trainable parameters: the sum over targets of r·(in + out)·L."""
    total = 0
    for name in cfg.targets:
        path, n_in = TARGETS[name]
        shape = _get(layers, path).shape
        total += cfg.rank * (math.prod(shape[1 : 1 + n_in]) + math.prod(shape[1 + n_in :])) * shape[0]
    return total


@dataclasses.dataclass(frozen=True)
class Trainable:
    """Which part of a TrainState the optimizer trains: `get(state)` is that tree, `put(state, tree)` sets it,
    and `split(state, tree, batch)` gives `loss_sums`' (params, batch, adapters) when `tree` is trained."""

    get: Callable
    put: Callable
    split: Callable


def trainable(cfg: TrainConfig) -> Trainable:
    """Full fine-tuning trains `params`; with a `lora` section, only the adapters in `lora`."""
    if cfg.lora is None:
        return Trainable(lambda s: s.params, lambda s, t: s.replace(params=t), lambda s, t, b: (t, b, s.lora))
    return Trainable(lambda s: s.lora, lambda s, t: s.replace(lora=t), lambda s, t, b: (s.params, b, t))


@dataclasses.dataclass(frozen=True)
class MergedStack:
    """A stacked base weight with its adapter folded in, one layer at a time (export reads `[i]`)."""

    base: object  # [L, *in, *out], indexable per layer (a StoredArray or an array)
    a: object  # [L, *in, r]
    b: object  # [L, r, *out]
    scale: float

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.base.dtype)

    def __getitem__(self, i: int) -> np.ndarray:
        w = np.asarray(self.base[i])
        d = np.tensordot(np.asarray(self.a[i], np.float32), np.asarray(self.b[i], np.float32), axes=1)
        return (w.astype(np.float32) + self.scale * d).astype(w.dtype)


def merged_params(params: Mapping, adapters: Mapping, s: float) -> dict:
    """The parameter tree with every adapted stacked weight read as a `MergedStack` (nothing computed yet)."""
    out = jax.tree.map(lambda x: x, dict(params), is_leaf=lambda x: not isinstance(x, Mapping))
    for name, ab in adapters.items():
        (module, weight), _ = TARGETS[name]
        out["layers"][module][weight] = MergedStack(params["layers"][module][weight], ab["a"], ab["b"], s)
    return out


# PEFT's names: our target -> the HF module it adapts (hf.TABLE's `{i}` rows), and its LoraConfig keys.
PEFT_MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
PEFT_KEY = "base_model.model.model.layers.{i}.{module}.lora_{ab}.weight"


def peft_tensors(adapters: Mapping, dtype: str | None = None) -> dict[str, np.ndarray]:
    """PEFT's adapter state dict: lora_A [r, in] and lora_B [out, r] per layer, HF's flattened in/out axes.

    HF's delta is scale·B_hf·A_hf = scale·(A·B)ᵀ over the flattened axes, i.e. our W + scale·A·B in HF's layout.
    """
    out = {}
    for name, ab in adapters.items():
        a, b = ab["a"], ab["b"]
        for i in range(a.shape[0]):
            a_i, b_i = np.asarray(a[i]), np.asarray(b[i])
            rank = a_i.shape[-1]
            tensors = {"A": a_i.reshape(-1, rank).T, "B": b_i.reshape(rank, -1).T}
            for ab_name, value in tensors.items():
                key = PEFT_KEY.format(i=i, module=PEFT_MODULES[name], ab=ab_name)
                out[key] = np.ascontiguousarray(value.astype(dtype or value.dtype))
    return out


def peft_config(cfg: LoraConfig, base_model: str | None = None) -> dict:
    """`adapter_config.json` for PEFT's LoraConfig (causal LM, no bias, plain LoRA)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": [PEFT_MODULES[t].split(".")[1] for t in cfg.targets],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def read_lora_config(run_dir: pathlib.Path) -> LoraConfig | None:
    """A run's LoraConfig (its `lora_config.json`), or None for a run without adapters."""
    path = pathlib.Path(run_dir) / LORA_CONFIG
    if not path.is_file():
        return None
    raw = read_json_object(path)
    try:
        return LoraConfig(**{**raw, "targets": tuple(raw.get("targets", LoraConfig.targets))})
    except (TypeError, UserError) as e:
        raise UserError(f"{path}: {e}") from None


def write_peft_adapter(adapters: Mapping, cfg: LoraConfig, out_dir: pathlib.Path, dtype: str | None = None,
                       base_model: str | None = None) -> None:  # fmt: skip
    """A PEFT adapter folder: `adapter_config.json` + `adapter_model.safetensors`."""
    safetensors.numpy.save_file(peft_tensors(adapters, dtype), str(out_dir / "adapter_model.safetensors"))
    (out_dir / "adapter_config.json").write_text(json.dumps(peft_config(cfg, base_model), indent=2) + "\n")
