"""Device meshes with the axes ('data', 'fsdp', 'context', 'tensor')."""

from __future__ import annotations

import math
from typing import Mapping

import jax
from jax.sharding import AxisType, Mesh

from eva_jax.parallel.sharding import MESH_AXES


def resolve_axis_sizes(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """{'data': -1, 'fsdp': 2} on 8 devices -> (4, 2, 1, 1). One axis may be -1 ("the rest")."""
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
  shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
  free = [i for i, s in enumerate(shape) if s == -1]
  if len(free) > 1:
    raise ValueError(f"only one mesh axis may be -1, got {[MESH_AXES[i] for i in free]}")
  fixed = math.prod(s for s in shape if s != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"config.mesh={dict(sizes)}: the fixed axes ({fixed} devices) do not divide the "
                       f"{num_devices} devices")
    shape[free[0]] = num_devices // fixed
  if math.prod(shape) != num_devices:
    raise ValueError(f"config.mesh={dict(sizes)}: a mesh of {math.prod(shape)} devices "
                     f"{dict(zip(MESH_AXES, shape))}, but {num_devices} are available (set one axis to -1 for "
                     "the remaining devices)")
  return tuple(shape)


def make_mesh(sizes: Mapping[str, int] | None = None, devices=None) -> Mesh:
  """A mesh over all (or the given) devices; default: everything on 'data'.

  Axes are Auto so that NamedShardings propagate through jit the classic way.
  """
  devices = list(devices) if devices is not None else jax.devices()
  shape = resolve_axis_sizes(sizes or {"data": -1}, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def check_batch_split(config, *fields: str, total: int | None = None) -> None:
  """Each batch size in `fields` (dotted config keys; `total` overrides the value of the first) splits evenly
  over the devices of the mesh's batch axes (data x fsdp of config.mesh). Checked before anything is built:
  otherwise the first step fails inside jax with a sharding message that names no config field."""
  from eva_jax.utils.checks import fail
  shape = resolve_axis_sizes(dict(config.mesh), jax.device_count())
  ways = shape[0] * shape[1]
  for i, field in enumerate(fields):
    value = config
    for part in field.split("."):
      value = value[part]
    size = total if i == 0 and total is not None else value
    if size % ways:
      what = "" if size == value else f" ({size} in all)"
      raise fail(field, value, f"a batch{what} that splits over the {ways} devices of the mesh's batch axes "
                               f"(config.mesh: data {shape[0]} x fsdp {shape[1]}, on {jax.device_count()} devices)")
