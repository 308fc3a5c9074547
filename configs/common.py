"""Helpers shared by the config scripts (big_vision style variant strings).

`get_config('tiny')`, `get_config('14b,steps=100')`: the argument after the colon in
`--config=configs/sft.py:tiny` is parsed by `parse_arg` into a ConfigDict of variant fields.
"""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, lazy: bool = False, **spec):
  """Parses 'a,b=2,c=x' against defaults in `spec` (types follow the defaults).

  A bare word sets a boolean field to True, or, if the first default is a string named `variant`,
  selects that variant: parse_arg('tiny', variant='14b', steps=0) -> {variant: 'tiny', steps: 0}.
  Unknown keys are an error unless `lazy`.
  """
  out = ml_collections.ConfigDict(dict(spec))
  if not arg:
    return out
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    if "=" in item:
      key, value = item.split("=", 1)
    elif "variant" in spec and not isinstance(spec.get(item), bool):
      key, value = "variant", item
    else:
      key, value = item, "True"
    if key not in spec:
      if not lazy:
        raise ValueError(f"unknown config argument {key!r} in {arg!r}; known: {sorted(spec)}")
      out[key] = value
      continue
    default = spec[key]
    if isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key!r} expects a boolean, got {value!r}")
      out[key] = value.lower() in ("true", "1")
    elif default is None:
      out[key] = value
    else:
      out[key] = type(default)(value)
  return out


def mesh_config(**sizes) -> ml_collections.ConfigDict:
  """Mesh axis sizes; -1 means "the rest of the devices"."""
  base = {"data": -1, "fsdp": 1, "context": 1, "tensor": 1}
  base.update(sizes)
  return ml_collections.ConfigDict(base)


def check_variant(variant: str, known) -> str:
  if variant not in known:
    raise ValueError(f"unknown config variant {variant!r}; choose one of {sorted(known)}")
  return variant
