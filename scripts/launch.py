#!/usr/bin/env python3
"""Starts this host's share of a multi-process `mellama train` run, without SLURM or MPI.

    python scripts/launch.py [--local N] [--hosts H0,H1,... | --nodes N --node-rank R] [--coordinator HOST:PORT]
                             -- --config run.yaml [key.sub=value ...]

Run it once on every host with the same arguments. It starts `--local` processes here (default: one per visible
NVIDIA GPU, else one), numbered node_rank * local + i out of nodes * local, each `mellama train ARGS
distributed.coordinator=... distributed.num_processes=... distributed.process_id=...`; with several processes on
a GPU host each gets its own GPUs through CUDA_VISIBLE_DEVICES. The coordinator is process 0's host: the first
of --hosts at --port, or without --hosts (a run on this host alone) 127.0.0.1 at a free port. Every option can
come from the environment instead: LOCAL_PROCESSES, HOSTS, NUM_NODES, NODE_RANK, COORDINATOR.

SIGTERM, SIGINT and SIGHUP are passed on to every process (which then save the same step and stop). When one
process fails, the others get --grace seconds to stop by themselves (they usually do: a failure is exchanged
between them every step), then SIGTERM, then SIGKILL. The exit code is the first failure's (128 + N for a
process killed by signal N), else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

from mellama_jax.hardware import gpu_ids

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse(argv: list[str]) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--local", type=int, default=int(env.get("LOCAL_PROCESSES", 0)),
                        help="processes on this host (default: one per visible GPU, else 1)")  # fmt: skip
    parser.add_argument("--hosts", default=env.get("HOSTS", ""), help="the run's hosts in order, comma-separated")
    parser.add_argument("--nodes", type=int, default=int(env.get("NUM_NODES", 0)), help="hosts (default: of --hosts)")
    parser.add_argument("--node-rank", type=int, default=int(env.get("NODE_RANK", -1)),
                        help="this host's place (default: its place in --hosts)")  # fmt: skip
    parser.add_argument("--coordinator", default=env.get("COORDINATOR", ""), help="host:port of process 0")
    parser.add_argument("--port", type=int, default=8476, help="coordinator port with --hosts (default 8476)")
    parser.add_argument("--grace", type=float, default=120.0, help="seconds the others get after a failure")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the arguments of `mellama train`")
    args = parser.parse_args(argv)
    args.train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    hosts = [h.strip() for h in args.hosts.replace(" ", ",").split(",") if h.strip()]
    args.nodes = args.nodes or len(hosts) or 1
    if hosts and len(hosts) != args.nodes:
        parser.error(f"--nodes {args.nodes} but {len(hosts)} --hosts")
    if args.node_rank < 0:
        if not hosts and args.nodes > 1:
            parser.error("a run over several hosts needs --node-rank (or NODE_RANK), or --hosts")
        args.node_rank = _place(hosts) if hosts else 0
        if args.node_rank < 0:
            parser.error(f"this host ({socket.gethostname()}) is not in --hosts; give --node-rank (or NODE_RANK)")
    if args.node_rank >= args.nodes:
        parser.error(f"--node-rank {args.node_rank} is not below --nodes {args.nodes}")
    if not args.coordinator and not hosts and args.nodes > 1:
        parser.error("a run over several hosts needs --coordinator (or COORDINATOR), or --hosts")
    args.coordinator = args.coordinator or (f"{hosts[0]}:{args.port}" if hosts else f"127.0.0.1:{free_port()}")
    args.local = args.local or len(gpu_ids()) or 1
    return args


def _place(hosts: list[str]) -> int:
    """This host's index in `hosts` (by name or address), or -1."""
    names = {socket.gethostname(), socket.gethostname().split(".")[0], socket.getfqdn()}
    with contextlib.suppress(OSError):
        names |= set(socket.gethostbyname_ex(socket.gethostname())[2])
    return next((rank for rank, host in enumerate(hosts) if host in names or host.split(".")[0] in names), -1)


def commands(args: argparse.Namespace) -> list[tuple[list[str], dict[str, str]]]:
    """The argv and environment of each process this host starts."""
    total, gpus = args.nodes * args.local, gpu_ids()
    if gpus and args.local > 1 and len(gpus) % args.local:
        raise SystemExit(f"launch: {len(gpus)} GPUs do not split evenly over {args.local} processes")
    result = []
    for i in range(args.local):
        argv = [sys.executable, "-m", "mellama_jax.cli", "train", *args.train_args]
        env = dict(os.environ)
        if total > 1:
            argv += [f"distributed.coordinator={args.coordinator}", f"distributed.num_processes={total}",
                     f"distributed.process_id={args.node_rank * args.local + i}"]  # fmt: skip
        if gpus and args.local > 1:
            share = len(gpus) // args.local
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[i * share : (i + 1) * share])
        result.append((argv, env))
    return result


def exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def supervise(processes: list[subprocess.Popen], grace: float) -> int:
    """Waits for every process; after the first failure gives the others `grace` seconds, then stops them."""
    failure, deadline, terminated = 0, None, False
    while any(p.poll() is None for p in processes):
        for i, p in enumerate(processes):
            if p.returncode not in (None, 0) and not failure:
                failure, deadline = exit_code(p.returncode), time.monotonic() + grace
                print(f"launch: process {i} exited with {failure}; the others get {grace:.0f} s", file=sys.stderr)
        if deadline is not None and time.monotonic() > deadline:
            for p in (p for p in processes if p.poll() is None):
                p.send_signal(signal.SIGKILL if terminated else signal.SIGTERM)
            deadline, terminated = time.monotonic() + grace, True
        time.sleep(0.2)
    return failure or next((exit_code(p.returncode) for p in processes if p.returncode), 0)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    processes: list[subprocess.Popen] = []

    def forward(signum, _frame) -> None:
        for p in processes:
            if p.poll() is None:
                p.send_signal(signum)

    for s in FORWARDED:  # before the first start, so no signal finds a process without its launcher's help
        signal.signal(s, forward)
    for argv_i, env in commands(args):
        processes.append(subprocess.Popen(argv_i, env=env))
    return supervise(processes, args.grace)


if __name__ == "__main__":
    sys.exit(main())
