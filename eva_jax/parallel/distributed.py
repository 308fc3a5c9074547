"""Multi-host start-up: every entry point calls `initialize()` before touching devices."""

from __future__ import annotations

import os

import jax
from absl import logging

_MARKERS = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def initialize(force: bool = False) -> None:
  """Calls `jax.distributed.initialize()` when launched as one of several processes.

  Single-process runs (a laptop, one GPU, CI) skip it. A SLURM allocation with one task, or
  EVA_JAX_NO_DISTRIBUTED=1, also skips it. JAX reads coordinator/process ids from the environment
  (SLURM, TPU pods, or JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID).
  """
  if os.environ.get("EVA_JAX_NO_DISTRIBUTED") == "1":
    return
  if not force:
    if not any(m in os.environ for m in _MARKERS):
      return
    if "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
      return
  if "JAX_COORDINATOR_ADDRESS" in os.environ and "JAX_NUM_PROCESSES" in os.environ:
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]))
  else:
    jax.distributed.initialize()
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
