"""The serving engine in-process: its slots against `generate`, on one device and on the tests' 8 devices, and
weight-only quantization against a numpy reference of the same rounding."""

import threading

import jax
import numpy as np
import pytest
from test_generate import checkpoint, prompts

from mellama_jax.inference import generate as gen
from mellama_jax.inference import quality
from mellama_jax.inference.engine import Engine, QueueFull, Request
from mellama_jax.model import quant
from mellama_jax.model.llama import with_params


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return checkpoint("gqa", tmp_path_factory.mktemp("engine"))[0]


def run_engine(engine: Engine, ids: list[list[int]], new: list[int]) -> list[list[int]]:
    """Every prompt through the engine at once (more prompts than slots: they queue); their new tokens."""
    outs, reasons, left = [[] for _ in ids], [None] * len(ids), threading.Semaphore(0)

    def emitter(i):
        def emit(event):
            if event[0] == "token":
                outs[i].append(event[1])
            elif event[0] in ("done", "error"):
                reasons[i] = event
                left.release()

        return emit

    for i, (prompt, n) in enumerate(zip(ids, new, strict=True)):
        engine.submit(Request(prompt, n, emitter(i)))
    for _ in ids:
        assert left.acquire(timeout=300)
    assert all(r[0] == "done" for r in reasons), reasons
    return outs


@pytest.mark.parametrize("devices", [1, 8])
def test_slots_give_generates_tokens_whatever_shares_the_batch(ckpt, devices):
    mesh = gen.decode_mesh(gen.read_model_config(ckpt / "model_config.json"), jax.devices()[:devices])
    model = gen.load(ckpt, mesh=mesh)
    ids = prompts(model.cfg.vocab_size, lengths=(5, 1, 17, 9, 30, 2, 40, 3, 12, 21), seed=3)
    new = [12, 3, 12, 7, 12, 12, 5, 12, 1, 9]
    want = [gen.generate(model, [p], gen.Sampling(max_new_tokens=n))[0] for p, n in zip(ids, new, strict=True)]
    engine = Engine(model, slots=8 if devices == 8 else 4, max_len=64, max_queue=len(ids))
    engine.warm_up()
    engine.start()
    try:
        assert run_engine(engine, ids, new) == want
        assert engine.busy() == 0 and engine.queued() == 0
        # warm-up compiled every program the requests ran: one step, one prefill per bucket, nothing since
        assert engine.windows == [64] and len(engine.row_options) == (3 if devices == 1 else 4)  # 1, 2, 4(, 8) rows
        assert sum(step._cache_size() for step in engine._steps.values()) == len(engine.row_options)
        assert engine._prefill._cache_size() == len(engine.buckets)
    finally:
        engine.stop()


def test_a_full_queue_refuses(ckpt):
    model = gen.load(ckpt)
    engine = Engine(model, slots=1, max_len=32, max_queue=2)  # not started: nothing leaves the queue
    engine.submit(Request([1, 2], 4, lambda e: None))
    engine.submit(Request([1, 2], 4, lambda e: None))
    with pytest.raises(QueueFull):
        engine.submit(Request([1, 2], 4, lambda e: None))


def numpy_rtn(w: np.ndarray, n_in: int, qmax: int, group: int | None) -> np.ndarray:
    """The dequantized weight, computed independently: symmetric round-to-nearest per (group of inputs, output)."""
    layers, outs = w.shape[0], w.shape[1 + n_in :]
    flat = w.reshape(layers, -1, int(np.prod(outs)))  # [L, I, O]
    size = group or flat.shape[1]
    grouped = flat.reshape(layers, flat.shape[1] // size, size, -1)
    scale = np.abs(grouped).max(axis=2, keepdims=True) / qmax
    scale[scale == 0] = 1
    return (np.clip(np.round(grouped / scale), -qmax, qmax) * scale).reshape(w.shape)


@pytest.mark.parametrize("mode, qmax", [("int8", 127), ("int4", 7)])
def test_quantized_weights_are_round_to_nearest_and_served_as_their_dequantized_floats(ckpt, mode, qmax):
    model = gen.load(ckpt)
    params, scales = quant.quantize(model.params, mode)
    layers = jax.tree.map(np.asarray, model.params["layers"])
    back = jax.vmap(quant.dequantize)(params["layers"], scales)  # as the model's layer scan does, layer by layer
    dequantized = {}
    for (module, weight), n_in in quant.WEIGHTS.items():
        w = layers[module][weight]
        assert params["layers"][module][weight].dtype == np.dtype(quant.MODES[mode][0])
        inputs = int(np.prod(w.shape[1 : 1 + n_in]))
        group = None if mode == "int8" else inputs // quant.groups(inputs, mode)
        want = numpy_rtn(w, n_in, qmax, group)
        got = np.asarray(back[module][weight])
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
        dequantized.setdefault(module, {})[weight] = want.astype(np.float32)
    # generate on the dequantized floats is the reference for the engine on the integers
    floats = gen.Loaded(**{**model.__dict__, "params": {**model.params, "layers": {**layers, **dequantized}}})
    ids = prompts(model.cfg.vocab_size, lengths=(5, 17, 9, 30), seed=4)
    want = gen.generate(floats, ids, gen.Sampling(max_new_tokens=10))
    quantized = quality.quantized(model, mode, "w5 w6 w7 w8 " * 8)
    report = quantized.quant_report
    engine = Engine(quantized, slots=4, max_len=64)
    engine.start()
    try:
        assert run_engine(engine, ids, [10] * len(ids)) == want
    finally:
        engine.stop()
    assert gen.generate(quantized, ids, gen.Sampling(max_new_tokens=10)) == want  # generate (and eval) quantized
    # the report's perplexities are those of the two models on the text
    tokens = np.asarray([model.tokenizer.encode("w5 w6 w7 w8 " * 8)])
    for params_, key in ((model.params, "perplexity"), (floats.params, "perplexity_quantized")):
        logits = with_params(model.cfg, params_)(tokens, np.arange(tokens.shape[1])[None])[0][0]
        logp = np.asarray(jax.nn.log_softmax(logits[:-1], -1))
        ppl = float(np.exp(-logp[np.arange(tokens.shape[1] - 1), tokens[0, 1:]].mean()))
        assert abs(report[key] - ppl) <= 1e-3 * ppl
    assert 0 <= report["top1_agreement"] <= 1 and report["tokens"] == tokens.shape[1]


def test_steps_attend_to_the_window_their_slots_reach(ckpt):
    """Short and long requests together: each step attends to the smallest window past every busy position."""
    model = gen.load(ckpt)
    engine = Engine(model, slots=4, max_len=256, max_queue=8)
    assert engine.windows == [64, 128, 256]
    ids = prompts(model.cfg.vocab_size, lengths=(5, 150, 30, 90, 200, 12), seed=5)
    new = [40, 12, 60, 20, 30, 8]
    want = [gen.generate(model, [p], gen.Sampling(max_new_tokens=n))[0] for p, n in zip(ids, new, strict=True)]
    engine.start(on_ready=lambda seconds, error: None)
    try:
        assert run_engine(engine, ids, new) == want
    finally:
        engine.stop()
    assert all(step._cache_size() == len(engine.row_options) for step in engine._steps.values())  # all warmed
