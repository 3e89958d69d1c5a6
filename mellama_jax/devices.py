"""The devices a run is planned for, without having them: GPU target configs, TPU topologies, the host's CPUs.

XLA compiles for a GPU it cannot see from a `GpuTargetConfigProto` (the device's facts as text), for a TPU
from a topology name that libtpu knows. `jax.experimental.topologies` turns either into compile-only devices:
a mesh can be built over them and a program lowered, compiled and measured (`memory_analysis`), never run.
Needs the `cuda` extra (jax-cuda12-plugin, -pjrt) or the `tpu` extra (libtpu); jax's own backend stays the
CPU (`JAX_PLATFORMS=cpu`, which `mellama plan` sets), so no device is opened.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os

from mellama_jax.errors import UserError

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Gpu:
    """An NVIDIA GPU as NVIDIA publishes it (whitepapers, datasheets) and CUDA reports it (cudaDeviceProp)."""

    description: str  # cudaDeviceProp.name
    compute_capability: tuple[int, int]
    sm_count: int
    fp32_cores_per_sm: int
    boost_clock_ghz: float
    memory_bytes: int  # totalGlobalMem, as CUDA reports it (a little under the nominal 80 GB)
    memory_clock_mhz: int  # HBM: two transfers per clock over `memory_bus_bits`
    memory_bus_bits: int
    l2_cache_bytes: int
    shared_memory_per_sm: int
    shared_memory_per_block_optin: int  # what a kernel may ask for; 48 KiB without asking
    registers_per_sm: int = 64 * 1024
    threads_per_sm: int = 2048
    # The CUDA runtime and cuDNN the plugin is built against (jax 0.10: CUDA 12.8, cuDNN 9.8): XLA chooses
    # its kernels (and refuses a config without them) by these versions.
    cuda_runtime: tuple[int, int, int] = (12, 8, 0)
    cudnn: tuple[int, int] = (9, 8)

    def target_config(self) -> str:
        """The text `GpuTargetConfigProto` that XLA's GPU compiler reads instead of asking a device."""
        major, minor = self.compute_capability
        info = {
            "threads_per_block_limit": 1024,
            "threads_per_warp": 32,
            "shared_memory_per_block": 48 * 1024,
            "shared_memory_per_core": self.shared_memory_per_sm,
            "threads_per_core_limit": self.threads_per_sm,
            "core_count": self.sm_count,
            "fpus_per_core": self.fp32_cores_per_sm,
            "block_dim_limit_x": 2**31 - 1,
            "block_dim_limit_y": 65535,
            "block_dim_limit_z": 65535,
            "memory_bandwidth": self.memory_clock_mhz * 10**6 * 2 * self.memory_bus_bits // 8,
            "l2_cache_size": self.l2_cache_bytes,
            "clock_rate_ghz": self.boost_clock_ghz,
            "device_memory_size": self.memory_bytes,
            "shared_memory_per_block_optin": self.shared_memory_per_block_optin,
        }
        lines = [f"  {key}: {value}" for key, value in info.items()]
        lines += [f"  cuda_compute_capability {{ major: {major} minor: {minor} }}"]
        lines += [f"  registers_per_core_limit: {self.registers_per_sm}", "  registers_per_block_limit: 65536"]
        runtime, dnn = self.cuda_runtime, self.cudnn
        return "\n".join(
            ["gpu_device_info {", *lines, "}", 'platform_name: "CUDA"',
             f"dnn_version_info {{ major: {dnn[0]} minor: {dnn[1]} }}",
             f"runtime_version {{ major: {runtime[0]} minor: {runtime[1]} patch: {runtime[2]} }}",
             f'device_description_str: "{self.description}"']
        ) + "\n"  # fmt: skip


# NVIDIA A100 Tensor Core GPU Architecture whitepaper (GA100 in A100: 108 SMs, 164 KB shared memory per SM of
# which 163 KB per block, 40 MB L2) and the A100 datasheet (80 GB HBM2e, 1593 MHz x 5120 bit = 2039 GB/s).
A100_SXM_80GB = Gpu("NVIDIA A100-SXM4-80GB", (8, 0), sm_count=108, fp32_cores_per_sm=64, boost_clock_ghz=1.41,
                    memory_bytes=85_100_068_864, memory_clock_mhz=1593, memory_bus_bits=5120,
                    l2_cache_bytes=40 * 2**20, shared_memory_per_sm=164 * 1024,
                    shared_memory_per_block_optin=163 * 1024)  # fmt: skip
# NVIDIA H100 Tensor Core GPU Architecture whitepaper (H100 SXM5: 132 SMs, 128 FP32 cores per SM, 228 KB shared
# memory per SM of which 227 KB per block, 50 MB L2, 1.98 GHz boost) and datasheet (80 GB HBM3, 3.35 TB/s).
H100_SXM_80GB = Gpu("NVIDIA H100 80GB HBM3", (9, 0), sm_count=132, fp32_cores_per_sm=128, boost_clock_ghz=1.98,
                    memory_bytes=84_942_979_072, memory_clock_mhz=2619, memory_bus_bits=5120,
                    l2_cache_bytes=50 * 2**20, shared_memory_per_sm=228 * 1024,
                    shared_memory_per_block_optin=227 * 1024)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class DeviceKind:
    """What `--device-kind` names: how to make compile-only devices of it, its memory and its peak speed."""

    name: str
    platform: str  # "cuda", "tpu" or "cpu"
    memory_bytes: int  # per device
    # The share of memory a run may fill. GPU: what scripts/train.sbatch gives jax (XLA_PYTHON_CLIENT_MEM_FRACTION
    # 0.90; the rest is CUDA, cuDNN and NCCL). TPU: all but runtime reservations.
    usable: float
    peak_tflops: float  # dense bf16 per device, from the datasheet
    per_host: int  # devices per host (GPUs of a node, TPU chips of a VM)
    gpu: Gpu | None = None
    tpu_generation: str = ""  # libtpu's topology prefix ("v4", "v5p", "v5e")
    tpu_dims: int = 3  # 3-D torus (v4, v5p) or 2-D (v5e)
    chip_config: str = "megacore"  # megacore: one device per chip of two TensorCores

    @property
    def budget(self) -> float:
        return self.memory_bytes * self.usable


KINDS = {
    kind.name: kind
    for kind in (
        DeviceKind("a100-80g", "cuda", A100_SXM_80GB.memory_bytes, 0.90, 312.0, 8, gpu=A100_SXM_80GB),
        DeviceKind("h100-80g", "cuda", H100_SXM_80GB.memory_bytes, 0.90, 989.0, 8, gpu=H100_SXM_80GB),
        # Cloud TPU system architecture pages: HBM per chip and bf16 peak per chip.
        DeviceKind("tpu-v4", "tpu", 32 * GIB, 0.95, 275.0, 4, tpu_generation="v4"),
        DeviceKind("tpu-v5p", "tpu", 95 * GIB, 0.95, 459.0, 4, tpu_generation="v5p"),
        DeviceKind("tpu-v5e", "tpu", 16 * GIB, 0.95, 197.0, 4, tpu_generation="v5e", tpu_dims=2, chip_config="default"),
        # The host's memory shared by all of its fake devices (set per call by `cpu_kind`).
        DeviceKind("cpu", "cpu", 0, 0.90, 0.0, 0),
    )
}


def cpu_kind(devices: int) -> DeviceKind:
    """This host as `devices` CPU devices: each gets an equal share of its physical memory."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return dataclasses.replace(KINDS["cpu"], memory_bytes=memory // devices, per_host=devices)


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


# The name in a running device's `device_kind` ("NVIDIA A100-SXM4-80GB") -> its dense bf16 peak, for MFU.
# The H200 is an H100 with more memory: the same peak.
RUNNING_PEAK_TFLOPS = {
    "A100": KINDS["a100-80g"].peak_tflops,
    "H100": KINDS["h100-80g"].peak_tflops,
    "H200": KINDS["h100-80g"].peak_tflops,
}


def peak_flops(kind: DeviceKind, override_tflops: float = 0.0) -> float:
    """Dense bf16 FLOP/s of one device (`peak_tflops` in the config wins)."""
    return (override_tflops or kind.peak_tflops) * 1e12


def describe(kind: DeviceKind, devices: int) -> str:
    """'160 x a100-80g (NVIDIA A100-SXM4-80GB, 20 hosts x 8)'."""
    what = kind.gpu.description if kind.gpu else kind.tpu_generation.upper() or "CPU"
    if kind.platform == "tpu":
        what = f"TPU {tpu_topology(kind, devices)[0]}"
    n_hosts = hosts(kind, devices)
    return f"{devices} x {kind.name} ({what}, {n_hosts} host{'s' * (n_hosts > 1)} x {math.ceil(devices / n_hosts)})"
