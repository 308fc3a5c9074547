"""Small NNX layers of the Wan DiT: Linear with dtype roles, float32 norms, adaLN helpers, the time sinusoid.

Parameters carry logical axis names (resolved to mesh axes only in eva_jax.parallel.sharding). Kernels are
[in, out] (PyTorch Linear weights transposed).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Names = Sequence[str | None]


def xavier_uniform(key, shape, dtype=jnp.float32):
  """Wan's init for Linear weights (A.7); fan-in/fan-out from the last two dims."""
  fan_in, fan_out = shape[-2], shape[-1]
  bound = math.sqrt(6.0 / (fan_in + fan_out))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class Linear(nnx.Module):
  """y = x @ kernel + bias, matmul in `dtype` (the compute dtype), parameters stored in `param_dtype`."""

  def __init__(self, in_features: int, out_features: int, *, names: Names = ("embed", "mlp"),
               use_bias: bool = True, dtype=jnp.float32, param_dtype=jnp.float32,
               kernel_init=xavier_uniform, rngs: nnx.Rngs):
    self.in_features, self.out_features = in_features, out_features
    self.dtype = dtype
    self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype),
                            out_sharding=tuple(names))
    self.bias = (nnx.Param(jnp.zeros((out_features,), param_dtype), out_sharding=(names[1],))
                 if use_bias else None)

  def base(self, x: jax.Array) -> jax.Array:
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.base(x)


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
  """Parameter-free LayerNorm over the last axis, statistics and result in float32 (Wan upcasts)."""
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


class LayerNorm(nnx.Module):
  """LayerNorm computed in float32 (optionally affine); returns float32."""

  def __init__(self, dim: int, *, eps: float, affine: bool = True, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",)) if affine else None
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=("norm",)) if affine else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = layer_norm(x, self.eps)
    if self.scale is not None:
      y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y


class RMSNorm(nnx.Module):
  """Wan's RMSNorm: float32 statistics, cast back to the input dtype, then times the weight."""

  def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = (xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + self.eps)).astype(x.dtype)
    return y * self.scale[...].astype(x.dtype)


def per_frame(x: jax.Array, frames: int) -> jax.Array:
  """[B, L, D] -> [B, T, L/T, D] so per-frame modulation [B, T, D] broadcasts over each frame's tokens."""
  b, l, d = x.shape
  if l % frames:
    raise ValueError(f"{l} tokens do not split into {frames} frames (per-frame timesteps need L = F * h * w)")
  return x.reshape(b, frames, l // frames, d)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """x * (1 + scale) + shift in float32; x [B, L, D], shift/scale [B, T, D] with T = 1 or frames."""
  b, l, d = x.shape
  xt = per_frame(x.astype(jnp.float32), shift.shape[1])
  return (xt * (1.0 + scale[:, :, None]) + shift[:, :, None]).reshape(b, l, d)


def gate(y: jax.Array, g: jax.Array) -> jax.Array:
  """y * gate in float32 (the gated residual branch); y [B, L, D], g [B, T, D]."""
  b, l, d = y.shape
  return (per_frame(y.astype(jnp.float32), g.shape[1]) * g[:, :, None]).reshape(b, l, d)


def timestep_sinusoid(t: jax.Array, dim: int) -> jax.Array:
  """[cos(t w), sin(t w)] with w_i = 10000^(-i / (dim/2)) (cos first, spec A.2 step 4). t [...] -> [..., dim]."""
  half = dim // 2
  # The ladder is exp(-ln(1e4) * i / half) rounded once to float32 (as diffusers' Timesteps builds it).
  exponent = (-math.log(10000.0) * np.arange(half, dtype=np.float32) / np.float32(half)).astype(np.float32)
  freqs = jnp.asarray(np.exp(exponent.astype(np.float64)).astype(np.float32))
  arg = t.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(arg), jnp.sin(arg)], axis=-1)
