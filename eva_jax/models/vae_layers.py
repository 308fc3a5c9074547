"""Building blocks of the Wan 2.1 causal 3D VAE (channels-last, streaming over time chunks).

Every block that looks at more than one frame is *streaming*: it is called as
`y, cache = block(x, cache)` on one time chunk `x: [B, t, H, W, C]`, and `cache` carries the frames
it needs from the previous chunk. `cache=None` means "this is the first chunk of the clip"; the
returned cache then already has the shape it keeps for every later chunk, so a `lax.scan` over the
remaining chunks can carry it. This reproduces the reference's chunked feature-cache semantics
(spec/wan.md B.4) exactly:
  * a k=3 causal conv keeps the last 2 frames of its input; at the start of the clip they are
    zeros, which is the reference's 2 zero frames of front padding;
  * the encoder's temporal downsampler passes the first chunk through unchanged and afterwards
    convolves (last cached frame, chunk) with stride 2;
  * the decoder's temporal upsampler skips its time conv on the first latent frame, and afterwards
    runs a causal conv whose context starts at frame 1 (zeros before it).

Parameters carry logical axis names for eva_jax.parallel.sharding.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Cache = Any  # a pytree of arrays (or None / () for stateless blocks)

# The reference normalises with F.normalize: x / max(||x||, eps).
_NORM_EPS = 1e-12
# Frames of context a k=3 causal conv carries between chunks.
CACHE_T = 2


def _kernel_init(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int, dtype) -> jax.Array:
  # PyTorch's default conv init (kaiming-uniform with a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  bound = 1.0 / (fan_in ** 0.5)
  return jax.random.uniform(rngs.params(), shape, dtype, -bound, bound)


# MARK: convolutions and norm

def fold_time_taps() -> bool:
  """Whether Conv3d runs as one 2-D conv over time-stacked channels (on CPU) instead of a 3-D conv.

  XLA:CPU has no fast 3-D convolution: its generic kernel runs the VAE's convs 8-12x slower than
  the 2-D kernel does the same arithmetic (measured on 2 cores). GPU and TPU keep the native conv.
  """
  return jax.default_backend() == "cpu"


def _conv3d_as_conv2d(x: jax.Array, kernel: jax.Array, stride_t: int) -> jax.Array:
  """The unpadded-in-time 3-D conv as a 2-D conv: the kt input frames that feed an output frame are
  stacked along channels. x [B, T, H, W, Ci], kernel [kt, kh, kw, Ci, Co] -> [B, T', H, W, Co]."""
  kt, kh, kw, ci, co = kernel.shape
  b, t, h, w, _ = x.shape
  t_out = (t - kt) // stride_t + 1
  taps = [x[:, i:i + stride_t * (t_out - 1) + 1:stride_t] for i in range(kt)]  # kt x [B, T', H, W, Ci]
  xs = jnp.concatenate(taps, axis=-1).reshape(b * t_out, h, w, kt * ci)
  k2 = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(kh, kw, kt * ci, co)   # channel index = tap * Ci + c
  y = jax.lax.conv_general_dilated(xs, k2, window_strides=(1, 1),
                                   padding=((kh // 2, kh // 2), (kw // 2, kw // 2)),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y.reshape(b, t_out, h, w, co)


class Conv3d(nnx.Module):
  """Conv3d with no time padding: the caller supplies temporal context (`causal` does it for you).

  Kernel layout [kt, kh, kw, Cin, Cout] (DHWIO); spatial padding is symmetric `kh // 2`.
  """

  def __init__(self, in_dim: int, out_dim: int, kernel: tuple[int, int, int], *,
               stride_t: int = 1, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    kt, kh, kw = kernel
    fan_in = in_dim * kt * kh * kw
    self.kernel = nnx.Param(_kernel_init(rngs, (kt, kh, kw, in_dim, out_dim), fan_in, param_dtype),
                            out_sharding=(None, None, None, "conv_in", "conv_out"))
    self.bias = nnx.Param(_kernel_init(rngs, (out_dim,), fan_in, param_dtype), out_sharding=("conv_out",))
    self.kernel_size = kernel
    self.stride_t = stride_t
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    # x: [B, T, H, W, Cin] -> [B, (T - kt) // s + 1, H, W, Cout]
    kt, kh, kw = self.kernel_size
    kernel = self.kernel[...].astype(self.dtype)
    x = x.astype(self.dtype)
    if self.kernel_size == (1, 1, 1):
      # Pointwise: a matmul is cheaper than a conv call.
      y = jnp.einsum("bthwi,io->bthwo", x, kernel[0, 0, 0])
    elif fold_time_taps():
      y = _conv3d_as_conv2d(x, kernel, self.stride_t)
    else:
      y = jax.lax.conv_general_dilated(
          x, kernel, window_strides=(self.stride_t, 1, 1),
          padding=((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)),
          dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    return y + self.bias[...].astype(self.dtype)

  def causal(self, x: jax.Array, cache: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Causal conv over a chunk: prepends the cached last kt-1 input frames (zeros at the start)."""
    # x: [B, t, H, W, C]; cache: [B, kt - 1, H, W, C] or None
    ctx = self.kernel_size[0] - 1
    if cache is None:
      cache = jnp.zeros(x.shape[:1] + (ctx,) + x.shape[2:], x.dtype)
    xin = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
    return self(xin), xin[:, -ctx:]


class Conv2d(nnx.Module):
  """Per-frame 2-D conv, kernel [kh, kw, Cin, Cout]; frames are folded into the batch."""

  def __init__(self, in_dim: int, out_dim: int, *, stride: int = 1,
               padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1)),
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    fan_in = in_dim * 9
    self.kernel = nnx.Param(_kernel_init(rngs, (3, 3, in_dim, out_dim), fan_in, param_dtype),
                            out_sharding=(None, None, "conv_in", "conv_out"))
    self.bias = nnx.Param(_kernel_init(rngs, (out_dim,), fan_in, param_dtype), out_sharding=("conv_out",))
    self.stride = stride
    self.padding = padding
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    # x: [B, T, H, W, Cin] -> [B, T, H', W', Cout]
    b, t = x.shape[:2]
    y = jax.lax.conv_general_dilated(
        x.reshape((b * t,) + x.shape[2:]).astype(self.dtype), self.kernel[...].astype(self.dtype),
        window_strides=(self.stride, self.stride), padding=self.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = y + self.bias[...].astype(self.dtype)
    return y.reshape((b, t) + y.shape[1:])


class RMSNorm(nnx.Module):
  """Wan's RMS_norm: x / max(||x||_2, 1e-12) over channels, times sqrt(C) * gamma (no bias)."""

  def __init__(self, dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32):
    self.gamma = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))
    self.scale = dim ** 0.5
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    # Statistics in float32 whatever the compute dtype (as the reference does for half types).
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
    y = x32 / jnp.maximum(norm, _NORM_EPS)
    return (y.astype(self.dtype) * self.scale) * self.gamma[...].astype(self.dtype)


# MARK: blocks

class ResidualBlock(nnx.Module):
  """RMSNorm, SiLU, causal conv3, RMSNorm, SiLU, (dropout = identity at eval), causal conv3, + shortcut."""

  def __init__(self, in_dim: int, out_dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.norm1 = RMSNorm(in_dim, **kw)
    self.conv1 = Conv3d(in_dim, out_dim, (3, 3, 3), rngs=rngs, **kw)
    self.norm2 = RMSNorm(out_dim, **kw)
    self.conv2 = Conv3d(out_dim, out_dim, (3, 3, 3), rngs=rngs, **kw)
    self.conv_shortcut = Conv3d(in_dim, out_dim, (1, 1, 1), rngs=rngs, **kw) if in_dim != out_dim else None

  def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    # x: [B, t, H, W, Cin] -> [B, t, H, W, Cout]; cache: (conv1 ctx, conv2 ctx) or None
    c1, c2 = (None, None) if cache is None else cache
    h = x if self.conv_shortcut is None else self.conv_shortcut(x)
    x, c1 = self.conv1.causal(jax.nn.silu(self.norm1(x)), c1)
    x, c2 = self.conv2.causal(jax.nn.silu(self.norm2(x)), c2)
    return x + h, (c1, c2)


class Dense(nnx.Module):
  """Pointwise projection over channels (the reference's 1x1 Conv2d), kernel [Cin, Cout]."""

  def __init__(self, in_dim: int, out_dim: int, *, zero_init: bool = False, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    kernel = (jnp.zeros((in_dim, out_dim), param_dtype) if zero_init
              else _kernel_init(rngs, (in_dim, out_dim), in_dim, param_dtype))
    self.kernel = nnx.Param(kernel, out_sharding=("conv_in", "conv_out"))
    self.bias = nnx.Param(jnp.zeros((out_dim,), param_dtype), out_sharding=("conv_out",))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    return x.astype(self.dtype) @ self.kernel[...].astype(self.dtype) + self.bias[...].astype(self.dtype)


class AttentionBlock(nnx.Module):
  """Single-head self-attention over the H*W positions of each frame, with a residual."""

  def __init__(self, dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.norm = RMSNorm(dim, **kw)
    # Output channels [0:C] = q, [C:2C] = k, [2C:3C] = v.
    self.to_qkv = Dense(dim, 3 * dim, rngs=rngs, **kw)
    # Wan zero-initialises the output projection, so a fresh block is the identity.
    self.proj = Dense(dim, dim, zero_init=True, rngs=rngs, **kw)
    self.dtype = dtype

  def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
    # x: [B, t, H, W, C]; per frame, no temporal context (cache stays empty).
    b, t, hh, ww, c = x.shape
    q, k, v = jnp.split(self.to_qkv(self.norm(x).reshape(b * t, hh * ww, c)), 3, axis=-1)  # [B*t, N, C]
    # Scores and softmax in float32 (N = H*W is large; bf16 logits would lose precision).
    s = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * (c ** -0.5)
    p = jax.nn.softmax(s, axis=-1).astype(self.dtype)
    o = self.proj(jnp.einsum("bqk,bkc->bqc", p, v))
    return x + o.reshape(b, t, hh, ww, c).astype(x.dtype), ()


class Resample(nnx.Module):
  """Spatial (and optionally temporal) down/up-sampling.

  modes: 'downsample2d', 'downsample3d' (+ stride-2 time conv), 'upsample2d', 'upsample3d'
  (+ time conv that doubles the frame count). Upsamplers halve the channels (dim -> dim // 2).
  """

  MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")

  def __init__(self, dim: int, mode: str, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if mode not in self.MODES:
      raise ValueError(f"Resample mode {mode!r} is not one of {self.MODES}")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.mode = mode
    if mode.startswith("down"):
      # ZeroPad2d(right 1, bottom 1) + 3x3 stride-2 conv without padding.
      self.resample = Conv2d(dim, dim, stride=2, padding=((0, 1), (0, 1)), **kw)
      self.time_conv = Conv3d(dim, dim, (3, 1, 1), stride_t=2, **kw) if mode == "downsample3d" else None
    else:
      self.resample = Conv2d(dim, dim // 2, **kw)
      self.time_conv = Conv3d(dim, 2 * dim, (3, 1, 1), **kw) if mode == "upsample3d" else None

  def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    if self.mode.startswith("down"):
      x = self.resample(x)                                      # [B, t, H/2, W/2, C]
      if self.time_conv is None:
        return x, ()
      if cache is None:
        # First chunk: the frame passes through; it is the context of the next chunk.
        return x, x[:, -1:]
      # (last frame of the previous chunk, chunk) -> stride 2: t frames -> t / 2 frames.
      xin = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
      return self.time_conv(xin), x[:, -1:]

    if self.time_conv is not None:
      if cache is None:
        # First latent frame: no time conv; the conv's context starts at the next frame.
        cache = jnp.zeros(x.shape[:1] + (CACHE_T,) + x.shape[2:], x.dtype)
      else:
        b, t, hh, ww, c = x.shape
        y, cache = self.time_conv.causal(x, cache)              # [B, t, H, W, 2C]
        # Channels [0:C] are the earlier output frame, [C:2C] the later one.
        x = y.reshape(b, t, hh, ww, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, hh, ww, c)
    else:
      cache = ()
    # Nearest ×2 (nearest-exact equals nearest for an exact factor of 2).
    x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
    return self.resample(x), cache


class MidBlock(nnx.Module):
  """ResidualBlock, AttentionBlock, ResidualBlock (names as diffusers: resnets.{0,1}, attentions.0)."""

  def __init__(self, dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List([ResidualBlock(dim, dim, **kw), ResidualBlock(dim, dim, **kw)])
    self.attentions = nnx.List([AttentionBlock(dim, **kw)])

  def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    c0, c1 = (None, None) if cache is None else cache
    x, c0 = self.resnets[0](x, c0)
    x, _ = self.attentions[0](x)
    x, c1 = self.resnets[1](x, c1)
    return x, (c0, c1)
