"""The one mapping between Hugging Face `LlamaForCausalLM` tensor names and our parameter paths.

HF stores every linear layer flattened as [out, in]; we store einsum shapes with the input axes first
(q [D, N, H], o [N, H, D], gate [D, F]). So a linear maps as `ours = hf.T.reshape(ours_shape)` and
back as `hf = ours.reshape(prod(in axes), -1).T` — a pure transpose and reshape, hence bit-exact.
Both layouts use HF's rotate-half RoPE, so q and k need no permutation. Our layers are stacked on a
leading L axis; HF names them one by one (`{i}`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping

import jax
import numpy as np
from flax import nnx

from mellama_jax.config import ModelConfig
from mellama_jax.errors import UserError
from mellama_jax.hf.files import rope_buffer_mismatch
from mellama_jax.model.llama import abstract_model


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # HF tensor name; "{i}" is the layer index
    path: tuple[str, ...]  # our parameter path
    n_in: int | None  # linear: how many leading axes of ours are HF's `in`; None: same layout


TABLE = (
    Rule("model.embed_tokens.weight", ("embed",), None),
    Rule("model.layers.{i}.input_layernorm.weight", ("layers", "attn_norm", "scale"), None),
    Rule("model.layers.{i}.self_attn.q_proj.weight", ("layers", "attn", "q"), 1),
    Rule("model.layers.{i}.self_attn.k_proj.weight", ("layers", "attn", "k"), 1),
    Rule("model.layers.{i}.self_attn.v_proj.weight", ("layers", "attn", "v"), 1),
    Rule("model.layers.{i}.self_attn.o_proj.weight", ("layers", "attn", "o"), 2),
    Rule("model.layers.{i}.post_attention_layernorm.weight", ("layers", "mlp_norm", "scale"), None),
    Rule("model.layers.{i}.mlp.gate_proj.weight", ("layers", "mlp", "gate"), 1),
    Rule("model.layers.{i}.mlp.up_proj.weight", ("layers", "mlp", "up"), 1),
    Rule("model.layers.{i}.mlp.down_proj.weight", ("layers", "mlp", "down"), 1),
    Rule("model.norm.weight", ("final_norm", "scale"), None),
    Rule("lm_head.weight", ("lm_head",), 1),
)
TIED_HEAD = "lm_head.weight"  # absent, or a copy of embed_tokens, when embeddings are tied
ROTARY_BUFFER = "model.layers.{i}.self_attn.rotary_emb.inv_freq"  # saved by transformers < 4.31; dropped


def to_ours(rule: Rule, hf: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """One HF tensor (one layer's, for stacked paths) in our layout of `shape`."""
    return hf if rule.n_in is None else hf.T.reshape(shape)


def to_hf(rule: Rule, ours: np.ndarray) -> np.ndarray:
    """One of our tensors (one layer's, for stacked paths) in HF's layout."""
    if rule.n_in is None:
        return ours
    return ours.reshape(math.prod(ours.shape[: rule.n_in]), -1).T


def param_shapes(cfg: ModelConfig) -> dict:
    """Our parameter tree as ShapeDtypeStructs, without allocating anything."""
    return nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param))


def rules(cfg: ModelConfig) -> Iterator[Rule]:
    """The table's rows this config uses (a tied model has no separate head)."""
    return (rule for rule in TABLE if not (rule.hf == TIED_HEAD and cfg.tie_embeddings))


def hf_names(cfg: ModelConfig) -> Iterator[tuple[str, Rule, int | None]]:
    """Every HF tensor this config has: (name, rule, layer index or None)."""
    for rule in rules(cfg):
        if "{i}" in rule.hf:
            for i in range(cfg.n_layers):
                yield rule.hf.format(i=i), rule, i
        else:
            yield rule.hf, rule, None


def get_path(tree: Mapping, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def hf_shape(rule: Rule, shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape if rule.n_in is None else (math.prod(shape[rule.n_in :]), math.prod(shape[: rule.n_in]))


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor this config has, with its HF shape."""
    ours = param_shapes(cfg)
    shapes = {}
    for name, rule, i in hf_names(cfg):
        full = get_path(ours, rule.path).shape
        shapes[name] = hf_shape(rule, full if i is None else full[1:])
    return shapes


def check_tensors(tensors: Mapping, cfg: ModelConfig, read: Callable[[str], np.ndarray]) -> dict[str, str]:
    """Refuses a missing, unexpected, wrongly shaped or non-float HF tensor, naming it; `tensors` hold `shape`
    and `dtype`, and `read(name)` gives the data of those checked by value, then dropped (tied head, RoPE).
    Returns each dtype the weights have, with the first tensor of that dtype."""
    expected = hf_shapes(cfg)
    extra = set(tensors) - set(expected)
    if cfg.tie_embeddings and TIED_HEAD in extra:
        if not np.array_equal(read(TIED_HEAD), read("model.embed_tokens.weight")):
            raise UserError(f"{TIED_HEAD}: embeddings are tied but it differs from model.embed_tokens.weight")
        extra.discard(TIED_HEAD)
    buffers = extra & {ROTARY_BUFFER.format(i=i) for i in range(cfg.n_layers)}
    for name in sorted(buffers):
        wrong = rope_buffer_mismatch(read(name), cfg.rope_theta, cfg.head_dim)
        if wrong:
            raise UserError(f"tensor {name!r} is not the RoPE frequencies of rope_theta={cfg.rope_theta} ({wrong})")
    extra -= buffers
    if extra:
        raise UserError(f"unexpected tensor {sorted(extra)[0]!r} ({len(extra)} unexpected in all)")
    missing = set(expected) - set(tensors)
    if missing:
        raise UserError(f"missing tensor {sorted(missing)[0]!r} ({len(missing)} missing in all)")
    dtypes: dict[str, str] = {}
    for name, want in expected.items():
        shape, dtype = tuple(tensors[name].shape), np.dtype(tensors[name].dtype)
        if shape != want:
            raise UserError(f"tensor {name!r} has shape {shape}, config expects {want}")
        if not jax.numpy.issubdtype(dtype, jax.numpy.floating):
            raise UserError(f"tensor {name!r} has dtype {dtype}; weights must be floating point")
        dtypes.setdefault(dtype.name, name)
    return dtypes


def params_from_hf(state_dict: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict:
    """HF state dict (numpy) -> our nested parameter dict, in the HF arrays' dtype."""
    state_dict = {k: np.asarray(v) for k, v in state_dict.items()}
    check_tensors(state_dict, cfg, state_dict.__getitem__)
    shapes = param_shapes(cfg)
    layers: dict[tuple[str, ...], list[np.ndarray]] = {}
    params: dict = {}
    for name, rule, i in hf_names(cfg):
        full = get_path(shapes, rule.path).shape
        value = to_ours(rule, state_dict[name], full if i is None else full[1:])
        if i is None:
            set_path(params, rule.path, value)
        else:
            layers.setdefault(rule.path, []).append(value)
    for path, per_layer in layers.items():
        set_path(params, path, np.stack(per_layer))
    return params


def params_to_hf(params: Mapping, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our nested parameter dict -> HF state dict (numpy, dtype kept). Tied embeddings export no lm_head."""
    out = {}
    for name, rule, i in hf_names(cfg):
        ours = np.asarray(jax.device_get(get_path(params, rule.path)))
        out[name] = np.ascontiguousarray(to_hf(rule, ours if i is None else ours[i]))
    return out


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
