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
import logging
import math
import pathlib
import shutil
from collections.abc import Callable, Iterator, Mapping

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from mellama_jax import lora
from mellama_jax.checkpoint import Stacked, find_params, save_params, stored_arrays
from mellama_jax.config import DTYPES, ModelConfig
from mellama_jax.config_file import read_json_object, read_model_config
from mellama_jax.data.tokenizer import (
    TOKENIZER_MODEL_FILES,
    SentencePieceTokenizer,
    Tokenizer,
    check_vocab,
    load_tokenizer,
    write_hf_tokenizer_json,
)
from mellama_jax.errors import UserError
from mellama_jax.hf_files import (
    TensorInfo,
    hf_weight_files,
    read_safetensors_index,
    rope_buffer_mismatch,
    write_safetensors_shards,
)
from mellama_jax.model import abstract_model
from mellama_jax.outdir import staged_output

log = logging.getLogger(__name__)


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


def _get(tree: Mapping, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _hf_shape(rule: Rule, shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape if rule.n_in is None else (math.prod(shape[rule.n_in :]), math.prod(shape[: rule.n_in]))


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor this config has, with its HF shape."""
    ours = param_shapes(cfg)
    shapes = {}
    for name, rule, i in hf_names(cfg):
        full = _get(ours, rule.path).shape
        shapes[name] = _hf_shape(rule, full if i is None else full[1:])
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
        full = _get(shapes, rule.path).shape
        value = to_ours(rule, state_dict[name], full if i is None else full[1:])
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


_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")  # generation_config.json keys config.json shares


def export_hf(
    params: Mapping,
    cfg: ModelConfig,
    out_dir: pathlib.Path,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 10**9,
    generation: Mapping | None = None,
) -> None:
    """An HF `LlamaForCausalLM` folder: sharded safetensors + index, config.json, generation_config.json.

    `params` is our parameter tree; its stacked leaves only need `[i]` indexing, so a lazy reader that
    loads one layer slice at a time keeps memory at one tensor. `generation` is generation_config.json's
    content; its bos/eos/pad token ids also go into config.json.
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
    generation = {k: v for k, v in (generation or {}).items() if v is not None}
    ids = {k: v for k, v in generation.items() if k in _TOKEN_ID_KEYS}
    config = {**cfg.to_hf(), **ids, "torch_dtype": str(specs[0][2])}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def _tokenizer_of(folder: pathlib.Path, cfg: ModelConfig) -> Tokenizer | None:
    """The folder's tokenizer, checked against the model's vocabulary; None (with a warning) if it has none."""
    if not any((folder / name).is_file() for name in TOKENIZER_MODEL_FILES):
        log.warning("%s has no tokenizer.model or tokenizer.json; the output will have no tokenizer", folder)
        return None
    tokenizer = load_tokenizer(folder)
    check_vocab(tokenizer, cfg.vocab_size, str(folder))
    return tokenizer


def _copy_along(tokenizer: Tokenizer | None, out_dir: pathlib.Path, for_transformers: bool = False) -> None:
    """The tokenizer files, as they are; for transformers, a SentencePiece model also gets a matching tokenizer.json."""
    if tokenizer is None:
        return
    rewrite = for_transformers and isinstance(tokenizer, SentencePieceTokenizer)
    for file in tokenizer.files:
        if not (rewrite and file.name in ("tokenizer.json", "tokenizer_config.json")):
            shutil.copy2(file, out_dir / file.name)
    if rewrite:
        config = tokenizer.files[0].parent / "tokenizer_config.json"
        write_hf_tokenizer_json(tokenizer, out_dir, read_json_object(config) if config.is_file() else {})


# Legacy `pytorch_model*.bin`: opened only with `torch.load(weights_only=True, mmap=True)`, which refuses to
# unpickle anything but tensors and containers. torch is an optional extra, imported only for these files.


@dataclasses.dataclass(frozen=True)
class TorchTensor:
    """A tensor of a memory-mapped legacy `.bin` state dict."""

    tensor: object  # torch.Tensor; torch is an optional extra, imported only to read `.bin` files

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.read().dtype

    def read(self) -> np.ndarray:
        import torch

        t = self.tensor
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()


def _read_torch_bin(path: pathlib.Path) -> dict[str, TorchTensor]:
    try:
        import torch
    except ImportError:
        raise UserError(f"{path}: reading legacy .bin weights needs torch: pip install 'mellama-jax[hf]'") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types (UnpicklingError, RuntimeError, ...) for unsafe or bad files
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        reason = next((line for line in lines if line.startswith("WeightsUnpickler error:")), lines[0])
        raise UserError(f"{path}: not a tensors-only PyTorch state dict, refused ({reason[:160]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a flat dict of tensors")
    return {name: TorchTensor(tensor) for name, tensor in state.items()}


def read_hf_tensors(hf_dir: pathlib.Path) -> dict[str, TensorInfo | TorchTensor]:
    """Every tensor of an HF folder, by name, as a lazy handle with `shape`, `dtype` and `read()`."""
    tensors: dict[str, TensorInfo | TorchTensor] = {}
    for file in hf_weight_files(hf_dir):
        if file.suffix == ".bin":
            log.warning("%s: legacy PyTorch weights, read with torch.load(weights_only=True)", file.name)
            tensors.update(_read_torch_bin(file))
        else:
            tensors.update(read_safetensors_index(file))
    return tensors


def convert_hf_to_jax(
    hf_dir: pathlib.Path, out_dir: pathlib.Path, dtype: str | None = None, overwrite: bool = False
) -> ModelConfig:
    """HF folder -> `out_dir/params` (orbax) + `model_config.json` + tokenizer, one tensor in memory at a time.

    `model_config.json`: param_dtype is the stored weights' (the source's, or `dtype`); compute dtype float32 for
    float32 weights, else bfloat16.
    """
    hf_dir = pathlib.Path(hf_dir)
    try:
        cfg = ModelConfig.from_hf(read_json_object(hf_dir / "config.json"))
    except UserError as e:
        raise UserError(f"{hf_dir}: {e}" if str(e).startswith("config.json") else str(e)) from None
    tensors = read_hf_tensors(hf_dir)
    found = check_tensors(tensors, cfg, lambda name: tensors[name].read())
    if not dtype and (len(found) > 1 or next(iter(found)) not in DTYPES):  # one dtype for model_config.json
        kinds = " and ".join(f"{kind} ({name!r})" for kind, name in found.items())
        raise UserError(f"the weights are {kinds}; pass --dtype float32 or bfloat16 to store them in one")
    stored = dtype or next(iter(found))
    cfg = dataclasses.replace(cfg, param_dtype=stored, dtype="float32" if stored == "float32" else "bfloat16")
    tokenizer = _tokenizer_of(hf_dir, cfg)

    shapes, tree, out_dtype = param_shapes(cfg), {}, jax.numpy.dtype(stored)
    for rule in rules(cfg):
        full = _get(shapes, rule.path).shape
        if "{i}" in rule.hf:
            read = lambda i, r=rule, s=full[1:]: to_ours(r, tensors[r.hf.format(i=i)].read(), s).astype(out_dtype)  # noqa: E731
            _set(tree, rule.path, Stacked(tuple(full), out_dtype, read))
        else:
            _set(tree, rule.path, np.array(to_ours(rule, tensors[rule.hf].read(), full), dtype=out_dtype))
    with staged_output(out_dir, overwrite, inputs=[hf_dir]) as staging:
        save_params(staging / "params", tree)
        (staging / "model_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        _copy_along(tokenizer, staging)
        if (hf_dir / "generation_config.json").is_file():
            shutil.copy2(hf_dir / "generation_config.json", staging)
    return cfg


def convert_jax_to_hf(
    ckpt_dir: pathlib.Path,
    out_dir: pathlib.Path,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 10**9,
    overwrite: bool = False,
    adapter_only: bool = False,
    base_model: str | None = None,
) -> ModelConfig:
    """A CKPT_DIR (converted checkpoint or training run, latest complete step) -> an HF folder, layer by layer.

    A LoRA run exports its adapters merged into the weights, or with `adapter_only` a PEFT adapter folder
    (`base_model`: its `base_model_name_or_path`).
    """
    ckpt_dir = pathlib.Path(ckpt_dir)
    cfg = read_model_config(ckpt_dir / "model_config.json")
    item_dir, subtree = find_params(ckpt_dir, adapters=True)
    lora_cfg = lora.read_lora_config(ckpt_dir) if subtree else None
    if adapter_only and lora_cfg is None:
        raise UserError(f"{ckpt_dir}: --adapter-only needs a LoRA training run (one with {lora.LORA_CONFIG})")
    try:
        params = stored_arrays(item_dir, subtree)
        adapters = stored_arrays(item_dir, ("lora",)) if lora_cfg else {}
    except (KeyError, FileNotFoundError) as e:
        raise UserError(f"{item_dir}: no saved params ({type(e).__name__}: {e})") from None
    if adapter_only:
        with staged_output(out_dir, overwrite, inputs=[ckpt_dir]) as staging:
            lora.write_peft_adapter(adapters, lora_cfg, staging, dtype, base_model)
        return cfg
    expected = param_shapes(cfg)
    for rule in rules(cfg):
        where, want = f"{item_dir}: parameter {'/'.join(rule.path)}", _get(expected, rule.path).shape
        try:
            shape = _get(params, rule.path).shape
        except KeyError:
            raise UserError(f"{where} is missing") from None
        if shape != want:
            raise UserError(f"{where} has shape {shape}, model_config.json expects {want}")
    if lora_cfg:
        params = lora.merged_params(params, adapters, lora.scale(lora_cfg))
    tokenizer = _tokenizer_of(ckpt_dir, cfg)
    saved = ckpt_dir / "generation_config.json"
    if saved.is_file():
        generation = read_json_object(saved)
    elif tokenizer:
        ids = (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
        generation = dict(zip(_TOKEN_ID_KEYS, ids, strict=True))
    else:
        generation = {}
    with staged_output(out_dir, overwrite, inputs=[ckpt_dir]) as staging:
        export_hf(params, cfg, staging, dtype, max_shard_bytes, generation)
        _copy_along(tokenizer, staging, for_transformers=True)
    return cfg
