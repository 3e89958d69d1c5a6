"""Generation against transformers' `generate` on the same weights; sampling, sharding, the cache's end, the CLI.

The reference is `LlamaForCausalLM.generate` (fp32, eager attention), run one prompt at a time without
padding, so our batched, bucketed, left-padded decoding has to reproduce an unpadded computation token
for token. Sampling filters are checked against transformers' own logits warpers.
"""

import dataclasses
import io
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import checkify
from test_convert_cli import write_tokenizer
from test_hf_parity import BASE, CONFIGS, reference_model
from tokenizers import Tokenizer

from mellama_jax.cli import main
from mellama_jax.config import MeshConfig
from mellama_jax.data.sft import TEMPLATES
from mellama_jax.errors import UserError
from mellama_jax.hf.convert import convert_hf_to_jax
from mellama_jax.inference import generate as gen
from mellama_jax.inference.sampling import filter_rows
from mellama_jax.model.llama import Llama, init_cache
from mellama_jax.model.sharding import make_mesh
from mellama_jax.training.checkpoints import finish_checkpoints, run_manager, save_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

NEW = 12  # new tokens per prompt
LENGTHS = (5, 1, 17, 9, 30, 2, 40)  # mixed, unsorted: batches mix lengths and buckets


def checkpoint(name: str, folder):
    """(a converted checkpoint with a tokenizer, the transformers model it came from)."""
    hf = reference_model(dataclasses.replace(BASE, **CONFIGS[name]))
    hf.save_pretrained(folder / "hf")
    write_tokenizer(folder / "hf")
    convert_hf_to_jax(folder / "hf", folder / "ckpt")
    return folder / "ckpt", hf


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    return checkpoint("gqa", tmp_path_factory.mktemp("gqa"))


@pytest.fixture(scope="module", params=["gqa", "mha-tied"])
def converted(request, tmp_path_factory, gqa):
    return gqa if request.param == "gqa" else checkpoint(request.param, tmp_path_factory.mktemp(request.param))


def prompts(vocab: int, lengths=LENGTHS, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


def hf_greedy(model, prompt: list[int], eos: list[int] | None, new: int = NEW) -> list[int]:
    """transformers' greedy continuation of one unpadded prompt; stops only at `eos` or `new` tokens."""
    config = transformers.GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), generation_config=config)[0, len(prompt) :].tolist()
    return out[:-1] if eos and out and out[-1] in eos else out


def test_greedy_equals_transformers_token_for_token(converted, monkeypatch):
    ckpt, hf = converted
    loaded = gen.load(ckpt)
    rows = prompts(loaded.cfg.vocab_size)
    free = [hf_greedy(hf, p, None) for p in rows]
    # End-of-sequence ids that the reference produces mid-way for some prompts: rows must stop one by one.
    eos = sorted({row[3] for row in free[:3]})
    expected = [hf_greedy(hf, p, eos) for p in rows]
    assert any(len(e) < NEW for e in expected) and any(len(e) == NEW for e in expected)

    loaded = dataclasses.replace(loaded, eos_ids=tuple(eos))
    assert gen.generate(loaded, rows, gen.Sampling(NEW), batch_size=3) == expected
    monkeypatch.setattr(gen, "PREFILL_CHUNK", 8)  # the 40-token prompt's batch prefills 5 chunks + 7 tokens
    assert gen.generate(loaded, rows, gen.Sampling(NEW), batch_size=3) == expected


def test_load_reads_the_checkpoints_stop_ids_and_places_params_by_heads(gqa, tmp_path):
    ckpt, _ = gqa
    loaded = gen.load(ckpt)
    assert loaded.eos_ids == (2,)  # transformers' LlamaConfig default, in the saved generation_config.json
    assert dict(loaded.mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}  # 2 kv heads -> tensor 2, data the rest
    assert loaded.params["layers"]["attn"]["k"].sharding.spec[2] == "tensor"
    assert loaded.cfg.dtype == "float32" and loaded.fingerprint.startswith("sha256:")

    copy = tmp_path / "copy"
    shutil.copytree(ckpt, copy)
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert gen.load(copy).eos_ids == (2, 7)
    assert gen.load(copy).fingerprint == loaded.fingerprint  # the params' files, not the settings beside them
    (copy / "generation_config.json").unlink()
    assert gen.load(copy).eos_ids == (2,)  # the tokenizer's </s>


def test_load_takes_the_params_of_a_training_runs_latest_step(gqa, tmp_path):
    ckpt, _ = gqa
    loaded = gen.load(ckpt)
    run = tmp_path / "run"
    run.mkdir()
    for name in ("model_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ckpt / name, run / name)
    params = loaded.params
    manager = run_manager(run, every=1, keep=2)
    for step, scale in ((1, 1.0), (2, 2.0)):
        state = {"params": jax.tree.map(lambda p, s=scale: p * s, params), "opt_state": {"mu": params}}
        save_checkpoint(manager, step, state, {"position": step}, force=True)
    finish_checkpoints(manager)

    restored = gen.load(run).params

    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want) * 2.0)


def test_eight_devices_give_the_tokens_of_one(gqa):
    ckpt, _ = gqa
    sharded = gen.load(ckpt)
    single = gen.load(ckpt, mesh=gen.decode_mesh(sharded.cfg, jax.devices()[:1]))
    rows = prompts(sharded.cfg.vocab_size)
    for sampling in (gen.Sampling(NEW), gen.Sampling(NEW, temperature=1.0, top_p=0.9, seed=5)):
        assert gen.generate(sharded, rows, sampling, batch_size=4) == gen.generate(single, rows, sampling)
    fsdp = gen.load(ckpt, mesh=make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))  # a mesh of the user's
    assert gen.generate(fsdp, rows, gen.Sampling(NEW)) == gen.generate(single, rows, gen.Sampling(NEW))


def test_sampling_is_reproducible_per_seed_and_independent_of_batching(gqa):
    loaded = dataclasses.replace(gen.load(gqa[0]), eos_ids=())
    rows = prompts(loaded.cfg.vocab_size)
    hot = gen.Sampling(NEW, temperature=1.0, seed=3)
    first = gen.generate(loaded, rows, hot, batch_size=2)
    assert gen.generate(loaded, rows, hot, batch_size=16) == first  # each row's key is its prompt's
    assert gen.generate(loaded, rows, dataclasses.replace(hot, seed=4), batch_size=2) != first
    greedy = gen.generate(loaded, rows, gen.Sampling(NEW))
    assert first != greedy
    assert gen.generate(loaded, rows, dataclasses.replace(hot, top_k=1)) == greedy
    assert gen.generate(loaded, rows, dataclasses.replace(hot, top_p=1e-6)) == greedy


def test_batches_reuse_one_compiled_program_and_keep_input_order(gqa):
    loaded = gen.load(gqa[0])
    sampling = gen.Sampling(4)
    decoder = gen._decoder(loaded.cfg, sampling, loaded.eos_ids, loaded.mesh, gen.PREFILL_CHUNK, ())
    rows = prompts(loaded.cfg.vocab_size, lengths=(9, 3, 12, 5, 16, 7, 10, 4))  # all in the 16-slot bucket
    seen = []
    out = gen.generate(loaded, rows, sampling, batch_size=4, progress=seen.append)
    assert seen == [4, 4]
    assert decoder._cache_size() == 1
    assert out == [gen.generate(loaded, [row], sampling)[0] for row in rows]  # each alone, in input order
    lengths, padded = (1, 16, 17, 33, 64, 65, 100, 129, 4000), [16, 16, 32, 48, 64, 80, 112, 160, 4096]
    assert [gen.bucket_length(n) for n in lengths] == padded


def test_a_row_ends_after_a_stop_token_kept_and_the_batch_when_every_row_has(gqa):
    loaded = gen.load(gqa[0])
    rows = prompts(loaded.cfg.vocab_size, lengths=(6, 11))
    sampling = gen.Sampling(NEW)
    free = gen.generate(loaded, rows, sampling)
    assert all(len(out) == NEW for out in free), "greedy runs its length: room for a stop to cut it"
    stop = free[0][3]  # the first row stops after its 4th token; the second where it first meets that token
    cut = gen.generate(loaded, rows, sampling, stop_ids=[stop])
    assert cut[0] == free[0][: free[0].index(stop) + 1]
    assert cut[1] == (free[1][: free[1].index(stop) + 1] if stop in free[1] else free[1])


SETTINGS = [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.9), (0.5, 10, 0.8), (2.0, 3, 0.3), (1.3, 50, 1.0)]


def test_filters_keep_what_transformers_warpers_keep_each_row_its_own():
    """One batch, each row with its own settings (as the serving engine's slots), against transformers per row."""
    from transformers.generation import logits_process as lp

    logits = np.random.default_rng(0).normal(size=(len(SETTINGS), 50)).astype(np.float32) * 3
    temperature, top_k, top_p = (jnp.asarray(column) for column in zip(*SETTINGS, strict=True))
    ours = np.asarray(filter_rows(jnp.asarray(logits), temperature, top_k, top_p))
    for row, (t, k, p) in enumerate(SETTINGS):
        warpers = [lp.TemperatureLogitsWarper(t)]
        warpers += [lp.TopKLogitsWarper(k)] if k else []
        warpers += [lp.TopPLogitsWarper(p)] if p < 1 else []
        expected = torch.tensor(logits[row : row + 1])
        for warper in warpers:
            expected = warper(None, expected)
        expected = expected.numpy()[0]
        np.testing.assert_array_equal(np.isfinite(ours[row]), np.isfinite(expected), err_msg=f"row {row}")
        kept = np.isfinite(expected)
        np.testing.assert_allclose(ours[row][kept], expected[kept], rtol=1e-6)


def test_temperature_sampling_frequencies_follow_the_softmax():
    logits = jnp.log(jnp.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))
    n, temperature = 20_000, 0.7
    keys = jax.random.split(jax.random.key(0), n)
    for top_k in (0, 3):
        tokens = gen.sample(jnp.tile(logits, (n, 1)), keys, gen.Sampling(temperature=temperature, top_k=top_k))
        counts = np.bincount(np.asarray(tokens), minlength=6) / n
        p = np.exp(np.asarray(logits) / temperature)
        if top_k:
            p[top_k:] = 0
        p /= p.sum()
        # Binomial standard error per token; 5 of them leaves a chance-failure rate below 1e-5.
        assert np.all(np.abs(counts - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-12), (counts, p)


def test_writing_past_the_end_of_the_cache_raises():
    cfg = dataclasses.replace(BASE, **CONFIGS["gqa"])
    model = Llama(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.ones((1, 3), jnp.int32)
    positions = jnp.arange(3)[None]
    _, full = model(tokens[:, :2], positions[:, :2], cache=init_cache(cfg, 1, 4))
    with pytest.raises(ValueError, match="KV cache overflow: writing 3 slots at index 2 of a cache of 4"):
        model(tokens, positions, cache=full)  # concrete index: refused at once

    def step(cache):
        return model(tokens, positions, cache=cache)[0]

    with pytest.raises(ValueError, match="functionaliz"):
        jax.jit(step)(full)  # a traced index under plain jit: refused when traced, never clamped
    error, _ = jax.jit(checkify.checkify(step, errors=checkify.user_checks))(full)
    with pytest.raises(checkify.JaxRuntimeError, match="writing 3 slots at index 2 of a cache of 4"):
        error.throw()
    error, _ = jax.jit(checkify.checkify(step, errors=checkify.user_checks))(init_cache(cfg, 1, 4))
    error.throw()  # room left: no error


def test_bad_requests_are_one_line_errors(gqa, tmp_path):
    loaded = gen.load(gqa[0])
    limit = loaded.cfg.max_seq_len - 8
    rows = [[1, 2], [1] * limit, [1] * (limit + 1)]
    with pytest.raises(UserError, match=r"^prompt 2: 249 tokens \+ max_new_tokens 8 exceed the model's max_seq_len"):
        gen.generate(loaded, rows, gen.Sampling(8))
    with pytest.raises(UserError, match="^prompt 1: token id outside"):
        gen.generate(loaded, [[1], [loaded.cfg.vocab_size]], gen.Sampling(8))
    with pytest.raises(UserError, match="^prompt 0: expected a non-empty"):
        gen.generate(loaded, [[]], gen.Sampling(8))
    for field, value in (("max_new_tokens", 0), ("temperature", -1.0), ("top_k", -1), ("top_p", 0.0), ("seed", -1)):
        with pytest.raises(UserError, match=f"^{field} must"):
            gen.Sampling(**{field: value})
    with pytest.raises(UserError, match="not a converted checkpoint"):
        gen.load(tmp_path)
    shutil.copytree(gqa[0], tmp_path / "no-tokenizer", ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(UserError, match="no tokenizer.model or tokenizer.json"):
        gen.load(tmp_path / "no-tokenizer")


def test_templates_wrap_the_prompt_as_sft_data_does():
    assert gen.apply_template("Is aspirin an NSAID?", "raw") == "Is aspirin an NSAID?"
    assert (
        gen.apply_template("Q?", "me-llama")
        == "Human: \nQ?\n\nAssistant: \n"
        == TEMPLATES["me-llama"][0].format(prompt="Q?")
    )
    assert gen.apply_template("{x}", "llama2-chat") == "[INST] {x} [/INST]"
    with pytest.raises(UserError, match="chat template must be one of"):
        gen.apply_template("Q?", "alpaca")


def test_cli_prints_the_continuation_of_one_prompt_or_json_lines_of_many(gqa, tmp_path, capsys, monkeypatch):
    ckpt, hf = gqa
    decode = Tokenizer.from_file(str(ckpt / "tokenizer.json")).decode
    texts = ["w5 w7 w9", "w11", "w3 w40 w41 w42 w100"]
    expected = [decode(hf_greedy(hf, [1, *(int(w[1:]) for w in t.split())], [2], new=6)) for t in texts]

    assert main(["generate", str(ckpt), "--prompt", texts[0], "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == expected[0] + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(texts[0] + "\n"))
    assert main(["generate", str(ckpt), "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == expected[0] + "\n"

    (tmp_path / "p.txt").write_text("\n".join(texts) + "\n\n")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    for name in ("p.txt", "p.jsonl"):
        assert main(["generate", str(ckpt), "--prompts", str(tmp_path / name), "--max-new-tokens", "6"]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert lines == [{"prompt_index": i, "output": e} for i, e in enumerate(expected)]

    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "w5"}) + "\n" + json.dumps({"text": "w5"}) + "\n")
    assert main(["generate", str(ckpt), "--prompts", str(tmp_path / "bad.jsonl")]) == 2
    reason = 'expected an object with a string "prompt" field'
    assert capsys.readouterr().err == f"mellama generate: error: {tmp_path / 'bad.jsonl'}:2: {reason}\n"
    assert main(["generate", str(ckpt), "--prompt", "w5", "--top-p", "1.5"]) == 2
    assert capsys.readouterr().err == "mellama generate: error: top_p must be in (0, 1] (1 = off), got 1.5\n"
    # bytes that are not UTF-8 reach Python as lone surrogates (from argv, or stdin in a C locale)
    assert main(["generate", str(ckpt), "--prompt", "caf\udce9"]) == 2
    assert capsys.readouterr().err == "mellama generate: error: --prompt: not UTF-8 text\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("caf\udce9 w5\n"))
    assert main(["generate", str(ckpt)]) == 2
    assert capsys.readouterr().err == "mellama generate: error: stdin: not UTF-8 text\n"


def test_a_run_trained_from_scratch_on_data_tokenizer_generates_with_that_tokenizer(tmp_path, shared_data, capsys):
    corpus = tmp_path / "notes.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": f"patient {i} given insulin for diabetes"}) + "\n" for i in range(40))
    )
    (tmp_path / "tok").mkdir()
    shutil.copy(shared_data / "llama2_tokenizer.model", tmp_path / "tok" / "llama2.model")  # any file name
    run = tmp_path / "run"
    config = [f"run_dir={run}", "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
              "model.head_dim=16", "model.ffn_dim=64", "model.max_seq_len=64", "model.dtype=float32", "seq_len=32",
              "global_batch=8", "micro_batches=1", "steps=2", "checkpoint_every=2", "data.kind=cpt",
              f"data.tokenizer={tmp_path / 'tok' / 'llama2.model'}",
              f'data.sources=[{{"name": "notes", "paths": ["{corpus}"]}}]']  # fmt: skip
    assert main(["train", *config]) == 0
    assert (run / "tokenizer.model").read_bytes() == (shared_data / "llama2_tokenizer.model").read_bytes()
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "patient given", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()
