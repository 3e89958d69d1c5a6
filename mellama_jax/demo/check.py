"""The demo's last check: its Hugging Face exports, reloaded in `transformers` (and `peft`), decode as we do.

Every held-out prompt of the after-SFT eval is decoded greedily by transformers from `hf/sft` (adapters merged)
and, when peft is installed, by `PeftModel` from `hf/cpt` + `hf/sft-adapter`; each output's token ids are compared
with the ids our `mellama eval` recorded (`predictions/*.jsonl`, `output_ids`, EOS not included); each task's prompts
go in one left-padded batch.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import warnings
from collections.abc import Sequence

from mellama_jax.config_file import read_json_object


def _rows(out: pathlib.Path, task: str) -> list[dict]:
    path = out / "eval" / "sft" / "predictions" / f"{task}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _matches(model, tokenizer, rows: list[dict], max_new_tokens: int) -> int:
    """How many rows transformers' greedy `generate` reproduces token for token (one left-padded batch)."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    tokenizer.padding_side, tokenizer.pad_token_id = "left", min(eos)
    batch = tokenizer([row["prompt"] for row in rows], return_tensors="pt", padding=True)
    new = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=min(eos))  # no_grad
    same = 0
    for row, ids in zip(rows, new[:, batch.input_ids.shape[1] :].tolist(), strict=True):
        cut = next((i for i, t in enumerate(ids) if t in eos), len(ids))
        same += ids[:cut] == row["output_ids"]
    return same


def compare_with_transformers(out: pathlib.Path, tasks: Sequence[str]) -> str:
    """A one-line verdict for the summary; 'skipped: ...' when transformers is not installed."""
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None:
        return "skipped: transformers is not installed (pip install -e '.[hf]' adds it)"
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    results = read_json_object(out / "eval" / "sft" / "results.json")
    max_new = results["settings"]["sampling"]["max_new_tokens"]
    rows, hf = [_rows(out, task) for task in tasks], out / "hf"
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf / "sft")
    merged = transformers.AutoModelForCausalLM.from_pretrained(hf / "sft", dtype="float32")
    total = sum(len(r) for r in rows)
    same = sum(_matches(merged, tokenizer, r, max_new) for r in rows)
    verdict = f"transformers reproduced {same}/{total} greedy outputs of ours (hf/sft)"
    if importlib.util.find_spec("peft") is None:
        return verdict + "; peft is not installed, so hf/sft-adapter was not loaded"
    import peft

    base = transformers.AutoModelForCausalLM.from_pretrained(hf / "cpt", dtype="float32")
    adapted = peft.PeftModel.from_pretrained(base, hf / "sft-adapter")
    same = sum(_matches(adapted, tokenizer, r, max_new) for r in rows)
    return verdict + f"; peft (hf/cpt + hf/sft-adapter) {same}/{total}"
