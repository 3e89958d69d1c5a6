"""The HF mapping table's refusals and layout, on synthetic state dicts (no torch needed)."""

import numpy as np
import pytest

from mellama_jax.config import ModelConfig
from mellama_jax.errors import UserError
from mellama_jax.hf.table import hf_names, params_from_hf, params_to_hf

CFG = ModelConfig.tiny(vocab_size=32, d_model=8, n_heads=2, n_kv_heads=1, head_dim=4, ffn_dim=12, n_layers=2)


def hf_state(cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Distinct values everywhere (arange), HF shapes as LlamaForCausalLM holds them."""
    d, n, k, h, f, v = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size
    shapes = {
        "embed_tokens": (v, d), "layernorm": (d,), "q_proj": (n * h, d), "k_proj": (k * h, d),
        "v_proj": (k * h, d), "o_proj": (d, n * h), "gate_proj": (f, d), "up_proj": (f, d),
        "down_proj": (d, f), "norm.weight": (d,), "lm_head": (v, d),
    }  # fmt: skip
    out, offset = {}, 0
    for name, _, _ in hf_names(cfg):
        shape = next(s for key, s in shapes.items() if key in name)
        out[name] = np.arange(offset, offset + np.prod(shape), dtype=np.float32).reshape(shape)
        offset += out[name].size
    return out


def test_q_projection_lands_in_einsum_layout():
    state = hf_state(CFG)
    q = params_from_hf(state, CFG)["layers"]["attn"]["q"]  # [L, D, N, H]
    hf_q1 = state["model.layers.1.self_attn.q_proj.weight"]  # [N*H, D], row n*H + h
    assert q.shape == (2, 8, 2, 4)
    assert q[1, 3, 1, 2] == hf_q1[1 * 4 + 2, 3]


def test_o_projection_lands_in_einsum_layout():
    state = hf_state(CFG)
    o = params_from_hf(state, CFG)["layers"]["attn"]["o"]  # [L, N, H, D]
    assert o[0, 1, 3, 5] == state["model.layers.0.self_attn.o_proj.weight"][5, 1 * 4 + 3]


def test_round_trip_keeps_every_tensor():
    state = hf_state(CFG)
    back = params_to_hf(params_from_hf(state, CFG), CFG)
    assert back.keys() == state.keys()
    assert all(np.array_equal(back[k], state[k]) for k in state)


def test_missing_tensor_is_named():
    state = hf_state(CFG)
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(UserError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        params_from_hf(state, CFG)


def test_unexpected_tensor_is_named():
    state = hf_state(CFG)
    state["model.layers.2.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(UserError, match=r"unexpected tensor 'model\.layers\.2\.mlp\.up_proj\.weight'"):
        params_from_hf(state, CFG)


def test_shape_mismatch_names_tensor_and_both_shapes():
    state = hf_state(CFG)
    state["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 8), np.float32)
    with pytest.raises(UserError, match=r"k_proj\.weight' has shape \(8, 8\), config expects \(4, 8\)"):
        params_from_hf(state, CFG)


def test_tied_head_is_accepted_only_as_a_copy_of_the_embedding():
    tied = ModelConfig.tiny(**{**CFG.__dict__, "tie_embeddings": True})
    state = hf_state(tied)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].copy()
    assert "lm_head" not in params_from_hf(state, tied)
    state["lm_head.weight"][0, 0] += 1
    with pytest.raises(UserError, match="tied but it differs"):
        params_from_hf(state, tied)
