"""CLIP ViT-H/14 image tower as Wan 2.1 i2v uses it, in Flax NNX.

What Wan computes (spec/wan.md C.1, `clip.visual(x, use_31_block=True)`): frames in [-1, 1] are
squash-resized to 224x224 (bicubic, no crop, no antialias), mapped to [0, 1], normalised with the CLIP
mean/std, cut into 14x14 patches (conv without bias), prefixed with a class token, given learned
positions, passed through `pre_norm` and the first 31 of the 32 pre-LN blocks. There is no post norm
and no projection head: the output is the penultimate block's hidden states, all 257 tokens,
[B, 257, 1280]. Attention uses the usual 1/sqrt(d) scale and the MLP exact (erf) GELU.

The model only holds the blocks it runs (31 for ViT-H/14); the converter drops block 32, the post
norm and the head.

    cfg = clip_config('vit-h-14', dtype=jnp.bfloat16)
    clip = CLIPVisionEncoder(cfg, rngs=nnx.Rngs(0))
    feats = clip.encode_image(first_frames)   # [B, H, W, 3] in [-1, 1] -> [B, 257, 1280]

Resizing (`resize='torch'`, the default) reproduces PyTorch's `F.interpolate(mode='bicubic',
align_corners=False)` exactly: cubic convolution with a = -0.75, half-pixel centres, edge-clamped
taps, no antialias, written as two small [out, in] matrices. `resize='jax'` uses
`jax.image.resize(..., 'bicubic', antialias=False)` instead, whose Keys kernel has a = -0.5: on
white-noise images the two differ by ~10% relative, on smooth images far less (measured in
tests/test_clip.py). Inputs already at the model's size are not resampled.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eva_jax.parallel.sharding import constrain

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Vision tower sizes. `num_layers` is the tower's depth; the model runs `num_layers - skip_last`."""
  image_size: int = 224
  patch_size: int = 14
  width: int = 1280
  num_layers: int = 32
  num_heads: int = 16
  mlp_dim: int = 5120
  eps: float = 1e-5
  skip_last: int = 1              # Wan's use_31_block: output after block 31 of 32
  resize: str = "torch"           # bicubic kernel of the squash resize: 'torch' (Wan's) or 'jax'
  mean: tuple[float, float, float] = CLIP_MEAN
  std: tuple[float, float, float] = CLIP_STD
  dtype: Any = jnp.float32        # compute dtype (Wan runs CLIP in float16 autocast)
  param_dtype: Any = jnp.float32

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_tokens(self) -> int:
    return self.num_patches + 1

  @property
  def used_layers(self) -> int:
    return self.num_layers - self.skip_last


CLIP_PRESETS: dict[str, dict[str, Any]] = {
    "vit-h-14": {},
    "tiny": dict(image_size=28, patch_size=7, width=32, num_layers=3, num_heads=4, mlp_dim=64),
}


def clip_config(name: str = "vit-h-14", **overrides) -> CLIPConfig:
  """A preset by name ('vit-h-14', 'tiny') with fields overridden by keyword."""
  if name not in CLIP_PRESETS:
    raise KeyError(f"unknown CLIP preset {name!r}; known: {sorted(CLIP_PRESETS)}")
  return CLIPConfig(**{**CLIP_PRESETS[name], **overrides})


# MARK: preprocessing


def _torch_cubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
  """[n_out, n_in] weights of torch's bicubic resize along one axis (align_corners=False)."""
  # Source positions in float32 arithmetic, as torch computes them (matters at 480+ pixels).
  scale = np.float32(n_in / n_out)
  src = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
  base = np.floor(src)  # src is not clamped at 0 for cubic
  t = (src - base).astype(np.float64)
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1              # |x| <= 1
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a         # 1 < |x| < 2
  weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)  # [n_out, 4]
  taps = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3)[None], 0, n_in - 1)
  mat = np.zeros((n_out, n_in), np.float64)
  np.add.at(mat, (np.repeat(np.arange(n_out), 4), taps.ravel()), weights.ravel())
  return mat.astype(np.float32)


def resize_bicubic(frames: jax.Array, size: int, method: str = "torch") -> jax.Array:
  """[B, H, W, C] -> [B, size, size, C] float32: squash resize (aspect ratio not kept), no antialias.

  method 'torch' matches `F.interpolate(mode='bicubic', align_corners=False)`; 'jax' is
  `jax.image.resize(..., 'bicubic', antialias=False)` (a different cubic kernel, see module doc).
  """
  b, h, w, c = frames.shape
  x = frames.astype(jnp.float32)
  if (h, w) == (size, size):
    return x
  if method == "jax":
    return jax.image.resize(x, (b, size, size, c), "bicubic", antialias=False)
  if method != "torch":
    raise ValueError(f"resize method must be 'torch' or 'jax', got {method!r}")
  mh = jnp.asarray(_torch_cubic_matrix(h, size))
  mw = jnp.asarray(_torch_cubic_matrix(w, size))
  hp = jax.lax.Precision.HIGHEST  # resampling is cheap; keep it exact in float32
  x = jnp.einsum("oh,bhwc->bowc", mh, x, precision=hp)
  return jnp.einsum("pw,bowc->bopc", mw, x, precision=hp)


def normalize(frames: jax.Array, cfg: CLIPConfig) -> jax.Array:
  """[-1, 1] -> [0, 1] -> (x - mean) / std, float32."""
  x = frames.astype(jnp.float32) * 0.5 + 0.5
  return (x - jnp.asarray(cfg.mean, jnp.float32)) / jnp.asarray(cfg.std, jnp.float32)


# MARK: layers


class LayerNorm(nnx.Module):
  """LayerNorm with float32 statistics, output in the compute dtype."""

  def __init__(self, dim: int, cfg: CLIPConfig):
    self.eps, self.dtype = cfg.eps, cfg.dtype
    self.scale = nnx.Param(jnp.ones((dim,), cfg.param_dtype), out_sharding=("norm",))
    self.bias = nnx.Param(jnp.zeros((dim,), cfg.param_dtype), out_sharding=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


def _dense(d_in: int, d_out: int, names: tuple[str, str], cfg: CLIPConfig, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                    kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), names),
                    bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (names[1],)),
                    rngs=rngs)


class CLIPAttention(nnx.Module):
  """Multi-head self-attention over all tokens (no mask), scale 1/sqrt(head_dim)."""

  def __init__(self, cfg: CLIPConfig, rngs: nnx.Rngs):
    self.num_heads = cfg.num_heads
    self.head_dim = cfg.width // cfg.num_heads
    self.q = _dense(cfg.width, cfg.width, ("embed", "heads"), cfg, rngs)
    self.k = _dense(cfg.width, cfg.width, ("embed", "heads"), cfg, rngs)
    self.v = _dense(cfg.width, cfg.width, ("embed", "heads"), cfg, rngs)
    self.o = _dense(cfg.width, cfg.width, ("heads", "embed"), cfg, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, l, d = x.shape
    split = lambda t: t.reshape(b, l, self.num_heads, self.head_dim)
    q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))  # [B, L, N, d]
    logits = jnp.einsum("bqnd,bknd->bnqk", q, k).astype(jnp.float32) * (self.head_dim ** -0.5)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # float32 softmax
    out = jnp.einsum("bnqk,bknd->bqnd", probs, v).reshape(b, l, d)
    return self.o(out)


class CLIPBlock(nnx.Module):
  """Pre-LN block: x + attn(norm1 x); x + fc2(gelu(fc1(norm2 x)))."""

  def __init__(self, cfg: CLIPConfig, rngs: nnx.Rngs):
    self.norm1 = LayerNorm(cfg.width, cfg)
    self.attn = CLIPAttention(cfg, rngs)
    self.norm2 = LayerNorm(cfg.width, cfg)
    self.fc1 = _dense(cfg.width, cfg.mlp_dim, ("embed", "mlp"), cfg, rngs)
    self.fc2 = _dense(cfg.mlp_dim, cfg.width, ("mlp", "embed"), cfg, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.norm1(x))
    h = jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False)  # exact GELU, not QuickGELU
    h = constrain(h, ("act_batch", "act_text", "act_mlp"))
    x = x + self.fc2(h)
    return constrain(x, ("act_batch", "act_text", "act_embed"))


# MARK: encoder


class CLIPVisionEncoder(nnx.Module):
  """Normalised pixels [B, S, S, 3] -> penultimate hidden states [B, 1 + (S/p)^2, width]."""

  def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    p, d = cfg.patch_size, cfg.width
    self.patch_embed = nnx.Conv(
        3, d, kernel_size=(p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, None, "conv_in", "embed")),
        rngs=rngs)
    init = nnx.initializers.normal(d ** -0.5)
    self.cls_embedding = nnx.Param(init(rngs.params(), (d,), cfg.param_dtype), out_sharding=("embed",))
    self.pos_embedding = nnx.Param(init(rngs.params(), (cfg.num_tokens, d), cfg.param_dtype),
                                   out_sharding=(None, "embed"))
    self.pre_norm = LayerNorm(d, cfg)

    @nnx.split_rngs(splits=cfg.used_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(r: nnx.Rngs) -> CLIPBlock:
      return CLIPBlock(cfg, r)

    self.blocks = make_blocks(rngs)

  def __call__(self, pixels: jax.Array) -> jax.Array:
    cfg = self.cfg
    b = pixels.shape[0]
    x = self.patch_embed(pixels.astype(cfg.dtype))  # [B, S/p, S/p, D]
    x = x.reshape(b, -1, cfg.width)  # row-major patches, like torch's flatten(2)
    cls = jnp.broadcast_to(self.cls_embedding[...].astype(cfg.dtype), (b, 1, cfg.width))
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embedding[...].astype(cfg.dtype)[None]
    x = self.pre_norm(x)
    x = constrain(x, ("act_batch", "act_text", "act_embed"))

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry,
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def run(block: CLIPBlock, x: jax.Array) -> jax.Array:
      return block(x)

    return run(self.blocks, x)

  def preprocess(self, frames: jax.Array) -> jax.Array:
    """[B, H, W, 3] in [-1, 1] -> normalised [B, S, S, 3] float32."""
    return normalize(resize_bicubic(frames, self.cfg.image_size, self.cfg.resize), self.cfg)

  def encode_image(self, frames: jax.Array) -> jax.Array:
    """Wan's `clip.visual(x, use_31_block=True)`: [B, H, W, 3] in [-1, 1] -> [B, 257, width]."""
    return self(self.preprocess(frames))


@nnx.jit
def encode_image_jit(encoder: CLIPVisionEncoder, frames: jax.Array) -> jax.Array:
  """Jitted `encoder.encode_image(frames)`."""
  return encoder.encode_image(frames)
