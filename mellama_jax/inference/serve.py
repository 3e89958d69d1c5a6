"""`mellama serve`: a checkpoint (and LoRA runs on it) behind the OpenAI API, on 127.0.0.1 unless told otherwise.

Start-up: the host and key are checked first (a non-loopback host needs an API key or --insecure), the
port is taken, then the model loads, adapters are stacked, weights are quantized if asked (with their
measured cost printed), and uvicorn starts answering: /health is 503 while the engine compiles every
prefill bucket and its step, then 200. SIGTERM (or Ctrl-C) stops taking connections, lets the requests in
flight finish, then stops the engine.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import logging
import os
import pathlib
import signal
import socket
import time

import jax
import jax.numpy as jnp
import numpy as np

from mellama_jax.checkpoint import find_params, stored_arrays
from mellama_jax.config_file import read_model_config
from mellama_jax.errors import UserError
from mellama_jax.inference import chat, quality
from mellama_jax.inference.engine import Adapters, Engine
from mellama_jax.inference.generate import Loaded, load
from mellama_jax.inference.metrics import Metrics
from mellama_jax.model import lora

log = logging.getLogger("mellama_jax.serve")

API_KEY_ENV = "MELLAMA_API_KEY"


def check_exposure(host: str, api_key: str | None, insecure: bool) -> None:
    """A server reachable from other machines answers only with a key, unless the user insists."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and api_key is None and not insecure:
        raise UserError(f"--host {host} is reachable from other machines: give --api-key (or {API_KEY_ENV}),"
                        " or --insecure to serve without one")  # fmt: skip


def take_port(host: str, port: int) -> None:
    """Fails now, in one line, if the port is taken (uvicorn would fail only after the model loaded)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None


def _origin(path: pathlib.Path) -> dict:
    """Where served weights came from: a converted checkpoint, or a run and its step."""
    item_dir, _ = find_params(path, adapters=True)
    if item_dir.name == "params":
        return {"kind": "checkpoint", "path": str(path.resolve())}
    return {"kind": "run", "path": str(path.resolve()), "step": int(item_dir.parent.name)}


def stack_adapters(model: Loaded, runs: list[tuple[str, pathlib.Path]]) -> tuple[Adapters | None, list[dict]]:
    """The runs' adapters stacked for per-row use (index i + 1 for the i-th run), and each one's card facts."""
    if not runs:
        return None, []
    found = []
    for name, run in runs:
        lora_cfg = lora.read_lora_config(run)
        if lora_cfg is None:
            raise UserError(f"--adapter {name}={run}: not a LoRA run (no lora_config.json)")
        cfg = read_model_config(run / "model_config.json")
        if any(getattr(cfg, f) != getattr(model.cfg, f) for f in ("d_model", "n_layers", "n_heads", "n_kv_heads",
                                                                  "ffn_dim", "vocab_size")):  # fmt: skip
            raise UserError(f"--adapter {name}={run}: trained on a model of another shape than the served one")
        item_dir, _ = find_params(run, adapters=True)
        arrays = jax.tree.map(np.asarray, stored_arrays(item_dir, ("lora",)))
        found.append((lora_cfg, arrays))
    rank = max(c.rank for c, _ in found)
    targets = sorted({t for c, _ in found for t in c.targets})
    dtype = jnp.dtype(model.cfg.param_dtype)
    stack = {}
    for target in targets:
        shapes = next(a[target] for c, a in found if target in a)
        a_shape, b_shape = shapes["a"].shape, shapes["b"].shape  # [L, *in, r], [L, r, *out]
        a_all = np.zeros((len(found) + 1, *a_shape[:-1], rank), np.float32)
        b_all = np.zeros((len(found) + 1, b_shape[0], rank, *b_shape[2:]), np.float32)
        for i, (c, arrays) in enumerate(found, 1):
            if target in arrays:
                r = c.rank
                a_all[i, ..., :r] = arrays[target]["a"]
                b_all[i, :, :r] = arrays[target]["b"] * lora.scale(c)
        stack[target] = {"a": jnp.asarray(a_all, dtype), "b": jnp.asarray(b_all, dtype)}
    cards = [{"lora": dataclasses.asdict(c)} for c, _ in found]
    return Adapters(stack), cards


def build_state(args: argparse.Namespace, api_key: str | None):
    from mellama_jax.inference.server import State

    model = load(args.ckpt_dir, args.dtype, quantize=args.quantize, quant_text=quality.read_text(args.quant_check_text))
    base = args.name or args.ckpt_dir.resolve().name
    adapters, cards = stack_adapters(model, args.adapter or [])
    created = int(time.time())

    def card(name: str, facts: dict) -> dict:
        parent = None if name == base else base
        return {"id": name, "object": "model", "created": created, "owned_by": "mellama-jax", "root": facts["path"],
                "parent": parent, "mellama": facts}  # fmt: skip

    base_facts = {**_origin(args.ckpt_dir), "params_fingerprint": model.fingerprint, "quantize": model.quantize,
                  "quantization_cost": model.quant_report, "lora": None}  # fmt: skip
    models = {base: {"adapter": 0, "card": card(base, base_facts)}}
    for i, ((name, run), extra) in enumerate(zip(args.adapter or [], cards, strict=True), 1):
        if name in models:
            raise UserError(f"--adapter {name}: the name is taken (the base is served as {base!r})")
        models[name] = {"adapter": i, "card": card(name, {**_origin(run), **extra})}
    template_name, template = chat.load(args.ckpt_dir, args.chat_template, model.tokenizer)
    log.info("chat template: %s", template_name)
    max_len = args.max_len or model.cfg.max_seq_len
    if not 0 < max_len <= model.cfg.max_seq_len:
        raise UserError(f"--max-len must be in 1..{model.cfg.max_seq_len} (the model's max_seq_len), got {max_len}")
    engine = Engine(model, args.max_slots, max_len, adapters, args.max_queue)
    return State(engine, model.tokenizer, models, template, api_key, Metrics(args.max_slots))


def run(args: argparse.Namespace) -> None:
    import uvicorn

    from mellama_jax.inference.server import build_app

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    check_exposure(args.host, api_key, args.insecure)
    for name, value in (("--max-slots", args.max_slots), ("--max-queue", args.max_queue)):
        if value < 1:
            raise UserError(f"{name} must be a positive integer, got {value}")
    take_port(args.host, args.port)
    state = build_state(args, api_key)

    def ready(seconds: float | None, error: Exception | None) -> None:
        if error is not None:  # /health says so; the server stays up to tell it
            state.failed = f"warm-up failed: {type(error).__name__}"
            log.error("%s", state.failed)
            return
        state.ready.set()
        engine = state.engine
        log.info("ready: %d slots x %d tokens, %d prefill buckets compiled in %.1f s; serving %s", engine.slots,
                 engine.max_len, len(engine.buckets), seconds, ", ".join(state.models))  # fmt: skip

    class Server(uvicorn.Server):
        """uvicorn's, except that a drained shutdown exits 0 (uvicorn re-raises the signal once it is done)."""

        @contextlib.contextmanager
        def capture_signals(self):
            def drain(sig, frame):
                if not self.should_exit:
                    log.info("stopping: finishing %d requests in flight, taking no new ones",
                             state.engine.busy() + state.engine.queued())  # fmt: skip
                self.handle_exit(sig, frame)  # a second signal forces the exit

            previous = {s: signal.signal(s, drain) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    config = uvicorn.Config(build_app(state), host=args.host, port=args.port, log_level="info", access_log=False,
                            timeout_graceful_shutdown=args.drain_timeout)  # fmt: skip
    server = Server(config)
    state.engine.start(on_ready=ready)
    log.info("listening on http://%s:%d (health: 503 until warm)", args.host, args.port)
    try:
        server.run()
    finally:
        state.engine.stop()
