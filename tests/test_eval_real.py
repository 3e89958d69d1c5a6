"""`mellama eval` on a real pretrained checkpoint (SmolLM2-135M-Instruct, converted with our tools) over the public
benchmark rows: its outputs are transformers' greedy generations for the same prompts."""

import json

import pytest
from test_quiet_host import mellama
from test_real_checkpoint import converted, source  # noqa: F401  (fixtures: the HF folder and our conversion)

from mellama_jax.data.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TASKS = ("pubmedqa", "medqa", "medmcqa", "hoc", "ddi")
NEW_TOKENS = 48


def test_eval_outputs_are_transformers_greedy_generations(source, converted, shared_data, tmp_path):  # noqa: F811
    ours, out = converted[0], tmp_path / "eval"
    argv = ["eval", str(ours), "--tasks", ",".join(TASKS), "--data-dir", str(shared_data / "medical"),
            "--limit", "2", "--max-new-tokens", str(NEW_TOKENS), "--batch-size", "4", "--out", str(out)]  # fmt: skip
    done = mellama(*argv)  # one CPU device, as a user runs it (on the tests' 8 fake devices: 4x the time)
    assert done.returncode == 0, done.stderr[-2000:]
    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = load_tokenizer(ours)
    reference_tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)
    compared = 0
    for task in TASKS:
        for row in map(json.loads, (out / "predictions" / f"{task}.jsonl").read_text().splitlines()):
            ids = reference_tokenizer(row["prompt"])["input_ids"]  # transformers' own tokenization of the prompt
            assert tokenizer.encode(row["prompt"]) == ids
            with torch.no_grad():
                generated = model.generate(
                    torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                    do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=next(iter(eos)),
                )[0, len(ids) :].tolist()  # fmt: skip
            if generated and generated[-1] in eos:
                generated = generated[:-1]
            assert row["output_ids"] == generated, (task, row["id"])
            assert row["output"] == tokenizer.decode(generated)
            compared += 1
    assert compared == 2 * len(TASKS)
