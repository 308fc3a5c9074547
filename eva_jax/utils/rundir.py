"""Run directories `outputs/<date>/<time>/`, as the original EVA (hydra) lays them out."""

from __future__ import annotations

import datetime
import json
import logging
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


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix.rstrip("."): tree}
  out: dict[str, Any] = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}."))
  return out


MAX_SECTIONS_CHANGED = 2


def check_resume(run_dir: str | pathlib.Path, config, fields: tuple[str, ...]) -> None:
  """An existing run directory (config.json + numbered checkpoints) resumes only with a config whose
  `fields` (those that shape the checkpoint: the model's preset, depth, widths) equal the ones it was started
  with, and only from the same trainer. Checked before anything is built or written, so a mismatch fails in
  a second naming the field, not as orbax's tree diff after compiling, and leaves the run as it was."""
  from eva_jax.utils.checks import ConfigError
  run_dir = pathlib.Path(run_dir)
  saved_path, ckpts = run_dir / "config.json", run_dir / "checkpoints"
  if not saved_path.is_file() or not (ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())):
    return  # a new run, or one that never checkpointed: nothing to resume
  try:
    saved = json.loads(saved_path.read_text(encoding="utf-8"))
  except (ValueError, OSError) as e:
    raise ValueError(f"{saved_path}: not a readable run config ({e}); this run directory cannot be resumed: "
                     "pick a new --workdir") from None
  new = _jsonable(config)
  theirs = set(saved) if isinstance(saved, dict) else set()
  # Trainers' configs differ in four or more sections (sft/grpo: 8, idm/vae: 5); a run of this trainer made
  # by an older or newer eva_jax may differ in one or two (a section added or retired) and still resumes.
  if len(theirs ^ set(new)) > MAX_SECTIONS_CHANGED:
    raise ValueError(f"--workdir {run_dir} holds a run of another trainer (its config.json has the sections "
                     f"{sorted(theirs - set(new))} and lacks {sorted(set(new) - theirs)} of this one's): resume it "
                     "with the trainer that wrote it, or pick a new --workdir")
  before, now = _flat(saved), _flat(new)
  for field in fields:
    for key in sorted(k for k in set(before) | set(now) if k == field or k.startswith(field + ".")):
      if before.get(key) != now.get(key):
        raise ConfigError(f"config.{key}={now.get(key)!r}: expected {before.get(key)!r}, the value the run in "
                          f"{run_dir} was started with (its checkpoints fit only that model; see {saved_path}): "
                          "pass that value to resume it, or a new --workdir to start another run")


def log_resume(checkpoints: str | pathlib.Path, step: int, total: int, field: str = "train.num_steps") -> None:
  """Logs a resume; warns when the run already reached `total` (config.`field`), where nothing is trained."""
  logging.info("resumed from %s at step %d", checkpoints, step)
  if step >= total:
    logging.warning("the run in %s is already at step %d and config.%s=%d: nothing left to train (raise "
                    "config.%s to continue it)", checkpoints, step, field, total, field)
