"""Test setup: 8 fake CPU devices (set before jax initialises), one XLA compilation cache for the run, and the
shared artifacts folder."""

import os
import pathlib
import shutil
import tempfile

# With the cuda/tpu extras installed, jax would probe for GPUs and TPUs (and take libtpu's lock file).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
FAKE_DEVICES = "--xla_force_host_platform_device_count=8"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAKE_DEVICES).strip()

import pytest  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"


_OWN_CACHE: list[str] = []


def pytest_configure(config):
    """Most tests compile the same tiny programs (a train step, a decode loop), many in subprocesses: jax's
    persistent compilation cache, one folder for the run's workers and every process they start, compiles each
    once (half the suite's time). Entries are keyed by the program, the devices and the flags, so a test runs
    what it would have compiled; the size limit turns on the cache's file lock, so no process reads an entry
    while another writes it. A JAX_COMPILATION_CACHE_DIR set by the user is used and kept."""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    _OWN_CACHE.append(tempfile.mkdtemp(prefix="mellama-tests-xla-cache-"))
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE[0]
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(4 << 30)


def pytest_unconfigure(config):
    for folder in _OWN_CACHE:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """`../shared/data`, or a skip saying why when the checkout has no shared folder beside it."""
    data = SHARED / "data"
    if not data.is_dir():
        pytest.skip(f"shared test artifacts not found at {data}")
    return data
