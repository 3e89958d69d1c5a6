"""Whole conversions: a Hugging Face `LlamaForCausalLM` folder to our checkpoint and back, one tensor in memory
at a time, through the mapping table (`table.py`); tokenizer files and generation settings travel along."""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import shutil
from collections.abc import Mapping

import jax
import numpy as np

from mellama_jax.checkpoint import LORA_CONFIG, Stacked, find_params, save_params, stored_arrays
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
from mellama_jax.hf.config import from_hf_config, hf_config
from mellama_jax.hf.files import read_hf_tensors, write_safetensors_shards
from mellama_jax.hf.table import (
    check_tensors,
    get_path,
    hf_names,
    hf_shape,
    param_shapes,
    rules,
    set_path,
    to_hf,
    to_ours,
)
from mellama_jax.model import lora
from mellama_jax.outdir import staged_output

log = logging.getLogger(__name__)


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
        ours = get_path(params, rule.path)
        ours = np.asarray(jax.device_get(ours if i is None else ours[i]))
        return to_hf(rule, ours).astype(dtype or ours.dtype, copy=False)

    def spec(name: str) -> tuple[str, tuple[int, ...], np.dtype]:
        rule, i = rows[name]
        leaf = get_path(params, rule.path)
        shape = tuple(leaf.shape if i is None else leaf.shape[1:])
        return name, hf_shape(rule, shape), np.dtype(dtype or leaf.dtype)

    specs = [spec(name) for name in rows]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_safetensors_shards(specs, get, out_dir, max_shard_bytes)
    generation = {k: v for k, v in (generation or {}).items() if v is not None}
    ids = {k: v for k, v in generation.items() if k in _TOKEN_ID_KEYS}
    config = {**hf_config(cfg), **ids, "torch_dtype": str(specs[0][2])}
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


def convert_hf_to_jax(
    hf_dir: pathlib.Path, out_dir: pathlib.Path, dtype: str | None = None, overwrite: bool = False
) -> ModelConfig:
    """HF folder -> `out_dir/params` (orbax) + `model_config.json` + tokenizer, one tensor in memory at a time.

    `model_config.json`: param_dtype is the stored weights' (the source's, or `dtype`); compute dtype float32 for
    float32 weights, else bfloat16.
    """
    hf_dir = pathlib.Path(hf_dir)
    try:
        cfg = from_hf_config(read_json_object(hf_dir / "config.json"))
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
        full = get_path(shapes, rule.path).shape
        if "{i}" in rule.hf:
            read = lambda i, r=rule, s=full[1:]: to_ours(r, tensors[r.hf.format(i=i)].read(), s).astype(out_dtype)  # noqa: E731
            set_path(tree, rule.path, Stacked(tuple(full), out_dtype, read))
        else:
            set_path(tree, rule.path, np.array(to_ours(rule, tensors[rule.hf].read(), full), dtype=out_dtype))
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
        raise UserError(f"{ckpt_dir}: --adapter-only needs a LoRA training run (one with {LORA_CONFIG})")
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
        where, want = f"{item_dir}: parameter {'/'.join(rule.path)}", get_path(expected, rule.path).shape
        try:
            shape = get_path(params, rule.path).shape
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
