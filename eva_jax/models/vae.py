"""The Wan 2.1 causal 3D VAE in Flax NNX (spec/wan.md B), channels-last and memory-bounded.

    cfg = vae_config('wan2.1')                       # or 'tiny', with overrides: vae_config('tiny', base_dim=16)
    vae = WanVAE(cfg, rngs=nnx.Rngs(0))
    nnx.update(vae, convert.wan.convert_vae_state_dict(torch_state_dict, cfg))
    z = vae.encode(video)      # [B, 1 + 4k, H, W, 3] in [-1, 1] -> normalised latents [B, 1 + k, H/8, W/8, 16]
    video = vae.decode(z)      # -> [B, 1 + 4k, H, W, 3] in [-1, 1]

Time is processed in chunks exactly as the reference does (encoder: frame 0 alone, then chunks of 4
frames; decoder: one latent frame at a time), with the causal context of every layer carried from
chunk to chunk (vae_layers.py). The first chunk runs on its own, the rest in a `lax.scan`, so the
activation memory is that of one chunk, not of the clip; inside a chunk the full-resolution layers
(which do no temporal resampling, so any chunking is exact) run one frame at a time. `encode`/`decode` are pure functions of
the parameters and jit (`nnx.jit`) with the batch sharded over ('data', 'fsdp').

Training (eva_jax.training.vae) calls `encode_posterior(video, stream=False)` and
`decode(z, stream=False)`: frame 0, then all later frames as one chunk, no scans. That is the same
function; it holds the whole clip's activations, and on CPU it differentiates several times faster
(XLA:CPU runs weight-gradient convolutions inside a loop body ~25x slower than outside one).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from eva_jax.models.vae_layers import (AttentionBlock, Cache, Conv3d, MidBlock, Resample, ResidualBlock,
                                       RMSNorm)
from eva_jax.parallel.sharding import constrain
from eva_jax.utils.tree import keyed_like, string_keys

# Per-channel statistics of the Wan 2.1 latents: z_model = (mu - mean) / std (spec/wan.md B.5).
LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

TEMPORAL_STRIDE = 4  # with two temporal downsamplers: T = 1 + 4k frames -> 1 + k latent frames
SPATIAL_STRIDE = 8   # three spatial downsamplers


# MARK: config

@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Architecture of the Wan 2.1 VAE (field names follow diffusers' AutoencoderKLWan)."""
  base_dim: int = 96
  z_dim: int = 16
  dim_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attn_scales: tuple[float, ...] = ()
  temporal_downsample: tuple[bool, ...] = (False, True, True)
  latents_mean: tuple[float, ...] = LATENTS_MEAN
  latents_std: tuple[float, ...] = LATENTS_STD
  dtype: Any = jnp.float32        # compute dtype (the reference runs the VAE in float32)
  param_dtype: Any = jnp.float32
  # bfloat16: the latent mean and 1/std rounded as EVA's buffers are (mean in bf16, 1/std computed in bf16;
  # spec/eva_fidelity_models.md section 5), the VAE side of precision 'eva'
  stats_dtype: Any = jnp.float32

  def __post_init__(self):
    if len(self.temporal_downsample) != len(self.dim_mult) - 1:
      raise ValueError(f"VAEConfig.temporal_downsample has {len(self.temporal_downsample)} entries; "
                       f"expected len(dim_mult) - 1 = {len(self.dim_mult) - 1}")
    if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
      raise ValueError(f"VAEConfig.latents_mean/std have {len(self.latents_mean)}/{len(self.latents_std)} "
                       f"entries; expected z_dim = {self.z_dim}")

  @property
  def temporal_stride(self) -> int:
    return 2 ** sum(self.temporal_downsample)

  @property
  def spatial_stride(self) -> int:
    return 2 ** (len(self.dim_mult) - 1)


VAE_CONFIGS = {
    "wan2.1": VAEConfig(),
    # Same topology (three downsamplers, two temporal), narrow channels: CPU parity tests.
    "tiny": VAEConfig(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
}


def vae_config(name: str = "wan2.1", **overrides) -> VAEConfig:
  """A named VAE config ('wan2.1' or 'tiny') with field overrides; unknown fields raise."""
  if name not in VAE_CONFIGS:
    raise ValueError(f"unknown VAE config {name!r}; known: {sorted(VAE_CONFIGS)}")
  fields = {f.name for f in dataclasses.fields(VAEConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"vae_config({name!r}): unknown field(s) {unknown}; fields are {sorted(fields)}")
  for key in ("dim_mult", "attn_scales", "temporal_downsample", "latents_mean", "latents_std"):
    if key in overrides:
      overrides[key] = tuple(overrides[key])
  return dataclasses.replace(VAE_CONFIGS[name], **overrides)


def stats_dtype(precision: str):
  """The latent-statistics dtype of a precision mode ('wan': float32, 'eva': bfloat16 as EVA's buffers)."""
  if precision not in ("wan", "eva"):
    raise ValueError(f"precision must be 'wan' or 'eva', got {precision!r}")
  return jnp.bfloat16 if precision == "eva" else jnp.float32


# MARK: encoder / decoder

def _stream(layers, x: jax.Array, cache: Cache) -> tuple[jax.Array, tuple]:
  """Runs streaming layers in order; cache is a tuple with one entry per layer (None at the start)."""
  new = []
  for i, layer in enumerate(layers):
    x, c = layer(x, None if cache is None else cache[i])
    new.append(c)
  return x, tuple(new)


def _scan_chunks(step, cache: Cache, chunks: jax.Array) -> tuple[jax.Array, Cache]:
  """lax.scan of `step(x, cache) -> (y, cache)` over chunks [n, B, ...] -> (stacked [n, B, ...], cache)."""
  def body(carry, x):
    y, carry = step(x, carry)
    return carry, y
  cache, ys = jax.lax.scan(body, cache, chunks)
  return ys, cache


def _merge_time(first: jax.Array | None, rest: jax.Array | None) -> jax.Array:
  # first: [B, t0, ...]; rest: [n, B, t, ...] -> [B, t0 + n t, ...]
  if rest is None:
    return first
  n, b, t = rest.shape[:3]
  rest = jnp.moveaxis(rest, 0, 1).reshape((b, n * t) + rest.shape[3:])
  return rest if first is None else jnp.concatenate([first, rest.astype(first.dtype)], axis=1)


def _frame_by_frame(step, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
  """Runs a streaming step one frame at a time (a lax.scan over frames).

  Exact for layers without temporal resampling (causal convs with their caches, per-frame norms and
  spatial ops give the same result for any chunking), and it bounds their activations to one frame.
  """
  first = None
  if cache is None:  # the first frame creates the cache
    first, cache = step(x[:, :1], None)
    x = x[:, 1:]
  if x.shape[1] == 0:
    return first, cache
  rest, cache = _scan_chunks(step, cache, jnp.moveaxis(x[:, :, None], 1, 0))
  return _merge_time(first, rest), cache


def _whole(step, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
  """`_frame_by_frame` without the scan: the same function, activations of every frame at once."""
  return step(x, cache)


class Encoder3d(nnx.Module):
  """[B, t, H, W, 3] chunk -> [B, t', H/8, W/8, 2 z_dim] (conv_in, down_blocks, mid_block, head)."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    dims = [cfg.base_dim * m for m in (1,) + tuple(cfg.dim_mult)]
    self.conv_in = Conv3d(3, dims[0], (3, 3, 3), **kw)
    blocks, scale = [], 1.0
    for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
      for _ in range(cfg.num_res_blocks):
        blocks.append(ResidualBlock(din, dout, **kw))
        if scale in cfg.attn_scales:
          blocks.append(AttentionBlock(dout, **kw))
        din = dout
      if i != len(cfg.dim_mult) - 1:
        blocks.append(Resample(dout, "downsample3d" if cfg.temporal_downsample[i] else "downsample2d", **kw))
        scale /= 2.0
    # One flat list, indexed like the reference's `downsamples.{i}`.
    self.down_blocks = nnx.List(blocks)
    # Blocks before the first temporal downsampler see each frame on its own: run them frame by frame.
    self.n_per_frame = next((j for j, blk in enumerate(blocks)
                             if isinstance(blk, Resample) and blk.mode == "downsample3d"), len(blocks))
    self.mid_block = MidBlock(dims[-1], **kw)
    self.norm_out = RMSNorm(dims[-1], dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.conv_out = Conv3d(dims[-1], 2 * cfg.z_dim, (3, 3, 3), **kw)

  def _per_frame(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    c_in, c_blocks = (None, None) if cache is None else cache
    x, c_in = self.conv_in.causal(x, c_in)
    x, c_blocks = _stream([self.down_blocks[j] for j in range(self.n_per_frame)], x, c_blocks)
    return x, (c_in, c_blocks)

  def __call__(self, x: jax.Array, cache: Cache, stream: bool = True) -> tuple[jax.Array, Cache]:
    c_pre, c_blocks, c_mid, c_out = (None,) * 4 if cache is None else cache
    # Full-resolution layers one frame at a time (stream): peak memory of one frame, not of the chunk.
    x, c_pre = (_frame_by_frame if stream else _whole)(self._per_frame, x, c_pre)
    rest = [self.down_blocks[j] for j in range(self.n_per_frame, len(self.down_blocks))]
    x, c_blocks = _stream(rest, x, c_blocks)
    x, c_mid = self.mid_block(x, c_mid)
    x, c_out = self.conv_out.causal(jax.nn.silu(self.norm_out(x)), c_out)
    return x, (c_pre, c_blocks, c_mid, c_out)


class UpBlock(nnx.Module):
  """num_res_blocks + 1 residual blocks, then an optional upsampler (diffusers `up_blocks.{i}`)."""

  def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, mode: str | None, *,
               dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List([ResidualBlock(in_dim if j == 0 else out_dim, out_dim, **kw)
                             for j in range(num_res_blocks + 1)])
    self.upsamplers = nnx.List([Resample(out_dim, mode, **kw)] if mode else [])

  def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    c_res, c_up = (None, None) if cache is None else cache
    x, c_res = _stream(self.resnets, x, c_res)
    x, c_up = _stream(self.upsamplers, x, c_up)
    return x, (c_res, c_up)


class Decoder3d(nnx.Module):
  """[B, 1, h, w, z_dim] latent frame -> [B, 1 or 4, 8h, 8w, 3] (conv_in, mid_block, up_blocks, head).

  Like diffusers' AutoencoderKLWan (and unlike the original), the decoder has no attention outside
  its middle block, whatever `attn_scales` says; the released config has attn_scales = ().
  """

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    mult = tuple(cfg.dim_mult)
    dims = [cfg.base_dim * m for m in (mult[-1],) + mult[::-1]]
    temporal_upsample = tuple(cfg.temporal_downsample)[::-1]
    self.conv_in = Conv3d(cfg.z_dim, dims[0], (3, 3, 3), **kw)
    self.mid_block = MidBlock(dims[0], **kw)
    blocks = []
    for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
      if i > 0:
        din //= 2  # every upsampler halves the channels
      mode = None
      if i != len(mult) - 1:
        mode = "upsample3d" if temporal_upsample[i] else "upsample2d"
      blocks.append(UpBlock(din, dout, cfg.num_res_blocks, mode, **kw))
    self.up_blocks = nnx.List(blocks)
    self.norm_out = RMSNorm(dims[-1], dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.conv_out = Conv3d(dims[-1], 3, (3, 3, 3), **kw)
    # Up blocks after the last temporal upsampler (and the head) run frame by frame.
    self.n_chunked = max((i + 1 for i, blk in enumerate(blocks)
                          if blk.upsamplers and blk.upsamplers[0].mode == "upsample3d"), default=0)

  def _per_frame(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    c_up, c_out = (None, None) if cache is None else cache
    tail = [self.up_blocks[i] for i in range(self.n_chunked, len(self.up_blocks))]
    x, c_up = _stream(tail, x, c_up)
    x, c_out = self.conv_out.causal(jax.nn.silu(self.norm_out(x)), c_out)
    return x, (c_up, c_out)

  def __call__(self, x: jax.Array, cache: Cache, stream: bool = True) -> tuple[jax.Array, Cache]:
    c_in, c_mid, c_up, c_post = (None,) * 4 if cache is None else cache
    x, c_in = self.conv_in.causal(x, c_in)
    x, c_mid = self.mid_block(x, c_mid)
    x, c_up = _stream([self.up_blocks[i] for i in range(self.n_chunked)], x, c_up)
    # Full-resolution layers one frame at a time (stream): peak memory of one frame, not of the chunk.
    x, c_post = (_frame_by_frame if stream else _whole)(self._per_frame, x, c_post)
    return x, (c_in, c_mid, c_up, c_post)


# MARK: the VAE

class WanVAE(nnx.Module):
  """Wan 2.1 VAE: `encode` video -> normalised latents, `decode` normalised latents -> video."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.cfg = cfg
    self.encoder = Encoder3d(cfg, rngs=rngs)
    self.quant_conv = Conv3d(2 * cfg.z_dim, 2 * cfg.z_dim, (1, 1, 1), **kw)
    self.post_quant_conv = Conv3d(cfg.z_dim, cfg.z_dim, (1, 1, 1), **kw)
    self.decoder = Decoder3d(cfg, rngs=rngs)

  def _check_video(self, video: jax.Array):
    if video.ndim != 5 or video.shape[-1] != 3:
      raise ValueError(f"WanVAE.encode: expected video [B, T, H, W, 3], got shape {tuple(video.shape)}")
    _, t, h, w, _ = video.shape
    ts, ss = self.cfg.temporal_stride, self.cfg.spatial_stride
    if (t - 1) % ts:
      raise ValueError(f"WanVAE.encode: clip length T={t} is not 1 + {ts}k (1, {1 + ts}, {1 + 2 * ts}, ...); "
                       f"trim or pad the clip to {1 + (t - 1) // ts * ts} or {1 + ((t - 1) // ts + 1) * ts} frames")
    if h % ss or w % ss:
      raise ValueError(f"WanVAE.encode: frame size {h}x{w} is not a multiple of {ss}")

  def _stats(self):
    mean = jnp.asarray(self.cfg.latents_mean, jnp.float32)
    std = jnp.asarray(self.cfg.latents_std, jnp.float32)
    sdt = jnp.dtype(self.cfg.stats_dtype)
    if sdt != jnp.float32:  # EVA: bf16 mean, and 1/std computed in bf16 (z = (mu - mean) * inv_std)
      mean = mean.astype(sdt).astype(jnp.float32)
      std = 1.0 / (1.0 / std.astype(sdt)).astype(sdt).astype(jnp.float32)
    return mean, std

  def _moments(self, video: jax.Array, stream: bool) -> jax.Array:
    """[B, 1 + 4k, H, W, 3] -> the posterior's raw [mu, logvar] [B, 1 + k, H/8, W/8, 2 z_dim] (float32)."""
    self._check_video(video)
    b, t = video.shape[:2]
    ts = self.cfg.temporal_stride
    x = constrain(video, ("act_batch", None, None, None, None))

    def step(chunk, cache):
      h, cache = self.encoder(chunk, cache, stream)
      return self.quant_conv(h).astype(jnp.float32), cache

    # The reference's chunks: [frame 0], [1..ts], [ts+1..2ts], ... Without `stream`, frames 1.. form
    # one chunk: every layer sees the same inputs (the temporal downsamplers' stride-2 windows tile
    # the clip the same way), so the result is the same function with the whole clip's activations.
    m0, cache = step(x[:, :1], None)
    if t == 1:
      return m0
    if not stream:
      return jnp.concatenate([m0, step(x[:, 1:], cache)[0]], axis=1)
    chunks = x[:, 1:].reshape((b, (t - 1) // ts, ts) + x.shape[2:])
    rest, _ = _scan_chunks(step, cache, jnp.moveaxis(chunks, 1, 0))
    return _merge_time(m0, rest)

  def encode(self, video: jax.Array, *, stream: bool = True) -> jax.Array:
    """[B, 1 + 4k, H, W, 3] in [-1, 1] -> normalised posterior mean [B, 1 + k, H/8, W/8, z_dim] (float32).

    stream: the reference's chunk-by-chunk pass (activation memory of one chunk). False runs frames
    1.. as one chunk without scans: the same function (to rounding), several times faster to
    differentiate on CPU, memory growing with the clip; the VAE trainer uses it on short clips.
    """
    mean, std = self._stats()
    mu = self._moments(video, stream)[..., :self.cfg.z_dim]
    return constrain((mu - mean) / std, ("act_batch", None, None, None, None))

  def encode_posterior(self, video: jax.Array, *, stream: bool = True) -> tuple[jax.Array, jax.Array]:
    """The diagonal Gaussian posterior in the normalised latent space: (mean, logvar), each
    [B, 1 + k, H/8, W/8, z_dim] float32. mean == encode(video); logvar is Wan's, clipped to [-30, 20]
    as the reference does, then shifted by -2 log(latents_std)."""
    mean, std = self._stats()
    moments = self._moments(video, stream)
    mu, logvar = moments[..., :self.cfg.z_dim], moments[..., self.cfg.z_dim:]
    logvar = jnp.clip(logvar, -30.0, 20.0) - 2.0 * jnp.log(std)
    names = ("act_batch", None, None, None, None)
    return constrain((mu - mean) / std, names), constrain(logvar, names)

  def decode(self, z: jax.Array, *, stream: bool = True, clip: bool = True) -> jax.Array:
    """Normalised latents [B, F, h, w, z_dim] -> video [B, 1 + 4(F-1), 8h, 8w, 3] clipped to [-1, 1].

    stream: one latent frame at a time (the reference); False: latent frames 1.. in one pass
    (the same function to rounding, see `encode`). clip=False skips the final clamp to [-1, 1], so
    that a training loss still has a gradient where the output overshoots.
    """
    if z.ndim != 5 or z.shape[-1] != self.cfg.z_dim:
      raise ValueError(f"WanVAE.decode: expected latents [B, F, h, w, {self.cfg.z_dim}], got {tuple(z.shape)}")
    mean, std = self._stats()
    z = constrain(z, ("act_batch", None, None, None, None))
    x = self.post_quant_conv(z.astype(jnp.float32) * std + mean)  # [B, F, h, w, z_dim]

    def step(frames, cache):
      y, cache = self.decoder(frames, cache, stream)
      y = y.astype(jnp.float32)
      return (jnp.clip(y, -1.0, 1.0) if clip else y), cache

    # Frame 0 -> 1 video frame, every later latent frame -> temporal_stride frames.
    v0, cache = step(x[:, :1], None)
    out = v0
    if x.shape[1] > 1 and not stream:
      out = jnp.concatenate([v0, step(x[:, 1:], cache)[0]], axis=1)
    elif x.shape[1] > 1:
      rest, _ = _scan_chunks(step, cache, jnp.moveaxis(x[:, 1:, None], 1, 0))
      out = _merge_time(v0, rest)
    return constrain(out, ("act_batch", None, None, None, None))


# MARK: loading

def abstract_vae(cfg: VAEConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, state of ShapeDtypeStructs) of WanVAE(cfg), allocating nothing.

  Safe under an active mesh (`nnx.eval_shape` there resolves the logical axis names against the
  mesh and fails); the Params keep their logical-name metadata. Fill with
  `nnx.replace_by_pure_dict(state, params)` and `nnx.merge(graphdef, state)`.
  """
  return jax.eval_shape(lambda: nnx.split(WanVAE(cfg, rngs=nnx.Rngs(0))))


def load_vae(path: str, cfg: VAEConfig, mesh: jax.sharding.Mesh | None = None) -> WanVAE:
  """WanVAE(cfg) with parameters restored from the orbax checkpoint written by `python -m convert --kind vae`.

  Built abstractly (no random init); each parameter is read onto the sharding its logical axis names
  give on `mesh` (or onto the first device), cast to cfg.param_dtype.
  """
  from orbax.checkpoint.experimental import v1 as ocp
  from eva_jax.parallel.sharding import state_shardings

  graphdef, state = abstract_vae(cfg)
  if mesh is not None:
    shardings = nnx.to_pure_dict(state_shardings(state, mesh))
  else:
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: single, nnx.to_pure_dict(state))
  targets = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                         nnx.to_pure_dict(state), shardings)
  restored = keyed_like(ocp.load(path, string_keys(targets)), targets)
  nnx.replace_by_pure_dict(state, restored)
  return nnx.merge(graphdef, state)
