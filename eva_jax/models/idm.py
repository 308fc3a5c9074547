"""EVA's inverse dynamics model (IDM): three frames in, the 14-d joint action of the middle frame out.

Architecture (spec/eva.md section B, the authors' `Resnet_plus`):
  frames [B, 3, H, W, 3] in [0, 1]
    -> resize to 512x512 (aspect not kept; bilinear with antialias like torchvision `Resize` on
       tensors) and ImageNet mean/std normalisation
    -> frames stacked frame-major on channels [B, 512, 512, 9]
    -> torchvision ResNet-50 v1.5 trunk (9-channel 7x7/2 stem, maxpool, layer1..layer4) [B, 16, 16, 2048]
    -> spatial softmax with a learnable temperature (expected x then y on a [-1, 1] 'ij' grid) [B, 4096]
    -> MLP head 4096 -> 1024 -> LayerNorm -> GELU -> Dropout(0.1) -> 512 -> GELU -> 14
    -> de-normalisation `a * train_std + train_mean` (joint units: rad, grippers 0..1).

BatchNorm keeps running statistics in `nnx.BatchStat` and follows torch exactly (momentum 0.1,
unbiased running variance, eps 1e-5): `model.train()` normalises with batch statistics and updates the
running ones, `model.eval()` uses the running ones. Dropout takes its key at call time (`rngs=`), so the
model state holds no RNG counters and training is reproducible from (seed, step).

Usage:
  idm = IDM(idm_config('resnet50'), rngs=nnx.Rngs(0)); idm.eval()
  actions = idm(frames)                       # [B, 14]
  traj = actions_from_video(idm, video)       # [B, T, 14], video [B, T, H, W, 3] in [0, 1]
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

# De-normalisation constants of the released IDM (identical to AnyPos), 14-d:
# [left_arm(6), left_gripper, right_arm(6), right_gripper].
ANYPOS_MEAN = (-0.26866713, 0.83559588, 0.69520934, -0.29099351, 0.18849116, -0.01014598, 1.41953145,
               0.35073715, 1.05651613, 0.8930193, -0.37493264, -0.18510782, -0.0272574, 1.35274259)
ANYPOS_STD = (0.25945241, 0.65903812, 0.52147207, 0.42150272, 0.32029947, 0.28452226, 1.78270006,
              0.29091741, 0.67675932, 0.58250554, 0.42399049, 0.28697442, 0.31100304, 1.67651926)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# MARK: config

@dataclasses.dataclass(frozen=True)
class IDMConfig:
  """Shape and numerics of the IDM. `resnet50` is the released model; `tiny` is for tests."""
  blocks: tuple[int, ...] = (3, 4, 6, 3)   # bottlenecks per stage (layer1..layer4)
  width: int = 64                          # stem / layer1 width; stage s has width * 2**s planes
  expansion: int = 4                       # bottleneck output = planes * expansion
  num_frames: int = 3
  action_dim: int = 14
  mlp_dims: tuple[int, int] = (1024, 512)
  dropout: float = 0.1
  image_size: tuple[int, int] = (512, 512)  # (H, W) the frames are resized to
  bn_eps: float = 1e-5
  bn_momentum: float = 0.1                 # torch convention: new = (1 - m) * old + m * batch
  ln_eps: float = 1e-5
  train_mean: tuple[float, ...] = ANYPOS_MEAN
  train_std: tuple[float, ...] = ANYPOS_STD
  dtype: Any = jnp.float32                 # compute dtype of convs / matmuls
  param_dtype: Any = jnp.float32

  @property
  def feature_dim(self) -> int:
    """Channels of the trunk output (2048 for ResNet-50)."""
    return self.width * 2 ** (len(self.blocks) - 1) * self.expansion


IDM_CONFIGS: dict[str, dict[str, Any]] = {
    "resnet50": {},
    # tiny: every stage once; 2x2 trunk output at 64 px (below 64 px the map is 1x1 and the spatial
    # softmax constant: use fewer stages, config blocks=(1,) or (1, 1), for smaller images)
    "tiny": dict(blocks=(1, 1, 1, 1), width=8, mlp_dims=(32, 16), image_size=(64, 64)),
}


def idm_config(name: str = "resnet50", **overrides) -> IDMConfig:
  """A named IDM preset ('resnet50' = the released model, 'tiny'), with field overrides."""
  if name not in IDM_CONFIGS:
    raise KeyError(f"unknown IDM config {name!r}; known: {sorted(IDM_CONFIGS)}")
  fields = {**IDM_CONFIGS[name], **overrides}
  for key in ("blocks", "mlp_dims", "image_size", "train_mean", "train_std"):
    if key in fields:
      fields[key] = tuple(fields[key])
  return IDMConfig(**fields)


class JointStat(nnx.Variable):
  """Non-trainable per-joint statistics (the torch buffers `train_mean` / `train_std`)."""


# MARK: layers

def _conv(cin: int, cout: int, k: int, stride: int, cfg: IDMConfig, rngs: nnx.Rngs) -> nnx.Conv:
  # torchvision init: kaiming normal, fan_out, relu gain.
  init = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")
  return nnx.Conv(
      cin, cout, kernel_size=(k, k), strides=(stride, stride), padding=((k // 2, k // 2),) * 2,
      use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
      kernel_init=nnx.with_partitioning(init, (None, None, "conv_in", "conv_out")), rngs=rngs)


class BatchNorm(nnx.Module):
  """torch.nn.BatchNorm2d over channels-last inputs, statistics in float32."""

  def __init__(self, num_features: int, cfg: IDMConfig):
    self.eps = cfg.bn_eps
    self.momentum = cfg.bn_momentum
    self.use_running_average = False
    self.scale = nnx.Param(jnp.ones((num_features,), cfg.param_dtype), out_sharding=("norm",))
    self.bias = nnx.Param(jnp.zeros((num_features,), cfg.param_dtype), out_sharding=("norm",))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32), out_sharding=("norm",))
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32), out_sharding=("norm",))

  def __call__(self, x: Array) -> Array:  # [B, H, W, C]
    x32 = x.astype(jnp.float32)
    if self.use_running_average:
      mean, var = self.mean[...], self.var[...]
    else:
      axes = tuple(range(x.ndim - 1))
      mean = x32.mean(axes)
      var = jnp.square(x32 - mean).mean(axes)  # biased: used to normalise, as torch does
      n = x.size // x.shape[-1]
      m = self.momentum
      # torch stores the unbiased variance in the running estimate.
      self.mean[...] = (1 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean)
      self.var[...] = (1 - m) * self.var[...] + m * jax.lax.stop_gradient(var) * (n / max(n - 1, 1))
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


class Bottleneck(nnx.Module):
  """ResNet v1.5 bottleneck: 1x1 -> 3x3 (carries the stride) -> 1x1 (x expansion), residual."""

  def __init__(self, cin: int, planes: int, stride: int, cfg: IDMConfig, *, rngs: nnx.Rngs):
    cout = planes * cfg.expansion
    self.conv1 = _conv(cin, planes, 1, 1, cfg, rngs)
    self.bn1 = BatchNorm(planes, cfg)
    self.conv2 = _conv(planes, planes, 3, stride, cfg, rngs)
    self.bn2 = BatchNorm(planes, cfg)
    self.conv3 = _conv(planes, cout, 1, 1, cfg, rngs)
    self.bn3 = BatchNorm(cout, cfg)
    if stride != 1 or cin != cout:
      self.downsample_conv = _conv(cin, cout, 1, stride, cfg, rngs)
      self.downsample_bn = BatchNorm(cout, cfg)
    else:
      self.downsample_conv = self.downsample_bn = None

  def __call__(self, x: Array) -> Array:  # [B, H, W, cin] -> [B, H/s, W/s, cout]
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = jax.nn.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    skip = x if self.downsample_conv is None else self.downsample_bn(self.downsample_conv(x))
    return jax.nn.relu(y + skip)


class ResNetTrunk(nnx.Module):
  """conv1 / bn1 / relu / maxpool / layer1..layer4 of torchvision's ResNet (no avgpool, no fc)."""

  def __init__(self, cfg: IDMConfig, *, rngs: nnx.Rngs):
    in_ch = 3 * cfg.num_frames
    self.conv1 = _conv(in_ch, cfg.width, 7, 2, cfg, rngs)
    self.bn1 = BatchNorm(cfg.width, cfg)
    cin = cfg.width
    for s, n in enumerate(cfg.blocks):
      planes = cfg.width * 2 ** s
      layer = []
      for j in range(n):
        stride = 2 if (j == 0 and s > 0) else 1
        layer.append(Bottleneck(cin, planes, stride, cfg, rngs=rngs))
        cin = planes * cfg.expansion
      setattr(self, f"layer{s + 1}", nnx.List(layer))
    self.num_stages = len(cfg.blocks)

  def __call__(self, x: Array) -> Array:  # [B, H, W, 9] -> [B, H/32, W/32, feature_dim]
    x = jax.nn.relu(self.bn1(self.conv1(x)))
    # maxpool 3x3 / 2, padding 1 (padded with -inf, like torch).
    x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                              ((0, 0), (1, 1), (1, 1), (0, 0)))
    for s in range(self.num_stages):
      for block in getattr(self, f"layer{s + 1}"):
        x = block(x)
    return x


class SpatialSoftmax(nnx.Module):
  """Per-channel softmax over H*W, then the expected (x, y) on a [-1, 1] grid; x varies along rows."""

  def __init__(self):
    self.temperature = nnx.Param(jnp.ones((1,), jnp.float32), out_sharding=(None,))

  def __call__(self, x: Array) -> Array:  # [B, H, W, C] -> [B, 2C] (all x, then all y)
    b, h, w, c = x.shape
    logits = x.astype(jnp.float32).reshape(b, h * w, c) / self.temperature[...]
    heat = jax.nn.softmax(logits, axis=1)  # [B, H*W, C]
    pos_x, pos_y = jnp.meshgrid(jnp.linspace(-1.0, 1.0, h), jnp.linspace(-1.0, 1.0, w), indexing="ij")
    ex = jnp.einsum("bpc,p->bc", heat, pos_x.reshape(-1))
    ey = jnp.einsum("bpc,p->bc", heat, pos_y.reshape(-1))
    return jnp.concatenate([ex, ey], axis=-1)


class MLPHead(nnx.Module):
  """Linear -> LayerNorm -> GELU -> Dropout -> Linear -> GELU -> Linear (torch `mlp_head.{0,1,4,6}`)."""

  def __init__(self, din: int, cfg: IDMConfig, *, rngs: nnx.Rngs):
    h1, h2 = cfg.mlp_dims
    xavier = jax.nn.initializers.xavier_uniform()
    def linear(i, o, names):
      return nnx.Linear(i, o, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs,
                        kernel_init=nnx.with_partitioning(xavier, names),
                        bias_init=nnx.with_partitioning(jax.nn.initializers.zeros, names[1:]))
    self.fc1 = linear(din, h1, ("embed", "mlp"))
    self.norm = nnx.LayerNorm(h1, epsilon=cfg.ln_eps, dtype=jnp.float32, param_dtype=cfg.param_dtype,
                              scale_init=nnx.with_partitioning(jax.nn.initializers.ones, ("norm",)),
                              bias_init=nnx.with_partitioning(jax.nn.initializers.zeros, ("norm",)),
                              rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout)
    self.fc2 = linear(h1, h2, ("mlp", "embed"))
    self.fc3 = linear(h2, cfg.action_dim, ("embed", None))

  def __call__(self, x: Array, rngs: nnx.Rngs | None = None) -> Array:  # [B, D] -> [B, 14]
    x = self.norm(self.fc1(x).astype(jnp.float32))
    x = jax.nn.gelu(x, approximate=False)
    x = self.dropout(x, rngs=rngs)
    x = jax.nn.gelu(self.fc2(x), approximate=False)
    return self.fc3(x).astype(jnp.float32)


# MARK: model

def preprocess(frames: Array, image_size: tuple[int, int]) -> Array:
  """[..., H, W, 3] in [0, 1] -> [..., S, S, 3] resized and ImageNet-normalised (float32).

  Matches torchvision `Resize(size)` on tensors (bilinear, antialias=True, half-pixel centres): the
  antialiased triangle filter of `jax.image.resize` agrees with it to float32 rounding.
  """
  *lead, h, w, c = frames.shape
  x = frames.astype(jnp.float32).reshape(-1, h, w, c)
  if (h, w) != tuple(image_size):
    x = jax.image.resize(x, (x.shape[0], *image_size, c), method="linear", antialias=True)
  x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
  return x.reshape(*lead, *image_size, c)


class IDM(nnx.Module):
  """frames [B, num_frames, H, W, 3] in [0, 1] -> actions [B, action_dim] in joint units."""

  def __init__(self, cfg: IDMConfig, *, rngs: nnx.Rngs):
    if len(cfg.train_mean) != cfg.action_dim or len(cfg.train_std) != cfg.action_dim:
      raise ValueError(f"IDMConfig: train_mean/train_std need {cfg.action_dim} values, got "
                       f"{len(cfg.train_mean)}/{len(cfg.train_std)}")
    self.cfg = cfg
    self.backbone = ResNetTrunk(cfg, rngs=rngs)
    self.spatial_softmax = SpatialSoftmax()
    self.mlp_head = MLPHead(2 * cfg.feature_dim, cfg, rngs=rngs)
    self.train_mean = JointStat(jnp.asarray(cfg.train_mean, jnp.float32))
    self.train_std = JointStat(jnp.asarray(cfg.train_std, jnp.float32))

  def normalized(self, x: Array, *, rngs: nnx.Rngs | None = None) -> Array:
    """Preprocessed windows [B, T, S, S, 3] -> normalised actions [B, action_dim] (float32)."""
    b, t, h, w, c = x.shape
    if t != self.cfg.num_frames:
      raise ValueError(f"IDM expects {self.cfg.num_frames} frames per window, got {t} (shape {x.shape})")
    # Frame-major channel stacking, like torch's view(B, T*3, H, W): channel = t * 3 + c.
    x = x.transpose(0, 2, 3, 1, 4).reshape(b, h, w, t * c).astype(self.cfg.dtype)
    feats = self.backbone(x)                       # [B, h, w, feature_dim]
    keypoints = self.spatial_softmax(feats)        # [B, 2 * feature_dim]
    return self.mlp_head(keypoints.astype(self.cfg.dtype), rngs=rngs)

  def denormalize(self, a: Array) -> Array:
    return a * self.train_std[...] + self.train_mean[...]

  def normalize(self, a: Array) -> Array:
    return (a - self.train_mean[...]) / self.train_std[...]

  def __call__(self, frames: Array, *, rngs: nnx.Rngs | None = None) -> Array:
    """frames [B, T, H, W, 3] in [0, 1] -> [B, action_dim] joint units."""
    x = preprocess(frames, self.cfg.image_size)
    return self.denormalize(self.normalized(x, rngs=rngs))


# MARK: video -> trajectory

def window_indices(num_frames_video: int, num_frames: int = 3) -> Array:
  """[T, num_frames] clamped windows centred on each frame: [i-1, i, i+1] for num_frames=3."""
  half = num_frames // 2
  offsets = jnp.arange(num_frames) - half
  return jnp.clip(jnp.arange(num_frames_video)[:, None] + offsets[None, :], 0, num_frames_video - 1)


def _actions_from_video_pure(idm: IDM, video: Array, batch_size: int | None) -> Array:
  b, t = video.shape[:2]
  x = preprocess(video, idm.cfg.image_size)                 # [B, T, S, S, 3]: each frame resized once
  idx = window_indices(t, idm.cfg.num_frames)               # [T, 3]
  windows = x[:, idx].reshape(b * t, *idx.shape[1:], *x.shape[2:])  # [B*T, 3, S, S, 3]
  if batch_size is None or batch_size >= b * t:
    out = idm.normalized(windows)
  else:
    pad = -(b * t) % batch_size
    chunks = jnp.pad(windows, ((0, pad),) + ((0, 0),) * 4)
    chunks = chunks.reshape(-1, batch_size, *windows.shape[1:])
    out = jax.lax.map(idm.normalized, chunks).reshape(-1, idm.cfg.action_dim)[: b * t]
  return idm.denormalize(out).reshape(b, t, -1)


@functools.partial(nnx.jit, static_argnames=("batch_size",))
def _actions_from_video_jit(idm: IDM, video: Array, batch_size: int | None) -> Array:
  return _actions_from_video_pure(idm, video, batch_size)


def actions_from_video(idm: IDM, video: Array, batch_size: int | None = None) -> Array:
  """Per-frame actions of videos [B, T, H, W, 3] in [0, 1] -> [B, T, action_dim], one jitted pass.

  Frame i is decoded from the clamped window [i-1, i, i+1] (spec/eva.md C). The IDM runs in its current
  mode: call `idm.eval()` first for the reward. `batch_size` bounds memory by running the B*T windows
  in chunks inside the same compiled program. Works under an outer jit too.
  """
  if video.ndim != 5 or video.shape[-1] != 3:
    raise ValueError(f"actions_from_video: expected video [B, T, H, W, 3], got {video.shape}")
  return _actions_from_video_jit(idm, video, batch_size)
