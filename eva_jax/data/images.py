"""An observation image to the model's frame size: EVA's stretch, or an aspect-keeping crop or pad.

  frame = fit_image(rgb_uint8, 480, 640, mode="stretch")     # uint8 [480, 640, 3]

Modes (bicubic resampling, PIL):
  'stretch' resize to exactly H x W, ignoring the aspect ratio. EVA's image_csv transform
            (`Resize((H, W))`, `is_augment: false`), so the default of inference and the planner.
  'crop'    scale until both sides cover the target, then centre-crop (the short side fills the frame).
  'pad'     scale until both sides fit inside, then pad with black to the target (letterbox).
For a 4:3 camera frame at 480x640 all three agree.
"""

from __future__ import annotations

import numpy as np

RESIZE_MODES = ("stretch", "crop", "pad")


def read_image(path) -> np.ndarray:
  """An image file as uint8 [H, W, 3] RGB; a missing, truncated or non-image file raises naming it."""
  import pathlib

  from PIL import Image
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"image {path} does not exist")
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"))
  except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for truncated or non-image files
    raise ValueError(f"image {path}: not a readable image ({type(e).__name__}: {e})") from None


def fit_image(image: np.ndarray, height: int, width: int, mode: str = "stretch") -> np.ndarray:
  """uint8 [h, w, 3] -> uint8 [height, width, 3] by `mode` (see the module docstring)."""
  from PIL import Image

  if mode not in RESIZE_MODES:
    raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
  pil = Image.fromarray(image.astype(np.uint8))
  h, w = image.shape[:2]
  if mode == "stretch":
    return np.asarray(pil.resize((width, height), Image.BICUBIC))
  scale = max(height / h, width / w) if mode == "crop" else min(height / h, width / w)
  nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
  if mode == "crop":
    nh, nw = max(nh, height), max(nw, width)
  resized = np.asarray(pil.resize((nw, nh), Image.BICUBIC))
  if mode == "crop":
    top, left = (nh - height) // 2, (nw - width) // 2
    return resized[top:top + height, left:left + width]
  out = np.zeros((height, width, 3), np.uint8)
  top, left = (height - nh) // 2, (width - nw) // 2
  out[top:top + nh, left:left + nw] = resized
  return out
