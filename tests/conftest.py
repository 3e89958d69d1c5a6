"""Test setup: 8 fake CPU devices (set before jax initialises) and the shared artifacts folder."""

import os
import pathlib

# With the cuda/tpu extras installed, jax would probe for GPUs and TPUs (and take libtpu's lock file).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """`../shared/data`, or a skip saying why when the checkout has no shared folder beside it."""
    data = SHARED / "data"
    if not data.is_dir():
        pytest.skip(f"shared test artifacts not found at {data}")
    return data
