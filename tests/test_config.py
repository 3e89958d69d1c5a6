"""ModelConfig presets, HF config translation in both directions, and its refusals."""

import dataclasses
import pathlib

import pytest

from mellama_jax.config import ModelConfig
from mellama_jax.config_file import load_config
from mellama_jax.errors import UserError
from mellama_jax.hf.config import from_hf_config, hf_config

# A real LLaMA-2-13B config.json as transformers 4.x wrote it (values from the paper's table).
LLAMA2_13B_HF = {
    "_name_or_path": "meta-llama/Llama-2-13b-hf",
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 5120,
    "initializer_range": 0.02,
    "intermediate_size": 13824,
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "num_attention_heads": 40,
    "num_hidden_layers": 40,
    "num_key_value_heads": 40,
    "pad_token_id": 0,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.32.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}


def test_presets_match_the_paper():
    assert ModelConfig.llama2_13b() == from_hf_config(LLAMA2_13B_HF)
    big = ModelConfig.llama2_70b()
    assert (big.n_layers, big.d_model, big.n_heads, big.n_kv_heads, big.ffn_dim) == (80, 8192, 64, 8, 28672)
    assert (big.rms_eps, big.rope_theta, big.max_seq_len, big.tie_embeddings) == (1e-5, 10000.0, 4096, False)


def test_rope_theta_at_top_level_or_in_rope_parameters():
    top = {**LLAMA2_13B_HF, "rope_theta": 500000.0}
    v5 = {**LLAMA2_13B_HF, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}
    del v5["rope_scaling"]
    assert from_hf_config(top).rope_theta == from_hf_config(v5).rope_theta == 500000.0


def test_head_dim_and_kv_heads_default_like_transformers():
    hf = {k: v for k, v in LLAMA2_13B_HF.items() if k != "num_key_value_heads"}
    cfg = from_hf_config(hf)
    assert (cfg.n_kv_heads, cfg.head_dim) == (40, 128)
    assert from_hf_config({**hf, "head_dim": 64}).head_dim == 64


@pytest.mark.parametrize("preset", ["tiny", "llama2_7b", "llama2_70b"])
def test_to_hf_and_back_is_identity(preset):
    cfg = dataclasses.replace(getattr(ModelConfig, preset)(), tie_embeddings=True, rope_theta=1e6)
    hf = hf_config(cfg)
    assert hf["rope_theta"] == 1e6 and hf["rope_scaling"] is None
    assert from_hf_config(hf, dtype=cfg.dtype, remat=cfg.remat) == cfg


@pytest.mark.parametrize(
    "attribute, value",
    [
        ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
        ("rope_scaling", {"type": "dynamic", "factor": 2.0}),
        ("rope_parameters", {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}),
        ("attention_bias", True),
        ("mlp_bias", True),
        ("hidden_act", "gelu"),
        ("attention_dropout", 0.1),
        ("sliding_window", 4096),
        ("model_type", "mistral"),
    ],
)
def test_unsupported_hf_attributes_are_refused_by_name(attribute, value):
    with pytest.raises(UserError, match=attribute) as err:
        from_hf_config({**LLAMA2_13B_HF, attribute: value})
    assert "\n" not in str(err.value)


def test_missing_required_hf_attribute():
    hf = {k: v for k, v in LLAMA2_13B_HF.items() if k != "hidden_size"}
    with pytest.raises(UserError, match="hidden_size"):
        from_hf_config(hf)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"n_kv_heads": 3}, "n_kv_heads"),
        ({"remat": "sometimes"}, "model.remat"),
        ({"dtype": "float8"}, "model.dtype"),
        ({"head_dim": 15}, "head_dim must be even"),
        ({"n_layers": 0}, "n_layers must be positive"),
    ],
)
def test_invalid_config_names_the_parameter(override, message):
    with pytest.raises(UserError, match=message):
        ModelConfig.tiny(**override)


def test_the_data_section_selects_sources_and_weights():
    cfg = load_config(str(pathlib.Path(__file__).parents[1] / "configs" / "me-llama-13b-cpt.yaml"))
    assert [(s.name, s.weight, s.format) for s in cfg.data.sources] == [
        ("biomedical", 15.0, "prepared"),
        ("clinical", 1.0, "prepared"),
        ("general", 4.0, "prepared"),
    ]
    cfg = load_config(None, ["data.kind=cpt", "data.sources=[{name: notes, paths: [a.jsonl, 'b/*.jsonl']}]"])
    assert cfg.data.sources[0].paths == ("a.jsonl", "b/*.jsonl") and cfg.data.sources[0].weight == 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.kind=dpo", r"data.kind must be 'synthetic', 'cpt' or 'sft'"),
        ("data.template=alpaca", r"data.template must be 'raw', 'me-llama' or 'llama2-chat'"),
        ("data.kind=sft", r"data.sources: a sft run needs at least one source"),
        ("data.kind=cpt", r"data.sources: a cpt run needs at least one source"),
        ("data.sources=[{name: a, paths: [x], colour: red}]", r"unknown key 'data.sources\[0\].colour'"),
        ("data.sources=[{paths: [x]}]", r"data.sources\[0\]: every source needs a unique name"),
        ("data.sources=[{name: a, paths: [x]}, {name: a, paths: [y]}]", r"data.sources\[1\]: every source needs a u"),
        ("data.sources=[{name: a}]", r"data.sources\[0\] \(a\): no paths"),
        ("data.sources=[{name: a, paths: [x], weight: 0}]", r"data.sources\[0\] \(a\): weight must be positive"),
        ("data.sources=[{name: a, paths: [x], format: csv}]", r"data.sources\[0\] \(a\): format must be one of"),
        ("data.sources={name: a}", r"'data.sources' must be a list"),
        ("data.sources=[a.jsonl]", r"every item of 'data.sources' must be a section"),
        ("data.sources=[{name: a, paths: [1]}]", r"every item of 'data.sources\[0\].paths' must be str"),
        ("data.on_error=ignore", r"data.on_error must be 'raise' or 'skip'"),
    ],
)
def test_bad_data_sections_are_one_line_errors(override, message):
    with pytest.raises(UserError, match=message):
        load_config(None, [override])


SOURCES = "[{name: held, paths: [held.jsonl]}]"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["eval_every=100"], r"override 'eval_every=100': eval_every: nothing to evaluate on; give eval_data"),
        (["eval_every=-1"], r"eval_every must be >= 0 \(0: never\), got -1"),
        (["eval_batches=-2"], r"eval_batches must be >= 0 \(0: all of the eval data\), got -2"),
        (["data.kind=cpt", f"data.sources={SOURCES}", "data.heldout=1.0"], r"data.heldout must be in \[0, 1\)"),
        (["data.heldout=0.01"], r"data.heldout: the synthetic counting data has no documents to hold out"),
        ([f"eval_data={{sources: {SOURCES}}}"], r"eval_data.kind must be 'cpt' or 'sft', got 'synthetic'"),
        (["eval_data.kind=cpt"], r"eval_data.sources: a cpt run needs at least one source"),
        (["eval_data.kind=sft", "eval_data.sources=[{name: a}]"], r"eval_data.sources\[0\] \(a\): no paths"),
        (["eval_data.kind=cpt", f"eval_data.sources={SOURCES}", "eval_data.epochs=2"],
         r"override 'eval_data.epochs=2': eval_data.epochs does not apply: every evaluation reads each document once"),
        (["eval_data.kind=cpt", f"eval_data.sources={SOURCES}", "eval_data.heldout=0.1"], r"eval_data.heldout does n"),
        (["eval_data.colour=red"], r"unknown key 'eval_data.colour'"),
        (["eval_data=[held.jsonl]"], r"'eval_data' must be a section"),
        (["data.kind=sft", f"data.sources={SOURCES}", "data.template=llama2-chat", "eval_data.kind=sft",
          f"eval_data.sources={SOURCES}"], r"eval_data.template \('me-llama'\) differs from data.template"
         r" \('llama2-chat'\): validation would wrap prompts unlike training; set eval_data.template: llama2-chat"),
    ],
)  # fmt: skip
def test_bad_validation_settings_are_one_line_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, overrides)


def test_validation_settings_round_trip_through_print_config(tmp_path):
    from mellama_jax.config_file import to_yaml

    heldout = ["data.kind=sft", f"data.sources={SOURCES}", "data.heldout=0.01", "eval_every=500"]
    separate = ["eval_every=500", "eval_batches=20", f"eval_data={{kind: cpt, sources: {SOURCES}}}"]
    for overrides in (heldout, separate, []):
        cfg = load_config(None, overrides)
        (tmp_path / "printed.yaml").write_text(to_yaml(cfg))
        assert load_config(str(tmp_path / "printed.yaml")) == cfg
    assert cfg.eval_data is None and "eval_data: null" in to_yaml(cfg)
    assert load_config(None, separate).eval_data.sources[0].paths == ("held.jsonl",)
