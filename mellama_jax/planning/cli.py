"""`mellama plan`: what a run costs on devices we do not have, before it is launched."""

from __future__ import annotations

import argparse
import os


def _plan(args: argparse.Namespace) -> None:
    # Planning never runs on a device: jax stays on the CPU even where GPUs or TPUs are (or their plugins are).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # XLA's own warnings while compiling for a target (e.g. that rematerialisation cannot reach its memory goal)
    # repeat what the report says, in its terms.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from mellama_jax.config_file import load_config
    from mellama_jax.planning.report import report

    cfg = load_config(args.config, args.overrides)
    lines = report(cfg, args.devices, args.device_kind, args.search, args.mfu)
    kind = f" x {args.device_kind}" if args.device_kind else " device(s)"
    print(f"plan for {args.config or 'the defaults (Me-LLaMA 13B CPT)'} on {args.devices}{kind}:")
    print("\n".join(lines))


def add_commands(commands) -> None:
    from mellama_jax.hardware import KINDS  # a table: no jax imported

    plan = commands.add_parser("plan", help="parameters, FLOPs and memory per device before launch")
    plan.add_argument("--config", help="YAML holding only differences from the defaults")
    plan.add_argument("--devices", type=int, default=1, help="devices the run is sharded over (default 1)")
    plan.add_argument("--device-kind", choices=tuple(KINDS), help="compile the step for these devices (no GPU needed)")
    plan.add_argument("--search", action="store_true", help="compile other meshes, micro-batches and remat; list fits")
    plan.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilisation for step time (default 0.40)")
    plan.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    plan.set_defaults(run=_plan)
