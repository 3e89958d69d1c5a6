"""HF checkpoints as found in the wild: broken files and configs refused in one line, old RoPE buffers,
null attributes, and the dtypes `model_config.json` records for the weights it describes."""

import dataclasses
import json
import re
import struct

import ml_dtypes
import numpy as np
import pytest
from test_convert_cli import CFG, tensors, write_tokenizer
from test_hf_parity import reference_model
from test_hf_table import CFG as SMALL
from test_hf_table import hf_state

from mellama_jax.checkpoint import restore_params
from mellama_jax.cli import main
from mellama_jax.config import ModelConfig
from mellama_jax.errors import UserError
from mellama_jax.hf.config import from_hf_config, hf_config
from mellama_jax.hf.table import params_from_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")
safetensors_torch = pytest.importorskip("safetensors.torch")

ROTARY = "model.layers.{i}.self_attn.rotary_emb.inv_freq"


def as_numpy(t) -> np.ndarray:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()


def write_hf(folder, cfg=CFG, dtype="float32", extra=None, fmt="safetensors", edit=None):
    """A tiny HF folder (config.json, weights, tokenizer); returns the torch model, in `dtype`."""
    model = reference_model(cfg).to(getattr(torch, dtype))
    folder.mkdir()
    config = {**hf_config(cfg), "torch_dtype": dtype, **(edit or {})}
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in {**model.state_dict(), **(extra or {})}.items()}
    if fmt == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        safetensors_torch.save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    write_tokenizer(folder, cfg.vocab_size)
    return model


def hf_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """transformers' own RoPE buffer for this config (float32)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    return LlamaRotaryEmbedding(transformers.LlamaConfig(**hf_config(cfg))).inv_freq.clone()


def cli(capsys, *argv):
    code = main(["convert", *map(str, argv)])
    return code, capsys.readouterr().err


def refused(capsys, *argv) -> str:
    """The one error line of a refused conversion (exit 2, no traceback)."""
    code, err = cli(capsys, *argv)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("mellama convert: error: "), err
    return err.strip()


# --- hf-to-jax: broken files and configs ---------------------------------------------------------------


def test_truncated_safetensors_names_the_file_and_the_cut_tensor(tmp_path, capsys):
    write_hf(tmp_path / "hf")
    file = tmp_path / "hf" / "model.safetensors"
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = {k: v for k, v in json.loads(raw[8 : 8 + length]).items() if k != "__metadata__"}
    last = max(header, key=lambda k: header[k]["data_offsets"][1])
    file.write_bytes(raw[:-100])  # smaller than any tensor: only the last one is cut
    with pytest.raises(Exception, match="(?i)incomplete|truncat"):  # the safetensors library agrees it is broken
        safetensors.safe_open(file, "np")
    message = refused(capsys, "hf-to-jax", tmp_path / "hf", tmp_path / "ours")
    assert f"{file}: truncated: tensor {last!r}" in message
    assert not (tmp_path / "ours").exists()


def test_safetensors_header_whose_offsets_do_not_fit_the_shape_is_refused(tmp_path, capsys):
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}).encode()
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(24))
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config(CFG)))
    message = refused(capsys, "hf-to-jax", tmp_path / "hf", tmp_path / "ours")
    assert "model.safetensors: not a readable safetensors file" in message and "tensor 'w'" in message


CONFIG_REFUSALS = {
    "a list": (lambda c: [c], r"hf/config\.json: expected a JSON object, got a list$"),
    "string int": ({"hidden_size": "64"}, r'hf: config\.json: hidden_size must be an integer, got "64"$'),
    "string float": ({"rms_norm_eps": "1e-5"}, r'config\.json: rms_norm_eps must be a number, got "1e-5"$'),
    "float for int": ({"num_hidden_layers": 2.0}, r"config\.json: num_hidden_layers must be an integer, got 2\.0$"),
    "bool for int": ({"num_attention_heads": True}, r"num_attention_heads must be an integer, got true$"),
    "bool for float": ({"initializer_range": False}, r"initializer_range must be a number, got false$"),
    "string bool": ({"tie_word_embeddings": "false"}, r'tie_word_embeddings must be true or false, got "false"$'),
    "null layers": ({"num_hidden_layers": None}, r"num_hidden_layers must be an integer, got null$"),
    "string theta": ({"rope_theta": "1e4"}, r'config\.json: rope_theta must be a number, got "1e4"$'),
    "rope not an object": ({"rope_parameters": "default"}, r'rope_parameters must be an object or null, got "def'),
    "rope bases disagree": (
        {"rope_theta": 500000.0},  # the folder's config.json holds rope_parameters.rope_theta = 10000.0
        r"config\.json: rope_parameters\.rope_theta=10000\.0 and rope_theta=500000\.0 disagree",
    ),
}


@pytest.mark.parametrize("case", CONFIG_REFUSALS)
def test_config_json_of_the_wrong_shape_or_types_is_refused_by_attribute(tmp_path, capsys, case):
    edit, message = CONFIG_REFUSALS[case]
    write_hf(tmp_path / "hf")
    config = tmp_path / "hf" / "config.json"
    hf = {**transformers.LlamaConfig(**hf_config(CFG)).to_dict(), "torch_dtype": "float32"}  # transformers 5's layout
    config.write_text(json.dumps(edit(hf) if callable(edit) else {**hf, **edit}))
    assert re.search(message, refused(capsys, "hf-to-jax", tmp_path / "hf", tmp_path / "ours"))
    assert not (tmp_path / "ours").exists()


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("model.norm.weight", torch.ones(64, dtype=torch.int32), "has dtype int32; weights must be floating point"),
        ("model.layers.1.input_layernorm.weight", torch.ones(64, dtype=torch.bool), "has dtype bool"),
        ("model.layers.0.mlp.up_proj.weight", torch.ones(96, 64, dtype=torch.int8), "has dtype int8"),
    ],
)
def test_integer_or_bool_weights_are_refused_by_name(tmp_path, capsys, name, value, message):
    write_hf(tmp_path / "hf", extra={name: value})
    assert f"tensor {name!r} {message}" in refused(capsys, "hf-to-jax", tmp_path / "hf", tmp_path / "ours")


def test_integer_weights_are_refused_in_memory_too():
    state = hf_state(SMALL)
    state["model.norm.weight"] = state["model.norm.weight"].astype(np.int64)
    with pytest.raises(UserError, match=r"tensor 'model\.norm\.weight' has dtype int64"):
        params_from_hf(state, SMALL)


def test_mixed_or_float64_weights_need_an_explicit_dtype(tmp_path, capsys):
    write_hf(tmp_path / "hf", extra={"model.norm.weight": torch.ones(64, dtype=torch.float16)})
    message = refused(capsys, "hf-to-jax", tmp_path / "hf", tmp_path / "ours")
    assert "are float32 ('model.embed_tokens.weight') and float16 ('model.norm.weight'); pass --dtype" in message
    assert cli(capsys, "hf-to-jax", tmp_path / "hf", tmp_path / "ours", "--dtype", "float32")[0] == 0
    write_hf(tmp_path / "hf64", dtype="float64")
    message = refused(capsys, "hf-to-jax", tmp_path / "hf64", tmp_path / "ours64")
    assert "weights are float64 ('model.embed_tokens.weight'); pass --dtype float32 or bfloat16" in message
    assert cli(capsys, "hf-to-jax", tmp_path / "hf64", tmp_path / "ours64", "--dtype", "float32")[0] == 0


# --- what HF means by null, and RoPE given twice ------------------------------------------------------


def test_null_kv_heads_and_head_dim_mean_what_transformers_makes_of_them(tmp_path, capsys):
    cfg = dataclasses.replace(CFG, n_kv_heads=CFG.n_heads)
    hf = {**hf_config(cfg), "num_key_value_heads": None, "head_dim": None}
    theirs = transformers.LlamaConfig(**hf)
    ours = from_hf_config(hf)
    assert (ours.n_kv_heads, ours.head_dim) == (theirs.num_key_value_heads, theirs.head_dim) == (4, 16)
    write_hf(tmp_path / "hf", cfg, edit={"num_key_value_heads": None, "head_dim": None})
    assert cli(capsys, "hf-to-jax", tmp_path / "hf", tmp_path / "ours")[0] == 0
    written = json.loads((tmp_path / "ours" / "model_config.json").read_text())
    assert (written["n_kv_heads"], written["head_dim"]) == (4, 16)


@pytest.mark.parametrize("nested", ["rope_parameters", "rope_scaling"])
def test_rope_theta_given_twice_is_accepted_when_both_agree(nested):
    hf = {**hf_config(CFG), "rope_theta": 500000, nested: {"rope_type": "default", "rope_theta": 500000.0}}
    assert from_hf_config(hf).rope_theta == 500000.0
    if nested == "rope_parameters":  # transformers 5 reads this layout (and prefers it when the two differ)
        assert transformers.LlamaConfig(**hf).rope_parameters["rope_theta"] == 500000.0
    with pytest.raises(UserError, match=rf"rope_theta=500000\.0 and {nested}\.rope_theta=500001\.0 disagree"):
        from_hf_config({**hf, nested: {"rope_type": "default", "rope_theta": 500001.0}})


# --- RoPE buffers of LLaMA-2-era checkpoints ------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, theta, fmt", [("float32", 10000.0, "safetensors"), ("bfloat16", 500000.0, "safetensors"),
                          ("float16", 500000.0, "bin")]
)  # fmt: skip
def test_rope_buffers_that_rope_theta_gives_are_dropped(tmp_path, capsys, dtype, theta, fmt):
    cfg = dataclasses.replace(CFG, rope_theta=theta)
    inv_freq = hf_inv_freq(cfg).to(getattr(torch, dtype))  # fp16 at theta 5e5: its last values are subnormal
    buffers = {ROTARY.format(i=i): inv_freq.clone() for i in range(cfg.n_layers)}
    model = write_hf(tmp_path / "hf", cfg, dtype, extra=buffers, fmt=fmt)
    code, err = cli(capsys, "hf-to-jax", tmp_path / "hf", tmp_path / "ours")
    assert code == 0, err
    assert cli(capsys, "jax-to-hf", tmp_path / "ours", tmp_path / "back")[0] == 0
    back, source = tensors(tmp_path / "back"), model.state_dict()
    assert back.keys() == source.keys()  # the buffers are gone, every weight is there
    for key, value in source.items():
        assert back[key].tobytes() == as_numpy(value).tobytes(), key


def test_rope_buffers_are_checked_in_memory_too():
    state = hf_state(SMALL)
    state[ROTARY.format(i=0)] = hf_inv_freq(SMALL).numpy()
    assert params_from_hf(state, SMALL).keys() == params_from_hf(hf_state(SMALL), SMALL).keys()
    state[ROTARY.format(i=1)] = hf_inv_freq(dataclasses.replace(SMALL, rope_theta=20000.0)).numpy()
    with pytest.raises(UserError, match=r"'model\.layers\.1\.self_attn\.rotary_emb\.inv_freq' is not the RoPE"):
        params_from_hf(state, SMALL)


@pytest.mark.parametrize(
    "buffer, message",
    [
        (lambda: hf_inv_freq(dataclasses.replace(CFG, rope_theta=10100.0)), r"element \d is \S+, expected \S+"),
        (lambda: hf_inv_freq(CFG).to(torch.bfloat16) * 1.02, r"element 0 is 1\.023438, expected 1"),
        (lambda: torch.ones(4), r"float32\[4\], not 8 frequencies"),
        (lambda: torch.arange(8), r"int64\[8\], not 8 frequencies"),
    ],
)
def test_rope_buffer_that_disagrees_is_refused_by_name(tmp_path, capsys, buffer, message):
    good = hf_inv_freq(CFG)
    write_hf(tmp_path / "hf", extra={ROTARY.format(i=0): good, ROTARY.format(i=1): buffer()})
    line = refused(capsys, "hf-to-jax", tmp_path / "hf", tmp_path / "ours")
    name = re.escape(repr(ROTARY.format(i=1)))
    assert re.search(rf"tensor {name} is not the RoPE frequencies of rope_theta=10000\.0 \({message}\)$", line), line


# --- the dtypes model_config.json records -----------------------------------------------------------------


@pytest.mark.parametrize(
    "source, cast, stored, compute",
    [
        ("float32", None, "float32", "float32"),
        ("bfloat16", None, "bfloat16", "bfloat16"),
        ("float16", None, "float16", "bfloat16"),
        ("bfloat16", "float32", "float32", "float32"),
        ("float32", "bfloat16", "bfloat16", "bfloat16"),
    ],
)
def test_model_config_describes_the_stored_weights(tmp_path, capsys, source, cast, stored, compute):
    model = write_hf(tmp_path / "hf", dtype=source)
    flags = ("--dtype", cast) if cast else ()
    assert cli(capsys, "hf-to-jax", tmp_path / "hf", tmp_path / "ours", *flags)[0] == 0
    text = (tmp_path / "ours" / "model_config.json").read_text()
    written = json.loads(text)
    assert (written["param_dtype"], written["dtype"]) == (stored, compute)
    if stored == "float32":
        assert "bfloat16" not in text
    params = restore_params(tmp_path / "ours" / "params")
    assert {np.asarray(leaf).dtype.name for leaf in _leaves(params)} == {stored}

    assert cli(capsys, "jax-to-hf", tmp_path / "ours", tmp_path / "back")[0] == 0
    back = tensors(tmp_path / "back")
    for key, value in model.to(getattr(torch, stored)).state_dict().items():  # torch's cast is the reference
        assert back[key].dtype.name == stored and back[key].tobytes() == as_numpy(value).tobytes(), key
    assert json.loads((tmp_path / "back" / "config.json").read_text())["torch_dtype"] == stored


def _leaves(tree):
    return [leaf for value in tree.values() for leaf in (_leaves(value) if isinstance(value, dict) else [value])]


# --- jax-to-hf: model_config.json as we write it, and nothing else ---------------------------------------

MODEL_CONFIG_REFUSALS = {
    "string int": ({"d_model": "64"}, r'model_config\.json: d_model must be an integer, got "64"$'),
    "string float": ({"rms_eps": "1e-5"}, r'model_config\.json: rms_eps must be a number, got "1e-5"$'),
    "float for int": ({"n_layers": 2.0}, r"model_config\.json: n_layers must be an integer, got 2\.0$"),
    "bool for int": ({"n_heads": True}, r"model_config\.json: n_heads must be an integer, got true$"),
    "int for bool": ({"tie_embeddings": 0}, r"model_config\.json: tie_embeddings must be true or false, got 0$"),
    "int for str": ({"dtype": 32}, r"model_config\.json: dtype must be a string, got 32$"),
    "unknown field": ({"n_experts": 8}, r"model_config\.json: unknown field 'n_experts' \(known: vocab_size, "),
    "unknown dtype": ({"param_dtype": "float64"}, r"model_config\.json: model\.param_dtype must be one of"),
    "a list": (lambda c: [c], r"model_config\.json: expected a JSON object, got a list$"),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("converted")
    write_hf(folder / "hf")
    assert main(["convert", "hf-to-jax", str(folder / "hf"), str(folder / "ours")]) == 0
    return folder / "ours", json.loads((folder / "ours" / "model_config.json").read_text())


@pytest.mark.parametrize("case", MODEL_CONFIG_REFUSALS)
def test_jax_to_hf_refuses_a_wrongly_typed_or_unknown_model_config_field(tmp_path, capsys, converted, case):
    ours, config = converted
    edit, message = MODEL_CONFIG_REFUSALS[case]
    (ours / "model_config.json").write_text(json.dumps(edit(config) if callable(edit) else {**config, **edit}))
    assert re.search(message, refused(capsys, "jax-to-hf", ours, tmp_path / "back"))
    assert not (tmp_path / "back").exists()
    (ours / "model_config.json").write_text(json.dumps({**config, "rms_eps": 1}))  # an int is a fine float
    assert cli(capsys, "jax-to-hf", ours, tmp_path / "back")[0] == 0


def test_jax_to_hf_refuses_a_generation_config_that_is_not_an_object(tmp_path, capsys, converted):
    ours, config = converted
    (ours / "model_config.json").write_text(json.dumps(config))
    (ours / "generation_config.json").write_text("[1, 2]")
    message = refused(capsys, "jax-to-hf", ours, tmp_path / "back")
    (ours / "generation_config.json").unlink()
    assert message.endswith("generation_config.json: expected a JSON object, got a list")
    with pytest.raises(UserError, match=r"^config\.json: expected a JSON object of attributes, got a list$"):
        from_hf_config([config])  # the library entry point checks too
