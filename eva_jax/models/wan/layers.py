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


# MARK: matmuls

E4M3_MAX = 448.0  # largest finite float8_e4m3fn


def _fp8_dequantized(t: jax.Array) -> jax.Array:
  """t rounded to float8_e4m3fn with one per-tensor scale (amax / 448), then scaled back in t's dtype.

  Written as XLA's FP8 pattern (quantize -> convert -> multiply by a scalar scale -> dot): on Hopper the GPU
  compiler turns a dot of two such operands into one cuBLASLt FP8 GEMM with the scales as its alpha; on CPU
  the same graph computes the dot of the rounded values (the FP8 numerics, at float speed).
  """
  scale = jnp.maximum(jnp.max(jnp.abs(t)).astype(jnp.float32) / E4M3_MAX, jnp.finfo(jnp.float32).tiny)
  q = jnp.clip(t.astype(jnp.float32) / scale, -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)
  return q.astype(t.dtype) * scale.astype(t.dtype)


def matmul(x: jax.Array, kernel: jax.Array, mode: str = "default") -> jax.Array:
  """x [..., in] contracted with kernel [in, ...] (both already in the compute dtype). mode 'fp8': both
  operands in float8_e4m3fn with per-tensor scales (inference only: the rounding has no useful gradient)."""
  if mode == "fp8":
    x, kernel = _fp8_dequantized(x), _fp8_dequantized(kernel)
  elif mode != "default":
    raise ValueError(f"matmul mode must be 'default' or 'fp8', got {mode!r}")
  return jnp.tensordot(x, kernel, axes=1) if kernel.ndim > 2 else jnp.dot(x, kernel)


class Linear(nnx.Module):
  """y = x @ kernel + bias, matmul in `dtype` (the compute dtype), parameters stored in `param_dtype`.

  `matmul_dtype='fp8'` runs the product in float8 (see `matmul`); the parameters are unchanged.
  """

  def __init__(self, in_features: int, out_features: int, *, names: Names = ("embed", "mlp"),
               use_bias: bool = True, dtype=jnp.float32, param_dtype=jnp.float32,
               kernel_init=xavier_uniform, matmul_dtype: str = "default", rngs: nnx.Rngs):
    self.in_features, self.out_features = in_features, out_features
    self.dtype = dtype
    self.matmul_dtype = matmul_dtype
    self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype),
                            out_sharding=tuple(names))
    self.bias = (nnx.Param(jnp.zeros((out_features,), param_dtype), out_sharding=(names[1],))
                 if use_bias else None)

  def base(self, x: jax.Array) -> jax.Array:
    y = matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.matmul_dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y

  def delta(self, x: jax.Array) -> jax.Array | None:
    """What an adapter adds to `base(x)` (None: a plain Linear has none; LoRALinear overrides)."""
    return None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.base(x)
    d = self.delta(x)
    return y if d is None else y + d


def fused_linear(layers: Sequence[Linear], x: jax.Array) -> list[jax.Array]:
  """[layer(x) for layer in layers] as one matmul: the kernels [in, out] are stacked per call into
  [in, n, out] (the parameters stay separate, so converters and adapters see the usual tree), the biases
  into [n, out]. Each output then gets its own adapter delta, as `Linear.__call__` adds it. Stacking on a
  new middle axis keeps the 'heads' sharding of the out axis: no resharding under tensor parallelism.
  Equal to the separate layers to float32 rounding (one GEMM of width n*out instead of n)."""
  first = layers[0]
  dt, mode = first.dtype, first.matmul_dtype
  if any(l.dtype != dt or l.matmul_dtype != mode or l.in_features != first.in_features for l in layers):
    raise ValueError("fused_linear: the layers must share dtype, matmul_dtype and in_features")
  kernel = jnp.stack([l.kernel[...].astype(dt) for l in layers], axis=-2)   # [in, n, out]
  y = matmul(x.astype(dt), kernel, mode)                                     # [..., n, out]
  if all(l.bias is not None for l in layers):
    y = y + jnp.stack([l.bias[...].astype(dt) for l in layers])
  elif any(l.bias is not None for l in layers):
    raise ValueError("fused_linear: either all layers have a bias or none")
  outs = []
  for i, layer in enumerate(layers):
    d = layer.delta(x)
    outs.append(y[..., i, :] if d is None else y[..., i, :] + d)
  return outs


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


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
  """x * (1 + scale) + shift in `dtype` (Wan: float32); x [B, L, D], shift/scale [B, T, D], T = 1 or frames."""
  b, l, d = x.shape
  xt = per_frame(x.astype(dtype), shift.shape[1])
  scale, shift = scale.astype(dtype), shift.astype(dtype)
  return (xt * (1.0 + scale[:, :, None]) + shift[:, :, None]).reshape(b, l, d)


def gate(y: jax.Array, g: jax.Array, dtype=jnp.float32) -> jax.Array:
  """y * gate in `dtype` (Wan: float32; the gated residual branch); y [B, L, D], g [B, T, D]."""
  b, l, d = y.shape
  return (per_frame(y.astype(dtype), g.shape[1]) * g.astype(dtype)[:, :, None]).reshape(b, l, d)


def timestep_sinusoid(t: jax.Array, dim: int) -> jax.Array:
  """[cos(t w), sin(t w)] with w_i = 10000^(-i / (dim/2)) (cos first, spec A.2 step 4). t [...] -> [..., dim]."""
  half = dim // 2
  # The ladder is exp(-ln(1e4) * i / half) rounded once to float32 (as diffusers' Timesteps builds it).
  exponent = (-math.log(10000.0) * np.arange(half, dtype=np.float32) / np.float32(half)).astype(np.float32)
  freqs = jnp.asarray(np.exp(exponent.astype(np.float64)).astype(np.float32))
  arg = t.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(arg), jnp.sin(arg)], axis=-1)
