"""The `mellama` command (DESIGN §4). User mistakes print one line and exit 2; no raw tracebacks."""

from __future__ import annotations

import argparse
import sys

from mellama_jax.errors import UserError


def _plan(args: argparse.Namespace) -> None:
    from mellama_jax.config import load_config
    from mellama_jax.plan import plan

    if args.devices < 1:
        raise UserError(f"--devices must be at least 1, got {args.devices}")
    cfg = load_config(args.config, args.overrides)
    rows = plan(cfg, args.devices)
    width = max(len(what) for what, _ in rows)
    print(f"plan for {args.config or 'the defaults (Me-LLaMA 13B CPT)'} on {args.devices} device(s):")
    for what, amount in rows:
        print(f"  {what:<{width}}  {amount}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mellama", description="Me-LLaMA training system in JAX/Flax.")
    commands = parser.add_subparsers(dest="command", required=True)

    plan = commands.add_parser("plan", help="parameters, FLOPs and memory per device before launch")
    plan.add_argument("--config", help="YAML holding only differences from the defaults")
    plan.add_argument("--devices", type=int, default=1, help="devices the run is sharded over (default 1)")
    plan.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    plan.set_defaults(run=_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except UserError as e:
        print(f"mellama {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
