"""`mellama serve` as a user runs it: a separate process on this machine's CPU, spoken to with the official
`openai` client (and raw HTTP for what a client would never send). Every answer is checked against
`generate` on the same checkpoint: greedy tokens must be identical, whatever else shares the batch."""

import concurrent.futures
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import jax
import numpy as np
import pytest
from test_generate import checkpoint
from test_quiet_host import FAKE_DEVICES

from mellama_jax.cli import main
from mellama_jax.data.sft import TEMPLATES
from mellama_jax.inference import generate as gen
from mellama_jax.model.llama import with_params

openai = pytest.importorskip("openai", reason="the openai client is in the test extra")
pytest.importorskip("fastapi", reason="mellama serve needs the serve extra: pip install 'mellama-jax[serve]'")

MAX_LEN = 64
SLOTS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(FAKE_DEVICES, "").strip()
    return env


@contextlib.contextmanager
def server(ckpt, *args, env_extra=None):
    """`mellama serve CKPT ARGS` on a free port, yielded once /health is 200: (base URL, process)."""
    port = free_port()
    argv = [sys.executable, "-m", "mellama_jax.cli", "serve", str(ckpt), "--port", str(port), *map(str, args)]
    process = subprocess.Popen(argv, env=serve_env() | (env_extra or {}), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, "the server did not turn healthy"
            time.sleep(0.25)
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()


def post(url: str, body, headers=None) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of a raw POST; `body` bytes are sent as they are."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read()), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), {k.lower(): v for k, v in e.headers.items()}


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics") as r:
        lines = r.read().decode().splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith(name + " ") or line.startswith(name + "{"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return checkpoint("gqa", tmp_path_factory.mktemp("serve"))[0]


@pytest.fixture(scope="module")
def loaded(ckpt):
    return gen.load(ckpt)


def adapter_run(ckpt, folder, rank: int, targets: str, seed: int):
    notes = [f"w{5 + seed} w{9 + seed} w17 w4{seed} w23 w8 w19", "w30 w31 w32 w33 w34 w35"]
    (folder / "notes.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in notes * 20))
    (folder / "run.yaml").write_text(
        f"init_from: {ckpt}\nrun_dir: {folder / 'run'}\nseq_len: 16\nglobal_batch: 8\nmicro_batches: 1\nsteps: 3\n"
        f"seed: {seed}\noptim: {{lr: 0.05, warmup_ratio: 0.0}}\n"
        f"lora: {{rank: {rank}, alpha: 16.0, targets: {targets}}}\n"
        f"data: {{kind: cpt, sources: [{{name: notes, paths: [{folder / 'notes.jsonl'}]}}]}}\n"
    )
    assert main(["train", "--config", str(folder / "run.yaml")]) == 0
    return folder / "run"


@pytest.fixture(scope="module")
def adapters(ckpt, tmp_path_factory):
    return {"a": adapter_run(ckpt, tmp_path_factory.mktemp("a"), 4, "[q, v]", 1),
            "b": adapter_run(ckpt, tmp_path_factory.mktemp("b"), 2, "[q, k, v, o, gate, up, down]", 2)}  # fmt: skip


@pytest.fixture(scope="module")
def live(ckpt, adapters):
    args = ["--max-len", MAX_LEN, "--max-slots", SLOTS, "--name", "base"]
    args += [f"--adapter={name}={run}" for name, run in adapters.items()]
    with server(ckpt, *args) as (url, process):
        yield url, openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def words(rng, n: int) -> str:
    return " ".join(f"w{i}" for i in rng.integers(3, 128, n))


def offline(loaded, texts: list[str], new: int, template: str = "raw") -> list[str]:
    ids = [loaded.tokenizer.encode(TEMPLATES[template][0].format(prompt=t)) for t in texts]
    return [loaded.tokenizer.decode(out) for out in gen.generate(loaded, ids, gen.Sampling(max_new_tokens=new))]


def test_completions_and_chat_streamed_or_not_equal_generate(live, loaded):
    _, client = live
    rng = np.random.default_rng(0)
    text = words(rng, 9)
    (want,) = offline(loaded, [text], 20)
    got = client.completions.create(model="base", prompt=text, max_tokens=20, temperature=0)
    assert got.choices[0].text == want and got.object == "text_completion"
    assert got.usage.prompt_tokens == 10 and got.usage.completion_tokens == len(want.split())
    streamed = client.completions.create(model="base", prompt=text, max_tokens=20, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want
    forced = client.completions.create(model="base", prompt=text, max_tokens=40, temperature=0,
                                       extra_body={"ignore_eos": True})  # fmt: skip
    assert forced.usage.completion_tokens == 40 and forced.choices[0].finish_reason == "length"

    (want_chat,) = offline(loaded, [text], 20, template="me-llama")  # the default template without one of its own
    messages = [{"role": "user", "content": text}]
    got = client.chat.completions.create(model="base", messages=messages, max_tokens=20, temperature=0)
    assert got.choices[0].message.content == want_chat and got.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(model="base", messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want_chat
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == got.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_sixteen_concurrent_mixed_requests_each_get_generates_answer(live, loaded):
    _, client = live
    rng = np.random.default_rng(1)
    texts = [words(rng, int(n)) for n in rng.integers(1, 40, 16)]
    lengths = [int(n) for n in rng.integers(1, 20, 16)]
    want = [offline(loaded, [t], n)[0] for t, n in zip(texts, lengths, strict=True)]

    def ask(i):
        stream = i % 2 == 0
        out = client.completions.create(model="base", prompt=texts[i], max_tokens=lengths[i], temperature=0,
                                        stream=stream)  # fmt: skip
        return "".join(c.choices[0].text for c in out) if stream else out.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, range(16)))
    assert got == want


def test_sampling_is_generates_for_the_same_seed(live, loaded):
    _, client = live
    text = "w5 w6 w7 w8"
    sampling = gen.Sampling(max_new_tokens=12, temperature=0.9, top_k=20, top_p=0.9, seed=7)
    want = loaded.tokenizer.decode(gen.generate(loaded, [loaded.tokenizer.encode(text)], sampling)[0])
    got = client.completions.create(model="base", prompt=text, max_tokens=12, temperature=0.9, top_p=0.9, seed=7,
                                    extra_body={"top_k": 20})  # fmt: skip
    assert got.choices[0].text == want


def test_two_adapters_share_a_batch_and_each_equals_its_merged_run(live, adapters):
    _, client = live
    rng = np.random.default_rng(2)
    texts = [words(rng, int(n)) for n in rng.integers(2, 30, 6)]
    want = {name: offline(gen.load(run), texts, 16) for name, run in adapters.items()}  # load() folds the adapter
    assert want["a"] != want["b"]

    def ask(job):
        name, text = job
        return client.completions.create(model=name, prompt=text, max_tokens=16, temperature=0).choices[0].text

    jobs = [(name, text) for text in texts for name in adapters]  # interleaved: both adapters in flight at once
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, jobs))
    assert got == [want[name][texts.index(text)] for name, text in jobs]
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"base", "a", "b"} and cards["a"].parent == "base"
    assert cards["b"].mellama["lora"]["rank"] == 2 and cards["a"].mellama["step"] == 3
    assert cards["base"].mellama["params_fingerprint"].startswith("sha256:")


def test_echo_logprobs_are_the_models_and_stop_strings_cut(live, loaded):
    _, client = live
    prompt = [1, 5, 9, 14, 22, 31]
    got = client.completions.create(model="base", prompt=prompt, max_tokens=3, temperature=0, logprobs=2, echo=True)
    lp = got.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(prompt) + got.usage.completion_tokens
    model = with_params(loaded.cfg, loaded.params)
    logits = np.asarray(jax.nn.log_softmax(model(np.asarray([prompt]), np.arange(len(prompt))[None])[0][0], -1))
    want = [float(logits[i, t]) for i, t in enumerate(prompt[1:])]
    np.testing.assert_allclose(lp.token_logprobs[1 : len(prompt)], want, atol=1e-4)
    assert all(len(top) == 2 for top in lp.top_logprobs[1:])

    text = "w5 w6 w7 w8"
    (full,) = offline(loaded, [text], 12)
    assert len(full.split()) > 3, "the reference stopped early: choose another prompt"
    stop = full.split()[3]
    cut = client.completions.create(model="base", prompt=text, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_bad_requests_get_their_4xx_never_a_500(live):
    url, client = live
    ok = {"model": "base", "prompt": "w5 w6", "max_tokens": 4}
    cases = [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        ({**ok, "temperature": "hot"}, 400, "temperature"),
        ({**ok, "max_tokens": 1.5}, 400, "max_tokens"),
        ({**ok, "max_tokens": MAX_LEN}, 400, "max_tokens"),
        ({**ok, "prompt": "w5 " * (MAX_LEN + 5)}, 400, "prompt"),
        ({**ok, "prompt": [1, 500]}, 400, "prompt"),
        ({**ok, "n": 2}, 400, "n"),
        ({**ok, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({**ok, "model": "nope"}, 404, "model"),
        ({**ok, "logprobs": 9}, 400, "logprobs"),
    ]
    for body, status, param in cases:
        code, answer, _ = post(f"{url}/v1/completions", body)
        assert code == status, (body if isinstance(body, bytes) else {k: str(v)[:40] for k, v in body.items()}, answer)
        assert answer["error"]["message"] and answer["error"]["param"] == param
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
    connection.putrequest("POST", "/v1/completions")
    connection.putheader("Content-Length", str(10**9))  # refused on the header, before a byte is read
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and "larger than" in json.loads(response.read())["error"]["message"]
    connection.close()
    code, answer, _ = post(f"{url}/v1/chat/completions", {"model": "base", "messages": [{"role": "robot"}]})
    assert code == 400 and answer["error"]["param"] == "messages[0].role"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "w5"}])
    with urllib.request.urlopen(f"{url}/health") as r:
        assert json.loads(r.read()) == {"status": "ok"}


def test_a_dropped_stream_frees_its_slot(live):
    url, client = live
    before = metric(url, "mellama_requests_total")
    stream = client.completions.create(model="base", prompt="w5 w6", max_tokens=60, temperature=0, stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 30
    while metric(url, "mellama_slots_in_use") or metric(url, "mellama_requests_total") == before:
        assert time.monotonic() < deadline, "the slot stayed busy after the client left"
        time.sleep(0.1)
    with urllib.request.urlopen(f"{url}/metrics") as r:
        assert 'mellama_requests_total{finish_reason="cancelled"}' in r.read().decode()


def test_keys_queue_limits_and_sigterm_drain(ckpt):
    args = ["--max-len", MAX_LEN, "--max-slots", 1, "--max-queue", 1, "--api-key", "s3cret"]
    with server(ckpt, *args) as (url, process):
        code, answer, _ = post(f"{url}/v1/completions", {"model": "ckpt", "prompt": "w5"})
        assert code == 401 and "API key" in answer["error"]["message"]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        long = {"model": "ckpt", "prompt": "w5 w6", "max_tokens": 60, "temperature": 0}
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(post, f"{url}/v1/completions", long, {"Authorization": "Bearer s3cret"})
                       for _ in range(4)]  # fmt: skip
            results = [f.result() for f in futures]
        refused = [r for r in results if r[0] == 429]
        assert refused and all(r[2].get("retry-after") == "1" for r in refused)
        assert [r[0] for r in results if r[0] != 429] == [200] * (4 - len(refused))

        stream = client.completions.create(**long, stream=True)
        chunks = [next(iter(stream))]
        process.send_signal(signal.SIGTERM)
        chunks += list(stream)
        assert chunks[-1].choices[0].finish_reason == "length"
        assert process.wait(60) == 0
        with pytest.raises(OSError):
            urllib.request.urlopen(f"{url}/health", timeout=5)


def test_a_reachable_host_without_a_key_is_refused_before_loading(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mellama_jax.cli", "serve", str(tmp_path), "--host", "0.0.0.0"],
                          capture_output=True, text=True, env=serve_env(), timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (
        "mellama serve: error: --host 0.0.0.0 is reachable from other machines: give --api-key (or MELLAMA_API_KEY),"
        " or --insecure to serve without one"
    )


def test_lm_eval_local_completions_scores_what_mellama_lm_eval_scores(live, ckpt, monkeypatch):
    """lm-eval's own OpenAI-API model against the server, and our lm-eval model in-process, on a local task."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    from test_lm_eval import DATA, LOGPROB_TOL, OFFLINE

    import mellama_jax.evaluation.lm_eval  # noqa: F401  registers the "mellama" model

    url, _ = live
    monkeypatch.chdir(DATA)
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    tasks = TaskManager(include_path=str(DATA))
    run = lambda model, args: lm_eval.simple_evaluate(  # noqa: E731
        model=model, model_args=args, tasks=["mellama_tiny_mc"], task_manager=tasks, log_samples=True
    )
    direct = run("mellama", {"ckpt": str(ckpt), "max_length": MAX_LEN})
    served = run("local-completions", {"base_url": f"{url}/v1/completions", "model": "base", "max_length": MAX_LEN,
                                       "tokenizer_backend": "huggingface", "tokenizer": str(ckpt.parent / "hf"),
                                       "add_bos_token": True})  # as HF models (and ours) encode  # fmt: skip
    responses = lambda out: sum((s["filtered_resps"] for s in out["samples"]["mellama_tiny_mc"]), [])  # noqa: E731
    ours, theirs = responses(direct), responses(served)
    assert len(ours) == len(theirs) == 26
    np.testing.assert_allclose([float(r[0]) for r in theirs], [float(r[0]) for r in ours], atol=LOGPROB_TOL, rtol=0)
    assert [r[1] for r in theirs] == [r[1] for r in ours]
