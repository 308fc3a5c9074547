"""The abstract DiT (shapes and logical axis names, no memory), for the converter and planners.

Loading weights into a DiT is `eva_jax.weights.load('dit', source, cfg, mesh=...)`.
"""

from __future__ import annotations

import jax
from flax import nnx

from eva_jax.models.wan.config import WanConfig
from eva_jax.models.wan.model import WanModel


def abstract_dit(cfg: WanConfig, *, seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, state of ShapeDtypeStructs) of WanModel(cfg), allocating nothing. Unlike nnx.eval_shape this also
  works under an active mesh (the Params keep their logical-name metadata)."""
  return jax.eval_shape(lambda: nnx.split(WanModel(cfg, rngs=nnx.Rngs(seed))))
