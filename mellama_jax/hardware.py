"""The devices we know, as their makers publish them: memory, dense bf16 peak, and for NVIDIA GPUs the facts
XLA's GPU compiler needs to compile for one it cannot see (`Gpu.target_config`). Training reads the running
device's peak for MFU; planning (`planning/`) compiles for these devices without having them. And which of
them this host has, found as jax's own start-up finds them, without starting jax: no jax here.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import os
import pathlib
from collections.abc import Mapping

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


# This host's accelerators, as jax looks for them when it starts (jax/_src/hardware_utils.py): NVIDIA device
# nodes (WSL2 has /dev/dxg instead), and TPU chips among the PCI devices (Google's vendor id, a TPU device id;
# Google's network cards share the vendor id).
NVIDIA_NODES = ("/dev/nvidiactl", "/dev/dxg")
PCI_DEVICES = pathlib.Path("/sys/bus/pci/devices")
GOOGLE_PCI_VENDOR = "0x1ae0"
TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")  # v3 ... TPU7x


def _device_nodes() -> list[str]:
    return glob.glob("/dev/nvidia[0-9]*")


def gpu_ids(env: Mapping[str, str] = os.environ) -> list[str]:
    """The CUDA ids (or UUIDs) of the NVIDIA GPUs a process started with `env` may use: `CUDA_VISIBLE_DEVICES`
    when set (CUDA stops at the first -1), else one per `/dev/nvidiaN`."""
    if "CUDA_VISIBLE_DEVICES" in env:
        ids = (d.strip() for d in env["CUDA_VISIBLE_DEVICES"].split(","))
        return [d for d in itertools.takewhile(lambda d: d != "-1", ids) if d]
    return [str(i) for i in range(len(_device_nodes()))]


def tpu_chips() -> int:
    """TPU chips attached to this host."""
    chips = 0
    for folder in PCI_DEVICES.glob("*") if PCI_DEVICES.is_dir() else ():
        try:
            chips += folder.joinpath("vendor").read_text().strip() == GOOGLE_PCI_VENDOR and (
                folder.joinpath("device").read_text().strip() in TPU_PCI_DEVICES
            )
        except OSError:  # a device that went away, or a file we may not read: not a TPU we could use
            continue
    return chips


def accelerators_visible(env: Mapping[str, str] = os.environ) -> bool:
    """Whether jax, started with `env`, may find a GPU or TPU here: GPUs that `CUDA_VISIBLE_DEVICES` names, or
    without it an NVIDIA device node; or a TPU chip."""
    nodes = "CUDA_VISIBLE_DEVICES" not in env and any(os.path.exists(node) for node in NVIDIA_NODES)
    return bool(gpu_ids(env)) or nodes or tpu_chips() > 0
