"""`mellama plan`: what a run costs on devices we do not have, before it is launched."""

from __future__ import annotations

import argparse
import os

from mellama_jax.errors import UserError


def _plan(args: argparse.Namespace) -> None:
    # Planning never runs on a device: jax stays on the CPU even where GPUs or TPUs are (or their plugins are).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # XLA's own warnings while compiling for a target (e.g. that rematerialisation cannot reach its memory goal)
    # repeat what the report says, in its terms.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from mellama_jax.config_file import load_config
    from mellama_jax.planning.report import report

    cfg = load_config(args.config, args.overrides)
    if args.serve:
        _plan_serve(args, cfg)
        return
    if args.quantize or args.slots or args.context:
        raise UserError("--quantize, --slots and --context plan serving: add --serve")
    lines = report(cfg, args.devices, args.device_kind, args.search, args.mfu)
    kind = f" x {args.device_kind}" if args.device_kind else " device(s)"
    print(f"plan for {args.config or 'the defaults (Me-LLaMA 13B CPT)'} on {args.devices}{kind}:")
    print("\n".join(lines))


def _plan_serve(args: argparse.Namespace, cfg) -> None:
    from mellama_jax import hardware
    from mellama_jax.planning import serve_plan

    if args.device_kind is None or args.device_kind == "cpu":
        raise UserError("--serve: name the accelerator with --device-kind (e.g. h100-80g, a100-80g, tpu-v5p)")
    if args.search:
        raise UserError("--serve: --search plans training layouts; the serve plan tries 1, 2, 4 and 8 devices itself")
    context = args.context or min(4096, cfg.model.max_seq_len)
    what = f"{args.quantize or 'bf16'} weights, {args.slots or 32} slots x {context} tokens"
    print(f"serve plan for {args.config or 'the defaults (Me-LLaMA 13B)'}, {what}, on {args.device_kind}:")
    kind = hardware.KINDS[args.device_kind]
    print("\n".join(serve_plan.report(cfg.model, kind, args.quantize, args.slots or 32, context, args.devices)))


def add_commands(commands) -> None:
    from mellama_jax.hardware import KINDS  # a table: no jax imported

    plan = commands.add_parser("plan", help="parameters, FLOPs and memory per device before launch")
    plan.add_argument("--config", help="YAML holding only differences from the defaults")
    plan.add_argument("--devices", type=int, default=1, help="devices the run is sharded over (default 1)")
    plan.add_argument("--device-kind", choices=tuple(KINDS), help="compile the step for these devices (no GPU needed)")
    plan.add_argument("--search", action="store_true", help="compile other meshes, micro-batches and remat; list fits")
    plan.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilisation for step time (default 0.40)")
    plan.add_argument(
        "--serve",
        action="store_true",
        help="plan `mellama serve` instead: the decode step compiled for --device-kind on 1, 2, 4, 8",
    )
    plan.add_argument("--quantize", choices=("int8", "int4"), help="--serve: weight-only quantization (default bf16)")
    plan.add_argument("--slots", type=int, help="--serve: requests decoded together (default 32)")
    plan.add_argument("--context", type=int, help="--serve: tokens per slot (default 4096, or the model's window)")
    plan.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    plan.set_defaults(run=_plan)
