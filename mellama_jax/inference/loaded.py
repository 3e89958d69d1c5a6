"""A checkpoint loaded for inference (`generate.load` makes it; `quality.quantized` holds its weights as integers)."""

from __future__ import annotations

import dataclasses

from jax.sharding import Mesh

from mellama_jax.config import ModelConfig
from mellama_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A checkpoint ready to generate or score: its model, params placed on `mesh`, tokenizer and stop ids."""

    cfg: ModelConfig
    params: dict  # nnx pure dict of jax arrays on `mesh`, as model.with_params takes
    tokenizer: Tokenizer
    eos_ids: tuple[int, ...]  # generation_config.json's eos_token_id, else the tokenizer's EOS
    mesh: Mesh
    fingerprint: str  # "sha256:<hex>" of the params' stored files
    scales: dict | None = None  # with `quantize`: the integer layer weights' scales (model/quant.py)
    quantize: str | None = None  # None, "int8" or "int4"
    quant_report: dict | None = None  # what quantizing cost, measured at load (inference/quality.py)
