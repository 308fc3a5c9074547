"""Ulysses sequence-parallel attention on 8 CPU devices equals single-device attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eva_jax import parallel
from eva_jax.models.wan.attention import attention
from eva_jax.models.wan.context_parallel import ulysses_attention
from tests.utils import rel_err


def _qkv(b, l, n, d, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(k_, (b, l, n, d), jnp.float32) for k_ in ks]


@pytest.mark.parametrize("mesh_sizes,l", [({"context": 8}, 64), ({"context": 4, "data": 2}, 50),
                                          ({"context": 2, "tensor": 2, "fsdp": 2}, 37)])
def test_ulysses_equals_plain_attention(mesh_sizes, l):
  mesh = parallel.make_mesh(mesh_sizes)
  q, k, v = _qkv(2, l, 8, 16)
  ref = attention(q, k, v, backend="xla")
  fn = jax.jit(lambda q, k, v: ulysses_attention(q, k, v, mesh=mesh, backend="xla"))
  out = fn(q, k, v)
  assert rel_err(out, ref) < 1e-6
  if mesh_sizes != {"context": 8}:
    return
  # gradients flow through the all-to-alls too
  g = jax.grad(lambda q: ulysses_attention(q, k, v, mesh=mesh).sum())(q)
  g_ref = jax.grad(lambda q: attention(q, k, v).sum())(q)
  assert rel_err(g, g_ref) < 1e-5


def test_ulysses_chunked_backend_and_kv_lengths():
  mesh = parallel.make_mesh({"context": 4, "data": 2})
  q, k, v = _qkv(2, 40, 4, 8, seed=1)
  lengths = jnp.array([40, 33])
  ref = attention(q, k, v, backend="xla", kv_seq_lengths=lengths)
  out = ulysses_attention(q, k, v, mesh=mesh, backend="chunked", chunk_size=16, kv_seq_lengths=lengths)
  assert rel_err(out, ref) < 1e-6


def test_heads_must_divide_context_axis():
  mesh = parallel.make_mesh({"context": 8})
  q, k, v = _qkv(1, 16, 12, 8)
  with pytest.raises(ValueError, match="'context'"):
    ulysses_attention(q, k, v, mesh=mesh)
