"""The lm-evaluation-harness adapter against lm-eval's own HF model running transformers on the same weights.

The reference model is transformers' LlamaForCausalLM built from the params our loader placed on the mesh
(hf.params_to_hf), scored by lm-eval's `HFLM`: the same tokenization rules and windowing, torch's fp32 logits.
"""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_convert_cli import write_tokenizer
from test_hf_parity import BASE, CONFIGS, reference_model

from mellama_jax.cli import main
from mellama_jax.errors import UserError
from mellama_jax.hf.table import params_to_hf

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install 'mellama-jax[lmeval]'")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from mellama_jax.evaluation.lm_eval import MellamaLM, bucket  # noqa: E402
from mellama_jax.hf.config import hf_config  # noqa: E402
from mellama_jax.inference import generate  # noqa: E402

CFG = dataclasses.replace(BASE, **CONFIGS["gqa"], max_seq_len=64)
WINDOW = 32  # max_length in these tests: requests longer than it are truncated
LOGPROB_TOL = 1e-4  # |Δ log-prob| per request, fp32 on both sides (measured ~2e-6)
DATA = pathlib.Path(__file__).parent / "data" / "lm_eval"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """(our converted checkpoint, the HF folder it came from), made through `mellama convert`."""
    root = tmp_path_factory.mktemp("lm_eval")
    reference_model(CFG).save_pretrained(root / "hf")
    write_tokenizer(root / "hf")
    assert main(["convert", "hf-to-jax", str(root / "hf"), str(root / "ours")]) == 0
    return root / "ours", root / "hf"


@pytest.fixture(scope="module")
def loaded(checkpoint) -> generate.Loaded:
    return generate.load(checkpoint[0])


@pytest.fixture(scope="module")
def hf_model(loaded):
    """transformers' model holding exactly the params our loader placed on the mesh."""
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(CFG), attn_implementation="eager"))
    state = params_to_hf(jax.tree.map(np.asarray, loaded.params), CFG)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def hf_tokenizer(checkpoint):
    return transformers.AutoTokenizer.from_pretrained(checkpoint[1])


def reference(hf_model, hf_tokenizer, **kwargs) -> HFLM:
    return HFLM(pretrained=hf_model, tokenizer=hf_tokenizer, batch_size=2, max_length=WINDOW, device="cpu",
                dtype="float32", **kwargs)  # fmt: skip


def requests(kind: str, *args: tuple) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]


def words(rng: np.random.Generator, n: int) -> str:
    return " ".join(f"w{i}" for i in rng.integers(3, CFG.vocab_size, n))


def hf_greedy(hf_model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=2, pad_token_id=0)
    return out[0, len(ids) :].tolist()


def greedy_pair(hf_model, rng) -> tuple[str, str]:
    """A context and a one-word continuation that transformers' argmax picks (so is_greedy must be True)."""
    while True:
        context = words(rng, 4)
        (token,) = hf_greedy(hf_model, [1, *(int(w[1:]) for w in context.split())], 1)
        if token >= 3:  # a word, not <unk>, <s> or </s>
            return context, f" w{token}"


def test_loglikelihood_matches_lm_eval_hf_model(loaded, hf_model, hf_tokenizer):
    rng = np.random.default_rng(0)
    long_context = words(rng, 3 * WINDOW)  # truncated from the left, as HF truncates it
    batch = requests(
        "loglikelihood",
        ("w5 w6 w7", " w8 w9"),
        ("", "w10 w11 w12"),  # empty context: BOS conditions the continuation
        ("w3 w4 ", "w20"),  # the trailing space moves into the continuation
        (long_context, " " + words(rng, 3)),
        greedy_pair(hf_model, rng),
        *[(words(rng, int(rng.integers(1, 20))), " " + words(rng, int(rng.integers(1, 5)))) for _ in range(7)],
    )
    model = MellamaLM(loaded=loaded, batch_size=3, max_length=WINDOW)
    ours = model.loglikelihood(batch)
    expected = reference(hf_model, hf_tokenizer).loglikelihood(batch)
    # inputs of 1..32 tokens: two padded lengths (16, 32); one compile per (length, scored width) used
    assert {length for length, _ in model.shapes} == {16, 32}
    assert model._score._cache_size() == len(model.shapes) <= 2 * 3  # widths 1..5 scored: 1, 2, 4 or 8

    np.testing.assert_allclose([s for s, _ in ours], [s for s, _ in expected], atol=LOGPROB_TOL, rtol=0)
    assert [g for _, g in ours] == [g for _, g in expected]
    assert ours[4][1] and not all(g for _, g in ours), "both greedy outcomes must be exercised"


def test_padded_lengths_add_at_most_a_quarter_past_64():
    ladder = sorted({bucket(n, 4096) for n in range(1, 4097)})
    assert ladder[:9] == [16, 32, 48, 64, 80, 96, 112, 128, 160]
    assert ladder[-4:] == [2560, 3072, 3584, 4096] and len(ladder) == 4 + 4 * 6  # 64 to 4096: six octaves
    assert all(b / a <= 1.25 for a, b in zip(ladder[3:], ladder[4:], strict=False))
    assert bucket(100, 90) == 90 and all(bucket(n, 4096) >= n for n in range(1, 4097))


def test_loglikelihood_rolling_equals_hf_logits_over_the_same_windows(loaded, hf_model, hf_tokenizer):
    rng = np.random.default_rng(1)
    docs = requests("loglikelihood_rolling", (words(rng, 3 * WINDOW + 5),), (words(rng, 7),), (words(rng, WINDOW),))
    ours = MellamaLM(loaded=loaded, batch_size=3, max_length=WINDOW).loglikelihood_rolling(docs)
    # add_bos_token=False: the document's own tokens, each predicted once, the first window conditioned on BOS
    # (lm-eval's default would also encode the tokenizer's BOS into the document, scoring BOS after BOS).
    expected = reference(hf_model, hf_tokenizer, add_bos_token=False).loglikelihood_rolling(docs)
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=LOGPROB_TOL)


def test_generate_until_cuts_at_the_first_stop_string_and_honours_max_gen_toks(loaded, hf_model, hf_tokenizer):
    rng = np.random.default_rng(2)
    while True:  # a prompt whose greedy continuation is 6 words, no EOS: room for a stop string to matter
        prompt = words(rng, 5)
        continuation = hf_greedy(hf_model, hf_tokenizer(prompt)["input_ids"], 6)
        if len(continuation) == 6 and min(continuation) >= 3:
            break
    text = hf_tokenizer.decode(continuation, skip_special_tokens=True)
    stop = text.split()[3]
    gen = requests(
        "generate_until",
        (prompt, {"until": [stop, "never"], "max_gen_toks": 6, "do_sample": False}),
        (prompt, {"until": [], "max_gen_toks": 2, "do_sample": False}),
        (prompt, {"until": "never", "max_gen_toks": 6}),
    )
    ours = MellamaLM(loaded=loaded, batch_size=2).generate_until(gen)

    assert ours[0] == text.split(stop)[0] and len(ours[0]) < len(text)
    assert ours[1] == hf_tokenizer.decode(continuation[:2], skip_special_tokens=True)
    assert ours[2] == text


def test_arguments_lm_eval_passes_are_checked(loaded):
    model = MellamaLM(loaded=loaded, batch_size="4", device="cuda:0")  # lm-eval's CLI defaults, as strings
    assert (model.batch_size, model.max_length, model.max_gen_toks) == (4, CFG.max_seq_len, 256)
    with pytest.raises(UserError, match="batch_size: 'auto'"):
        MellamaLM(loaded=loaded, batch_size="auto")
    with pytest.raises(UserError, match="max_length 65 exceeds the model's 64"):
        MellamaLM(loaded=loaded, max_length=65)
    with pytest.raises(UserError, match="max_gen_toks must be a positive integer"):
        MellamaLM(loaded=loaded, max_gen_toks="many")
    with pytest.raises(UserError, match="give ckpt=CKPT_DIR"):
        MellamaLM()
    with pytest.raises(UserError, match="unsupported num_beams"):
        model.generate_until(requests("generate_until", ("w5", {"until": [], "num_beams": 4})))
    with pytest.raises(UserError, match="leaves no room in max_length 64"):
        model.generate_until(requests("generate_until", ("w5", {"until": [], "max_gen_toks": 64})))


def test_a_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    args = ["--model_args", f"ckpt={tmp_path / 'missing'}", "--tasks", "mellama_tiny_mc", "--include_path", str(DATA)]
    code = main(["lm-eval", "--model", "mellama", *args])
    assert code == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"mellama lm-eval: error: {tmp_path / 'missing'}")


def test_unknown_model_args_and_tasks_are_one_line_errors(tmp_path, capsys):
    local = ["--include_path", str(DATA), "--tasks"]
    bad_arg = ["--model_args", f"ckpt={tmp_path},pretrained=gpt2", *local, "mellama_tiny_mc"]
    assert main(["lm-eval", "--model", "mellama", *bad_arg]) == 2  # was lm-eval's raw TypeError
    assert capsys.readouterr().err.splitlines()[-1] == (
        "mellama lm-eval: error: lm-eval model_args: unknown pretrained (known: ckpt, dtype, quantize, max_length,"
        " max_gen_toks)"
    )
    bad_task = ["--model_args", f"ckpt={tmp_path}", *local, "mellama_tiny_mc,no_such_task"]
    assert main(["lm-eval", "--model", "mellama", *bad_task]) == 2  # was lm-eval's raw ValueError
    assert capsys.readouterr().err.splitlines()[-1] == (
        "mellama lm-eval: error: lm-eval --tasks: Tasks not found: no_such_task (list them with: mellama lm-eval ls"
        " tasks)"
    )


def test_a_dataset_out_of_reach_offline_is_a_one_line_error(monkeypatch, capsys):
    import lm_eval.__main__

    def offline():  # what datasets raises for a task whose data is neither cached nor reachable
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", offline)
    assert main(["lm-eval", "--model", "mellama", "--tasks", "arc_easy"]) == 2  # was a raw traceback
    assert capsys.readouterr().err == (
        "mellama lm-eval: error: lm-eval: Couldn't reach 'allenai/ai2_arc' on the Hub (LocalEntryNotFoundError);"
        " offline, only datasets already cached can run\n"
    )


def test_without_lm_eval_the_package_imports_and_the_command_says_what_to_install(monkeypatch, capsys):
    blocked = "import sys; sys.modules['lm_eval'] = None; import mellama_jax.cli, mellama_jax.inference.generate"
    assert subprocess.run([sys.executable, "-c", blocked], capture_output=True, timeout=120).returncode == 0
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith(("lm_eval.", "mellama_jax.evaluation.lm"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now fails, as when it is not installed
    code = main(["lm-eval", "--model", "mellama"])
    assert code == 2
    assert capsys.readouterr().err == (
        "mellama lm-eval: error: lm-evaluation-harness is not installed: pip install 'mellama-jax[lmeval]'\n"
    )


def test_simple_evaluate_runs_the_registered_model_on_a_local_task(checkpoint, loaded, hf_model, hf_tokenizer,
                                                                   monkeypatch):  # fmt: skip
    monkeypatch.chdir(DATA)  # the task's data_files are relative to the working directory
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    tasks = TaskManager(include_path=str(DATA))
    run = lambda model, **kw: lm_eval.simple_evaluate(  # noqa: E731
        model=model, tasks=["mellama_tiny_mc"], task_manager=tasks, log_samples=True, **kw
    )
    ours = run("mellama", model_args={"ckpt": str(checkpoint[0])}, batch_size=4)
    expected = run(reference(hf_model, hf_tokenizer))

    responses = [s["filtered_resps"] for s in ours["samples"]["mellama_tiny_mc"]]
    reference_responses = [s["filtered_resps"] for s in expected["samples"]["mellama_tiny_mc"]]
    assert [len(r) for r in responses] == [len(r) for r in reference_responses] == [3, 2, 4, 2, 4, 4, 3, 4]
    for got, want in zip(sum(responses, []), sum(reference_responses, []), strict=True):
        assert abs(got[0] - want[0]) < LOGPROB_TOL and got[1] == want[1]
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["mellama_tiny_mc"][metric] == expected["results"]["mellama_tiny_mc"][metric]
    assert ours["config"]["model_fingerprint"] == loaded.fingerprint


def run_lm_eval(command: list[str], out: pathlib.Path, home: pathlib.Path) -> dict:
    """Runs an lm-eval command line offline from the task folder; returns results and per-request responses."""
    env = {**os.environ, **OFFLINE, "HF_HOME": str(home), "HF_DATASETS_CACHE": str(home / "datasets")}
    common = ["--tasks", "mellama_tiny_mc", "--include_path", ".", "--log_samples", "--output_path", str(out)]
    done = subprocess.run(command + common, cwd=DATA, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (results,) = out.rglob("results_*.json")
    (samples,) = out.rglob("samples_mellama_tiny_mc_*.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    responses = {(r["doc_id"], i): resp for r in rows for i, resp in enumerate(r["filtered_resps"])}
    return {"metrics": json.loads(results.read_text())["results"]["mellama_tiny_mc"], "responses": responses}


@pytest.mark.slow
def test_lm_eval_command_line_runs_a_local_multiple_choice_task_offline(checkpoint, tmp_path):
    ours_dir, hf_dir = checkpoint
    ours = run_lm_eval(
        [sys.executable, "-m", "mellama_jax.cli", "lm-eval", "--model", "mellama", "--model_args",
         f"ckpt={ours_dir}", "--batch_size", "4"], tmp_path / "ours", tmp_path / "home",
    )  # fmt: skip
    expected = run_lm_eval(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={hf_dir},dtype=float32",
         "--device", "cpu", "--batch_size", "4"], tmp_path / "hf", tmp_path / "home",
    )  # fmt: skip

    assert ours["responses"].keys() == expected["responses"].keys() and len(ours["responses"]) == 26
    for key, (logprob, greedy) in expected["responses"].items():
        assert abs(float(ours["responses"][key][0]) - float(logprob)) < LOGPROB_TOL, key
        assert ours["responses"][key][1] == greedy, key
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["metrics"][metric] == expected["metrics"][metric], metric
