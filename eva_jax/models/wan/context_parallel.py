"""Sequence (context) parallel self-attention: Ulysses all-to-all over the 'context' mesh axis.

Tokens arrive sharded along the sequence over 'context' (and heads possibly over 'tensor'). One
all-to-all turns [B, L/c, N, d] into [B, L, N/c, d]: each device then holds whole sequences for a
subset of heads, runs ordinary (flash / chunked) attention, and a second all-to-all restores the
sequence sharding. Communication per layer is O(L·D/c), independent of the number of devices that
hold the sequence, which is why Ulysses is the default for video DiTs (heads: 40 = 2·4·5, so c ∈ {2,4,5,8}).

A token count that does not divide c is padded; padded keys are masked through `kv_seq_lengths`, and
padded queries are dropped, so the result equals single-device attention (unlike Wan's USP, which does
not mask the padding).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from eva_jax.models.wan.attention import attention
from eva_jax.parallel.sharding import _drop_absent_axes, logical_to_spec


def _axis_size(mesh, name: str) -> int:
  return int(mesh.shape[name]) if name in mesh.shape else 1


def context_size(mesh) -> int:
  return 1 if mesh is None else _axis_size(mesh, "context")


def ulysses_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mesh, backend: str = "xla",
                      kv_seq_lengths: jax.Array | None = None, chunk_size: int = 1024,
                      scale: float | None = None, kv_multiple: int | None = None) -> jax.Array:
  """Self-attention with q/k/v [B, L, N, d] sequence-sharded over 'context'. Equals `attention(q, k, v)`."""
  c = _axis_size(mesh, "context")
  if c == 1:
    return attention(q, k, v, backend=backend, kv_seq_lengths=kv_seq_lengths, chunk_size=chunk_size, scale=scale,
                     kv_multiple=kv_multiple)
  b, l, n, _ = q.shape
  t = _axis_size(mesh, "tensor")
  if n % (c * t):
    raise ValueError(f"Ulysses attention: {n} heads do not divide over mesh axis 'context' ({c})"
                     + (f" × 'tensor' ({t})" if t > 1 else "") + "; choose a context size that divides the heads")
  batch_spec = _drop_absent_axes(logical_to_spec(("act_batch",)), mesh)[0]
  batch_axes = () if batch_spec is None else (batch_spec if isinstance(batch_spec, tuple) else (batch_spec,))
  batch_shards = math.prod(_axis_size(mesh, a) for a in batch_axes)
  if b % batch_shards:
    raise ValueError(f"batch {b} does not divide over the batch mesh axes {batch_spec} ({batch_shards} shards)")

  pad = (-l) % c
  # Without caller lengths, the valid key count is the static l (every example alike: splash then needs no
  # per-example mask); with them, a [B] array sharded like the batch.
  lengths = None if kv_seq_lengths is None else jnp.asarray(kv_seq_lengths, jnp.int32)
  if pad:
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, widths) for x in (q, k, v))

  spec = P(batch_spec, "context", "tensor" if t > 1 else None, None)

  def local(q, k, v, *lengths):
    # [b, L/c, n, d] -> [b, L, n/c, d]: gather the sequence, scatter the heads.
    to_heads = functools.partial(jax.lax.all_to_all, axis_name="context", split_axis=2, concat_axis=1, tiled=True)
    qh, kh, vh = to_heads(q), to_heads(k), to_heads(v)
    valid = lengths[0] if lengths else (l if pad else None)
    out = attention(qh, kh, vh, backend=backend, kv_seq_lengths=valid, chunk_size=chunk_size, scale=scale,
                    kv_multiple=kv_multiple)
    return jax.lax.all_to_all(out, axis_name="context", split_axis=1, concat_axis=2, tiled=True)

  extra, extra_specs = ((lengths,), (P(batch_spec),)) if lengths is not None else ((), ())
  out = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec) + extra_specs, out_specs=spec,
                      check_vma=False)(q, k, v, *extra)
  return out[:, :l] if pad else out


def self_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, backend: str = "xla", chunk_size: int = 1024,
                   scale: float | None = None, kv_multiple: int | None = None) -> jax.Array:
  """The DiT's self-attention entry: Ulysses when the mesh in context (`jax.set_mesh`) has a 'context'
  axis larger than 1, plain `attention` otherwise (one device, or data/FSDP/tensor parallelism only)."""
  from eva_jax.parallel.sharding import _current_mesh
  mesh = _current_mesh()
  if context_size(mesh) > 1:
    return ulysses_attention(q, k, v, mesh=mesh, backend=backend, chunk_size=chunk_size, scale=scale,
                             kv_multiple=kv_multiple)
  return attention(q, k, v, backend=backend, chunk_size=chunk_size, scale=scale, kv_multiple=kv_multiple)
