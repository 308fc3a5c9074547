"""Meshes, the logical-axis rules table, and sharded helpers (see sharding.py)."""

from eva_jax.parallel.sharding import (  # noqa: F401
    LOGICAL_AXIS_RULES,
    MESH_AXES,
    constrain,
    logical_to_spec,
    named_sharding,
    shard_batch,
    state_shardings,
)
from eva_jax.parallel.mesh import check_batch_split, make_mesh, resolve_axis_sizes  # noqa: F401,E402
