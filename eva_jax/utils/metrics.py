"""Metrics to JSON lines (`metrics.jsonl`) and TensorBoard event files, written by process 0 only."""

from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Mapping

import jax
import numpy as np


def _scalar(v) -> float:
  v = np.asarray(jax.device_get(v))
  if v.size != 1:
    raise ValueError(f"metric values must be scalars, got shape {v.shape}")
  return float(v.reshape(()))


class MetricWriter:
  """`writer.write(step, {'loss': 0.1})` appends one JSON line and a TensorBoard scalar per key."""

  def __init__(self, run_dir: str | pathlib.Path, tensorboard: bool = True):
    self.run_dir = pathlib.Path(run_dir)
    self.enabled = jax.process_index() == 0
    self._tb = None
    if not self.enabled:
      return
    self.run_dir.mkdir(parents=True, exist_ok=True)
    self._file = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
    if tensorboard:
      from tensorboardX import SummaryWriter  # lazy: only a writer needs it
      self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, object]) -> dict:
    values = {k: _scalar(v) for k, v in metrics.items()}
    if self.enabled:
      record = {"step": int(step), "time": time.time(), **{k: (v if math.isfinite(v) else str(v)) for k, v in values.items()}}
      self._file.write(json.dumps(record) + "\n")
      if self._tb is not None:
        for k, v in values.items():
          self._tb.add_scalar(k, v, int(step))
    return values

  def flush(self):
    if self.enabled:
      self._file.flush()
      if self._tb is not None:
        self._tb.flush()

  def close(self):
    if self.enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_metrics(path: str | pathlib.Path) -> list[dict]:
  """Reads a metrics.jsonl file back (for reports and tests)."""
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class StepClock:
  """A training loop's throughput: step time and host data time per step, the compiling first step left out.

    clock = StepClock()
    for step in ...:
      with clock.data():
        batch = next(it)
      metrics = train_step(...)
      clock.stepped(metrics)
      values.update(clock.rates(batch_size, "clips"))  # {} until a step after the first has run
  """

  def __init__(self):
    self._t0, self._steps, self._data_s = None, 0, 0.0

  def data(self):
    clock = self

    class _Timer:
      def __enter__(self):
        self.tic = time.perf_counter()

      def __exit__(self, *exc):
        clock._data_s += time.perf_counter() - self.tic
    return _Timer()

  def stepped(self, metrics) -> None:
    """After each train step; the first waits for its result (compilation) and starts the clock."""
    if self._t0 is None:
      jax.block_until_ready(metrics)
      self._t0, self._data_s = time.perf_counter(), 0.0
    else:
      self._steps += 1

  def rates(self, batch_size: int, unit: str) -> dict[str, float]:
    if not self._steps:
      return {}
    dt = (time.perf_counter() - self._t0) / self._steps
    return {"step_time_s": dt, f"{unit}_per_s": batch_size / dt, "data_time_s": self._data_s / self._steps}


def fetch_finite(metrics: Mapping, step: int, since: int, what: str) -> dict[str, float]:
  """A train step's device metrics as floats; FloatingPointError naming the non-finite ones (and the steps
  since the last check, where they went bad) instead of writing them and training on."""
  values = {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}
  bad = {k: v for k, v in values.items() if not math.isfinite(v)}
  if bad:
    raise FloatingPointError(f"{what}: non-finite {bad} between steps {since} and {step}")
  return values
