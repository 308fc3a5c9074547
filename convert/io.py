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
_WRAPPERS = ("state_dict", "model_state_dict", "model", "module")


class LazyStateDict(Mapping):
  """Read-only mapping key -> torch tensor backed by files; `shape_of(key)` needs no tensor read."""

  def __init__(self, readers: dict[str, Any], source: str, shapes: dict[str, tuple] | None = None):
    self._readers = readers          # key -> ('safetensors', file path) or ('torch', mmapped dict)
    self._shapes = shapes or {}      # safetensors shapes from the file headers
    self.source = source

  def __getitem__(self, key: str):
    kind, handle = self._readers[key]
    if kind == "safetensors":
      # Open per access: safe_open memory-maps the file, and pages of a mapping kept open stay in RSS.
      from safetensors import safe_open
      with safe_open(handle, framework="pt") as f:
        return f.get_tensor(key)
    return handle[key]

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
  readers, shapes = {}, {}
  for file in files:
    with safe_open(file, framework="pt") as handle:
      for key in handle.keys():
        if key in readers:
          raise ValueError(f"tensor {key!r} appears in two files ({file})")
        readers[key] = ("safetensors", file)
        shapes[key] = tuple(handle.get_slice(key).get_shape())
  return LazyStateDict(readers, source, shapes)


def _index_files(index_path: str) -> list[str]:
  with open(index_path) as f:
    weight_map = json.load(f)["weight_map"]
  folder = os.path.dirname(index_path)
  files = sorted(set(weight_map.values()))
  missing = [f for f in files if not os.path.exists(os.path.join(folder, f))]
  if missing:
    raise FileNotFoundError(f"{index_path} names shard(s) that do not exist: {missing}")
  return [os.path.join(folder, f) for f in files]


def open_state_dict(src: str) -> LazyStateDict:
  """A file or directory of PyTorch weights as a LazyStateDict."""
  src = os.fspath(src)
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
    import torch
    obj = torch.load(src, map_location="cpu", mmap=True, weights_only=True)
    tensors = unwrap_state_dict(obj, src)
    return LazyStateDict({k: ("torch", tensors) for k in tensors}, src)
  raise ValueError(f"{src}: unknown checkpoint format (expected .safetensors, an index json, {TORCH_SUFFIXES})")
