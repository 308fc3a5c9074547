"""Timing and memory helpers for scripts/bench.py (never used in asserts)."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from typing import Callable

import jax


def block(x):
  return jax.block_until_ready(x)


def time_fn(fn: Callable, *args, warmup: int = 1, iters: int = 5, **kwargs) -> dict:
  """Median wall time of `fn(*args)`, after `warmup` calls (compilation excluded)."""
  for _ in range(warmup):
    block(fn(*args, **kwargs))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    block(fn(*args, **kwargs))
    times.append(time.perf_counter() - t0)
  return {"median_s": statistics.median(times), "times_s": times}


def time_torch(fn: Callable, *args, warmup: int = 1, iters: int = 5) -> dict:
  """Same for a PyTorch callable (synchronises CUDA when present)."""
  import torch
  sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
  with torch.no_grad():
    for _ in range(warmup):
      fn(*args)
    sync()
    times = []
    for _ in range(iters):
      t0 = time.perf_counter()
      fn(*args)
      sync()
      times.append(time.perf_counter() - t0)
  return {"median_s": statistics.median(times), "times_s": times}


def peak_rss_mb() -> float:
  """Peak resident set size of this process in MB."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def device_peak_memory_mb(device=None) -> float | None:
  """Peak accelerator memory in MB where the backend reports it (GPU/TPU), else None."""
  device = device or jax.devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:
    return None
  if not stats:
    return None
  return stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0)) / 2**20
