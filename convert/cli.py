"""Command line converter: PyTorch weights -> an orbax checkpoint of eva_jax parameters.

  python -m convert --kind dit --src Wan2.1-I2V-14B-480P/ --out ckpt/dit --config i2v-14b --dtype bfloat16
  python -m convert --kind dit --src eva_i2v_14B.ckpt --out ckpt/eva_dit        # Lightning, 'model.' prefix
  python -m convert --kind vae --src Wan2.1_VAE.pth --out ckpt/vae
  python -m convert --kind dit --to-torch --src ckpt/dit --out dit.safetensors --layout diffusers

`--to-torch` goes the other way (convert/export.py): eva_jax DiT weights (a converted orbax directory, an SFT
run directory) -> one PyTorch safetensors file under the Wan (`--layout wan`, the default) or diffusers names.

Kinds dispatch lazily to convert.wan (dit, vae), convert.clip, convert.umt5 and convert.idm, each with its config
builder `eva_jax.models.<module>.<kind>_config(name, **overrides)`. The DiT is streamed: source tensors are read
one at a time (safetensors `safe_open`, `torch.load(mmap=True)`), each output parameter (per-layer tensors
stacked) is written with orbax partial saves as soon as it is complete, so peak memory stays near the largest
stacked tensor (40 x 5120 x 13824 for the 14B FFN), not the model. Load with `eva_jax.weights.load("dit", out, cfg)`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import json
import os
import shutil
import sys
import time
from typing import Any, Iterable, Iterator

import numpy as np

# kind -> (converter module, converter function, config module, config function, default config name)
KINDS = {
    "dit": ("convert.wan", "convert_dit_state_dict", "eva_jax.models.wan", "wan_config", "i2v-14b"),
    "vae": ("convert.wan", "convert_vae_state_dict", "eva_jax.models.vae", "vae_config", "wan2.1"),
    "clip": ("convert.clip", "convert_clip_state_dict", "eva_jax.models.clip", "clip_config", "vit-h-14"),
    "umt5": ("convert.umt5", "convert_umt5_state_dict", "eva_jax.models.umt5", "umt5_config", "umt5-xxl"),
    "idm": ("convert.idm", "convert_idm_state_dict", "eva_jax.models.idm", "idm_config", "resnet50"),
}
METADATA_FILE = "eva_convert.json"


def _parse_value(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def build_config(kind: str, name: str | None, overrides: dict[str, Any]):
  _, _, cfg_module, cfg_fn, default = KINDS[kind]
  fn = getattr(importlib.import_module(cfg_module), cfg_fn)
  base = fn(name or default)
  for key, value in overrides.items():  # `--set num_layers=abc` fails here, not as a shape error inside a model
    if hasattr(base, key) and not _same_kind(getattr(base, key), value):
      current = getattr(base, key)
      raise ValueError(f"--set {key}={value!r}: expected a value of type {type(current).__name__}, like the preset's "
                       f"{key}={current!r}")
  return fn(name or default, **overrides)


def _same_kind(current: Any, value: Any) -> bool:
  if isinstance(current, bool):
    return isinstance(value, bool)
  if isinstance(current, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(current, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(current, (tuple, list)):
    return isinstance(value, (tuple, list))
  if isinstance(current, str):
    return isinstance(value, str)
  return True  # dtypes and other objects: the config builder converts (or rejects) the value


def _flatten(tree, prefix=()) -> Iterator[tuple[tuple, Any]]:
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flatten(v, prefix + (k,))
  else:
    yield prefix, tree


def _nest(items: Iterable[tuple[tuple, Any]]) -> dict:
  tree: dict = {}
  for path, value in items:
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return tree


def _cast(x: np.ndarray, dtype) -> np.ndarray:
  return x.astype(dtype) if dtype is not None and np.issubdtype(x.dtype, np.floating) else x


def stream_to_orbax(items: Iterable[tuple[tuple, np.ndarray]], out: str, *, batch_bytes: int = 256 << 20,
                    progress: bool = True) -> dict:
  """Writes (path, array) items into an orbax checkpoint at `out` with partial saves of at most ~batch_bytes
  (or one array); returns {'params', 'bytes', 'largest_bytes'}."""
  from orbax.checkpoint.experimental import v1 as ocp
  out = os.path.abspath(out)
  batch, size, stats = [], 0, dict(params=0, bytes=0, largest_bytes=0)
  t0 = time.time()

  def flush():
    nonlocal batch, size
    if batch:
      ocp.partial.save(out, _nest(batch))
      batch, size = [], 0

  for path, arr in items:
    # orbax wants string keys; integer keys (unscanned layer lists) become their decimal string
    path = tuple(str(p) for p in path)
    _check_finite(arr, "/".join(path))
    if size and size + arr.nbytes > batch_bytes:
      flush()
    batch.append((path, arr))
    size += arr.nbytes
    stats["params"] += 1
    stats["bytes"] += arr.nbytes
    stats["largest_bytes"] = max(stats["largest_bytes"], arr.nbytes)
    if progress:
      rate = stats["bytes"] / max(time.time() - t0, 1e-9) / 2**20
      print(f"\r[convert] {stats['params']} tensors, {stats['bytes'] / 2**30:.2f} GiB ({rate:.0f} MiB/s) "
            f"{'/'.join(path)}", end="", file=sys.stderr, flush=True)
    if size >= batch_bytes:
      flush()
  flush()
  ocp.partial.finalize(out)
  if progress:
    print(file=sys.stderr)
  return stats


def _check_finite(arr: np.ndarray, name: str, chunk: int = 1 << 24) -> None:
  """No NaN / inf in a converted tensor (a damaged source file); checked in slices, so the check adds no
  copy of the largest tensor to the converter's peak memory."""
  if not (np.issubdtype(arr.dtype, np.floating) or arr.dtype.name.startswith(("bfloat16", "float8"))):
    return
  flat = arr.reshape(-1)
  for start in range(0, flat.size, chunk):
    part = np.asarray(flat[start:start + chunk], np.float32)
    if not np.isfinite(part).all():
      first = start + int(np.argmin(np.isfinite(part)))
      raise ValueError(f"parameter {name} of the source holds NaN / inf values (first at flat index {first}); "
                       "the checkpoint file is damaged or was saved after a diverged run")


def _staging_dir(out: str) -> str:
  """A fresh folder `<name>.incomplete-<pid>/` next to `out` (same filesystem, so the final rename is
  atomic) that holds the checkpoint being written and orbax's own `.partial_save` folders; stale ones of
  killed runs (their process gone) are removed."""
  parent, name = os.path.split(os.path.abspath(out))
  try:
    os.makedirs(parent, exist_ok=True)
  except OSError as e:  # a path component is a file, no permission
    raise OSError(f"--out {out}: cannot create its folder {parent} ({e.strerror or e})") from None
  prefix = f"{name}.incomplete-"
  for entry in os.listdir(parent):
    if entry.startswith(prefix) and entry[len(prefix):].isdigit() and not _alive(int(entry[len(prefix):])):
      shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
  staging = os.path.join(parent, f"{prefix}{os.getpid()}")
  shutil.rmtree(staging, ignore_errors=True)
  os.makedirs(staging)
  return staging


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:
    return True
  return True


def _publish(tmp: str, out: str) -> None:
  """Moves the finished `tmp` to `out`; an existing `out` is replaced only now, after success."""
  if not os.path.exists(out):
    os.rename(tmp, out)
    return
  old = f"{tmp}.previous"  # inside the staging folder
  os.rename(out, old)
  try:
    os.rename(tmp, out)
  except BaseException:
    os.rename(old, out)  # put the previous output back
    raise
  shutil.rmtree(old, ignore_errors=True)


def convert(kind: str, src: str, out: str, *, config: str | None = None, overrides: dict | None = None,
            dtype: str | None = None, overwrite: bool = False, progress: bool = True) -> dict:
  """Library entry point of the CLI; returns a summary dict (also written to <out>/eva_convert.json).

  The checkpoint is written to a staging folder next to `out` and renamed to `out` when complete: a run
  that fails or is killed leaves no partial `out`, and `overwrite` replaces an existing one only then.
  """
  import jax.numpy as jnp
  from convert.io import open_state_dict
  if kind not in KINDS:
    raise ValueError(f"--kind must be one of {sorted(KINDS)}, got {kind!r}")
  if os.path.exists(out) and not overwrite:
    raise FileExistsError(f"--out {out} exists; pass --overwrite to replace it")
  if os.path.exists(out) and not os.path.isdir(out):
    raise FileExistsError(f"--out {out} exists and is not a directory; remove it first")
  cfg = build_config(kind, config, overrides or {})
  try:
    np_dtype = np.dtype(jnp.dtype(dtype)) if dtype else None
  except TypeError:
    raise ValueError(f"--dtype {dtype!r} is not a dtype (float32, bfloat16, float16)") from None
  sd = open_state_dict(src)
  t0 = time.time()
  if kind == "dit":
    from convert.wan_dit import detect_layout, iter_dit_params
    layout = detect_layout(list(sd.keys()))
    items = iter_dit_params(sd, cfg, dtype=np_dtype)
  else:
    mod, fn = KINDS[kind][:2]
    layout = None
    tree = getattr(importlib.import_module(mod), fn)(sd, cfg)
    items = ((p, _cast(np.asarray(v), np_dtype)) for p, v in _flatten(tree))
  staging = _staging_dir(out)
  # Not a dot-name: orbax's partial saves do not finalize into a hidden folder.
  tmp = os.path.join(staging, os.path.basename(os.path.abspath(out)))
  try:
    stats = stream_to_orbax(items, tmp, progress=progress)
    from eva_jax.utils.timing import peak_rss_mb
    stats["peak_rss_mb"] = round(peak_rss_mb(), 1)
    cfg_dict = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    summary = dict(kind=kind, source=os.path.abspath(src), layout=layout, config_name=config or KINDS[kind][4],
                   config=cfg_dict, dtype=dtype, seconds=round(time.time() - t0, 2), **stats)
    with open(os.path.join(tmp, METADATA_FILE), "w") as f:
      json.dump(summary, f, indent=2, default=str)
    _publish(tmp, out)
  except BaseException:
    if progress:
      print(file=sys.stderr)  # end the progress line
    raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return summary


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m convert", description=__doc__.split("\n\n")[0])
  p.add_argument("--kind", required=True, choices=sorted(KINDS))
  p.add_argument("--src", required=True, help="checkpoint file or directory (safetensors, .pth, .ckpt); with "
                 "--to-torch an orbax directory from this converter or a trainer's run directory")
  p.add_argument("--out", required=True, help="output orbax checkpoint directory (--to-torch: a .safetensors file)")
  p.add_argument("--to-torch", action="store_true", help="export eva_jax DiT weights to PyTorch safetensors")
  p.add_argument("--layout", default="wan", choices=("wan", "diffusers"),
                 help="--to-torch key names: the original Wan release's or diffusers' WanTransformer3DModel's")
  p.add_argument("--config", default=None, help="config preset name (dit: t2v-1.3b, t2v-14b, i2v-14b, ...)")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="config override, e.g. --set num_layers=2 (repeatable)")
  p.add_argument("--dtype", default=None, help="stored dtype, e.g. bfloat16 or float32 (default: config's)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out (only once the new one is complete)")
  p.add_argument("--quiet", action="store_true", help="no progress line")
  p.add_argument("--verbosity", type=int, default=None,
                 help="0 = quiet terminal (default), 1 = library INFO logging too, 2 = DEBUG; or EVA_JAX_VERBOSITY")
  return p


def parse_args(argv=None) -> tuple[argparse.Namespace, dict]:
  p = build_parser()
  args = p.parse_args(argv)
  overrides = {}
  for item in args.set:
    if "=" not in item:
      p.error(f"--set expects FIELD=VALUE, got {item!r}")
    k, v = item.split("=", 1)
    overrides[k] = _parse_value(v)
  return args, overrides


def main(argv=None) -> int:
  from eva_jax.utils import logs
  args, overrides = parse_args(argv)
  logs.setup(args.verbosity)

  def run():
    if args.to_torch:
      if args.kind != "dit":
        raise ValueError(f"--to-torch exports the DiT only, not --kind {args.kind}")
      from convert.export import export_dit
      summary = export_dit(args.src, args.out, config=args.config, overrides=overrides, layout=args.layout,
                           dtype=args.dtype, overwrite=args.overwrite)
      print(json.dumps(summary))
      print(f"convert: wrote {args.out}", file=sys.stderr)
      return 0
    summary = convert(args.kind, args.src, args.out, config=args.config, overrides=overrides, dtype=args.dtype,
                      overwrite=args.overwrite, progress=not args.quiet)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}))
    print(f"convert: wrote {args.out}", file=sys.stderr)
    return 0
  return logs.guarded(run, "convert")


def cli() -> None:
  """The `eva-convert` console script."""
  raise SystemExit(main())
