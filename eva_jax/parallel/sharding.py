"""The one table that maps logical axis names onto mesh axes, and helpers that apply it.

Every parameter is annotated with logical names (`nnx.with_partitioning(init, ('embed', 'mlp'))` or
`nnx.Param(x, out_sharding=(...))`); activations with `constrain(x, ('act_batch', 'act_seq', None))`.
Only this file knows which mesh axis a logical name lands on.

Mesh axes: ('data', 'fsdp', 'context', 'tensor').
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "context", "tensor")

# Logical name -> mesh axis (or tuple of axes, or None = replicated).
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    # Model width D: FSDP shards the big matrices along it. The context axis joins in, so that with
    # sequence parallelism the weights are still spread over every device (ZeRO-3 over fsdp × context).
    ("embed", ("fsdp", "context")),
    ("heads", "tensor"),        # attention projections' head-major output dim
    ("mlp", "tensor"),          # FFN hidden dim
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),           # the stacked layer axis of scanned blocks
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("norm", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_seq", "context"),     # video tokens: sequence (context) parallel
    ("act_text", None),         # text / image tokens: replicated keys for cross-attention
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
)


def logical_to_spec(names: Sequence[str | None], rules=LOGICAL_AXIS_RULES) -> P:
  """('act_batch', 'act_seq', None) -> PartitionSpec(('data', 'fsdp'), 'context', None)."""
  table = dict(rules)
  out = []
  for name in names:
    if name is None:
      out.append(None)
    elif name not in table:
      raise KeyError(f"logical axis {name!r} has no rule in eva_jax.parallel.sharding.LOGICAL_AXIS_RULES")
    else:
      out.append(table[name])
  return P(*out)


def _drop_absent_axes(spec: P, mesh: jax.sharding.Mesh) -> P:
  """Removes mesh axes the mesh does not have (or has with size 1), so one table serves every mesh."""
  def keep(entry):
    if entry is None:
      return None
    axes = entry if isinstance(entry, tuple) else (entry,)
    axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
    if not axes:
      return None
    return axes if len(axes) > 1 else axes[0]
  return P(*(keep(e) for e in spec))


def named_sharding(mesh, names: Sequence[str | None], rules=LOGICAL_AXIS_RULES) -> NamedSharding:
  return NamedSharding(mesh, _drop_absent_axes(logical_to_spec(names, rules), mesh))


def state_shardings(state: nnx.State, mesh, rules=LOGICAL_AXIS_RULES):
  """NamedSharding for every leaf of an nnx.State, from each Variable's `out_sharding` metadata."""
  def one(var):
    names = var.get_metadata().get("out_sharding") if isinstance(var, nnx.Variable) else None
    if not names:
      return NamedSharding(mesh, P())
    return named_sharding(mesh, names, rules)
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, names: Sequence[str | None], mesh=None, rules=LOGICAL_AXIS_RULES):
  """with_sharding_constraint by logical names; a no-op outside a mesh context."""
  mesh = mesh or _current_mesh()
  if mesh is None or mesh.empty or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, named_sharding(mesh, names, rules))


def _current_mesh():
  try:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is not None and not mesh.empty:
      return mesh
  except Exception:  # older jax
    pass
  return None


def shard_batch(x, mesh, names: Sequence[str | None] | None = None, rules=LOGICAL_AXIS_RULES):
  """device_put an input batch by logical names (default: 'act_batch' on axis 0, the rest replicated),
  with an error that names the mesh axes when a dimension does not divide over them."""
  names = tuple(names) if names is not None else ("act_batch",) + (None,) * (x.ndim - 1)
  sharding = named_sharding(mesh, names, rules)
  for dim, (size, entry) in enumerate(zip(x.shape, sharding.spec)):
    if entry is None:
      continue
    axes = entry if isinstance(entry, tuple) else (entry,)
    parts = 1
    for a in axes:
      parts *= mesh.shape[a]
    if size % parts:
      raise ValueError(f"dimension {dim} ({names[dim]}) of size {size} does not divide over mesh axes "
                       f"{axes} ({parts} shards); change the batch size or the mesh")
  return jax.device_put(x, sharding)
