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


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates adjacent channel pairs of x [B, L, N, d] by the per-token angles ([L, d/2] cos/sin tables)."""
  b, l, n, d = x.shape
  xf = x.astype(jnp.float32).reshape(b, l, n, d // 2, 2)  # rotation in float32, as Wan (`.float()`)
  a, c = xf[..., 0], xf[..., 1]                            # [B, L, N, d/2]
  cos = cos[None, :, None, :]
  sin = sin[None, :, None, :]
  out = jnp.stack([a * cos - c * sin, a * sin + c * cos], axis=-1)
  return out.reshape(b, l, n, d).astype(x.dtype)
