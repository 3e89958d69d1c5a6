"""HF folder -> orbax checkpoint (streamed) -> HF folder, through the files transformers itself writes."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_hf_parity import BASE, CONFIGS, LOGIT_TOL, reference_model

from mellama_jax.checkpoint import restore_params
from mellama_jax.config import ModelConfig
from mellama_jax.errors import UserError
from mellama_jax.hf.config import hf_config
from mellama_jax.hf.convert import convert_hf_to_jax, export_hf
from mellama_jax.hf.files import hf_weight_files, read_safetensors_index
from mellama_jax.model.llama import with_params

torch = pytest.importorskip("torch")


def hf_files(folder) -> dict[str, np.ndarray]:
    return {k: t.read() for f in hf_weight_files(folder) for k, t in read_safetensors_index(f).items()}


@pytest.mark.parametrize("name, dtype", [("gqa", "float32"), ("mqa-theta500k-tied", "float32"), ("gqa", "bfloat16")])
def test_hf_files_round_trip_bit_identical_through_orbax(tmp_path, name, dtype):
    cfg = dataclasses.replace(BASE, **CONFIGS[name])
    source = tmp_path / "hf"
    reference = reference_model(cfg).to(getattr(torch, dtype))
    reference.save_pretrained(source, max_shard_size="50KB")  # forces a sharded source with an index
    assert len(hf_weight_files(source)) > 3

    converted = convert_hf_to_jax(source, tmp_path / "ours")
    compute = "float32" if dtype == "float32" else "bfloat16"  # model_config.json describes the stored weights
    assert converted == dataclasses.replace(cfg, dtype=compute, param_dtype=dtype, remat="full")
    assert ModelConfig(**json.loads((tmp_path / "ours" / "model_config.json").read_text())) == converted
    params = restore_params(tmp_path / "ours" / "params")
    export_hf(params, cfg, tmp_path / "back", max_shard_bytes=50_000)

    original, back = hf_files(source), hf_files(tmp_path / "back")
    original.pop("lm_head.weight", None) if cfg.tie_embeddings else None
    assert back.keys() == original.keys()
    for key, value in original.items():
        assert back[key].dtype == value.dtype and back[key].tobytes() == value.tobytes(), key

    if dtype == "float32":
        tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 20))
        with torch.no_grad():
            expected = reference(torch.tensor(tokens)).logits.numpy()
        logits, _ = with_params(cfg, params)(jnp.asarray(tokens), jnp.arange(20)[None])
        np.testing.assert_allclose(np.asarray(logits), expected, atol=LOGIT_TOL, rtol=0)


def test_convert_to_bf16_casts_every_tensor(tmp_path):
    cfg = dataclasses.replace(BASE, **CONFIGS["gqa"])
    reference_model(cfg).save_pretrained(tmp_path / "hf")
    convert_hf_to_jax(tmp_path / "hf", tmp_path / "ours", dtype="bfloat16")
    params = restore_params(tmp_path / "ours" / "params")
    source = hf_files(tmp_path / "hf")
    assert {str(np.asarray(p).dtype) for p in jax.tree.leaves(params)} == {"bfloat16"}
    q0 = source["model.layers.0.self_attn.q_proj.weight"].astype(jnp.bfloat16)
    assert np.array_equal(np.asarray(params["layers"]["attn"]["q"][0]).reshape(64, -1).T, q0)


def test_converter_names_a_shape_mismatch_from_headers(tmp_path):
    cfg = dataclasses.replace(BASE, **CONFIGS["gqa"])
    reference_model(cfg).save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "intermediate_size": 100}))
    with pytest.raises(UserError, match=r"gate_proj\.weight' has shape \(96, 64\), config expects \(100, 64\)"):
        convert_hf_to_jax(tmp_path / "hf", tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


def test_converter_refuses_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf_config(BASE)))
    with pytest.raises(UserError, match="no model.safetensors"):
        convert_hf_to_jax(tmp_path, tmp_path / "ours")
