"""A host without GPU or TPU, with the `cuda` and `tpu` extras installed (CI installs them): a mellama command
prints no traceback and no plugin warning, because jax is told to use the CPU before it starts. A GPU or TPU
host is left to jax, and a `JAX_PLATFORMS` of the user's own always wins."""

import os
import subprocess
import sys

import pytest
from conftest import FAKE_DEVICES
from test_convert_cli import CFG, write_tokenizer
from test_hf_parity import reference_model

from mellama_jax import cli, hardware

# What the CUDA plugin and libtpu print when jax starts them on a host without their devices.
NOISE = ("Traceback", "cuDNN", "CUDA", "cuda", "TPU", "libtpu", "plugin")
CPU_NOTE = "INFO: no GPU or TPU on this host: running on the CPU (set JAX_PLATFORMS to choose)"


def mellama(*args, env_extra=None) -> subprocess.CompletedProcess:
    """The command in a fresh process, run as from a user's shell: without the JAX_PLATFORMS and the 8 fake CPU
    devices that conftest sets for the tests themselves."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"} | (env_extra or {})
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(FAKE_DEVICES, "").strip()
    argv = [sys.executable, "-m", "mellama_jax.cli", *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800)


@pytest.fixture
def cpu_host():
    if hardware.accelerators_visible():
        pytest.skip("this host has a GPU or TPU: jax is left to use it")


def quiet(done: subprocess.CompletedProcess, command: str) -> list[str]:
    """Its stderr lines, once shown to hold no plugin noise and our note that the CPU is used."""
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stderr.splitlines()
    assert f"mellama {command}: {CPU_NOTE}" in lines
    assert [line for line in lines if any(word in line for word in NOISE) and not line.endswith(CPU_NOTE)] == []
    return lines


def test_train_and_convert_print_no_traceback_on_a_cpu_host(tmp_path, cpu_host):
    run = tmp_path / "run"
    quiet(mellama("train", "--config", "configs/tiny.yaml", "steps=4", "checkpoint_every=2", f"run_dir={run}"), "train")
    assert (run / "checkpoints" / "4").is_dir()
    reference_model(CFG).save_pretrained(tmp_path / "hf")
    write_tokenizer(tmp_path / "hf")
    quiet(mellama("convert", "hf-to-jax", tmp_path / "hf", tmp_path / "ours"), "convert")
    assert (tmp_path / "ours" / "params").is_dir()


def test_the_users_jax_platforms_wins(tmp_path, cpu_host):
    done = mellama("train", "--config", "configs/tiny.yaml", "--print-config", env_extra={"JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0 and done.stderr == ""  # nothing decided for the user, nothing said
    assert "preset" not in done.stdout and "vocab_size: 512" in done.stdout


def test_the_platform_is_left_to_jax_where_a_gpu_or_tpu_is(monkeypatch):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    logger = cli.logging.getLogger("test")
    monkeypatch.setattr(hardware, "accelerators_visible", lambda: True)
    cli._choose_platform("train", logger)
    assert "JAX_PLATFORMS" not in os.environ
    monkeypatch.setattr(hardware, "accelerators_visible", lambda: False)
    cli._choose_platform("train", logger)
    assert os.environ["JAX_PLATFORMS"] == "cpu"
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")  # the user's, even where no GPU is seen
    cli._choose_platform("train", logger)
    assert os.environ["JAX_PLATFORMS"] == "cuda"


def fake_pci(root, devices):
    for i, (vendor, device) in enumerate(devices):
        folder = root / f"0000:00:{i:02x}.0"
        folder.mkdir(parents=True)
        (folder / "vendor").write_text(vendor + "\n")
        (folder / "device").write_text(device + "\n")


@pytest.mark.parametrize(
    ("env", "gpu_nodes", "ctl", "pci", "expected"),
    [
        ({}, 0, False, [("0x8086", "0x1237")], False),  # a CPU host
        ({}, 8, True, [], True),  # an 8-GPU node
        ({}, 0, True, [], True),  # a container that shows only /dev/nvidiactl
        ({"CUDA_VISIBLE_DEVICES": ""}, 8, True, [], False),  # GPUs hidden from this process
        ({"CUDA_VISIBLE_DEVICES": "-1"}, 8, True, [], False),
        ({"CUDA_VISIBLE_DEVICES": "GPU-5f3c"}, 0, False, [], True),
        ({}, 0, False, [("0x1ae0", "0x0042")], False),  # Google's network card on a GCE VM is no TPU
        ({}, 0, False, [("0x1ae0", "0x0042"), ("0x1ae0", "0x005e")], True),  # a TPU v4 chip
    ],
)
def test_accelerators_are_found_as_jax_finds_them(tmp_path, monkeypatch, env, gpu_nodes, ctl, pci, expected):
    monkeypatch.setattr(hardware, "_device_nodes", lambda: [f"/dev/nvidia{i}" for i in range(gpu_nodes)])
    monkeypatch.setattr(hardware, "NVIDIA_NODES", (str(tmp_path / "nvidiactl"),))
    if ctl:
        (tmp_path / "nvidiactl").touch()
    fake_pci(tmp_path / "pci", pci)
    monkeypatch.setattr(hardware, "PCI_DEVICES", tmp_path / "pci")
    assert hardware.accelerators_visible(env) is expected
