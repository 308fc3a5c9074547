"""Frames as pictures: the model's [-1, 1] video range to uint8, and strips of frames for reports."""

from __future__ import annotations

import numpy as np


def to_uint8(frames) -> np.ndarray:
  """uint8 passes through; floats are taken as [-1, 1] (the model's video range)."""
  frames = np.asarray(frames)
  if frames.dtype == np.uint8:
    return frames
  return np.clip(np.round((frames.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def frame_strip(frames, max_frames: int = 8) -> np.ndarray:
  """Evenly spaced frames side by side, [H, k*W, 3] uint8 (for PNG reports)."""
  frames = to_uint8(frames)
  idx = np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int)
  return np.concatenate(list(frames[idx]), axis=1)
