"""`mellama plan`'s report: the compiled per-device memory beside the estimate, the fit against the device,
speed at a stated MFU, what to change when it does not fit or divide, and a search over layouts."""

from __future__ import annotations

import dataclasses

from mellama_jax import hardware
from mellama_jax.config import TrainConfig
from mellama_jax.errors import UserError
from mellama_jax.model.llama import param_count, train_flops_per_token
from mellama_jax.planning import devices as dev
from mellama_jax.planning.plan import (
    GIB,
    MFU,
    RECOMPUTE,
    Layout,
    Memory,
    dividing_layouts,
    estimate,
    hardware_flops,
    layout,
    measure,
    problems,
    resolved_attention,
    step_seconds,
    traffic,
    trainable_count,
    uneven,
    with_layout,
    xla_options,
)

REMATS = ("full", "save_dots", "none")  # search: most recomputation (least memory) to none


def _gib(x: float) -> str:
    return f"{x / GIB:.2f}"


@dataclasses.dataclass
class Target:
    """The devices planned for: their kind and count, compile-only devices made on first use."""

    kind: hardware.DeviceKind
    count: int
    _devices: list | None = None

    def mesh(self, lay: Layout):
        from mellama_jax.config import MeshConfig
        from mellama_jax.model.sharding import make_mesh

        if self._devices is None:
            self._devices = dev.compile_only_devices(self.kind, self.count)
        return make_mesh(MeshConfig(lay.data, lay.fsdp, lay.tensor), self._devices)

    def measure(self, cfg: TrainConfig, lay: Layout, options: dict | None = None) -> Memory:
        import jax

        try:
            return measure(with_layout(cfg, lay), self.mesh(lay), options)
        except jax.errors.JaxRuntimeError as e:  # MELLAMA_DEBUG=1 shows the traceback
            first = str(e).splitlines()[0]
            raise UserError(f"{self.kind.name}: XLA could not compile the step on {lay.mesh()}: {first}") from e


def report(cfg: TrainConfig, devices: int, kind_name: str | None, search: bool = False, mfu: float = MFU) -> list[str]:
    """The lines `mellama plan` prints."""
    if devices < 1:
        raise UserError(f"--devices must be at least 1, got {devices}")
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1], got {mfu}")
    if cfg.steps == "auto":  # resolved from the data at train time; the step's program does not depend on it
        cfg = dataclasses.replace(cfg, steps=1)
    kind = None
    if kind_name is not None:
        kind = hardware.cpu_kind(devices) if kind_name == "cpu" else hardware.KINDS[kind_name]
    m, notes = cfg.model, []
    try:
        lay = layout(cfg, devices)
    except UserError as e:  # the config's mesh is for another count: its data and tensor kept, fsdp the rest
        mesh = cfg.mesh
        tensor = mesh.tensor if mesh.tensor > 0 and devices % mesh.tensor == 0 else 1
        data = mesh.data if mesh.data > 0 and devices % (mesh.data * tensor) == 0 else 1
        cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(mesh, data=data, fsdp=-1, tensor=tensor))
        lay = layout(cfg, devices)
        notes.append(f"  note         {e}: planned as {lay.mesh()}")
    platform = kind.platform if kind else "cuda"
    tokens = cfg.global_batch * cfg.seq_len
    if kind:
        notes.insert(0, f"  devices      {dev.describe(kind, devices)}")
    lines = notes + [
        f"  model        {param_count(m):,} parameters ({m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads / "
        f"{m.n_kv_heads} kv, ffn {m.ffn_dim}, vocab {m.vocab_size})",
        f"  batch        {cfg.global_batch} x {cfg.seq_len} = {tokens:,} tokens per step, {lay.micro_batches} "
        f"micro-batch(es) of {lay.rows} sequence(s) per device",
        f"  layout       mesh {lay.mesh()}; remat {m.remat}; attention {m.attention} "
        f"({resolved_attention(m, platform)} on {platform if kind else 'GPU'})",
    ]
    if cfg.lora:
        trained = trainable_count(cfg)
        lines.append(f"  LoRA         rank {cfg.lora.rank} on {','.join(cfg.lora.targets)}: {trained:,} trainable,"
                     f" {param_count(m):,} frozen; gradients and AdamW moments for the adapters only")  # fmt: skip
    flops = train_flops_per_token(m, cfg.seq_len)
    lines.append(f"  FLOPs        {flops:.3e} per token, {flops * tokens:.3e} per step (model FLOPs: 6N + attention)")
    wrong = problems(cfg, lay)
    if wrong:
        lines += [f"  DOES NOT DIVIDE: {why}" for why in wrong]
        lines.append(f"  a layout that divides: {_dividing(cfg, devices, kind)}")
        return lines
    if uneven(cfg, lay):
        even = _dividing(cfg, devices, kind)
        lines.append(f"  note         {uneven(cfg, lay)}: devices wait for rows moved to them; evenly: {even}")
    target = Target(kind, devices) if kind else None
    options = xla_options(kind) if kind else None
    est = estimate(cfg, lay, platform)
    measured = target.measure(cfg, lay, options) if target else None
    default = target.measure(cfg, lay) if options else None  # the same step under XLA's default GPU schedule
    lines += _memory(est, measured, default)
    if kind is None:
        lines.append("  (estimate only: --device-kind a100-80g|h100-80g|tpu-v4|tpu-v5p|tpu-v5e|cpu compiles the step)")
        return lines
    if kind.platform == "cuda":
        flags = "mellama's GPU flags (gpu_flags.py), as `mellama train` sets them" if options else "your XLA_FLAGS"
        lines.append(f"  XLA          compiled with {flags}" + ("; 'XLA defaults': without them" if options else ""))
    lines += _fit(kind, measured)
    if measured.total > kind.budget:
        lines += _helps(cfg, lay, target, est, measured, default)
    lines += _speed(cfg, lay, kind, mfu)
    if search:
        lines += _search(cfg, target, options, mfu)
    return lines


def _memory(est: Memory, measured: Memory | None, default: Memory | None) -> list[str]:
    rows = [("parameters (fp32)", "params"), ("AdamW moments (fp32)", "opt_state"),
            ("batch and step counters", "batch"), ("temporaries", "temp")]  # fmt: skip
    columns = [("compiled", measured), ("XLA defaults", default), ("estimate", est)]
    columns = [(name, mem) for name, mem in columns if mem is not None]
    lines = [f"  {'per device, GiB':<50}" + "".join(f"{name:>14}" for name, _ in columns)]
    for what, field in rows:
        lines.append(f"    {what:<48}" + "".join(f"{_gib(getattr(mem, field)):>14}" for _, mem in columns))
        if field == "temp":
            pad = " " * 14 * (len(columns) - 1)
            lines += [f"      {part:<46}{pad}{_gib(size):>14}" for part, size in est.parts.items()]
    if measured and measured.outputs + measured.code:
        lines.append(f"    {'outputs (metrics) and generated code':<48}" + "".join(
            f"{_gib(mem.outputs + mem.code):>14}" for _, mem in columns))  # fmt: skip
    lines.append(f"    {'total (peak)':<48}" + "".join(f"{_gib(mem.total):>14}" for _, mem in columns))
    return lines


def _fit(kind: hardware.DeviceKind, mem: Memory) -> list[str]:
    share = f"{kind.usable:.0%} of {_gib(kind.memory_bytes)} GiB"
    why = {
        "cuda": "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90 as scripts/train.sbatch sets; the rest: CUDA, cuDNN, NCCL",
        "tpu": "the rest: the TPU runtime",
        "cpu": "this host's memory shared by its CPU devices",
    }[kind.platform]
    if mem.total <= kind.budget:
        verdict = f"FITS, {_gib(kind.budget - mem.total)} GiB to spare"
    else:
        verdict = f"DOES NOT FIT: {_gib(mem.total)} GiB > {_gib(kind.budget)} GiB"
    return [f"  memory       budget {_gib(kind.budget)} GiB per device ({share}; {why}): {verdict}"]


def _speed(cfg: TrainConfig, lay: Layout, kind: hardware.DeviceKind, mfu: float) -> list[str]:
    peak = hardware.peak_flops(kind, cfg.peak_tflops)
    if not peak:
        return ["  speed        unknown for this device kind (set peak_tflops)"]
    seconds = step_seconds(cfg, lay.devices, peak, mfu)
    per_device = cfg.global_batch * cfg.seq_len / seconds / lay.devices
    executed = hardware_flops(cfg) / (seconds * lay.devices * peak)
    return [
        f"  speed        at {mfu:.0%} MFU of {peak / 1e12:.0f} TFLOP/s (bf16 peak): {seconds:.1f} s per step, "
        f"{per_device:,.0f} tokens/s per device, {per_device * lay.devices:,.0f} in all "
        f"({executed:.0%} of peak in FLOPs executed, remat {cfg.model.remat})",
        f"  traffic      {traffic(cfg, lay) / 1e9:,.0f} GB received per device per step (FSDP gathers and gradient "
        f"reduce-scatters per micro-batch, data-parallel all-reduce, tensor-parallel activations)",
    ]


def _dividing(cfg: TrainConfig, devices: int, kind: hardware.DeviceKind | None) -> str:
    per_host = kind.per_host if kind else 8
    options = dividing_layouts(cfg, devices, per_host)
    if options:  # most fsdp (least memory), then the micro-batch size nearest the config's
        want = max(cfg.global_batch // cfg.micro_batches // devices, 1)
        best = min(options, key=lambda lay: (-lay.fsdp, lay.tensor, abs(lay.rows - want)))
        return best.overrides()
    for fsdp in range(devices, 0, -1):  # the global batch must change: the closest multiple of data x fsdp
        if devices % fsdp == 0 and cfg.model.d_model % fsdp == 0:
            rows = max(round(cfg.global_batch / devices), 1) * devices
            return f"mesh.data={devices // fsdp} mesh.fsdp={fsdp} mesh.tensor=1 global_batch={rows} ({devices} x k)"
    return "none of data x fsdp x tensor divides the model and batch"


def _helps(
    cfg: TrainConfig, lay: Layout, target: Target, est: Memory, measured: Memory, default: Memory | None
) -> list[str]:
    """Why it does not fit, and each change that helps with its compiled total (knobs tried in order of cost)."""
    kind, lines = target.kind, []
    state = measured.params + measured.opt_state
    lines.append(
        f"  why          parameters + AdamW moments {_gib(state)} GiB, temporaries {_gib(measured.temp)} GiB "
        f"(estimate: {', '.join(f'{k} {_gib(v)}' for k, v in est.parts.items())})"
    )
    # the state and its gradients alone; LoRA's gradients are the adapters' (half their two AdamW moments)
    grads = measured.params if cfg.lora is None else measured.opt_state / 2
    if state + grads >= kind.budget:
        held = "fp32 weights, gradients, AdamW moments: 16 bytes per parameter" if cfg.lora is None else (
            "frozen weights, adapters with their gradients and AdamW moments")  # fmt: skip
        lines.append(
            f"  what helps   the train state alone ({held}, {_gib(state + grads)} GiB per device) is more than a"
            f" device holds: no micro-batch, remat or attention setting helps; only more fsdp, over more devices"
        )
        need = _fewest_devices(cfg, target)
        if need:
            count, fits, got = need
            lines.append(f"  what helps   --devices {count} {fits.overrides()}: {_gib(got.total)} GiB compiled, fits")
        return lines
    tries = []  # (what, config, layout)
    if lay.rows > 1:
        smaller = next(r for r in range(lay.rows - 1, 0, -1) if lay.rows % r == 0)
        new = dataclasses.replace(lay, rows=smaller, micro_batches=lay.micro_batches * lay.rows // smaller)
        tries.append((f"micro_batches={new.micro_batches} ({smaller} per device)", cfg, new))
    if cfg.model.remat != "full":
        tries.append(("model.remat=full", _model(cfg, remat="full"), lay))
    if resolved_attention(cfg.model, kind.platform) == "xla" and kind.platform == "cuda":
        tries.append(("model.attention=flash", _model(cfg, attention="flash"), lay))
    more = [d for d in dividing_layouts(cfg, lay.devices, kind.per_host)
            if d.fsdp > lay.fsdp and d.tensor == lay.tensor and d.rows == lay.rows]  # fmt: skip
    if more:
        tries.append((f"more fsdp: mesh.data={more[0].data} mesh.fsdp={more[0].fsdp}", cfg, more[0]))
    for what, new_cfg, new_lay in tries:
        got = target.measure(new_cfg, new_lay, xla_options(kind))
        fits = "fits" if got.total <= kind.budget else "still too much"
        lines.append(f"  what helps   {what}: {_gib(got.total)} GiB compiled, {fits}")
    if default is not None:
        fits = "fits" if default.total <= kind.budget else "still too much"
        lines.append(
            f"  what helps   XLA's default GPU schedule (an XLA_FLAGS of your own, without mellama's "
            f"latency-hiding scheduler; less overlap of communication): {_gib(default.total)} GiB compiled, {fits}"
        )
    return lines


def _model(cfg: TrainConfig, **fields) -> TrainConfig:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **fields))


def _fewest_devices(cfg: TrainConfig, target: Target, compiles: int = 4) -> tuple[int, Layout, Memory] | None:
    """The fewest devices (whole hosts) whose compiled step fits: for each count, its most-fsdp layout with one
    sequence per device per micro-batch when the estimate lets it fit, confirmed by compiling (`compiles` at most);
    `--search` on that count then finds larger micro-batches."""
    kind = target.kind
    for count in range(kind.per_host, 4097, kind.per_host):
        fitting = [lay for lay in dividing_layouts(cfg, count, kind.per_host)
                   if estimate(with_layout(cfg, lay), lay, kind.platform).total <= kind.budget]  # fmt: skip
        if fitting:
            lay = min(fitting, key=lambda lay: (-lay.fsdp, lay.tensor, lay.rows))
            got = Target(kind, count).measure(cfg, lay, xla_options(kind))
            if got.total <= kind.budget:
                return count, lay, got
            compiles -= 1
            if not compiles:
                return None
    return None


def _search(cfg: TrainConfig, target: Target, options, mfu: float, limit: int = 8, compiles: int = 16) -> list[str]:
    """Layouts x remat policies that fit, compiled, fastest first: fewest FLOPs executed (remat's recompute
    counted), then fewest micro-batches (larger matmuls, fewer weight gathers), then least traffic."""
    kind, count = target.kind, target.count
    peak = hardware.peak_flops(kind, cfg.peak_tflops)
    candidates = []
    for lay in dividing_layouts(cfg, count, kind.per_host):
        for remat in REMATS:
            new = with_layout(cfg, lay, remat=remat)
            key = (hardware_flops(new), lay.micro_batches, traffic(new, lay))
            candidates.append((key, lay, new, estimate(new, lay, kind.platform)))
    candidates.sort(key=lambda c: c[0])
    # FLOPs executed per second: the config's own rate at `mfu` (so its row's step time is the report's)
    rate = count * peak * mfu * RECOMPUTE[cfg.model.remat]
    hopeful = [c for c in candidates if c[3].total <= kind.budget]
    rows, tried = [], 0
    for (flops, _, moved), lay, new, _ in hopeful:
        if len(rows) == limit or tried == compiles:
            break
        tried += 1
        try:
            got = target.measure(new, lay, options)
        except UserError:  # one candidate XLA refuses does not end the search
            continue
        if got.total <= kind.budget:
            seconds = f"{flops / rate:.1f}" if rate else "-"
            numbers = f"{_gib(got.total):>7} {flops / count / 1e15:>9.3g} {seconds:>7} {moved / 1e9:>8,.0f}"
            rows.append(f"    {lay.mesh():<28}{lay.rows:>9}{lay.micro_batches:>7}  {new.model.remat:<10}{numbers}")
    lines = [
        f"  search       {len(candidates)} layouts x remat divide the model and batch, {len(hopeful)} estimated to "
        f"fit; compiled {tried}, {len(rows)} fit (fastest first; step s at the config's FLOP rate at {mfu:.0%} MFU):"
    ]
    if rows:
        lines.append(f"    {'mesh':<28}{'seqs/dev':>9}{'micro':>7}  {'remat':<10}{'GiB':>7} {'PFLOP/dev':>9} "
                     f"{'step s':>7} {'GB moved':>8}")  # fmt: skip
    return lines + rows
