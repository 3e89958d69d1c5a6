"""GPU runtime settings: applied when a GPU is found (before jax starts), the user's XLA_FLAGS left alone,
every flag known to this XLA."""

import os
import pathlib
import subprocess
import sys

import pytest

from mellama_jax import hardware
from mellama_jax.training import gpu_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_flags_are_set_when_a_gpu_is_found(monkeypatch):
    monkeypatch.setattr(gpu_flags, "gpu_present", lambda env: True)
    env = {"PATH": "/usr/bin"}
    note = gpu_flags.apply(env)
    assert env["XLA_FLAGS"] == gpu_flags.xla_flags() and note.startswith("NVIDIA GPUs: XLA_FLAGS=--xla_gpu_")
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in env["XLA_FLAGS"].split()
    assert "--xla_gpu_all_gather_combine_threshold_bytes=268435456" in env["XLA_FLAGS"].split()
    assert len(env["XLA_FLAGS"].split()) == len(gpu_flags.FLAGS) == 6
    assert "pipelined" not in env["XLA_FLAGS"]  # memory for overlap: the user's choice (gpu_flags.PIPELINED)
    assert len(gpu_flags.xla_flags(pipelined=True).split()) == 10


@pytest.mark.parametrize("users", ["--xla_dump_to=/tmp/hlo", ""])
def test_the_users_xla_flags_are_left_alone(monkeypatch, users):
    monkeypatch.setattr(gpu_flags, "gpu_present", lambda env: True)
    env = {"XLA_FLAGS": users}
    assert "used as it is" in gpu_flags.apply(env)
    assert env == {"XLA_FLAGS": users}  # an empty XLA_FLAGS is a choice too: no flags


def test_nothing_is_set_without_a_gpu(monkeypatch):
    monkeypatch.setattr(gpu_flags, "gpu_present", lambda env: False)
    env = {}
    assert gpu_flags.apply(env) is None and env == {}


@pytest.mark.parametrize(
    ("env", "plugin", "nodes", "expected"),
    [
        ({"JAX_PLATFORMS": "cpu"}, True, 8, False),  # the user's choice wins
        ({"JAX_PLATFORMS": "cuda"}, False, 0, True),
        ({"JAX_PLATFORMS": "GPU,cpu"}, False, 0, True),
        ({}, True, 8, True),
        ({}, True, 0, False),  # the plugin, but no device (a login node with jax[cuda12] installed)
        ({}, False, 8, False),  # a GPU that jax cannot use without the plugin
        ({"CUDA_VISIBLE_DEVICES": ""}, True, 8, False),
        ({"CUDA_VISIBLE_DEVICES": "-1"}, True, 8, False),
        ({"CUDA_VISIBLE_DEVICES": "GPU-5f3c"}, True, 0, True),  # a container that shows no /dev nodes
        ({"JAX_PLATFORMS": ""}, True, 1, True),
    ],
)
def test_a_gpu_is_found_before_jax_starts(monkeypatch, env, plugin, nodes, expected):
    monkeypatch.setattr(gpu_flags, "_cuda_plugin_installed", lambda: plugin)
    monkeypatch.setattr(hardware, "_device_nodes", lambda: [f"/dev/nvidia{i}" for i in range(nodes)])
    assert gpu_flags.gpu_present(env) is expected


def test_gpu_ids(monkeypatch):
    monkeypatch.setattr(hardware, "_device_nodes", lambda: ["/dev/nvidia0", "/dev/nvidia1", "/dev/nvidia2"])
    assert hardware.gpu_ids({}) == ["0", "1", "2"]
    assert hardware.gpu_ids({"CUDA_VISIBLE_DEVICES": "4, 5"}) == ["4", "5"]
    assert hardware.gpu_ids({"CUDA_VISIBLE_DEVICES": "0,1,-1,2"}) == ["0", "1"]  # CUDA stops at -1


def python(code: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "-c", code], env={**clean, "JAX_PLATFORMS": "cpu", **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_every_flag_is_known_to_this_xla():
    # XLA parses every flag in XLA_FLAGS when the first backend starts, CPU included, and aborts on one it does
    # not know; so a CPU run proves the names (the GPU compiler alone reads the values)
    run = "import jax, jax.numpy as jnp; print(jax.jit(lambda x: x * 2)(jnp.ones(3)).sum())"
    ours = python(run, XLA_FLAGS=gpu_flags.xla_flags(pipelined=True))
    assert ours.returncode == 0 and ours.stdout.strip() == "6.0", ours.stderr[-2000:]
    unknown = python(run, XLA_FLAGS=gpu_flags.xla_flags() + " --xla_gpu_enable_latency_hiding_schedule=true")
    assert unknown.returncode != 0 and "Unknown flag in XLA_FLAGS: --xla_gpu_enable_latency_hiding_schedule" in (
        unknown.stderr
    )  # the check above would catch a misspelt name


TRAIN = """
import sys, jax
from mellama_jax import cli
from mellama_jax.training import gpu_flags
from mellama_jax.training import loop
gpu_flags.gpu_present = lambda env: True
gpu_flags.FLAGS["xla_force_host_platform_device_count"] = "3"  # visible only if read when jax starts
loop.train = lambda cfg: print("devices", jax.device_count()) or []
sys.exit(cli.main(["train", "--config", "configs/tiny.yaml"]))
"""


def test_mellama_train_sets_the_flags_before_jax_starts():
    ours = python(TRAIN)
    assert ours.returncode == 0, ours.stderr[-2000:]
    assert ours.stdout.strip() == "devices 3"
    assert "INFO: NVIDIA GPUs: XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true" in ours.stderr
    users = python(TRAIN, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert users.returncode == 0 and users.stdout.strip() == "devices 2", users.stderr[-2000:]
    assert "XLA_FLAGS is set: used as it is" in users.stderr


def test_the_flags_print_for_extending_them():
    done = subprocess.run(
        [sys.executable, "-m", "mellama_jax.training.gpu_flags"], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == gpu_flags.xla_flags()
