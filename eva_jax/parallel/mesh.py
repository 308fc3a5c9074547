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
      raise ValueError(f"mesh axes {dict(sizes)} do not divide {num_devices} devices")
    shape[free[0]] = num_devices // fixed
  if math.prod(shape) != num_devices:
    raise ValueError(
        f"mesh {dict(zip(MESH_AXES, shape))} has {math.prod(shape)} devices, but {num_devices} are available")
  return tuple(shape)


def make_mesh(sizes: Mapping[str, int] | None = None, devices=None) -> Mesh:
  """A mesh over all (or the given) devices; default: everything on 'data'.

  Axes are Auto so that NamedShardings propagate through jit the classic way.
  """
  devices = list(devices) if devices is not None else jax.devices()
  shape = resolve_axis_sizes(sizes or {"data": -1}, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
