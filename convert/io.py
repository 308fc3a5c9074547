"""Streaming readers for PyTorch checkpoints: a lazy name -> tensor mapping that loads one tensor per access.

  sd = open_state_dict('Wan2.1-I2V-14B-480P/')   # sharded *.safetensors + index json, a .safetensors file,
  sd.shape_of('blocks.0.ffn.0.weight')           # or a .pth / .pt / .ckpt / .bin (torch.load(mmap=True))
  w = sd['blocks.0.ffn.0.weight']                 # a torch tensor, read now

safetensors files are read with `safe_open` (each access reads just that tensor); torch pickles are opened with
`torch.load(mmap=True, weights_only=True)`, so tensor storage stays on disk until touched. A Lightning `.ckpt`
(`{'state_dict': ...}`) or a `{'model_state_dict': ...}` / `{'model': ...}` wrapper is unwrapped.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Iterator, Mapping

TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
TORCH_EXTRA = "install the torch extra: pip install 'eva_jax[torch]' (the CPU build is enough)"


def import_torch(what: str = "reading PyTorch weights"):
  """`import torch`, or an ImportError that says how to get it: torch is an install extra, not a dependency."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f"{what} needs torch: {TORCH_EXTRA}") from None
  return torch


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split()) or type(e).__name__
_WRAPPERS = ("state_dict", "model_state_dict", "model", "module")


class LazyStateDict(Mapping):
  """Read-only mapping key -> torch tensor backed by files; `shape_of(key)` needs no tensor read."""

  def __init__(self, readers: dict[str, Any], source: str, shapes: dict[str, tuple] | None = None):
    self._readers = readers          # key -> ('safetensors', file path) or ('torch', mmapped dict)
    self._shapes = shapes or {}      # safetensors shapes from the file headers
    self.source = source

  def __getitem__(self, key: str):
    kind, handle = self._readers[key]
    try:
      if kind == "safetensors":
        # Open per access: safe_open memory-maps the file, and pages of a mapping kept open stay in RSS.
        from safetensors import safe_open
        with safe_open(handle, framework="pt") as f:
          return f.get_tensor(key)
      return handle[key]
    except Exception as e:  # a truncated data region shows only when the tensor is read
      where = handle if kind == "safetensors" else self.source
      raise ValueError(f"{where}: cannot read tensor {key!r}: {_one_line(e)}") from e

  def shape_of(self, key: str) -> tuple[int, ...]:
    kind, handle = self._readers[key]
    if kind == "safetensors":
      return tuple(self._shapes[key])
    return tuple(handle[key].shape)

  def __iter__(self) -> Iterator[str]:
    return iter(self._readers)

  def __len__(self) -> int:
    return len(self._readers)

  def __repr__(self) -> str:
    return f"LazyStateDict({self.source!r}, {len(self)} tensors)"


def unwrap_state_dict(obj: Any, path: str = "<checkpoint>") -> Mapping[str, Any]:
  """{'state_dict': {...}} (Lightning), {'model_state_dict': ...} etc. -> the tensor mapping inside."""
  for _ in range(3):
    if not isinstance(obj, Mapping):
      break
    if any(hasattr(v, "shape") for v in obj.values()):
      return {k: v for k, v in obj.items() if hasattr(v, "shape")}
    inner = next((obj[k] for k in _WRAPPERS if k in obj and isinstance(obj[k], Mapping)), None)
    if inner is None:
      break
    obj = inner
  raise ValueError(f"{path}: no tensor mapping found (looked under {list(_WRAPPERS)})")


def _safetensors(files: list[str], source: str) -> LazyStateDict:
  from safetensors import safe_open
  import_torch(f"reading {source} (safetensors opened as torch tensors)")
  readers, shapes = {}, {}
  for file in files:
    if not os.path.isfile(file):
      raise FileNotFoundError(f"safetensors file {file} does not exist")
    try:
      with safe_open(file, framework="pt") as handle:
        for key in handle.keys():
          if key in readers:
            raise ValueError(f"tensor {key!r} appears in two files ({file})")
          readers[key] = ("safetensors", file)
          shapes[key] = tuple(handle.get_slice(key).get_shape())
    except (ValueError, ImportError):
      raise
    except Exception as e:  # SafetensorError: truncated header, not safetensors at all
      raise ValueError(f"{file} is not a readable safetensors file: {_one_line(e)}") from e
  if not readers:
    raise ValueError(f"{source}: holds no tensors")
  return LazyStateDict(readers, source, shapes)


def _index_files(index_path: str) -> list[str]:
  try:
    with open(index_path) as f:
      weight_map = json.load(f)["weight_map"]
    if not isinstance(weight_map, dict):
      raise TypeError(f"'weight_map' must be a mapping, found {type(weight_map).__name__}")
  except FileNotFoundError:
    raise FileNotFoundError(f"safetensors index {index_path} does not exist") from None
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{index_path} is not a safetensors index json with a 'weight_map': {_one_line(e)}") from e
  folder = os.path.dirname(index_path)
  files = sorted(set(weight_map.values()))
  missing = [f for f in files if not os.path.exists(os.path.join(folder, f))]
  if missing:
    raise FileNotFoundError(f"{index_path} names shard(s) that do not exist: {missing}")
  return [os.path.join(folder, f) for f in files]


def open_state_dict(src: str) -> LazyStateDict:
  """A file or directory of PyTorch weights as a LazyStateDict."""
  src = os.fspath(src)
  if not os.path.exists(src):
    raise FileNotFoundError(f"checkpoint {src} does not exist")
  if os.path.isfile(src) and os.path.getsize(src) == 0:
    raise ValueError(f"checkpoint {src} is empty (0 bytes): a download or copy that did not finish?")
  if os.path.isdir(src):
    indexes = sorted(glob.glob(os.path.join(src, "*.safetensors.index.json")))
    if len(indexes) > 1:
      raise ValueError(f"{src}: several safetensors index files {indexes}; pass one of them as --src")
    if indexes:
      return _safetensors(_index_files(indexes[0]), src)
    shards = sorted(glob.glob(os.path.join(src, "*.safetensors")))
    if shards:
      return _safetensors(shards, src)
    pickles = sorted(p for s in TORCH_SUFFIXES for p in glob.glob(os.path.join(src, "*" + s)))
    if len(pickles) == 1:
      return open_state_dict(pickles[0])
    raise FileNotFoundError(f"{src}: expected *.safetensors (+ index json) or one of {TORCH_SUFFIXES}, "
                            f"found {sorted(os.listdir(src))[:10]}")
  if src.endswith(".safetensors.index.json"):
    return _safetensors(_index_files(src), src)
  if src.endswith(".safetensors"):
    return _safetensors([src], src)
  if src.endswith(TORCH_SUFFIXES):
    torch = import_torch(f"reading {src}")
    try:
      obj = torch.load(src, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # truncated zip, not a pickle, a pickle of arbitrary objects
      raise ValueError(f"{src} is not a readable PyTorch checkpoint: {_one_line(e)}") from e
    tensors = unwrap_state_dict(obj, src)
    return LazyStateDict({k: ("torch", tensors) for k in tensors}, src)
  raise ValueError(f"{src}: unknown checkpoint format (expected .safetensors, an index json, {TORCH_SUFFIXES})")
