"""`mellama generate`: prompts completed by a checkpoint or a training run."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from mellama_jax.errors import UserError


def _utf8(text: str, where: str) -> str:
    """`text` as given, if it came from UTF-8 bytes (Python smuggles other bytes in as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{where}: not UTF-8 text") from None
    return text


def _prompts(args: argparse.Namespace) -> list[str]:
    from mellama_jax.inference.generate import read_prompts

    if args.prompt is not None:
        return [_utf8(args.prompt, "--prompt")]
    if args.prompts is not None:
        return read_prompts(args.prompts)
    if sys.stdin.isatty():
        raise UserError("give a prompt: --prompt TEXT, --prompts FILE, or text on stdin")
    try:
        text = _utf8(sys.stdin.read().removesuffix("\n"), "stdin")
    except UnicodeDecodeError:  # a UTF-8 locale decodes strictly; others escape the bytes (caught by _utf8)
        raise UserError("stdin: not UTF-8 text") from None
    if not text.strip():
        raise UserError("stdin: no prompt")
    return [text]


def _generate(args: argparse.Namespace) -> None:
    from mellama_jax.inference.generate import Sampling, apply_template, generate, load

    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    texts = _prompts(args)
    model = load(args.ckpt_dir, args.dtype, quantize=args.quantize)
    ids = [model.tokenizer.encode(apply_template(text, args.chat_template)) for text in texts]
    outputs = [model.tokenizer.decode(new) for new in generate(model, ids, sampling, args.batch_size)]
    if args.prompts is None:  # one prompt: its text; a file of them: JSON lines, even for one
        print(outputs[0])
        return
    for i, output in enumerate(outputs):
        print(json.dumps({"prompt_index": i, "output": output}, ensure_ascii=False))


def add_commands(commands) -> None:
    gen = commands.add_parser("generate", help="complete prompts with a checkpoint (greedy unless told to sample)")
    gen.add_argument("ckpt_dir", type=pathlib.Path, metavar="CKPT_DIR", help="converted checkpoint or training run")
    source = gen.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="one prompt (default: the whole of stdin is one prompt)")
    source.add_argument("--prompts", type=pathlib.Path, metavar="FILE",
                        help=".txt: one prompt per line; .jsonl: a \"prompt\" field per line (blank lines skipped);"
                             " prints one JSON line per prompt, {prompt_index, output}, in input order")  # fmt: skip
    gen.add_argument("--max-new-tokens", type=int, default=256, help="per prompt (default 256)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default 0: off)")
    gen.add_argument("--top-p", type=float, default=1.0, help="sample within this probability mass (default 1: off)")
    gen.add_argument("--seed", type=int, default=0, help="same seed, same samples (default 0)")
    gen.add_argument("--chat-template", default="raw", choices=("raw", "me-llama", "llama2-chat"),
                     help="wrap each prompt as SFT data is wrapped (default raw: as given)")  # fmt: skip
    gen.add_argument("--batch-size", type=int, default=16, help="prompts generated together (default 16)")
    gen.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default float32)")
    gen.add_argument("--quantize", choices=("int8", "int4"), help="weight-only, as mellama serve's (default: off)")
    gen.set_defaults(run=_generate)

    serve = commands.add_parser("serve", help="an OpenAI-compatible server (continuous batching, LoRA, int8/int4)")
    serve.add_argument(
        "ckpt_dir", type=pathlib.Path, metavar="CKPT_OR_RUN", help="converted checkpoint or training run"
    )
    serve.add_argument(
        "--adapter",
        action="append",
        type=_adapter,
        metavar="NAME=RUN",
        help="a LoRA run on this base, served as model NAME (repeatable; unmerged, batched together)",
    )
    serve.add_argument("--name", help="the base's model name in the API (default: the folder's name)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    serve.add_argument("--port", type=int, default=8000, help="default 8000")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (or set MELLAMA_API_KEY)")
    serve.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    serve.add_argument(
        "--quantize",
        choices=("int8", "int4"),
        help="weight-only: int8 per output channel, int4 in groups of 128 (cost measured at load)",
    )
    serve.add_argument(
        "--quant-check-text",
        type=pathlib.Path,
        metavar="FILE",
        help="held-out text to measure --quantize's cost on (default: a built-in clinical passage)",
    )
    serve.add_argument("--max-slots", type=int, default=16, help="requests decoded together (default 16)")
    serve.add_argument("--max-len", type=int, help="tokens per slot, prompt + output (default: the model's window)")
    serve.add_argument(
        "--max-queue", type=int, default=256, help="requests waiting for a slot before 429 (default 256)"
    )
    serve.add_argument(
        "--chat-template",
        default="auto",
        choices=("auto", "own", "raw", "me-llama", "llama2-chat"),
        help="auto (default): the checkpoint's own if it has one, else me-llama",
    )
    serve.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default float32)")
    serve.add_argument(
        "--drain-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="on SIGTERM, wait at most this long for requests in flight (default: until they finish)",
    )
    serve.set_defaults(run=_serve)


def _adapter(value: str) -> tuple[str, pathlib.Path]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=RUN, got {value!r}")
    return name, pathlib.Path(path)


def _serve(args: argparse.Namespace) -> None:
    try:
        import fastapi  # noqa: F401
        import jinja2  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UserError(f"mellama serve needs the serve extra: pip install 'mellama-jax[serve]' ({e})") from None
    from mellama_jax.inference import serve

    serve.run(args)
