"""`mellama train`: a CPT or SFT run from a YAML config, resumed from its latest checkpoint."""

from __future__ import annotations

import argparse
import logging
import pathlib


def _train(args: argparse.Namespace) -> None:
    from mellama_jax.config_file import load_config, to_yaml

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return
    from mellama_jax.training import gpu_flags

    gpu_note = gpu_flags.apply()  # before jax starts its backend: XLA reads XLA_FLAGS only then
    import jax

    from mellama_jax.training.distributed import initialize
    from mellama_jax.training.loop import train

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


def add_commands(commands) -> None:
    train = commands.add_parser("train", help="continued pre-training; resumes the latest checkpoint in run_dir")
    train.add_argument("--config", help="YAML holding only differences from the defaults")
    train.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    train.add_argument("--print-config", action="store_true", help="print the fully resolved config as YAML and exit")
    train.set_defaults(run=_train)
