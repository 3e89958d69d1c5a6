"""`mellama eval`, `mellama decontaminate` and `mellama lm-eval`: the benchmarks, the overlap check, lm-eval."""

from __future__ import annotations

import argparse
import pathlib

from mellama_jax.errors import UserError


def _eval(args: argparse.Namespace) -> None:
    from mellama_jax.evaluation.harness import RESULTS, TABLE, EvalSettings, evaluate
    from mellama_jax.inference.generate import Sampling

    sampling = Sampling(max_new_tokens=args.max_new_tokens)
    settings = EvalSettings(shots=args.shots, limit=args.limit, template=args.chat_template, sampling=sampling)
    evaluate(args.ckpt_dir, args.tasks, args.data_dir, args.out, settings, args.batch_size,
             args.exclude_contaminated, args.overwrite, args.dtype, args.quantize)  # fmt: skip
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
    evaluate.add_argument("--quantize", choices=("int8", "int4"), help="weight-only, as mellama serve's (default: off)")
    evaluate.add_argument("--exclude-contaminated", type=pathlib.Path, metavar="REPORT",
                          help="a `mellama decontaminate` report: also score the clean subset")  # fmt: skip
    evaluate.add_argument("--overwrite", action="store_true", help="replace results of other settings in --out")
    evaluate.set_defaults(run=_eval)


def _decontaminate(args: argparse.Namespace) -> None:
    from mellama_jax.evaluation.decontaminate import decontaminate, summary

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


def add_commands(commands) -> None:
    _add_eval(commands)
    _add_decontaminate(commands)
    _add_lm_eval(commands)
