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


def time_fn(fn: Callable, *args, warmup: int = 1, iters: int = 5, pipelined: bool = False, **kwargs) -> dict:
  """Median wall time of `fn(*args)` over `iters` synchronised calls, after `warmup` calls (compilation excluded).

  pipelined: also time `iters` calls queued back to back with one synchronisation at the end
  ('pipelined_s', per call): the steady-state cost of a training or sampling loop, where dispatching the
  next call overlaps the device work of the previous one. At most two outputs are alive at a time.
  """
  for _ in range(warmup):
    block(fn(*args, **kwargs))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    block(fn(*args, **kwargs))
    times.append(time.perf_counter() - t0)
  result = {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}
  if pipelined:
    t0 = time.perf_counter()
    out = None
    for _ in range(iters):
      out = fn(*args, **kwargs)
    block(out)
    result["pipelined_s"] = (time.perf_counter() - t0) / iters
  return result


def time_looped(step: Callable, carry, *consts, calls: int = 10, iters: int = 3) -> dict:
  """Per-call time of `carry = step(carry, *consts)` run `calls` times inside one jitted `lax.fori_loop`:
  the device time of a call with no per-call dispatch, launch gaps or host synchronisation (the way a
  layer runs inside the model's scan). `consts` (the weights) are arguments, not baked-in constants; each
  call feeds the next through `carry`, so XLA can neither hoist nor drop any of them. Compile excluded.
  The consts ride in the loop carry, unchanged (XLA aliases them), rather than being closed over: an NNX
  module merged inside the body must see its parameters at the body's trace level (see sampler.sample_latents).
  """
  def run(carry, *consts):
    body = lambda i, c: (step(c[0], *c[1]), c[1])
    return jax.lax.fori_loop(0, calls, body, (carry, consts))[0]
  t0 = time.perf_counter()
  compiled = jax.jit(run).lower(carry, *consts).compile()
  block(compiled(carry, *consts))
  compile_s = time.perf_counter() - t0
  timing = time_fn(compiled, carry, *consts, warmup=0, iters=iters)
  return {"calls": calls, "median_s": timing["median_s"] / calls, "min_s": timing["min_s"] / calls,
          "loop_times_s": timing["times_s"], "compile_s": compile_s}


def time_torch(fn: Callable, *args, warmup: int = 1, iters: int = 5, grad: bool = False,
               pipelined: bool = False) -> dict:
  """Same for a PyTorch callable (synchronises CUDA when present); under no_grad unless `grad`."""
  import contextlib

  import torch
  sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
  with contextlib.nullcontext() if grad else torch.no_grad():
    for _ in range(warmup):
      fn(*args)
    sync()
    times = []
    for _ in range(iters):
      t0 = time.perf_counter()
      fn(*args)
      sync()
      times.append(time.perf_counter() - t0)
    result = {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}
    if pipelined:
      t0 = time.perf_counter()
      for _ in range(iters):
        fn(*args)
      sync()
      result["pipelined_s"] = (time.perf_counter() - t0) / iters
  return result


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


def profile_kernels(fn: Callable, *args, iters: int = 2, top: int = 30, trace_dir: str | None = None) -> dict:
  """Device-kernel time of `fn(*args)` from a jax.profiler trace, summed by kernel name.

  Returns {'per_call_ms': total kernel time per call, 'kernels': [(name, ms per call, count per call)],
  top entries first}. On CPU there are no device planes and 'kernels' is empty. `fn` must be warm.
  """
  import collections
  import glob
  import tempfile

  from jax.profiler import ProfileData
  trace_dir = trace_dir or tempfile.mkdtemp(prefix="eva_jax_profile_")
  block(fn(*args))
  jax.profiler.start_trace(trace_dir)
  try:
    for _ in range(iters):
      block(fn(*args))
  finally:
    jax.profiler.stop_trace()
  files = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))
  if not files:
    return {"per_call_ms": None, "kernels": [], "note": f"no trace written under {trace_dir}"}
  # Device planes hold one line per stream (the kernels) plus aggregate lines; 'XLA Ops' names the HLO
  # instruction of each kernel, which maps back to the optimised HLO text.
  kernel_ns, kernel_n = collections.Counter(), collections.Counter()
  op_ns = collections.Counter()
  aggregate = ("XLA Modules", "Steps", "Framework Ops", "Framework Name Scope", "Source code")
  for plane in ProfileData.from_file(files[-1]).planes:
    if not plane.name.startswith(("/device:GPU", "/device:TPU")):
      continue
    for line in plane.lines:
      if line.name in aggregate:
        continue
      for event in line.events:
        if line.name == "XLA Ops":
          op_ns[event.name] += event.duration_ns
        else:
          kernel_ns[event.name] += event.duration_ns
          kernel_n[event.name] += 1
  per_call = lambda ns: ns / iters / 1e6
  return {"per_call_ms": per_call(sum(kernel_ns.values())),
          "kernels": [(k, per_call(ns), kernel_n[k] / iters) for k, ns in kernel_ns.most_common(top)],
          "ops": [(k, per_call(ns)) for k, ns in op_ns.most_common(top)], "trace_dir": trace_dir}
