"""`mellama convert` both ways through the command line: outputs, tokenizer files, training runs, refusals."""

import argparse
import dataclasses
import json
import re

import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_hf_parity import BASE, CONFIGS, LOGIT_TOL, numpy_state, reference_model
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from mellama_jax.checkpoint import restore_params
from mellama_jax.cli import main
from mellama_jax.hf.config import hf_config
from mellama_jax.hf.files import hf_weight_files, read_safetensors_index
from mellama_jax.hf.table import params_to_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

CFG = dataclasses.replace(BASE, **CONFIGS["gqa"])


def write_tokenizer(folder, vocab_size=CFG.vocab_size):
    """A word-level tokenizer.json with exactly `vocab_size` tokens that adds BOS, like a real checkpoint's."""
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(3, vocab_size))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tok


@pytest.fixture
def hf_source(tmp_path, capsys):
    model = reference_model(CFG)
    model.generation_config.max_new_tokens = 17  # a setting of the user's own that must travel along
    model.save_pretrained(tmp_path / "hf", max_shard_size="50KB")
    write_tokenizer(tmp_path / "hf")
    capsys.readouterr()  # transformers' own progress bars
    return tmp_path / "hf", model


def cli(capsys, *argv):
    code = main(["convert", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, err


def tensors(folder) -> dict[str, np.ndarray]:
    return {k: t.read() for f in hf_weight_files(folder) for k, t in read_safetensors_index(f).items()}


def test_round_trip_through_the_cli_keeps_tensors_tokenizer_and_generation_config(tmp_path, capsys, hf_source):
    source, model = hf_source
    assert cli(capsys, "hf-to-jax", source, tmp_path / "ours") == (0, "")
    names = {p.name for p in (tmp_path / "ours").iterdir()}
    assert names == {"params", "model_config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"}
    assert cli(capsys, "jax-to-hf", tmp_path / "ours", tmp_path / "back", "--max-shard-size", "50KB") == (0, "")

    original, back = tensors(source), tensors(tmp_path / "back")
    assert len(hf_weight_files(tmp_path / "back")) > 3 and back.keys() == original.keys()
    for key, value in original.items():
        assert back[key].tobytes() == value.tobytes(), key

    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    reference = Tokenizer.from_file(str(source / "tokenizer.json"))
    assert tokenizer("w5 w7 nonsense w9")["input_ids"] == reference.encode("w5 w7 nonsense w9").ids == [1, 5, 7, 0, 9]
    generation = json.loads((tmp_path / "back" / "generation_config.json").read_text())
    assert generation["max_new_tokens"] == 17
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    tokens = torch.tensor(np.random.default_rng(0).integers(0, CFG.vocab_size, (1, 12)))
    with torch.no_grad():
        np.testing.assert_allclose(loaded(tokens).logits, model(tokens).logits, atol=LOGIT_TOL, rtol=0)


def test_jax_to_hf_reads_the_latest_complete_step_of_a_training_run(tmp_path, capsys, hf_source):
    source, _ = hf_source
    assert cli(capsys, "hf-to-jax", source, tmp_path / "ours")[0] == 0
    params = restore_params(tmp_path / "ours" / "params")
    run = tmp_path / "run"
    run.mkdir()
    for name in ("model_config.json", "tokenizer.json", "tokenizer_config.json"):
        (run / name).write_bytes((tmp_path / "ours" / name).read_bytes())
    with ocp.CheckpointManager(run / "checkpoints") as manager:
        for step in (1, 2):
            params_at_step = {k: v for k, v in params.items()}
            params_at_step["embed"] = params["embed"] * step
            state = {"step": np.int32(step), "params": params_at_step, "opt_state": {"mu": np.zeros(3)}}
            manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state)))
    (run / "checkpoints" / "3.orbax-checkpoint-tmp-1234").mkdir()  # a save killed half-way: never picked up

    assert cli(capsys, "jax-to-hf", run, tmp_path / "back", "--dtype", "bfloat16")[0] == 0
    back = tensors(tmp_path / "back")
    expected = params_to_hf({**params, "embed": params["embed"] * 2}, CFG)
    for key, value in expected.items():
        assert back[key].dtype.name == "bfloat16" and np.array_equal(back[key], value.astype(back[key].dtype)), key


def test_legacy_bin_weights_convert_with_a_warning(tmp_path, capsys):
    model = reference_model(CFG)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config(CFG)))
    torch.save(model.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    write_tokenizer(tmp_path / "hf")
    code, err = cli(capsys, "hf-to-jax", tmp_path / "hf", tmp_path / "ours")
    assert code == 0 and "WARNING: pytorch_model.bin: legacy PyTorch weights" in err
    assert cli(capsys, "jax-to-hf", tmp_path / "ours", tmp_path / "back")[0] == 0
    for key, value in tensors(tmp_path / "back").items():
        assert value.tobytes() == numpy_state(model)[key].tobytes(), key


def test_overwrite_replaces_only_when_asked(tmp_path, capsys, hf_source):
    source, _ = hf_source
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "notes.txt").write_text("mine")
    code, err = cli(capsys, "hf-to-jax", source, tmp_path / "ours")
    assert code == 2 and err.endswith("exists and is not empty; pass --overwrite to replace it\n")
    assert (tmp_path / "ours" / "notes.txt").read_text() == "mine"
    assert cli(capsys, "hf-to-jax", source, tmp_path / "ours", "--overwrite")[0] == 0
    assert not (tmp_path / "ours" / "notes.txt").exists() and (tmp_path / "ours" / "params").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "ours"]  # no staging folders left behind
    code, err = cli(capsys, "hf-to-jax", source, source, "--overwrite")
    assert code == 2 and "would replace the input" in err


def _drop_tensor(folder):
    state = tensors(folder)
    del state["model.layers.1.mlp.up_proj.weight"]
    _rewrite(folder, state)


def _add_tensor(folder):
    _rewrite(folder, {**tensors(folder), "model.layers.0.self_attn.q_proj.bias": np.ones(64, np.float32)})


def _rewrite(folder, state):
    for f in [*hf_weight_files(folder), folder / "model.safetensors.index.json"]:
        f.unlink()
    state = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
    safetensors_torch.save_file(state, folder / "model.safetensors")


def _edit_config(**changes):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **changes}))

    return edit


def _pickled_object(folder):
    _rewrite(folder, {})
    (folder / "model.safetensors").unlink()
    torch.save({"weights": argparse.Namespace(payload="not a tensor")}, folder / "pytorch_model.bin")


HF_TO_JAX_REFUSALS = {
    "missing tensor": (_drop_tensor, r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight' \(1 missing in all\)"),
    "unexpected tensor": (_add_tensor, r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"),
    "shape mismatch": (
        _edit_config(intermediate_size=100),
        r"'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \(96, 64\), config expects \(100, 64\)",
    ),
    "unsupported attribute": (
        _edit_config(rope_scaling={"rope_type": "linear", "factor": 2.0}),
        r"hf: config\.json: unsupported rope_scaling=",
    ),
    "tokenizer vocab": (
        lambda folder: write_tokenizer(folder, vocab_size=100),
        r"hf: tokenizer has 100 tokens but the model's vocab_size is 128",
    ),
    "pickled object": (
        _pickled_object,
        r"pytorch_model\.bin: not a tensors-only PyTorch state dict, refused \(WeightsUnpickler error: Unsupported",
    ),
}


@pytest.mark.parametrize("case", HF_TO_JAX_REFUSALS)
def test_hf_to_jax_refusals_are_one_line_and_write_nothing(tmp_path, capsys, hf_source, case):
    source, _ = hf_source
    break_it, message = HF_TO_JAX_REFUSALS[case]
    break_it(source)
    code, err = cli(capsys, "hf-to-jax", source, tmp_path / "ours")
    errors = [line for line in err.splitlines() if line.startswith("mellama convert: error: ")]
    assert code == 2 and len(errors) == 1 and re.search(message, errors[0]), err
    assert all(line.startswith("mellama convert: ") for line in err.splitlines()), err  # no traceback
    assert not (tmp_path / "ours").exists()


def test_jax_to_hf_refusals_are_one_line(tmp_path, capsys, hf_source):
    source, _ = hf_source
    code, err = cli(capsys, "jax-to-hf", tmp_path / "nowhere", tmp_path / "back")
    assert code == 2 and re.fullmatch(r"mellama convert: error: .*nowhere/model_config\.json: cannot read .*\n", err)
    assert cli(capsys, "hf-to-jax", source, tmp_path / "ours")[0] == 0
    config = json.loads((tmp_path / "ours" / "model_config.json").read_text())
    (tmp_path / "ours" / "model_config.json").write_text(json.dumps({**config, "ffn_dim": 100}))
    code, err = cli(capsys, "jax-to-hf", tmp_path / "ours", tmp_path / "back")
    assert code == 2 and len(err.splitlines()) == 1
    assert "parameter layers/mlp/gate has shape (2, 64, 96), model_config.json expects (2, 64, 100)" in err
    run = tmp_path / "run"
    (run / "checkpoints" / "5.orbax-checkpoint-tmp-77").mkdir(parents=True)  # only a save that never finished
    (run / "model_config.json").write_text(json.dumps(config))
    code, err = cli(capsys, "jax-to-hf", run, tmp_path / "back")
    assert code == 2 and err.endswith("checkpoints: no complete checkpoint step\n")
    with pytest.raises(SystemExit):
        main(["convert", "jax-to-hf", str(tmp_path / "ours"), str(tmp_path / "back"), "--max-shard-size", "5 parsecs"])
    assert "expected a size like 5GB" in capsys.readouterr().err
    assert not (tmp_path / "back").exists()


def test_exported_llama2_tokenizer_gives_sentencepiece_ids_in_autotokenizer(tmp_path, capsys, shared_data):
    from test_tokenizer import TEXTS

    spm = pytest.importorskip("sentencepiece")
    cfg = dataclasses.replace(CFG, vocab_size=32000)
    reference_model(cfg).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.model").write_bytes((shared_data / "llama2_tokenizer.model").read_bytes())
    official = {"tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True, "chat_template": "{{x}}"}
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(official))
    assert cli(capsys, "hf-to-jax", tmp_path / "hf", tmp_path / "ours")[0] == 0
    assert cli(capsys, "jax-to-hf", tmp_path / "ours", tmp_path / "back")[0] == 0

    reference = spm.SentencePieceProcessor(model_file=str(shared_data / "llama2_tokenizer.model"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert tokenizer.chat_template == "{{x}}" and (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")
    for text in [*TEXTS, "a  b   c", "literal </s> and <s> stay text"]:
        ids = tokenizer(text)["input_ids"]
        assert ids == [reference.bos_id(), *reference.encode(text)], text
        assert tokenizer.decode(ids, skip_special_tokens=True) == reference.decode(reference.encode(text)), text
