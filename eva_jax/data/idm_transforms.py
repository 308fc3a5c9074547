"""Frame transforms of the authors' IDM data path: the 832:480 crop-and-resize and the R<->B swap.

The authors' RoboTwin dataset (spec/eva_fidelity_rl.md, V-ds `_decode_image`) decodes each stored
JPEG with OpenCV, optionally centre-crops it to the 832:480 aspect of the world model's videos and
resizes it bicubically (`cv2.INTER_CUBIC`) to 832x480, then applies `cv2.COLOR_BGR2RGB`. Because the
recorder encoded RGB arrays as if they were BGR, that last step *swaps* red and blue relative to the
recorder's colours: the authors' IDM trains on R<->B-swapped frames (docs/idm.md, "Channel order").

Both run on the accelerator inside the jitted train and evaluation steps (`FrameTransform`), on the
decoded frames as stored: the prepared dataset keeps the recorder's JPEGs, so one dataset serves both
recipes, there is no second JPEG generation, and the crop is a static slice plus two small matmuls per
frame (the bicubic weights are a fixed [out, in] matrix per axis), a few per cent of a ResNet-50 step
at 512 px.

  t = FrameTransform(channel_order="bgr_swapped", crop_and_resize=True)
  x = t(frames)            # [..., H, W, 3] in [0, 1] -> [..., 480, 832, 3] in [0, 1], R and B swapped
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np

CROP_SIZE = (480, 832)     # (H, W) of the authors' crop_and_resize (the LVP world model's 480x832)
CHANNEL_ORDERS = ("rgb", "bgr_swapped")
CV2_CUBIC_A = -0.75        # OpenCV's bicubic kernel parameter (PIL and jax.image use -0.5)


def center_crop_box(h: int, w: int, out_h: int, out_w: int) -> tuple[int, int, int, int]:
  """(top, left, height, width) of the largest centred box with the out_w:out_h aspect.

  The wider side is cut to int(other side x aspect), the offset rounded down: for a 640x480 head
  camera frame and 832:480 that is rows 55..423 (369 rows), all 640 columns.
  """
  target, current = out_w / out_h, w / h
  if current > target:
    cw = int(h * target)
    return 0, (w - cw) // 2, h, cw
  ch = int(w / target)
  return (h - ch) // 2, 0, ch, w


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with parameter a, at distances x."""
  x = np.abs(x)
  return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                  np.where(x < 2, ((x - 5) * x + 8) * x * a - 4 * a, 0.0))


@functools.lru_cache(maxsize=32)
def cubic_matrix(n_in: int, n_out: int, a: float = CV2_CUBIC_A) -> np.ndarray:
  """[n_out, n_in] float32 weights of a 1-d bicubic resize as OpenCV's INTER_CUBIC computes it:
  half-pixel centres (src = (i + 0.5) * n_in / n_out - 0.5), four taps around floor(src), indices
  outside the image clamped to the edge (replicated border), no antialiasing when downscaling."""
  src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
  base = np.floor(src)
  frac = src - base
  m = np.zeros((n_out, n_in), np.float64)
  for k in (-1, 0, 1, 2):
    idx = np.clip(base + k, 0, n_in - 1).astype(np.int64)
    np.add.at(m, (np.arange(n_out), idx), _cubic(frac - k, a))
  return m.astype(np.float32)


def crop_and_resize(frames: jnp.ndarray, size: tuple[int, int] = CROP_SIZE, *,
                    a: float = CV2_CUBIC_A, quantize: bool = True) -> jnp.ndarray:
  """[..., H, W, C] in [0, 1] -> [..., size[0], size[1], C]: centre crop to the size's aspect, then
  bicubic resize to `size` (OpenCV INTER_CUBIC weights). `quantize` rounds to 8-bit levels and clips
  to [0, 1], as cv2 returns uint8 for uint8 input (cubic overshoot at edges is clipped there too)."""
  *lead, h, w, c = frames.shape
  top, left, ch, cw = center_crop_box(h, w, *size)
  x = frames[..., top:top + ch, left:left + cw, :].astype(jnp.float32)
  wy = jnp.asarray(cubic_matrix(ch, size[0], a))
  wx = jnp.asarray(cubic_matrix(cw, size[1], a))
  # rows, then columns; 'highest' keeps the float32 matmuls exact on accelerators (TF32 would not).
  x = jnp.einsum("yh,...hwc->...ywc", wy, x, precision="highest")
  x = jnp.einsum("xw,...ywc->...yxc", wx, x, precision="highest")
  if quantize:
    x = jnp.clip(jnp.round(x * 255.0), 0.0, 255.0) / 255.0
  return x


def swap_red_blue(frames):
  """[..., 3] -> the same frames with channels 0 and 2 exchanged (numpy or jax arrays)."""
  return frames[..., ::-1]


@dataclasses.dataclass(frozen=True)
class FrameTransform:
  """What happens to decoded frames (recorder RGB, [0, 1]) before the IDM's own 512x512 resize.

  channel_order: 'rgb' (the recorder's colours; what the reward sees) or 'bgr_swapped' (the authors'
    training frames: red and blue exchanged).
  crop_and_resize: centre crop to 832:480 and bicubic resize to 832x480 (the authors' V-ds / V-eval).
  Hashable: it is a static argument of the jitted steps.
  """
  channel_order: str = "rgb"
  crop_and_resize: bool = False
  crop_size: tuple[int, int] = CROP_SIZE

  def __post_init__(self):
    if self.channel_order not in CHANNEL_ORDERS:
      raise ValueError(f"config.data.channel_order: {self.channel_order!r}; expected one of {CHANNEL_ORDERS}")

  @classmethod
  def from_config(cls, data_cfg) -> "FrameTransform":
    return cls(channel_order=str(data_cfg.get("channel_order", "rgb")),
               crop_and_resize=bool(data_cfg.get("crop_and_resize", False)))

  @property
  def is_identity(self) -> bool:
    return self.channel_order == "rgb" and not self.crop_and_resize

  def __call__(self, frames: jnp.ndarray) -> jnp.ndarray:
    """[..., H, W, 3] in [0, 1] -> transformed frames in [0, 1]."""
    if self.crop_and_resize:
      frames = crop_and_resize(frames, tuple(self.crop_size))
    if self.channel_order == "bgr_swapped":
      frames = swap_red_blue(frames)
    return frames
