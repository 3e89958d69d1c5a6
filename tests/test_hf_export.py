"""Our HF export loads in transformers and computes the same logits; safetensors I/O against the library."""

import dataclasses
import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from test_hf_parity import BASE, CONFIGS, LOGIT_TOL, numpy_state, reference_model

from mellama_jax.hf.convert import export_hf
from mellama_jax.hf.files import read_safetensors_index
from mellama_jax.hf.table import params_from_hf
from mellama_jax.model.llama import with_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


def as_numpy(t):
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()


def test_reader_matches_safetensors_library(tmp_path):
    tensors = {"w": torch.randn(3, 5).to(torch.bfloat16), "b": torch.randn(7), "i": torch.arange(6).reshape(2, 3)}
    safetensors_torch.save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    index = read_safetensors_index(tmp_path / "x.safetensors")
    for name, tensor in tensors.items():
        assert index[name].read().tobytes() == as_numpy(tensor).tobytes()


@pytest.mark.parametrize("name", ["gqa", "gqa-tied"])
def test_sharded_export_loads_in_transformers_with_equal_logits(tmp_path, name):
    cfg = dataclasses.replace(BASE, **CONFIGS[name])
    source = numpy_state(reference_model(cfg, seed=3))
    params = params_from_hf(source, cfg)

    export_hf(params, cfg, tmp_path, max_shard_bytes=40_000, generation={"bos_token_id": 1, "eos_token_id": 2})

    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 3 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    assert json.loads((tmp_path / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    for key, value in loaded.state_dict().items():  # every tensor arrives bit-identical
        assert as_numpy(value).tobytes() == source[key].tobytes(), key

    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 33))
    with torch.no_grad():
        expected = loaded(torch.tensor(tokens)).logits.numpy()
    logits, _ = with_params(cfg, params)(jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(33), (2, 33)))
    np.testing.assert_allclose(np.asarray(logits), expected, atol=LOGIT_TOL, rtol=0)


def test_bf16_export_is_bit_identical_to_a_bf16_source(tmp_path):
    cfg = dataclasses.replace(BASE, **CONFIGS["mqa"], param_dtype="bfloat16")
    source = {k: as_numpy(v) for k, v in reference_model(cfg).to(torch.bfloat16).state_dict().items()}
    export_hf(params_from_hf(source, cfg), cfg, tmp_path, max_shard_bytes=10**6)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for shard in tmp_path.glob("model-*.safetensors"):
        for key, value in safetensors_torch.load_file(shard).items():
            assert value.dtype == torch.bfloat16 and as_numpy(value).tobytes() == source[key].tobytes(), key
