"""Scoring chosen positions (model/scoring.py): the same log-probabilities as the whole logits give, in pieces,
and no [B, T, V] tensor in the compiled program. Parity with transformers is in test_lm_eval.py."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mellama_jax.config import ModelConfig
from mellama_jax.model import scoring
from mellama_jax.model.llama import Llama, abstract_model, with_params

CFG = ModelConfig.tiny(vocab_size=96, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=48, init_std=0.2,
                       dtype="float32")  # fmt: skip
TOL = 1e-5  # |Δ log-prob|, fp32 both ways: the same products, only the reduction differs


@pytest.mark.parametrize("budget", [scoring.LOGIT_BYTES, 3 * 2 * 96 * 4])  # one piece; pieces of 2 positions
def test_picked_positions_score_as_the_whole_logits_do(monkeypatch, budget):
    monkeypatch.setattr(scoring, "LOGIT_BYTES", budget)
    params = nnx.to_pure_dict(nnx.state(Llama(CFG, rngs=nnx.Rngs(0)), nnx.Param))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (3, 24)), jnp.int32)
    picks = jnp.asarray([[0, 5, 9, 23, 1], [22, 21, 20, 0, 0], [7, 7, 3, 12, 13]], jnp.int32)  # K = 5: not whole pieces
    targets = jnp.asarray(rng.integers(0, CFG.vocab_size, picks.shape), jnp.int32)

    logp, top = jax.jit(scoring.token_logprobs, static_argnums=0)(CFG, params, {}, tokens, picks, targets)

    positions = jnp.broadcast_to(jnp.arange(24), tokens.shape)
    logits = with_params(CFG, params)(tokens, positions)[0]  # [B, T, V]: the path scoring avoids
    at = jnp.take_along_axis(logits, picks[..., None], axis=1)
    expected = jnp.take_along_axis(jax.nn.log_softmax(at, axis=-1), targets[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(logp, expected, atol=TOL, rtol=0)
    np.testing.assert_array_equal(top, jnp.argmax(at, axis=-1))


def test_eight_rows_of_4096_with_a_32000_vocabulary_never_hold_a_gigabyte_of_logits():
    """Compiled, not run: the largest buffer with a vocabulary axis is one piece's logits."""
    cfg = dataclasses.replace(CFG, vocab_size=32000, max_seq_len=4096, n_layers=1)
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), nnx.to_pure_dict(nnx.state(
        abstract_model(cfg), nnx.Param)))  # fmt: skip
    rows = jax.ShapeDtypeStruct((8, 4096), jnp.int32)
    fn = jax.jit(scoring.token_logprobs, static_argnums=0)
    compiled = fn.lower(cfg, params, {}, rows, rows, rows).compile()  # rolling: every position scored
    hlo = compiled.as_text()
    # Buffers with a vocabulary axis (the attention's own [B, K, G, T, T] scores are XLA:CPU's reference
    # attention, not logits: on a GPU the flash kernel never makes them).
    with_vocab = [np.prod([int(d) for d in shape.split(",")]) for shape in re.findall(r"f32\[([\d,]+)\]", hlo)
                  if "32000" in shape.split(",")]  # fmt: skip
    assert with_vocab, "the projection is in the program"
    assert max(with_vocab) * 4 <= scoring.LOGIT_BYTES, f"a {max(with_vocab) * 4 / 2**20:.0f} MiB buffer of logits"
    assert max(with_vocab) * 4 < 1 << 30 and "f32[8,4096,32000]" not in hlo
