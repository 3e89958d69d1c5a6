"""The one mapping between Hugging Face `LlamaForCausalLM` tensor names and our parameter paths.

HF stores every linear layer flattened as [out, in]; we store einsum shapes with the input axes first
(q [D, N, H], o [N, H, D], gate [D, F]). So a linear maps as `ours = hf.T.reshape(ours_shape)` and
back as `hf = ours.reshape(prod(in axes), -1).T` — a pure transpose and reshape, hence bit-exact.
Both layouts use HF's rotate-half RoPE, so q and k need no permutation. Our layers are stacked on a
leading L axis; HF names them one by one (`{i}`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from mellama_jax.config import ModelConfig
from mellama_jax.errors import UserError
from mellama_jax.model import abstract_model


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


def _get(tree: Mapping, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _hf_shape(rule: Rule, shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape if rule.n_in is None else (math.prod(shape[rule.n_in :]), math.prod(shape[: rule.n_in]))


def check_tensors(shapes: Mapping[str, tuple[int, ...]], cfg: ModelConfig, tied_head_equal: Callable[[], bool]) -> None:
    """Refuses a missing, unexpected or wrongly shaped HF tensor, naming it; needs only shapes, no data."""
    ours = param_shapes(cfg)
    expected = {name: (rule, i) for name, rule, i in hf_names(cfg)}
    extra = set(shapes) - set(expected)
    if cfg.tie_embeddings and TIED_HEAD in extra:
        if not tied_head_equal():
            raise UserError(f"{TIED_HEAD}: embeddings are tied but it differs from model.embed_tokens.weight")
        extra.discard(TIED_HEAD)
    if extra:
        raise UserError(f"unexpected tensor {sorted(extra)[0]!r} ({len(extra)} unexpected in all)")
    missing = set(expected) - set(shapes)
    if missing:
        raise UserError(f"missing tensor {sorted(missing)[0]!r} ({len(missing)} missing in all)")
    for name, (rule, i) in expected.items():
        full = _get(ours, rule.path).shape
        want = _hf_shape(rule, full if i is None else full[1:])
        if tuple(shapes[name]) != want:
            raise UserError(f"tensor {name!r} has shape {tuple(shapes[name])}, config expects {want}")


def params_from_hf(state_dict: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict:
    """HF state dict (numpy) -> our nested parameter dict, in the HF arrays' dtype."""
    embed = "model.embed_tokens.weight"
    tied_equal = lambda: np.array_equal(state_dict[TIED_HEAD], state_dict.get(embed))  # noqa: E731
    check_tensors({k: np.shape(v) for k, v in state_dict.items()}, cfg, tied_equal)
    shapes = param_shapes(cfg)
    layers: dict[tuple[str, ...], list[np.ndarray]] = {}
    params: dict = {}
    for name, rule, i in hf_names(cfg):
        full = _get(shapes, rule.path).shape
        value = to_ours(rule, np.asarray(state_dict[name]), full if i is None else full[1:])
        if i is None:
            _set(params, rule.path, value)
        else:
            layers.setdefault(rule.path, []).append(value)
    for path, per_layer in layers.items():
        _set(params, path, np.stack(per_layer))
    return params


def params_to_hf(params: Mapping, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our nested parameter dict -> HF state dict (numpy, dtype kept). Tied embeddings export no lm_head."""
    out = {}
    for name, rule, i in hf_names(cfg):
        ours = np.asarray(jax.device_get(_get(params, rule.path)))
        out[name] = np.ascontiguousarray(to_hf(rule, ours if i is None else ours[i]))
    return out


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# --- safetensors, read and written tensor by tensor ------------------------------------------------
# The format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
# then raw little-endian bytes. We read it ourselves because the `safetensors` numpy API has no bf16,
# and one memmap per tensor (released after use) keeps resident memory at one tensor, not one shard.

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip
_DTYPE_NAMES = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: pathlib.Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`

    def read(self) -> np.ndarray:
        """The tensor, memory-mapped read-only; dropping it releases the mapping."""
        if math.prod(self.shape) == 0:
            return np.zeros(self.shape, self.dtype)
        return np.memmap(self.file, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)


def read_safetensors_index(path: pathlib.Path) -> dict[str, TensorInfo]:
    """Every tensor's dtype, shape and location, from the header alone."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        return {
            name: TensorInfo(
                path, np.dtype(SAFETENSORS_DTYPES[h["dtype"]]), tuple(h["shape"]), 8 + length + h["data_offsets"][0]
            )
            for name, h in header.items()
        }
    except (OSError, struct.error, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def plan_shards(specs: Sequence[tuple[str, tuple[int, ...], np.dtype]], max_shard_bytes: int) -> list[list[int]]:
    """Tensors (in order) grouped into shards of at most `max_shard_bytes` (a bigger tensor gets its own)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, dtype) in enumerate(specs):
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def write_safetensors_shards(
    specs: Sequence[tuple[str, tuple[int, ...], np.dtype]],
    get: Callable[[str], np.ndarray],
    out_dir: pathlib.Path,
    max_shard_bytes: int,
) -> None:
    """`model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`, holding one tensor at a time."""
    shards = plan_shards(specs, max_shard_bytes)
    weight_map, total = {}, 0
    for s, members in enumerate(shards, start=1):
        name = f"model-{s:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for i in members:
            key, shape, dtype = specs[i]
            nbytes = math.prod(shape) * np.dtype(dtype).itemsize
            header[key] = {
                "dtype": _DTYPE_NAMES[np.dtype(dtype)],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
            weight_map[key] = name
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        with open(out_dir / name, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for i in members:
                key, shape, dtype = specs[i]
                array = np.ascontiguousarray(get(key))
                if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
                    raise ValueError(f"{key}: got {array.dtype}{array.shape}, planned {np.dtype(dtype)}{tuple(shape)}")
                f.write(memoryview(array.reshape(-1).view(np.uint8)))
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def export_hf(
    params: Mapping,
    cfg: ModelConfig,
    out_dir: pathlib.Path,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 10**9,
    generation: Mapping[str, int | None] | None = None,
) -> None:
    """An HF `LlamaForCausalLM` folder: sharded safetensors + index, config.json, generation_config.json.

    `params` is our parameter tree; its stacked leaves only need `[i]` indexing, so a lazy reader that
    loads one layer slice at a time keeps memory at one tensor. `generation` holds bos/eos/pad token ids.
    """
    rows = {name: (rule, i) for name, rule, i in hf_names(cfg)}

    def get(name: str) -> np.ndarray:
        rule, i = rows[name]
        ours = _get(params, rule.path)
        ours = np.asarray(jax.device_get(ours if i is None else ours[i]))
        return to_hf(rule, ours).astype(dtype or ours.dtype, copy=False)

    def spec(name: str) -> tuple[str, tuple[int, ...], np.dtype]:
        rule, i = rows[name]
        leaf = _get(params, rule.path)
        shape = tuple(leaf.shape if i is None else leaf.shape[1:])
        return name, _hf_shape(rule, shape), np.dtype(dtype or leaf.dtype)

    specs = [spec(name) for name in rows]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_safetensors_shards(specs, get, out_dir, max_shard_bytes)
    ids = {k: v for k, v in (generation or {}).items() if v is not None}
    config = {**cfg.to_hf(), **ids, "torch_dtype": str(specs[0][2])}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")


def hf_weight_files(hf_dir: pathlib.Path) -> list[pathlib.Path]:
    """The safetensors files of an HF folder: from its index, or the single/sharded files themselves."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise UserError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        missing = [n for n in names if not (hf_dir / n).is_file()]
        if missing:
            raise UserError(f"{index}: names shard {missing[0]!r}, which is not in {hf_dir}")
        return [hf_dir / n for n in names]
    files = sorted(hf_dir.glob("model*.safetensors"))
    if not files:
        raise UserError(f"{hf_dir}: no model.safetensors, model-*.safetensors or model.safetensors.index.json")
    return files


def convert_hf_to_jax(hf_dir: pathlib.Path, out_dir: pathlib.Path, dtype: str | None = None) -> ModelConfig:
    """HF folder -> `out_dir/params` (orbax) + `model_config.json`, one tensor in memory at a time."""
    try:
        cfg = ModelConfig.from_hf(json.loads((hf_dir / "config.json").read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{hf_dir / 'config.json'}: cannot read ({type(e).__name__}: {e})") from None
    tensors: dict[str, TensorInfo] = {}
    for file in hf_weight_files(hf_dir):
        tensors.update(read_safetensors_index(file))
    embed = "model.embed_tokens.weight"
    tied_equal = lambda: np.array_equal(tensors[TIED_HEAD].read(), tensors[embed].read())  # noqa: E731
    check_tensors({k: t.shape for k, t in tensors.items()}, cfg, tied_equal)

    from mellama_jax.checkpoint import Stacked, save_params

    shapes, tree = param_shapes(cfg), {}
    for rule in rules(cfg):
        full = _get(shapes, rule.path).shape
        out_dtype = jax.numpy.dtype(dtype) if dtype else tensors[rule.hf.format(i=0)].dtype
        if "{i}" in rule.hf:
            read = lambda i, r=rule, s=full[1:], d=out_dtype: to_ours(r, tensors[r.hf.format(i=i)].read(), s).astype(d)  # noqa: E731
            _set(tree, rule.path, Stacked(tuple(full), out_dtype, read))
        else:
            _set(tree, rule.path, np.array(to_ours(rule, tensors[rule.hf].read(), full), dtype=out_dtype))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_params(out_dir / "params", tree)
    (out_dir / "model_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    return cfg
