"""`mellama convert`: Hugging Face folders to our checkpoints and back."""

from __future__ import annotations

import argparse
import pathlib
import re

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _size(text: str) -> int:
    """'5GB' (10^9, as transformers counts), '500MiB', or plain bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match and match.group(2).upper()
    if not match or unit not in _SIZE_UNITS or float(match.group(1)) * _SIZE_UNITS[unit] < 1:
        raise argparse.ArgumentTypeError(f"expected a size like 5GB, 500MB or 2GiB, got {text!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def _hf_to_jax(args: argparse.Namespace) -> None:
    from mellama_jax.hf.convert import convert_hf_to_jax

    cfg = convert_hf_to_jax(args.hf_dir, args.out_dir, args.dtype, args.overwrite)
    print(f"converted {args.hf_dir} ({cfg.n_layers} layers, d_model {cfg.d_model}) to {args.out_dir}")


def _jax_to_hf(args: argparse.Namespace) -> None:
    from mellama_jax.hf.convert import convert_jax_to_hf

    convert_jax_to_hf(
        args.ckpt_dir, args.out_hf_dir, args.dtype, args.max_shard_size, args.overwrite, args.adapter_only,
        args.base_model,
    )  # fmt: skip
    print(f"exported {args.ckpt_dir} to {args.out_hf_dir}")


def add_commands(commands) -> None:
    convert = commands.add_parser("convert", help="Hugging Face <-> our checkpoints, streamed tensor by tensor")
    directions = convert.add_subparsers(dest="direction", required=True)
    to_jax = directions.add_parser("hf-to-jax", help="HF LlamaForCausalLM folder -> orbax checkpoint")
    to_jax.add_argument("hf_dir", type=pathlib.Path, metavar="HF_DIR")
    to_jax.add_argument("out_dir", type=pathlib.Path, metavar="OUT_DIR")
    to_jax.add_argument("--dtype", choices=("bfloat16", "float32"), help="cast the weights (default: keep)")
    to_jax.set_defaults(run=_hf_to_jax)
    to_hf = directions.add_parser("jax-to-hf", help="converted checkpoint or training run -> HF folder")
    to_hf.add_argument("ckpt_dir", type=pathlib.Path, metavar="CKPT_DIR")
    to_hf.add_argument("out_hf_dir", type=pathlib.Path, metavar="OUT_HF_DIR")
    to_hf.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help="cast the weights (default: keep)")
    to_hf.add_argument("--max-shard-size", type=_size, default=5 * 10**9, help="per safetensors file (default 5GB)")
    to_hf.add_argument("--adapter-only", action="store_true", help="LoRA run: a PEFT adapter folder, not merged")
    to_hf.add_argument("--base-model", help="--adapter-only: its base_model_name_or_path (an HF name or folder)")
    to_hf.set_defaults(run=_jax_to_hf)
    for direction in (to_jax, to_hf):
        direction.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
