"""Run directories `outputs/<date>/<time>/`, as the original EVA (hydra) lays them out."""

from __future__ import annotations

import datetime
import json
import pathlib
from typing import Any


def make_run_dir(root: str | pathlib.Path = "outputs", now: datetime.datetime | None = None) -> pathlib.Path:
  """Creates and returns a fresh `<root>/<YYYY-MM-DD>/<HH-MM-SS>[-N]/` directory.

  On a multi-process run every process calls this and gets the same directory: process 0 creates it
  and broadcasts its path (otherwise each process would make its own, seconds apart).
  """
  import jax
  if jax.process_count() > 1:
    import numpy as np
    from jax.experimental import multihost_utils
    buf = np.zeros(4096, np.uint8)
    if jax.process_index() == 0:
      name = str(_new_run_dir(root, now)).encode()
      buf[:len(name)] = np.frombuffer(name, np.uint8)
    buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    path = pathlib.Path(bytes(buf).rstrip(b"\0").decode())
    path.mkdir(parents=True, exist_ok=True)  # hosts that do not share a file system
    return path
  return _new_run_dir(root, now)


def _new_run_dir(root, now) -> pathlib.Path:
  now = now or datetime.datetime.now()
  base = pathlib.Path(root) / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S")
  path, n = base, 1
  while True:
    try:
      path.mkdir(parents=True, exist_ok=False)
      break
    except FileExistsError:  # two runs started within the same second
      path = base.with_name(f"{base.name}-{n}")
      n += 1
  from eva_jax.utils import logs
  if logs.log_file() is None:  # an entry point's first run directory holds its log (no-op in a library)
    logs.set_log_dir(path)
  return path


def _jsonable(x: Any):
  if hasattr(x, "to_dict"):
    x = x.to_dict()
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (str, int, float, bool)) or x is None:
    return x
  if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
    return x.item()
  return str(x)


def save_config(run_dir: str | pathlib.Path, config) -> pathlib.Path:
  """Writes the resolved config as `config.json` (ConfigDict, dataclass-like or dict)."""
  from eva_jax.utils.files import atomic_path
  path = pathlib.Path(run_dir) / "config.json"
  with atomic_path(path) as tmp:
    tmp.write_text(json.dumps(_jsonable(config), indent=2, sort_keys=True))
  return path
