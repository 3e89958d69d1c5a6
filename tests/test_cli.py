"""`mellama plan`, the YAML config loader and every shipped config."""

import pathlib
import subprocess
import sys

import pytest

from mellama_jax.config import ModelConfig, TrainConfig
from mellama_jax.config_file import load_config
from mellama_jax.errors import UserError
from mellama_jax.model.llama import param_count, train_flops_per_token

CONFIGS = sorted((pathlib.Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_flops_per_token_by_hand():
    cfg = ModelConfig.tiny(vocab_size=32, d_model=8, ffn_dim=12, n_heads=2, n_kv_heads=1, head_dim=4, n_layers=2)
    # Per layer: q 8*2*4 + k 8*1*4 + v 8*1*4 + o 2*4*8 + gate/up/down 3*8*12 = 480 weights; 2 layers plus the
    # 8x32 head = 1216 matmul weights -> 2432 FLOPs forward. Causal attention: 2 layers * 2*16*2*4 = 512.
    # Training is 3x forward: 3 * (2432 + 512).
    assert train_flops_per_token(cfg, seq_len=16) == 3 * (2432 + 512)
    # Tied: the table becomes the head's matmul (same 256 weights), and there is no separate head.
    tied = ModelConfig.tiny(**{**cfg.__dict__, "tie_embeddings": True})
    assert param_count(tied) == param_count(cfg) - 32 * 8
    assert train_flops_per_token(tied, seq_len=16) == train_flops_per_token(cfg, seq_len=16)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(str(path)), TrainConfig)


def test_yaml_holds_only_differences_and_overrides_win(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  preset: tiny\n  rope_theta: 500000\nseq_len: 64\n")
    cfg = load_config(str(path), ["model.n_layers=3", "global_batch=4", "micro_batches=2", "optim.lr=1e-4"])
    assert cfg.model == ModelConfig.tiny(rope_theta=500000.0, n_layers=3)
    assert (cfg.seq_len, cfg.global_batch, cfg.micro_batches, cfg.optim.lr) == (64, 4, 2, 1e-4)
    assert load_config() == TrainConfig()


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("model:\n  nheads: 3\n", [], r"run\.yaml: unknown key 'model\.nheads'"),
        ("seq_len: [1]\n", [], r"'seq_len' must be int"),
        ("model:\n  tie_embeddings: 1\n", [], r"'model\.tie_embeddings' must be bool"),
        ("model: 3\n", [], r"'model' must be a section"),
        ("model:\n  preset: llama3\n", [], r"unknown model\.preset 'llama3'"),
        ("model:\n  n_kv_heads: 3\n", [], r"run\.yaml: model\.n_heads \(40\) must be a multiple"),
        ("[1, 2]\n", [], r"expected a mapping"),
        ("model: {\n", [], r"cannot read config"),
        ("", ["seq_len"], r"override 'seq_len': expected key\.sub=value"),
    ],
)
def test_config_mistakes_are_one_line_errors_naming_the_key(tmp_path, text, overrides, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message) as err:
        load_config(str(path), overrides)
    assert "\n" not in str(err.value)


def mellama(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mellama_jax.cli", *args], capture_output=True, text=True)


def test_plan_command_reports_the_70b_run():
    run = mellama("plan", "--config", str(CONFIGS[0].parent / "me-llama-70b-cpt.yaml"), "--devices", "160")
    assert run.returncode == 0, run.stderr
    assert "68,976,648,192" in run.stdout
    assert "3,932,160" in run.stdout  # tokens per step, 960 x 4096 (the multiple of 160 rows nearest 1024)


def test_plan_command_bad_key_exits_2_with_one_line():
    run = mellama("plan", "model.nheads=3")
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0
    assert "unknown key 'model.nheads'" in run.stderr


def test_mellama_debug_shows_the_traceback(monkeypatch, capsys):
    from mellama_jax.cli import main

    assert main(["plan", "model.nheads=3"]) == 2 and "Traceback" not in capsys.readouterr().err
    monkeypatch.setenv("MELLAMA_DEBUG", "1")
    with pytest.raises(UserError, match="unknown key 'model.nheads'"):
        main(["plan", "model.nheads=3"])
