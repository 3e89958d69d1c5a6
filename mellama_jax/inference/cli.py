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
    model = load(args.ckpt_dir, args.dtype)
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
    gen.set_defaults(run=_generate)
