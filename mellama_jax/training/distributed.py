"""Multi-process start-up: one process per host (or per GPU), joined through `jax.distributed`.

Where the coordinator comes from, first match wins:
1. `distributed.coordinator` in the config, or env `JAX_COORDINATOR_ADDRESS`, with the process count and
   id from the config or env `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID` (or from the launcher, if any);
2. a SLURM (`srun`) or OpenMPI (`mpirun`) launch of more than one task: jax reads everything from it;
3. otherwise this is a single-process run and nothing is initialised.
Must run before anything touches a jax device.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from mellama_jax.config import DistributedConfig
from mellama_jax.errors import UserError

log = logging.getLogger(__name__)

SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def launcher() -> str | None:
    """'slurm' or 'openmpi' when this process is one of several tasks they started, else None."""
    env = os.environ
    if all(v in env for v in SLURM_VARS) and int(env["SLURM_NTASKS"]) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "openmpi"
    return None


def _setting(value: int, unset: int, env_name: str) -> int | None:
    if value != unset:
        return value
    text = os.environ.get(env_name)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise UserError(f"env {env_name}: expected an integer, got {text!r}") from None


def initialize(cfg: DistributedConfig) -> None:
    """Joins the processes of a multi-process run (idempotent); a single-process run is left as it is."""
    if jax.distributed.is_initialized():
        return
    coordinator = cfg.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    count = _setting(cfg.num_processes, 0, "JAX_NUM_PROCESSES")
    index = _setting(cfg.process_id, -1, "JAX_PROCESS_ID")
    source = launcher()
    if not coordinator and source is None:
        if (count or 1) > 1:
            raise UserError(f"distributed: num_processes={count} needs a coordinator (host:port of process 0)")
        return
    if coordinator and source is None:
        if count is None or index is None:
            raise UserError(f"distributed: coordinator {coordinator} needs num_processes and process_id")
        if count < 1 or not 0 <= index < count:
            raise UserError(f"distributed: need 0 <= process_id < num_processes, got {index} and {count}")
    # CPU collectives across processes need gloo; GPU (NCCL) and TPU ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator or None, count, index)
    if jax.process_index() == 0:
        log.info("%d processes joined (%s)", jax.process_count(), coordinator or source)


def anywhere(*flags: bool) -> tuple[bool, ...]:
    """Whether each flag holds on any process, in one exchange: processes that decide together never diverge."""
    if jax.process_count() == 1:
        return flags
    return tuple(bool(f) for f in multihost_utils.process_allgather(np.asarray(flags, np.int32)).any(axis=0))


def together(action: Callable[[], object]) -> None:
    """Runs `action` here; if it fails on any process, every process stops (else the others would wait forever
    in their next exchange)."""
    error = None
    try:
        action()
    except (UserError, OSError) as e:
        error = e
    if anywhere(error is not None)[0]:
        raise error or UserError("another process stopped the run (its error says why)")
