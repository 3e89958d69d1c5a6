"""The `mellama` command (DESIGN §4). User mistakes print one line and exit 2; no raw tracebacks.

What the machine refuses (a full disk, a read-only or missing folder) is a one-line error too, naming the
file. `MELLAMA_DEBUG=1` shows the traceback of any error.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import pathlib
import re
import sys

from mellama_jax.errors import UserError

# OS errors that are about the user's machine or paths, not bugs of ours: reported in one line.
_USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
                   errno.ENOENT, errno.EEXIST}  # fmt: skip


def _plan(args: argparse.Namespace) -> None:
    # Planning never runs on a device: jax stays on the CPU even where GPUs or TPUs are (or their plugins are).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # XLA's own warnings while compiling for a target (e.g. that rematerialisation cannot reach its memory goal)
    # repeat what the report says, in its terms.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from mellama_jax.config_file import load_config
    from mellama_jax.plan_report import report

    cfg = load_config(args.config, args.overrides)
    lines = report(cfg, args.devices, args.device_kind, args.search, args.mfu)
    kind = f" x {args.device_kind}" if args.device_kind else " device(s)"
    print(f"plan for {args.config or 'the defaults (Me-LLaMA 13B CPT)'} on {args.devices}{kind}:")
    print("\n".join(lines))


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _size(text: str) -> int:
    """'5GB' (10^9, as transformers counts), '500MiB', or plain bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match and match.group(2).upper()
    if not match or unit not in _SIZE_UNITS or float(match.group(1)) * _SIZE_UNITS[unit] < 1:
        raise argparse.ArgumentTypeError(f"expected a size like 5GB, 500MB or 2GiB, got {text!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def _hf_to_jax(args: argparse.Namespace) -> None:
    from mellama_jax.hf import convert_hf_to_jax

    cfg = convert_hf_to_jax(args.hf_dir, args.out_dir, args.dtype, args.overwrite)
    print(f"converted {args.hf_dir} ({cfg.n_layers} layers, d_model {cfg.d_model}) to {args.out_dir}")


def _jax_to_hf(args: argparse.Namespace) -> None:
    from mellama_jax.hf import convert_jax_to_hf

    convert_jax_to_hf(
        args.ckpt_dir, args.out_hf_dir, args.dtype, args.max_shard_size, args.overwrite, args.adapter_only,
        args.base_model,
    )  # fmt: skip
    print(f"exported {args.ckpt_dir} to {args.out_hf_dir}")


def _train(args: argparse.Namespace) -> None:
    from mellama_jax.config_file import load_config, to_yaml

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return
    from mellama_jax import gpu_flags

    gpu_note = gpu_flags.apply()  # before jax starts its backend: XLA reads XLA_FLAGS only then
    import jax

    from mellama_jax.distributed import initialize
    from mellama_jax.loop import train

    initialize(cfg.distributed)
    if jax.process_index() != 0:  # process 0 speaks for the run; the others only warn
        logging.getLogger("mellama_jax").setLevel(logging.WARNING)
    if gpu_note:
        logging.getLogger("mellama_jax").info(gpu_note)
    rows = train(cfg)
    if rows and jax.process_index() == 0:
        run = pathlib.Path(cfg.run_dir)
        print(f"{run}: step {rows[-1]['step']}, loss {rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f}")
        print(f"  metrics {run / 'metrics.jsonl'}, plot {run / 'loss.png'}, checkpoints {run / 'checkpoints'}")
        print(f"  tensorboard --logdir {run / 'tensorboard'}")


def _prepare(args: argparse.Namespace) -> None:
    from mellama_jax.data.prepare import prepare

    if args.workers < 0:
        raise UserError(f"--workers must be at least 0, got {args.workers}")
    manifest = prepare(args.sources, args.tokenizer, args.out, args.format, args.text_field, args.on_error,
                       args.workers, args.overwrite)  # fmt: skip
    skipped = f", {manifest['skipped']} malformed skipped" if manifest["skipped"] else ""
    print(f"prepared {manifest['documents']} documents, {manifest['tokens']} tokens{skipped} in {args.out}")


def _add_prepare(commands) -> None:
    from mellama_jax.data.sources import EXTENSIONS

    prepare = commands.add_parser("prepare", help="tokenize corpora into array_record shards + a manifest")
    prepare.add_argument("sources", nargs="+", metavar="SOURCES", help="files, folders or glob patterns")
    prepare.add_argument("--tokenizer", required=True, help="tokenizer.model / tokenizer.json, or a folder with one")
    prepare.add_argument("--out", required=True, type=pathlib.Path, help="the prepared corpus folder")
    prepare.add_argument("--format", default="", choices=("", *EXTENSIONS.values()), help="default: from the extension")
    prepare.add_argument("--text-field", default="text", help="jsonl/parquet/array_record field (default text)")
    prepare.add_argument("--on-error", default="raise", choices=("raise", "skip"), help="malformed records")
    prepare.add_argument("--workers", type=int, default=0, help="tokenizing processes (default: one per core)")
    prepare.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    prepare.set_defaults(run=_prepare)


def _add_convert(commands) -> None:
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


def _eval(args: argparse.Namespace) -> None:
    from mellama_jax.evaluation.harness import RESULTS, TABLE, EvalSettings, evaluate
    from mellama_jax.generate import Sampling

    sampling = Sampling(max_new_tokens=args.max_new_tokens)
    settings = EvalSettings(shots=args.shots, limit=args.limit, template=args.chat_template, sampling=sampling)
    evaluate(args.ckpt_dir, args.tasks, args.data_dir, args.out, settings, args.batch_size,
             args.exclude_contaminated, args.overwrite, args.dtype)  # fmt: skip
    print((args.out / TABLE).read_text(), end="")
    print(f"results in {args.out / RESULTS}, every output in {args.out / 'predictions'}")


def _add_eval(commands) -> None:
    evaluate = commands.add_parser("eval", help="the MIBE medical benchmarks (DESIGN §2) on a checkpoint")
    evaluate.add_argument("ckpt_dir", type=pathlib.Path, metavar="CKPT_DIR", help="converted checkpoint or run")
    evaluate.add_argument("--tasks", required=True, help="comma-separated task names, or all")
    evaluate.add_argument("--data-dir", required=True, type=pathlib.Path, help="folder with the tasks' files")
    evaluate.add_argument("--out", required=True, type=pathlib.Path, help="results folder (resumed if re-run)")
    evaluate.add_argument("--limit", type=int, help="the first N examples of each task")
    evaluate.add_argument("--batch-size", type=int, default=16, help="prompts generated together (default 16)")
    evaluate.add_argument("--shots", type=int, default=0, choices=(0, 1), help="0: the paper's zero-shot (default)")
    evaluate.add_argument("--max-new-tokens", type=int, default=256, help="per answer (default 256, the paper's)")
    evaluate.add_argument("--chat-template", default="raw", choices=("raw", "me-llama", "llama2-chat"),
                          help="wrap each prompt (default raw: as the paper's harness sends it)")  # fmt: skip
    evaluate.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default float32)")
    evaluate.add_argument("--exclude-contaminated", type=pathlib.Path, metavar="REPORT",
                          help="a `mellama decontaminate` report: also score the clean subset")  # fmt: skip
    evaluate.add_argument("--overwrite", action="store_true", help="replace results of other settings in --out")
    evaluate.set_defaults(run=_eval)


def _demo(args: argparse.Namespace) -> None:
    import time

    from mellama_jax.demo import run_demo

    begun = time.monotonic()
    print(run_demo(args.out), end="")
    print(f"demo done in {(time.monotonic() - begun) / 60:.1f} min; this summary is in {args.out / 'summary.md'}")


def _add_demo(commands) -> None:
    demo = commands.add_parser("demo", help="the Me-LLaMA pipeline in miniature: CPT, LoRA SFT, eval, HF export")
    demo.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/demo"),
                      help="folder for everything it writes (default runs/demo; a re-run resumes)")  # fmt: skip
    demo.set_defaults(run=_demo)


def _decontaminate(args: argparse.Namespace) -> None:
    from mellama_jax.decontaminate import decontaminate, summary

    if args.workers < 0:
        raise UserError(f"--workers must be at least 0, got {args.workers}")
    report = decontaminate(args.data, args.tasks, args.data_dir, args.out, args.n, args.limit, args.overwrite,
                           args.tokenizer, args.text_field, args.workers)  # fmt: skip
    print("\n".join(summary(report)))
    print(f"report in {args.out}")


def _add_decontaminate(commands) -> None:
    check = commands.add_parser("decontaminate", help="eval examples sharing 13-grams with the training corpus")
    check.add_argument("--data", required=True, nargs="+", metavar="CONFIG_OR_PREPARED",
                       help="a training YAML (its data.sources), or prepared folders and raw corpus files, "
                            "folders or globs (.jsonl .txt .parquet .array_record), each one source")  # fmt: skip
    check.add_argument("--tasks", required=True, help="comma-separated task names, or all (those in --data-dir)")
    check.add_argument("--data-dir", required=True, type=pathlib.Path, help="folder with the tasks' files")
    check.add_argument("--out", required=True, type=pathlib.Path, help="the report (JSON)")
    check.add_argument("--n", type=int, default=13, help="n-gram length in words (default 13, as GPT-3)")
    check.add_argument("--limit", type=int, help="the first N examples of each task")
    check.add_argument("--tokenizer", default="", help="of prepared data (default: the YAML's tokenizer/init_from)")
    check.add_argument("--text-field", default="text", help="raw jsonl/parquet/array_record field (default text)")
    check.add_argument("--workers", type=int, default=0, help="scanning processes (default: one per core)")
    check.add_argument("--overwrite", action="store_true", help="replace an existing report")
    check.set_defaults(run=_decontaminate)


def _lm_eval(args: argparse.Namespace) -> None:
    try:
        from mellama_jax.evaluation.lm_eval import main  # registers `--model mellama`
    except ModuleNotFoundError as e:
        if (e.name or "").partition(".")[0] != "lm_eval":
            raise
        raise UserError("lm-evaluation-harness is not installed: pip install 'mellama-jax[lmeval]'") from None
    main(args.lm_eval_args)


def _add_lm_eval(commands) -> None:
    # Everything after `lm-eval` is lm-eval's own (its --help too): a parser with no option prefix passes it through.
    lm_eval = commands.add_parser("lm-eval", add_help=False, prefix_chars="\0",
                                  help="lm-evaluation-harness with --model mellama: mellama lm-eval --model mellama "
                                       "--model_args ckpt=CKPT_DIR --tasks ...")  # fmt: skip
    lm_eval.add_argument("lm_eval_args", nargs=argparse.REMAINDER, metavar="LM_EVAL_ARGS")
    lm_eval.set_defaults(run=_lm_eval)


def _utf8(text: str, where: str) -> str:
    """`text` as given, if it came from UTF-8 bytes (Python smuggles other bytes in as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{where}: not UTF-8 text") from None
    return text


def _generate(args: argparse.Namespace) -> None:
    import json

    from mellama_jax.generate import Sampling, apply_template, generate, load, read_prompts

    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    if args.prompt is not None:
        texts = [_utf8(args.prompt, "--prompt")]
    elif args.prompts is not None:
        texts = read_prompts(args.prompts)
    elif sys.stdin.isatty():
        raise UserError("give a prompt: --prompt TEXT, --prompts FILE, or text on stdin")
    else:
        try:
            texts = [_utf8(sys.stdin.read().removesuffix("\n"), "stdin")]
        except UnicodeDecodeError:  # a UTF-8 locale decodes strictly; others escape the bytes (caught by _utf8)
            raise UserError("stdin: not UTF-8 text") from None
        if not texts[0].strip():
            raise UserError("stdin: no prompt")
    model = load(args.ckpt_dir, args.dtype)
    ids = [model.tokenizer.encode(apply_template(text, args.chat_template)) for text in texts]
    outputs = [model.tokenizer.decode(new) for new in generate(model, ids, sampling, args.batch_size)]
    if args.prompts is None:  # one prompt: its text; a file of them: JSON lines, even for one
        print(outputs[0])
        return
    for i, output in enumerate(outputs):
        print(json.dumps({"prompt_index": i, "output": output}, ensure_ascii=False))


def _add_generate(commands) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    from mellama_jax.devices import KINDS  # a table: no jax imported

    parser = argparse.ArgumentParser(prog="mellama", description="Me-LLaMA training system in JAX/Flax.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_demo(commands)

    plan = commands.add_parser("plan", help="parameters, FLOPs and memory per device before launch")
    plan.add_argument("--config", help="YAML holding only differences from the defaults")
    plan.add_argument("--devices", type=int, default=1, help="devices the run is sharded over (default 1)")
    plan.add_argument("--device-kind", choices=tuple(KINDS), help="compile the step for these devices (no GPU needed)")
    plan.add_argument("--search", action="store_true", help="compile other meshes, micro-batches and remat; list fits")
    plan.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilisation for step time (default 0.40)")
    plan.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    plan.set_defaults(run=_plan)
    _add_convert(commands)
    _add_prepare(commands)
    _add_generate(commands)
    train = commands.add_parser("train", help="continued pre-training; resumes the latest checkpoint in run_dir")
    train.add_argument("--config", help="YAML holding only differences from the defaults")
    train.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    train.add_argument("--print-config", action="store_true", help="print the fully resolved config as YAML and exit")
    train.set_defaults(run=_train)
    _add_eval(commands)
    _add_decontaminate(commands)
    _add_lm_eval(commands)
    return parser


# What orbax and tensorstore print when one of their operations fails: a traceback logged per background
# thread and per abandoned asyncio task, and "Event loop is closed" from futures that finish after the loop
# that awaited them was closed. The failure itself is raised to our code, which reports it in one line.
_RELAYED = ("raised an exception", "Failed to run", "(save_finalize) failed", "exception was never retrieved")


def _relayed(record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and any(m in record.getMessage() for m in _RELAYED))


def _abandoned(unraisable) -> bool:
    code = getattr(unraisable.object, "cr_code", None)  # a coroutine of orbax's, garbage-collected unfinished
    closed = isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"
    return closed or "orbax" in getattr(code, "co_filename", "")


def _quiet_library_failures() -> None:
    """Silences orbax's and tensorstore's own reports of failures that they also raise to us (process-wide, once)."""
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_relayed)  # adding the same filter again is a no-op
    if not getattr(sys.unraisablehook, "mellama", False):
        default = sys.unraisablehook
        sys.unraisablehook = lambda unraisable: None if _abandoned(unraisable) else default(unraisable)
        sys.unraisablehook.mellama = True


def _one_line(e: Exception) -> str:
    if isinstance(e, OSError) and e.strerror:
        where = e.filename if e.filename2 is None else f"{e.filename} -> {e.filename2}"
        return f"{where}: {e.strerror}" if where else e.strerror
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logger, handler = logging.getLogger("mellama_jax"), logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"mellama {args.command}: %(levelname)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # libraries (absl) may configure the root logger; print ours once
    if not os.environ.get("MELLAMA_DEBUG"):
        _quiet_library_failures()
    try:
        args.run(args)
    except (UserError, OSError) as e:
        if os.environ.get("MELLAMA_DEBUG") or (isinstance(e, OSError) and e.errno not in _USER_OS_ERRORS):
            raise
        print(f"mellama {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    return 0


if __name__ == "__main__":
    sys.exit(main())
