"""The HF `config.json` of a LLaMA, both ways: what each attribute means for `ModelConfig`, and what is refused."""

from __future__ import annotations

import json
import typing
from typing import Any

from mellama_jax.config import ModelConfig, typed
from mellama_jax.errors import UserError

# HF attribute -> our field, for attributes that translate one to one.
_HF_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "d_model",
    "intermediate_size": "ffn_dim",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads",
    "head_dim": "head_dim",
    "rms_norm_eps": "rms_eps",
    "max_position_embeddings": "max_seq_len",
    "tie_word_embeddings": "tie_embeddings",
    "initializer_range": "init_std",
}
# Attributes that describe the file, the tokenizer or torch runtime, not the function the model computes.
_HF_IGNORED = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "sep_token_id", "pretraining_tp",
    "output_attentions", "output_hidden_states", "return_dict", "tokenizer_class", "chunk_size_feed_forward",
    "is_encoder_decoder", "id2label", "label2id", "problem_type", "tf_legacy_loss", "use_bfloat16",
}  # fmt: skip
# Attributes we accept only at the value that means "the plain LLaMA computation".
_HF_MUST_BE = {
    "hidden_act": ("silu",),
    "attention_bias": (False,),
    "mlp_bias": (False,),
    "attention_dropout": (0, 0.0),
}


_HF_NULL_MEANS_DEFAULT = ("num_key_value_heads", "head_dim")  # transformers: = num_attention_heads, d / n_heads


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """A `config.json` dict that transformers 4.x and 5.x both read (rope_theta at top level)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.rms_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
    }


def from_hf_config(hf: Any, **kw) -> ModelConfig:
    """The ModelConfig of a `config.json` dict (`kw`: our own fields, e.g. dtype); a UserError names any attribute
    we do not implement: we refuse rather than guess."""
    if not isinstance(hf, dict):
        raise UserError(f"config.json: expected a JSON object of attributes, got a {type(hf).__name__}")
    kinds = typing.get_type_hints(ModelConfig)
    fields: dict[str, Any] = {}
    thetas: dict[str, float] = {}  # where each RoPE base is given -> its value
    for key, value in hf.items():
        if key in _HF_FIELDS:
            if not (value is None and key in _HF_NULL_MEANS_DEFAULT):
                fields[_HF_FIELDS[key]] = typed(value, kinds[_HF_FIELDS[key]], f"config.json: {key}")
        elif key in _HF_MUST_BE:
            if value not in _HF_MUST_BE[key]:
                raise UserError(f"config.json: unsupported {key}={value!r} (supported: {_HF_MUST_BE[key]})")
        elif key == "rope_theta":
            thetas[key] = typed(value, float, "config.json: rope_theta")
        elif key in ("rope_parameters", "rope_scaling"):  # transformers 5 moves rope_theta into these
            theta = _rope_theta(key, value)
            if theta is not None:
                thetas[f"{key}.rope_theta"] = theta
        elif key not in _HF_IGNORED and not key.startswith("_"):
            raise UserError(f"config.json: unsupported attribute {key!r}={value!r}; refusing to guess")
    if hf.get("model_type", "llama") != "llama":
        raise UserError(f"config.json: unsupported model_type={hf['model_type']!r} (supported: 'llama')")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]  # fmt: skip
    if missing:
        raise UserError(f"config.json: missing required attribute(s) {', '.join(missing)}")
    first = next(iter(thetas), None)
    for where, theta in thetas.items():  # transformers 5 silently prefers rope_parameters; we refuse to choose
        if theta != thetas[first]:
            raise UserError(f"config.json: {first}={thetas[first]} and {where}={theta} disagree; which RoPE base?")
    if thetas:
        fields["rope_theta"] = thetas[first]
    fields.setdefault("n_kv_heads", fields["n_heads"])
    if "head_dim" not in fields and fields["n_heads"] > 0:  # n_heads <= 0 is refused by ModelConfig, by name
        fields["head_dim"] = fields["d_model"] // fields["n_heads"]
    return ModelConfig(**fields, **kw)


def _rope_theta(key: str, rope: Any) -> float | None:
    """Accepts only plain RoPE: None or rope_type 'default'; returns its theta when it names one."""
    if rope is not None and not isinstance(rope, dict):
        raise UserError(f"config.json: {key} must be an object or null, got {json.dumps(rope)}")
    rope = rope or {}
    unsupported = {k: v for k, v in rope.items() if k not in ("rope_type", "type", "rope_theta")}
    if rope.get("rope_type", rope.get("type", "default")) != "default" or unsupported:
        raise UserError(f"config.json: unsupported {key}={rope!r} (only plain RoPE, rope_type 'default')")
    return typed(rope["rope_theta"], float, f"config.json: {key}.rope_theta") if "rope_theta" in rope else None
