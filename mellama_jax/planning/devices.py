"""The devices a run is planned for, made without having them: compile-only GPUs, TPUs, and the host's CPUs.

The devices themselves (memory, peak, GPU facts) are `hardware.py`'s. XLA compiles for a GPU it cannot see
from a `GpuTargetConfigProto` (the device's facts as text), for a TPU from a topology name that libtpu knows.
`jax.experimental.topologies` turns either into compile-only devices: a mesh can be built over them and a
program lowered, compiled and measured (`memory_analysis`), never run. Needs the `cuda` extra
(jax-cuda12-plugin, -pjrt) or the `tpu` extra (libtpu); jax's own backend stays the CPU
(`JAX_PLATFORMS=cpu`, which `mellama plan` sets), so no device is opened.
"""

from __future__ import annotations

import contextlib
import math
import os

from mellama_jax.errors import UserError
from mellama_jax.hardware import DeviceKind


def hosts(kind: DeviceKind, devices: int) -> int:
    """How many hosts `devices` devices of `kind` span (a partial host counts as one)."""
    return max(1, -(-devices // kind.per_host))


def tpu_topology(kind: DeviceKind, chips: int) -> tuple[str, tuple[int, int, int]]:
    """(slice name, chips per host) for `chips` chips: hosts of 2x2 chips, the slice as nearly cubic (square in
    2-D) as they allow, e.g. v4:4x8x5; fewer than 4 chips are one host."""
    sides = [d for d in range(1, chips + 1) if chips % d == 0]
    even = [d for d in sides if d % 2 == 0]
    if kind.tpu_dims == 2:
        shapes = [(a, chips // a) for a in even if a * a <= chips and chips // a % 2 == 0]
    else:
        shapes = [(a, b, chips // (a * b)) for a in even for b in even if a <= b and chips % (a * b) == 0]
    if shapes:
        shape, bounds = min(shapes, key=lambda s: (max(s), -min(s))), (2, 2, 1)
    else:  # one host holds them all
        shape = (1, chips) if kind.tpu_dims == 2 else (1, 1, chips)
        bounds = (1, chips, 1) if kind.tpu_dims == 2 else (1, 1, chips)
    return f"{kind.tpu_generation}:" + "x".join(map(str, shape)), bounds


@contextlib.contextmanager
def _libtpu_offline():
    """What libtpu reads when it loads, set for a host that is no TPU VM: no metadata server to ask, no worker
    hostnames to find (it warns otherwise), no lock on TPUs it will not open (planners may run side by side)."""
    settings = {"TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_WORKER_HOSTNAMES": "localhost",
                "TPU_ACCELERATOR_TYPE": "v4-8"}  # fmt: skip
    added = [name for name in settings if name not in os.environ]
    os.environ.update({name: settings[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            del os.environ[name]


def compile_only_devices(kind: DeviceKind, devices: int) -> list:
    """`devices` devices of `kind` to compile for (never to run on), in the order of their hosts."""
    import jax

    if kind.platform == "cpu":
        with contextlib.suppress(RuntimeError):  # refused once jax has started; the count is checked below
            jax.config.update("jax_num_cpu_devices", devices)
        found = jax.devices("cpu")
        if len(found) < devices:
            raise UserError(f"cpu: this process has {len(found)} CPU devices, not {devices} (jax started already)")
        return found[:devices]
    from jax.experimental import topologies

    try:
        if kind.platform == "cuda":
            per_host = min(devices, kind.per_host)
            if devices % per_host:
                raise UserError(f"{kind.name}: {devices} GPUs do not fill hosts of {per_host}")
            topology = f"1x{devices // per_host}x{per_host}"  # slices x hosts x devices per host
            return topologies.get_topology_desc(
                platform="cuda", topology=topology, target_config=kind.gpu.target_config()
            ).devices
        topology, bounds = tpu_topology(kind, devices)
        with _libtpu_offline():
            return topologies.get_topology_desc(
                topology_name=topology, platform="tpu", chip_config_name=kind.chip_config,
                chips_per_host_bounds=bounds, num_slices=1,
            ).devices  # fmt: skip
    except (ImportError, RuntimeError, NotImplementedError) as e:
        extra = "cuda" if kind.platform == "cuda" else "tpu"
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "not installed" in first or "not implemented" in first or isinstance(e, ImportError):
            raise UserError(
                f"{kind.name}: compiling for it needs `pip install 'mellama-jax[{extra}]'` ({first})"
            ) from None
        raise UserError(f"{kind.name}: cannot make {devices} compile-only devices: {first}") from None


def describe(kind: DeviceKind, devices: int) -> str:
    """'160 x a100-80g (NVIDIA A100-SXM4-80GB, 20 hosts x 8)'."""
    what = kind.gpu.description if kind.gpu else kind.tpu_generation.upper() or "CPU"
    if kind.platform == "tpu":
        what = f"TPU {tpu_topology(kind, devices)[0]}"
    n_hosts = hosts(kind, devices)
    return f"{devices} x {kind.name} ({what}, {n_hosts} host{'s' * (n_hosts > 1)} x {math.ceil(devices / n_hosts)})"
