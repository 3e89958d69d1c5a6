"""Parity with the independent reference: transformers' LlamaForCausalLM (torch, fp32, eager attention)."""

import dataclasses

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from mellama_jax.config import ModelConfig
from mellama_jax.hf.config import from_hf_config, hf_config
from mellama_jax.hf.table import params_from_hf, params_to_hf
from mellama_jax.model.llama import with_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# init_std 0.1 (not 0.02) so logits spread over O(1) and a 1e-4 tolerance is a real constraint.
BASE = ModelConfig.tiny(vocab_size=128, d_model=64, head_dim=16, ffn_dim=96, init_std=0.1, dtype="float32")
CONFIGS = {
    "mha": dict(n_heads=4, n_kv_heads=4),
    "gqa": dict(n_heads=4, n_kv_heads=2),
    "mqa": dict(n_heads=4, n_kv_heads=1),
    "gqa-tied": dict(n_heads=4, n_kv_heads=2, tie_embeddings=True),
    "mha-tied": dict(n_heads=4, n_kv_heads=4, tie_embeddings=True),
    "gqa-theta500k": dict(n_heads=4, n_kv_heads=2, rope_theta=500000.0),
    "mqa-theta500k-tied": dict(n_heads=4, n_kv_heads=1, rope_theta=500000.0, tie_embeddings=True),
}
LOGIT_TOL = 1e-4  # max |Δlogit|, fp32 on both sides


def reference_model(cfg: ModelConfig, seed: int = 0):
    """A random HF model; norm weights are randomised too so they are tested, not left at 1."""
    torch.manual_seed(seed)
    hf_cfg = transformers.LlamaConfig(**hf_config(cfg), attn_implementation="eager")
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model


def numpy_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("seq_len", [7, 64])
@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(name, seq_len):
    cfg = dataclasses.replace(BASE, **CONFIGS[name])
    ref = reference_model(cfg)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, cfg.vocab_size, (2, seq_len))
    positions = np.arange(seq_len)[None, :] + np.array([[0], [5]])  # second row starts at position 5

    with torch.no_grad():
        expected = ref(torch.tensor(tokens), position_ids=torch.tensor(positions)).logits.numpy()
    ours = with_params(cfg, params_from_hf(numpy_state(ref), cfg))
    logits, _ = ours(jnp.asarray(tokens), jnp.asarray(positions))

    assert logits.dtype == jnp.float32
    assert expected.std() > 0.3, "logits too flat for the tolerance to mean anything"
    np.testing.assert_allclose(np.asarray(logits), expected, atol=LOGIT_TOL, rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["gqa", "mha-tied"])
def test_hf_to_ours_to_hf_is_bit_identical(name, dtype):
    cfg = dataclasses.replace(BASE, **CONFIGS[name])
    ref = reference_model(cfg).to(getattr(torch, dtype))
    if dtype == "bfloat16":  # numpy has no bf16: reinterpret the bits as ml_dtypes.bfloat16
        state = {k: v.view(torch.int16).numpy().view(ml_dtypes.bfloat16) for k, v in ref.state_dict().items()}
    else:
        state = numpy_state(ref)
    if cfg.tie_embeddings:  # a tied export carries no lm_head; transformers re-ties it on load
        assert np.array_equal(state.pop("lm_head.weight"), state["model.embed_tokens.weight"])

    back = params_to_hf(params_from_hf(state, cfg), cfg)

    assert back.keys() == state.keys()
    for key, value in state.items():
        assert back[key].dtype == value.dtype, key
        assert back[key].shape == value.shape, key
        assert back[key].tobytes() == value.tobytes(), f"{key} differs"


def test_transformers_reads_our_config_and_we_read_its_own():
    cfg = dataclasses.replace(BASE, **CONFIGS["mqa-theta500k-tied"])
    hf_cfg = transformers.LlamaConfig(**hf_config(cfg))
    assert hf_cfg.num_key_value_heads == 1
    assert hf_cfg.tie_word_embeddings is True
    # transformers 5 moves rope_theta into rope_parameters; our reader takes either form.
    assert hf_cfg.to_dict()["rope_parameters"]["rope_theta"] == 500000.0
    assert from_hf_config(hf_cfg.to_dict(), dtype="float32", remat="none") == cfg
