"""The tiny DiT under every mesh layout (data, FSDP, tensor, context/Ulysses, mixed) equals one device.

The token count 3·2·3 = 18 does not divide the context axis of 4, so the Ulysses path pads and masks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eva_jax import parallel
from eva_jax.models.wan import WanModel, wan_config
from tests.utils import rel_err

CFG = wan_config("tiny-i2v", dim=64, num_heads=4, ffn_dim=96, num_layers=2)
B = 8


def _inputs():
  ks = jax.random.split(jax.random.key(1), 4)
  x = jax.random.normal(ks[0], (B, 3, 4, 6, 16))                           # 3·2·3 = 18 tokens
  t = jax.random.uniform(ks[1], (B, 3), minval=0, maxval=1000)
  ctx = jax.random.normal(ks[2], (B, 7, CFG.text_dim))
  clip = jax.random.normal(ks[3], (B, 257, CFG.image_dim))
  return x, t, ctx, clip


def _loss_and_grad(graphdef, state, x, t, ctx, clip):
  def loss(st):
    out = nnx.merge(graphdef, st)(x, t, ctx, clip)
    return jnp.mean(out ** 2), out
  (l, out), g = jax.value_and_grad(loss, has_aux=True)(state)
  return out, g


@pytest.fixture(scope="module")
def reference():
  graphdef, state = nnx.split(WanModel(CFG, rngs=nnx.Rngs(0)))
  inputs = _inputs()
  out, grads = jax.jit(_loss_and_grad, static_argnums=0)(graphdef, state, *inputs)
  return graphdef, state, inputs, out, grads


@pytest.mark.parametrize("sizes", [{"data": 8}, {"fsdp": 8}, {"tensor": 4, "data": 2}, {"context": 4, "data": 2},
                                   {"data": 2, "fsdp": 2, "context": 2}, {"fsdp": 2, "context": 2, "tensor": 2}])
def test_sharded_forward_and_backward_equal_single_device(reference, sizes):
  graphdef, state, inputs, ref_out, ref_grads = reference
  mesh = parallel.make_mesh(sizes)
  with jax.set_mesh(mesh):
    sharded = jax.device_put(state, parallel.state_shardings(state, mesh))
    batch = [parallel.shard_batch(a, mesh) for a in inputs]
    out, grads = jax.jit(_loss_and_grad, static_argnums=0)(graphdef, sharded, *batch)
  assert rel_err(out, ref_out) < 1e-5
  flat, ref_flat = jax.tree.leaves(grads), jax.tree.leaves(ref_grads)
  assert len(flat) == len(ref_flat)
  for g, r in zip(flat, ref_flat):
    if np.linalg.norm(np.asarray(r)) > 0:
      assert rel_err(g, r) < 1e-4
  # parameters really are sharded where the mesh has the axis
  if sizes.get("fsdp", 1) > 1:
    specs = {str(v.sharding.spec) for v in jax.tree.leaves(sharded)}
    assert any("fsdp" in s for s in specs)


def test_context_axis_must_divide_heads():
  graphdef, state = nnx.split(WanModel(wan_config("tiny-t2v"), rngs=nnx.Rngs(0)))  # 2 heads
  mesh = parallel.make_mesh({"context": 8})
  x = jnp.zeros((1, 1, 4, 4, 16))
  with jax.set_mesh(mesh), pytest.raises(ValueError, match="'context'"):
    nnx.merge(graphdef, state)(x, jnp.zeros((1,)), jnp.zeros((1, 4, 24)))


def test_batch_must_divide_batch_axes():
  mesh = parallel.make_mesh({"data": 4, "fsdp": 2})
  with pytest.raises(ValueError, match=r"\('data', 'fsdp'\) \(8 shards\)"):
    parallel.shard_batch(jnp.zeros((6, 3)), mesh)
