"""LoRA: frozen base, adapters alone trained, sharded and accumulated like full training, exact resume, and the
HF exports (merged weights in transformers, the adapter folder in peft) computing our logits."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import assert_trees_close, packed_batch, run

from mellama_jax.checkpoint import LORA_CONFIG, find_params, restore_params
from mellama_jax.config import LoraConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from mellama_jax.errors import UserError
from mellama_jax.hf.convert import convert_jax_to_hf, export_hf
from mellama_jax.model import lora
from mellama_jax.model.llama import with_params
from mellama_jax.model.sharding import make_mesh
from mellama_jax.planning import plan
from mellama_jax.training.loop import train
from mellama_jax.training.step import abstract_state, init_state, loss_sums, state_shardings

MODEL = ModelConfig.tiny(vocab_size=128, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96, init_std=0.1)
RANK = 4
CFG = TrainConfig(
    model=MODEL,
    seq_len=16,
    global_batch=8,
    micro_batches=2,
    steps=10,
    optim=OptimConfig(lr=1e-2, warmup_ratio=0.2),
    lora=LoraConfig(rank=RANK, alpha=8.0),
)
LOGIT_TOL = 1e-4  # max |Δlogit|, fp32 on both sides (as tests/test_hf_parity.py)


def test_trainable_count_is_the_formula():
    d, q, kv, f, layers = 64, 4 * 16, 2 * 16, 96, 2  # in/out widths of q, k, v, o, gate, up, down, by hand
    per_layer = RANK * ((d + q) + 2 * (d + kv) + (q + d) + 2 * (d + f) + (f + d))
    state = jax.eval_shape(lambda: init_state(CFG, make_mesh(CFG.mesh)))
    assert sum(x.size for x in jax.tree.leaves(state.lora)) == per_layer * layers
    assert lora.count(CFG.lora, state.params["layers"]) == per_layer * layers
    fresh = jax.device_get(init_state(CFG, make_mesh(CFG.mesh)).lora)
    assert not np.any(fresh["down"]["b"]) and 0.9 < np.abs(fresh["down"]["a"]).max() * np.sqrt(f) <= 1.0  # as PEFT
    only_q = dataclasses.replace(CFG, lora=LoraConfig(rank=RANK, targets=("q",)))
    state = jax.eval_shape(lambda: init_state(only_q, make_mesh(CFG.mesh)))
    assert sum(x.size for x in jax.tree.leaves(state.lora)) == RANK * (d + q) * layers


@pytest.mark.slow
def test_base_is_frozen_and_has_no_optimizer_state():
    mesh = make_mesh(CFG.mesh)
    before = jax.device_get(init_state(CFG, mesh))
    after, history = run(CFG, jax.devices(), [packed_batch(CFG, seed) for seed in range(3)])
    for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(after.params), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    assert history[-1]["loss"] < history[0]["loss"]  # the adapters learn
    assert all(np.any(b["b"] != 0) for b in after.lora.values())  # B left zero-init
    base_shapes = {x.shape for x in jax.tree.leaves(before.params)}
    opt_shapes = {x.shape for x in jax.tree.leaves(after.opt_state)}
    assert not base_shapes & opt_shapes, base_shapes & opt_shapes
    adapter_size = sum(x.size for x in jax.tree.leaves(after.lora))
    assert sum(x.size for x in jax.tree.leaves(after.opt_state)) == 2 * adapter_size + 1  # mu, nu, Adam's count


def random_adapters(seed: int = 0) -> tuple[dict, dict]:
    state = jax.device_get(init_state(CFG, make_mesh(CFG.mesh)))
    rng = np.random.default_rng(seed)  # B non-zero: a fresh adapter would change nothing
    adapters = {t: {"a": ab["a"], "b": rng.normal(0, 0.05, ab["b"].shape).astype(np.float32)}
                for t, ab in state.lora.items()}  # fmt: skip
    return state.params, adapters


def our_logits(params: dict, tokens: np.ndarray, adapters: dict | None = None) -> np.ndarray:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    model = with_params(MODEL, params)
    logits, _ = model(jnp.asarray(tokens), positions, adapters=adapters, lora_scale=lora.scale(CFG.lora))
    return np.asarray(logits)


def merged_by_hand(params: dict, adapters: dict) -> dict:
    merged = jax.tree.map(np.array, params)
    s = CFG.lora.alpha / CFG.lora.rank
    for target, ab in adapters.items():
        path, _ = lora.TARGETS[target]
        layers = merged["layers"][path[0]]
        for i in range(MODEL.n_layers):
            layers[path[1]][i] += s * np.tensordot(ab["a"][i], ab["b"][i], axes=1)
    return merged


def test_merged_weights_give_the_adapted_logits():
    params, adapters = random_adapters()
    tokens = np.random.default_rng(1).integers(0, MODEL.vocab_size, (2, 16))
    adapted = our_logits(params, tokens, adapters)
    assert np.abs(adapted - our_logits(params, tokens)).max() > 1e-2  # the adapters matter here
    np.testing.assert_allclose(adapted, our_logits(merged_by_hand(params, adapters), tokens), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_sharded_step_equals_one_device_and_adapters_shard_by_name():
    batches = [packed_batch(CFG, seed) for seed in range(2)]
    one, one_history = run(dataclasses.replace(CFG, mesh=MeshConfig(fsdp=1)), jax.devices()[:1], batches)
    sharded = dataclasses.replace(CFG, mesh=MeshConfig(data=2, fsdp=2, tensor=2))
    eight, eight_history = run(sharded, jax.devices(), batches)
    for a, b in zip(one_history, eight_history, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5
    assert_trees_close(one.lora, eight.lora)
    shardings = state_shardings(sharded, make_mesh(sharded.mesh)).lora
    assert tuple(shardings["q"]["a"].spec) == (None, "fsdp", None)  # [L, D, r]: embed over fsdp, rank whole
    assert tuple(shardings["q"]["b"].spec) == (None, None, "tensor", None)  # [L, r, N, H]: heads over tensor
    assert tuple(shardings["down"]["a"].spec) == (None, "tensor", None)  # [L, F, r]
    assert tuple(shardings["o"]["a"].spec) == (None, "tensor", None, None)  # [L, N, H, r]


@pytest.mark.slow
def test_accumulation_equals_one_big_batch():
    batches = [packed_batch(CFG, seed) for seed in range(2)]
    big, big_history = run(dataclasses.replace(CFG, micro_batches=1), jax.devices(), batches)
    acc, acc_history = run(dataclasses.replace(CFG, micro_batches=4), jax.devices(), batches)
    for a, b in zip(big_history, acc_history, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5
    assert_trees_close(big.lora, acc.lora)


def test_config_is_checked():
    for bad in ({"rank": 0}, {"alpha": 0.0}, {"dropout": 0.1}, {"targets": ("q", "wq")}, {"targets": ()}):
        with pytest.raises(UserError, match="lora"):
            LoraConfig(**bad)
    assert TrainConfig().lora is None  # full fine-tuning by default


RUN = dataclasses.replace(CFG, steps=6, checkpoint_every=2, keep_checkpoints=10, optim=OptimConfig(lr=3e-2))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    train(dataclasses.replace(RUN, run_dir=str(run_dir)))
    return run_dir


def saved_state(run_dir, step: int) -> dict:
    return restore_params(run_dir / "checkpoints" / str(step) / "state")


@pytest.mark.slow
def test_a_lora_run_resumes_bit_for_bit(lora_run, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(lora_run, resumed)
    for step in (4, 6):  # as if killed after step 2's checkpoint
        shutil.rmtree(resumed / "checkpoints" / str(step))
    train(dataclasses.replace(RUN, run_dir=str(resumed)))
    straight, again = saved_state(lora_run, 6), saved_state(resumed, 6)
    assert set(straight) == set(again) and straight["lora"]
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(again), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    shapes = {k: v.shape for k, v in jax.tree_util.tree_leaves_with_path(abstract_state(RUN, make_mesh(RUN.mesh)))}
    assert len(shapes) == len(jax.tree.leaves(straight))


@pytest.mark.slow
def test_hf_exports_compute_our_logits(lora_run, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    state = saved_state(lora_run, 6)
    tokens = np.random.default_rng(2).integers(0, MODEL.vocab_size, (2, 16))
    ours = our_logits(state["params"], tokens, state["lora"])
    assert np.abs(our_logits(state["params"], tokens) - ours).max() > 100 * LOGIT_TOL  # unloaded adapters would show
    convert_jax_to_hf(lora_run, tmp_path / "merged")
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype=torch.float32)
    with torch.no_grad():
        np.testing.assert_allclose(merged(torch.tensor(tokens)).logits.numpy(), ours, atol=LOGIT_TOL, rtol=0)

    peft = pytest.importorskip("peft", reason="peft is part of the hf extra")
    convert_jax_to_hf(lora_run, tmp_path / "adapter", adapter_only=True, base_model="base")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["task_type"]) == (RANK, 8.0, "CAUSAL_LM")
    export_hf(state["params"], MODEL, tmp_path / "base")
    base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    with torch.no_grad():
        np.testing.assert_allclose(adapted(torch.tensor(tokens)).logits.numpy(), ours, atol=LOGIT_TOL, rtol=0)


@pytest.mark.slow
def test_generate_and_eval_load_a_lora_run_with_its_adapters_folded_in(lora_run, tmp_path):
    from test_convert_cli import write_tokenizer

    from mellama_jax.inference.generate import load

    state = saved_state(lora_run, 6)
    tokens = np.random.default_rng(3).integers(0, MODEL.vocab_size, (2, 16))
    shutil.copytree(lora_run, tmp_path / "run")  # the counting corpus has no tokenizer; load needs one
    write_tokenizer(tmp_path / "run", MODEL.vocab_size)
    loaded = load(tmp_path / "run", mesh=make_mesh(MeshConfig(tensor=2), jax.devices()[:2]))
    np.testing.assert_allclose(our_logits(loaded.params, tokens), our_logits(state["params"], tokens, state["lora"]),
                               atol=1e-5, rtol=0)  # fmt: skip


@pytest.mark.slow
def test_adapter_only_refuses_a_run_without_adapters(lora_run, tmp_path):
    with pytest.raises(UserError, match="a LoRA run"):  # init_from would otherwise start from the bare base
        find_params(lora_run)
    shutil.copytree(lora_run, tmp_path / "run")
    (tmp_path / "run" / LORA_CONFIG).unlink()
    with pytest.raises(UserError, match="adapter-only needs a LoRA training run"):
        convert_jax_to_hf(tmp_path / "run", tmp_path / "out", adapter_only=True)


def test_plan_counts_only_the_adapters_as_trained():
    cfg = TrainConfig(global_batch=8, micro_batches=1, lora=LoraConfig())  # 13B, DESIGN §1's rank 16 on all seven
    d, f, layers = 5120, 13824, 40
    trained = 16 * (4 * (d + d) + 3 * (d + f)) * layers  # q, k, v, o are 5120 -> 5120 in LLaMA-2 13B (no GQA)
    assert trained == 62_586_880 and plan.trainable_count(cfg) == trained
    lay = plan.Layout(data=1, fsdp=8, tensor=1, micro_batches=1, rows=1)
    mem = plan.estimate(cfg, lay)
    assert mem.opt_state == 2 * 4 * trained / 8
    assert mem.params == 4 * (13_015_864_320 + trained) / 8


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["none", "full"])
def test_adapter_gradients_are_the_same_under_flash_and_xla(remat):
    params, adapters = random_adapters()
    batch = {k: jnp.asarray(v) for k, v in packed_batch(CFG, seed=3).items()}
    grads = {}
    for impl in ("flash", "xla"):
        cfg = dataclasses.replace(CFG, model=dataclasses.replace(MODEL, attention=impl, remat=remat))
        mean_loss = lambda ab, cfg=cfg: jnp.divide(*loss_sums(cfg, params, batch, ab))  # noqa: E731
        grads[impl] = jax.grad(mean_loss)(adapters)
    assert any(np.abs(g).max() > 1e-3 for g in jax.tree.leaves(grads["xla"]))
    assert_trees_close(grads["flash"], grads["xla"], tol=1e-5)  # fp32: only the kernels' summation order differs
