"""Wan's 3D rotary position embedding (spec wan.md A.4).

Each head's d channels form d/2 adjacent pairs (x[2i], x[2i+1]) (interleaved, GPT-J style). The pairs are split
across the three token-grid axes: frame, row, column, with d - 4*(d//6), 2*(d//6), 2*(d//6) channels (44/42/42 for
d = 128). Each axis has its own frequency ladder theta^(-2j/axis_dim), and positions are integer grid indices
starting at 0. The angle table depends only on the (static) grid, so it is built in float64 with numpy at trace
time and enters the graph as a float32 constant, like Wan's float64 math followed by `.float()`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def axis_dims(head_dim: int) -> tuple[int, int, int]:
  """Channels per axis (frame, height, width): (44, 42, 42) for head_dim 128."""
  hw = 2 * (head_dim // 6)
  return head_dim - 2 * hw, hw, hw


def rope_angles(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0,
                max_len: int = 1024) -> np.ndarray:
  """Rotation angle of every (token, pair): float64 [F*H*W, head_dim // 2], tokens row-major over (f, h, w)."""
  if max(grid) > max_len:
    raise ValueError(f"token grid {grid} exceeds the RoPE table length {max_len} on some axis")
  per_axis = []
  for size, dim in zip(grid, axis_dims(head_dim)):
    inv_freq = theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)       # [dim/2]
    per_axis.append(np.arange(size, dtype=np.float64)[:, None] * inv_freq)    # [size, dim/2]
  f, h, w = grid
  ang_f = np.broadcast_to(per_axis[0][:, None, None, :], (f, h, w, per_axis[0].shape[1]))
  ang_h = np.broadcast_to(per_axis[1][None, :, None, :], (f, h, w, per_axis[1].shape[1]))
  ang_w = np.broadcast_to(per_axis[2][None, None, :, :], (f, h, w, per_axis[2].shape[1]))
  return np.concatenate([ang_f, ang_h, ang_w], axis=-1).reshape(f * h * w, head_dim // 2)


def rope_tables(grid, head_dim, theta=10000.0, max_len=1024) -> tuple[jax.Array, jax.Array]:
  """(cos, sin), each float32 [L, head_dim // 2]."""
  ang = rope_angles(tuple(grid), head_dim, theta, max_len)
  return jnp.asarray(np.cos(ang), jnp.float32), jnp.asarray(np.sin(ang), jnp.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, *, fused: bool = True) -> jax.Array:
  """Rotates adjacent channel pairs of x [B, L, N, d] by the per-token angles ([L, d/2] cos/sin tables).

  fused=True (WanConfig.fused_rope) writes the rotation as  x * cos' + swap_pairs(x) * sin'  with
  cos' = (cos, cos) and sin' = (-sin, sin) per pair: the output keeps x's shape and layout, the pair swap is a
  reverse of a size-2 minor axis, and nothing is stacked, so XLA can keep the rotation in the fusion that
  computes x (the q/k RMSNorm) instead of writing x and re-reading it in a concatenate. The float ops per
  element are the same as fused=False (a*cos - c*sin == a*cos + c*(-sin) exactly): equal bit for bit.
  """
  if fused:
    return _rope_swap(x, cos, sin)
  return _rope_stack(x, cos, sin)


def _rope_swap(x, cos, sin):
  b, l, n, d = x.shape
  xf = x.astype(jnp.float32).reshape(b, l, n, d // 2, 2)  # rotation in float32, as Wan (`.float()`)
  swapped = jnp.flip(xf, axis=-1)                          # (c, a) per pair
  cos2 = jnp.stack([cos, cos], axis=-1)[None, :, None]     # [1, L, 1, d/2, 2] (trace-time constants)
  sin2 = jnp.stack([-sin, sin], axis=-1)[None, :, None]
  return (xf * cos2 + swapped * sin2).reshape(b, l, n, d).astype(x.dtype)


def _rope_stack(x, cos, sin):
  """The unfused reference form: split the pairs, rotate, stack them back."""
  b, l, n, d = x.shape
  xf = x.astype(jnp.float32).reshape(b, l, n, d // 2, 2)  # rotation in float32, as Wan (`.float()`)
  a, c = xf[..., 0], xf[..., 1]                            # [B, L, N, d/2]
  cos = cos[None, :, None, :]
  sin = sin[None, :, None, :]
  out = jnp.stack([a * cos - c * sin, a * sin + c * cos], axis=-1)
  return out.reshape(b, l, n, d).astype(x.dtype)
