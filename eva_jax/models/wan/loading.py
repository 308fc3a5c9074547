"""Restore a converted DiT checkpoint (written by `python -m convert --kind dit`) straight into a sharded model.

  model = load_dit('ckpt/dit', wan_config('i2v-14b', dtype='bfloat16'), mesh=make_mesh({'fsdp': -1}))

The model is built abstractly (no memory), each parameter gets the NamedSharding its logical axis names resolve
to on `mesh` (or the first device without a mesh), and orbax reads every device's slice directly from disk,
casting to cfg.param_dtype. LoRA factors (not in a base checkpoint) are freshly initialised (B = 0).
"""

from __future__ import annotations

import jax
from flax import nnx

from eva_jax.models.lora import LoRAParam
from eva_jax.models.wan.config import WanConfig
from eva_jax.models.wan.model import WanModel
from eva_jax.utils.tree import keyed_like, string_keys

_BASE = nnx.All(nnx.Param, nnx.Not(LoRAParam))



def abstract_dit(cfg: WanConfig, *, seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, state of ShapeDtypeStructs) of WanModel(cfg), allocating nothing. Unlike nnx.eval_shape this also
  works under an active mesh (the Params keep their logical-name metadata)."""
  return jax.eval_shape(lambda: nnx.split(WanModel(cfg, rngs=nnx.Rngs(seed))))


def load_dit(path: str, cfg: WanConfig, mesh: jax.sharding.Mesh | None = None, *, seed: int = 0) -> WanModel:
  """WanModel(cfg) with parameters restored from the orbax checkpoint at `path`."""
  from orbax.checkpoint.experimental import v1 as ocp
  from eva_jax.parallel.sharding import state_shardings

  def create():
    return WanModel(cfg, rngs=nnx.Rngs(seed))

  graphdef, abstract_state = abstract_dit(cfg, seed=seed)
  base_state, rest = nnx.split_state(abstract_state, _BASE, ...)
  if mesh is not None:
    shardings = state_shardings(base_state, mesh)
  else:
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: single, base_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  targets = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                         nnx.to_pure_dict(base_state), nnx.to_pure_dict(shardings))
  restored = keyed_like(ocp.load(path, string_keys(targets)), targets)
  nnx.replace_by_pure_dict(base_state, restored)
  if jax.tree.leaves(rest):
    # Only the LoRA factors are computed: XLA drops the unused base-weight initialisers.
    rest_out = nnx.to_pure_dict(rest)
    rest_shardings = (nnx.to_pure_dict(state_shardings(rest, mesh)) if mesh is not None
                      else jax.tree.map(lambda _: single, rest_out))
    init = jax.jit(lambda: nnx.to_pure_dict(nnx.state(create(), LoRAParam)), out_shardings=rest_shardings)
    nnx.replace_by_pure_dict(rest, init())
  return nnx.merge(graphdef, base_state, rest)
