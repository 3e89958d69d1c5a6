"""lm-eval through its Python API: `--model mellama` against its own `hf` backend on the same weights and tasks.

Weights: the real SmolLM2-135M-Instruct (fp32), converted once by serve_bench.prepare. Tasks: local YAMLs over
`../shared/data/medical/medqa_usmle_4opt.sample40.jsonl` (40 questions), one per request kind:
  medqa_choice   multiple choice over the four answers' texts (acc, acc_norm): 160 log-likelihood requests
  medqa_rolling  the questions' log-likelihood, rolling windows (word perplexity): 40 requests
  medqa_answer   generate_until "\\n", at most 24 tokens, greedy: 40 requests
Each side runs in its own process, batch size 8, both cores; the order alternates: mellama with an empty
compilation cache (cold), hf, mellama again on the cache the first filled (warm), hf again. Each task's wall
time is measured around `simple_evaluate` in the child (the model loaded once, before); the metrics of both
sides are printed beside the times, so an unequal answer shows.

Then `mellama eval` on the shared MedQA and PubMedQA samples (48 new tokens, batch 16; the whole command, cold
and warm) against a plain transformers loop over the same prompts (left-padded batches of 16, greedy
`generate`, the whole process), with how many answers are the same tokens.

    python benchmarks/eval_speed.py [--work /tmp/serve_bench] [--limit 40] [--skip-lm-eval]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
MEDQA = HERE.parent.parent / "shared" / "data" / "medical" / "medqa_usmle_4opt.sample40.jsonl"
TASKS = ("medqa_choice", "medqa_rolling", "medqa_answer")
COMMON = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
metadata:
  version: 1.0
"""
YAMLS = {
    "medqa_choice": """output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{[options.A, options.B, options.C, options.D]}}"
doc_to_target: "{{['A', 'B', 'C', 'D'].index(answer_idx)}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "medqa_rolling": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{question}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""",
    "medqa_answer": """output_type: generate_until
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 24
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


def write_tasks(folder: pathlib.Path) -> None:
    for name, body in YAMLS.items():
        (folder / f"{name}.yaml").write_text(f"task: {name}\n" + COMMON.format(data=MEDQA) + body)


def child(side: str, weights: str, tasks: str, limit: int) -> dict:
    """Loads the model once, then times each task's `simple_evaluate`."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    if side == "mellama":
        from mellama_jax import compile_cache
        from mellama_jax.evaluation.lm_eval import MellamaLM

        compile_cache.enable(logging.getLogger("eval_speed"))
        began = time.perf_counter()
        model = MellamaLM(ckpt=weights, batch_size=8)
    else:
        from lm_eval.models.huggingface import HFLM

        began = time.perf_counter()
        model = HFLM(pretrained=weights, batch_size=8, device="cpu", dtype="float32")
    out = {"load_s": time.perf_counter() - began}
    manager = TaskManager(include_path=tasks)
    for task in TASKS:
        began = time.perf_counter()
        result = lm_eval.simple_evaluate(model=model, tasks=[task], task_manager=manager, limit=limit,
                                         log_samples=False, verbosity="WARNING")  # fmt: skip
        metrics = {k: v for k, v in result["results"][task].items() if isinstance(v, float) and "stderr" not in k}
        out[task] = {"seconds": time.perf_counter() - began, "metrics": metrics}
    if side == "mellama":
        out["compiled"] = {"programs": compile_cache.TALLY.programs, "seconds": compile_cache.TALLY.seconds,
                           "loaded": compile_cache.TALLY.loaded}  # fmt: skip
    return out


def transformers_loop(hf: str, predictions: str, new_tokens: int) -> dict:
    """Greedy answers to the prompts `mellama eval` wrote, 16 at a time; how many equal its tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    began = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(hf, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    rows = [json.loads(line) for path in predictions.split(",") for line in pathlib.Path(path).read_text().splitlines()]
    same = 0
    for start in range(0, len(rows), 16):
        batch = rows[start : start + 16]
        inputs = tok([r["prompt"] for r in batch], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
                                 or tok.eos_token_id)  # fmt: skip
        for r, ids in zip(batch, out[:, inputs["input_ids"].shape[1] :].tolist(), strict=True):
            ids = ids[: ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids
            same += ids == r["output_ids"]
    return {"seconds": time.perf_counter() - began, "same": same, "answers": len(rows)}


def eval_command(ckpt: pathlib.Path, out: pathlib.Path, cache: pathlib.Path, new_tokens: int) -> float:
    argv = [sys.executable, "-m", "mellama_jax.cli", "eval", str(ckpt), "--tasks", "medqa,pubmedqa", "--data-dir",
            str(MEDQA.parent), "--max-new-tokens", str(new_tokens), "--out", str(out)]  # fmt: skip
    began = time.perf_counter()
    done = subprocess.run(argv, env={**os.environ, "MELLAMA_COMPILE_CACHE": str(cache)}, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"mellama eval failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - began


def run(side: str, weights: pathlib.Path, tasks: pathlib.Path, limit: int, cache: pathlib.Path) -> dict:
    env = {**os.environ, "MELLAMA_COMPILE_CACHE": str(cache), "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "0"}
    argv = [sys.executable, __file__, "--side", side, "--weights", str(weights), "--tasks", str(tasks),
            "--limit", str(limit)]  # fmt: skip
    done = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=tasks)
    if done.returncode:
        sys.exit(f"{side} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/serve_bench"))
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--new-tokens", type=int, default=48, help="per answer in the mellama eval part")
    parser.add_argument("--skip-lm-eval", action="store_true", help="only the mellama eval part")
    parser.add_argument("--side", choices=("mellama", "hf", "transformers"), help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--tasks", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "transformers":
        print(json.dumps(transformers_loop(args.weights, args.tasks, args.new_tokens)))
        return
    if args.side:
        print(json.dumps(child(args.side, args.weights, args.tasks, args.limit)))
        return
    sys.path.insert(0, str(HERE))
    from serve_bench import prepare

    files = prepare(args.work, None)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as scratch:
        tasks, cache = pathlib.Path(scratch) / "tasks", pathlib.Path(scratch) / "cache"
        tasks.mkdir()
        write_tasks(tasks)
        if not args.skip_lm_eval:
            lm_eval_part(files, tasks, args.limit, cache, args.work)
        eval_part(files, pathlib.Path(scratch), args.new_tokens)


def lm_eval_part(files: dict, tasks: pathlib.Path, limit: int, cache: pathlib.Path, work: pathlib.Path) -> None:
    runs = [("mellama cold", run("mellama", files["ours"], tasks, limit, cache)),
            ("hf", run("hf", files["hf"], tasks, limit, cache)),
            ("mellama warm", run("mellama", files["ours"], tasks, limit, cache)),
            ("hf again", run("hf", files["hf"], tasks, limit, cache))]  # fmt: skip
    (work / "eval_speed.json").write_text(json.dumps(dict(runs), indent=1))
    print(f"\nlm-eval, batch 8, {limit} MedQA questions\n")
    print("| run | load s | " + " | ".join(f"{t} s" for t in TASKS) + " | compiled (from cache) |")
    print("|---|---|" + "---|" * len(TASKS) + "---|")
    for name, r in runs:
        c = r.get("compiled")
        compiled = f"{c['programs']} in {c['seconds']:.1f} s ({c['loaded']})" if c else ""
        print(f"| {name} | {r['load_s']:.1f} | " + " | ".join(f"{r[t]['seconds']:.1f}" for t in TASKS)
              + f" | {compiled} |")  # fmt: skip
    print("\nmetrics:")
    for name, r in runs:
        print(f"  {name}: " + "; ".join(f"{t} {r[t]['metrics']}" for t in TASKS))


def eval_part(files: dict, scratch: pathlib.Path, new_tokens: int) -> None:
    cache = scratch / "eval-cache"
    cold = eval_command(files["ours"], scratch / "eval-cold", cache, new_tokens)
    predictions = ",".join(str(scratch / "eval-cold" / "predictions" / f"{t}.jsonl") for t in ("medqa", "pubmedqa"))
    argv = [sys.executable, __file__, "--side", "transformers", "--weights", str(files["hf"]), "--tasks", predictions,
            "--new-tokens", str(new_tokens)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "0"})
    if done.returncode:
        sys.exit(f"transformers loop failed:\n{done.stderr[-3000:]}")
    hf = json.loads(done.stdout.strip().splitlines()[-1])
    warm = eval_command(files["ours"], scratch / "eval-warm", cache, new_tokens)
    print(f"\nmellama eval --tasks medqa,pubmedqa (40 + 40), {new_tokens} new tokens, batch 16, whole commands\n")
    print("| run | seconds | same tokens as mellama eval |\n|---|---|---|")
    print(f"| mellama eval, cold cache | {cold:.1f} | |\n| mellama eval, warm cache | {warm:.1f} | |")
    print(f"| transformers loop | {hf['seconds']:.1f} | {hf['same']} of {hf['answers']} |")


if __name__ == "__main__":
    main()
