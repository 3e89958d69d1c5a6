"""Every numeric setting is checked, errors name the override that caused them, the model follows init_from."""

import dataclasses
import json

import pytest
import yaml

from mellama_jax.cli import main
from mellama_jax.config import ModelConfig, TrainConfig
from mellama_jax.config_file import load_config
from mellama_jax.errors import UserError

YAML = "model: {preset: tiny}\nseq_len: 64\nglobal_batch: 8\nmicro_batches: 2\n"


@pytest.mark.parametrize(
    "override, message",
    [
        ("keep_checkpoints=0", r"keep_checkpoints must be at least 1, got 0"),
        ("checkpoint_every=0", r"checkpoint_every must be at least 1"),
        ("global_batch=0", r"global_batch must be at least 1"),
        ("seq_len=-4", r"seq_len must be at least 1"),
        ("seq_len=512", r"seq_len \(512\) exceeds model.max_seq_len \(256\)"),
        ("model.max_seq_len=32", r"seq_len \(64\) exceeds model.max_seq_len \(32\)"),
        ("optim.clip_norm=0", r"optim.clip_norm must be positive, got 0.0"),
        ("optim.b2=1.5", r"optim.b2 must be in \[0, 1\)"),
        ("optim.weight_decay=-1", r"optim.weight_decay must be >= 0"),
        ("micro_batches=3", r"micro_batches \(3\) must divide global_batch \(8\)"),
        ("steps=0", r"steps must be a positive integer or 'auto', got 0"),
        ("steps=soon", r"steps must be a positive integer or 'auto', got 'soon'"),
        ("data.epochs=-1", r"data.epochs must be >= 0"),
        ("data.on_source_end=loop", r"data.on_source_end must be 'stop' or 'repeat'"),
        ("model.rope_theta=0", r"model.rope_theta must be positive"),
    ],
)
def test_bad_numbers_are_errors_that_name_the_override(tmp_path, override, message):
    (tmp_path / "run.yaml").write_text(YAML)
    with pytest.raises(UserError, match=message) as err:
        load_config(str(tmp_path / "run.yaml"), [override])
    assert str(err.value).startswith(f"override {override!r}: ") and "\n" not in str(err.value)


def test_an_error_from_the_yaml_names_the_yaml(tmp_path):
    (tmp_path / "run.yaml").write_text(YAML + "keep_checkpoints: 0\n")
    with pytest.raises(UserError, match=r"run\.yaml: keep_checkpoints must be at least 1"):
        load_config(str(tmp_path / "run.yaml"), ["steps=5"])


def test_print_config_prints_yaml_that_loads_back_to_the_same_config(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text(YAML + "data: {kind: cpt, sources: [{name: notes, paths: [a.jsonl]}]}\n")
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--print-config", "steps=auto"]) == 0
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed)["model"]["d_model"] == 64 and not (tmp_path / "runs").exists()
    (tmp_path / "resolved.yaml").write_text(printed)
    assert load_config(str(tmp_path / "resolved.yaml")) == load_config(str(tmp_path / "run.yaml"), ["steps=auto"])


CONVERTED = ModelConfig.tiny(vocab_size=49152, rope_theta=1e5, tie_embeddings=True, dtype="bfloat16",
                             param_dtype="bfloat16")  # fmt: skip


@pytest.fixture
def converted(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model_config.json").write_text(json.dumps(dataclasses.asdict(CONVERTED)))
    return tmp_path / "ckpt"


def test_with_only_init_from_the_model_is_the_checkpoints(tmp_path, converted):
    (tmp_path / "run.yaml").write_text(f"init_from: {converted}\nseq_len: 128\n")
    cfg = load_config(str(tmp_path / "run.yaml"))
    compute = {f: getattr(TrainConfig().model, f) for f in ("dtype", "param_dtype", "remat", "init_std")}
    assert cfg.model == dataclasses.replace(CONVERTED, **compute)  # fp32 master weights, whatever was stored
    assert cfg.model.rope_theta == 1e5 and cfg.model.vocab_size == 49152 and cfg.model.param_dtype == "float32"


def test_a_model_section_may_change_compute_settings_and_repeat_the_rest(tmp_path, converted):
    (tmp_path / "run.yaml").write_text(f"init_from: {converted}\nseq_len: 128\nmodel: {{remat: save_dots}}\n")
    cfg = load_config(str(tmp_path / "run.yaml"), ["model.rope_theta=100000", "model.dtype=float32"])
    assert (cfg.model.remat, cfg.model.dtype, cfg.model.rope_theta, cfg.model.n_layers) == ("save_dots", "float32",
                                                                                            1e5, 2)  # fmt: skip


@pytest.mark.parametrize(
    "section, overrides, message",
    [
        ("{rope_theta: 10000}", [], r"run\.yaml: model\.rope_theta=10000\.0 contradicts .*model_config\.json \(100000"),
        ("{}", ["model.vocab_size=32000"], r"override 'model\.vocab_size=32000': model\.vocab_size=32000 contradicts"),
        ("{preset: tiny}", [], r"model\.vocab_size=32000 contradicts"),  # a preset names every field
    ],
)
def test_a_model_section_that_contradicts_init_from_is_refused(tmp_path, converted, section, overrides, message):
    (tmp_path / "run.yaml").write_text(f"init_from: {converted}\nseq_len: 128\nmodel: {section}\n")
    with pytest.raises(UserError, match=message):
        load_config(str(tmp_path / "run.yaml"), overrides)


def test_a_broken_model_config_json_is_named(tmp_path, converted):
    (converted / "model_config.json").write_text(json.dumps({**dataclasses.asdict(CONVERTED), "d_model": "64"}))
    with pytest.raises(UserError, match=r'ckpt/model_config\.json: d_model must be an integer, got "64"'):
        load_config(None, [f"init_from={converted}"])
    (converted / "model_config.json").write_text(json.dumps({"d_model": 64}))
    with pytest.raises(UserError, match=r"ckpt/model_config\.json: missing field 'vocab_size'"):
        load_config(None, [f"init_from={converted}"])


def test_a_global_batch_that_does_not_split_over_the_devices_is_one_line(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text(YAML)  # 8 fake devices on fsdp: 4 rows cannot be split whole
    argv = ["train", "--config", str(tmp_path / "run.yaml"), f"run_dir={tmp_path / 'run'}", "global_batch=4", "steps=1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "global_batch (4) must be a multiple of data×fsdp = 8 devices" in err
