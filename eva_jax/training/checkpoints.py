"""Orbax checkpoints of train states: keep-N latest for resuming, plus a separate `best/` by a metric.

Layout under `directory`:
  <step>/state      the pytree (sharded arrays are written by every host, each its own slice)
  <step>/meta       a small JSON dict (data-iterator state, epoch, ...), optional
  best/<step>/...   the best checkpoint by `best_metric` (kept apart so keep-N never deletes it)

A save is atomic (orbax writes to a temporary directory and renames), so an interrupted save never
corrupts the last good checkpoint; `restore()` reads the newest finalized step. A state holding NaN or
inf is never written: `save` raises FloatingPointError naming the step and the leaves, and the last good
checkpoint stays the newest.
"""

from __future__ import annotations

import functools
import math
import pathlib
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp


@jax.jit
def _finite_leaves(tree):
  """Per floating leaf: all finite (one program per state structure; a tiny fetch of bools)."""
  return jax.tree.map(lambda x: jax.numpy.isfinite(x).all(), tree)


def check_finite(state: Any, step: int, what: str = "checkpoint") -> None:
  """FloatingPointError naming `step` and the first non-finite leaves of `state`; nothing else happens."""
  import numpy as np
  leaves = [(p, x) for p, x in jax.tree_util.tree_leaves_with_path(state)
            if hasattr(x, "dtype") and np.issubdtype(np.dtype(x.dtype), np.inexact)]
  if not leaves:
    return
  ok = jax.device_get(_finite_leaves([x for _, x in leaves]))
  bad = [jax.tree_util.keystr(p) for (p, _), good in zip(leaves, ok) if not bool(good)]
  if bad:
    raise FloatingPointError(f"{what} at step {step} not written: non-finite values in {bad[:5]}"
                             f"{' ...' if len(bad) > 5 else ''} ({len(bad)} leaves); the last good checkpoint "
                             "is kept")


def _abstract(tree):
  """Arrays -> ShapeDtypeStruct with their sharding, so restore lands on the same devices."""
  def one(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x
  return jax.tree.map(one, tree)


@functools.cache
def _whole_replica_saves_on_cpu() -> None:
  """On CPU, each replicated array is written whole by its first replica (orbax's choice on GPU too).

  Orbax's default splits a replicated array's write across its replicas, slicing it with one compiled
  program per array shape: on CPU devices (the demo, tests, 8 fake devices) those compiles cost seconds
  per first save (a 30-step toy VAE run: 160 slice programs, 12 s of a 65 s run) and the parallel
  writes gain nothing. TPU keeps orbax's default. Same files either way; restores are unaffected."""
  if jax.default_backend() == "cpu":
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


class Checkpointer:
  """`ckpt.save(step, state, metrics)` / `ckpt.restore(target=abstract_state)`."""

  def __init__(self, directory: str | pathlib.Path, max_to_keep: int = 3, best_metric: str | None = None,
               best_mode: str = "max", async_save: bool = True):
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    _whole_replica_saves_on_cpu()
    self.directory = pathlib.Path(directory).absolute()
    self.best_metric, self.best_mode = best_metric, best_mode
    opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                        enable_async_checkpointing=async_save)
    self._latest = ocp.CheckpointManager(self.directory, options=opts, item_names=("state", "meta"))
    self._best = None
    if best_metric:
      best_opts = ocp.CheckpointManagerOptions(
          max_to_keep=1, create=True, enable_async_checkpointing=async_save,
          best_fn=lambda m: m[best_metric], best_mode=best_mode)
      self._best = ocp.CheckpointManager(self.directory / "best", options=best_opts, item_names=("state", "meta"))

  # MARK: save
  def save(self, step: int, state: Any, metrics: Mapping[str, float] | None = None,
           meta: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    """Saves `state` at `step`; also to `best/` when `metrics[best_metric]` improves. Returns True if saved.
    A state with non-finite values raises FloatingPointError instead (check_finite)."""
    check_finite(state, step, f"checkpoint {self.directory}")
    args = {"state": ocp.args.StandardSave(state)}
    if meta is not None:
      args["meta"] = ocp.args.JsonSave(dict(meta))
    saved = self._latest.save(step, args=ocp.args.Composite(**args), force=force)
    if self._best is not None and metrics is not None and self.best_metric in metrics:
      value = float(metrics[self.best_metric])
      if math.isfinite(value) and self._improves(value):
        self._best.save(step, args=ocp.args.Composite(**args), metrics={self.best_metric: value}, force=True)
    return saved

  def _improves(self, value: float) -> bool:
    best = self.best_value()
    if best is None:
      return True
    return value > best if self.best_mode == "max" else value < best

  # MARK: query
  def latest_step(self) -> int | None:
    return self._latest.latest_step()

  def best_step(self) -> int | None:
    return None if self._best is None else self._best.best_step()

  def best_value(self) -> float | None:
    if self._best is None:
      return None
    self._best.wait_until_finished()
    step = self._best.best_step()
    if step is None:
      return None
    for info in self._best._checkpoints:  # orbax keeps the metrics it was given per step
      if info.step == step and info.metrics:
        return float(info.metrics[self.best_metric])
    return None

  def all_steps(self) -> list[int]:
    return list(self._latest.all_steps())

  # MARK: restore
  def restore(self, step: int | None = None, target: Any = None, best: bool = False):
    """Returns (state, meta). `target`: a pytree of arrays or ShapeDtypeStructs (with shardings) to restore
    onto, e.g. `jax.eval_shape(init)` with `state_shardings`; without it arrays come back as saved."""
    mngr = self._best if best else self._latest
    if mngr is None:
      raise ValueError(f"{self.directory}: no best checkpoints are kept (best_metric not set)")
    mngr.wait_until_finished()
    if step is None:
      step = mngr.best_step() if best else mngr.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint found in {mngr.directory}")
    state_args = ocp.args.StandardRestore(_abstract(target)) if target is not None else ocp.args.StandardRestore()
    args = {"state": state_args}
    # JSON items report no metadata; their presence is told by the item directory.
    has_meta = (pathlib.Path(mngr.directory) / str(step) / "meta").exists()
    if has_meta:
      args["meta"] = ocp.args.JsonRestore()
    try:
      out = mngr.restore(step, args=ocp.args.Composite(**args))
    except (ValueError, KeyError, TypeError, OSError) as e:  # orbax's tree diff is a page of pytree repr
      detail = " ".join(str(e).split())
      raise ValueError(f"cannot restore {mngr.directory}/{step} ({type(e).__name__}: {detail[:240]}"
                       f"{' ...' if len(detail) > 240 else ''}): the checkpoint is damaged, or it was written by "
                       "another trainer or model config (see the run's config.json); resume with that config, or "
                       "use a new --workdir") from None
    return out["state"], (dict(out["meta"]) if has_meta and out["meta"] is not None else {})

  def wait(self):
    self._latest.wait_until_finished()
    if self._best is not None:
      self._best.wait_until_finished()

  def close(self):
    self.wait()
    self._latest.close()
    if self._best is not None:
      self._best.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
