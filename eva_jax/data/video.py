"""mp4 reading and writing with PyAV (H.264, yuv420p), channels-last uint8 frames [T, H, W, 3]."""

from __future__ import annotations

import os
import pathlib
from fractions import Fraction

import numpy as np

from eva_jax.utils.frames import frame_strip, to_uint8  # noqa: F401 (part of this module's API)


def write_video(path: str | os.PathLike, frames, fps: float = 16, crf: int = 18) -> pathlib.Path:
  """Writes [T, H, W, 3] frames (uint8, or float in [-1, 1]) as an H.264 mp4, atomically.

  Odd sizes are padded by one pixel (yuv420p needs even sides). The file appears only when complete.
  The same frames give the same bytes: see the mbtree note below.
  """
  import av

  frames = to_uint8(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"write_video({path}): frames must be [T, H, W, 3], got {frames.shape}")
  if frames.shape[1] % 2 or frames.shape[2] % 2:
    frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)), mode="edge")
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp")
  try:
    _encode(av, tmp, frames, fps, crf)
    os.replace(tmp, path)
  except BaseException:  # no partial .tmp left behind either
    tmp.unlink(missing_ok=True)
    raise
  return path


def _encode(av, tmp: pathlib.Path, frames: np.ndarray, fps: float, crf: int) -> None:
  with av.open(str(tmp), mode="w", format="mp4") as container:
    stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = "yuv420p"
    # mbtree=0: x264's macroblock-tree rate control coded the same frames differently from call to
    # call (PyAV 18.1's libx264, at one thread too; asm=0 also cures it), so the demo's training data,
    # decoded from these files, changed between runs of one seed. It costs a little bitrate at one crf.
    stream.options = {"crf": str(crf), "x264-params": "mbtree=0"}
    for frame in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def _check_exists(path: pathlib.Path) -> None:
  if not path.exists():
    raise FileNotFoundError(f"video not found: {path}")
  if not path.is_file():
    raise IsADirectoryError(f"video {path} is not a file")


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split()) or type(e).__name__


def read_video(path: str | os.PathLike, indices=None) -> tuple[np.ndarray, float]:
  """Returns (frames uint8 [T, H, W, 3], fps). `indices` selects frames (decoding stops at the last one).

  Errors name the file, and the frame where decoding stopped."""
  import av

  path = pathlib.Path(path)
  _check_exists(path)
  wanted = None if indices is None else sorted(set(int(i) for i in indices))
  if wanted is not None and wanted and wanted[0] < 0:
    raise ValueError(f"video {path}: frame indices must be >= 0, got {wanted[0]}")
  i = -1
  try:
    with av.open(str(path)) as container:
      if not container.streams.video:
        raise ValueError(f"video {path} has no video stream")
      stream = container.streams.video[0]
      fps = float(stream.average_rate or stream.guessed_rate or 0.0)
      frames = []
      for i, frame in enumerate(container.decode(stream)):
        if wanted is None or i in wanted:
          frames.append(frame.to_ndarray(format="rgb24"))
        if wanted is not None and i >= wanted[-1]:
          break
  except Exception as e:  # av raises several error types (its InvalidDataError is a ValueError too)
    if isinstance(e, ValueError) and not isinstance(e, av.error.FFmpegError):
      if str(path) in str(e):  # ours, above
        raise
      raise ValueError(f"cannot decode video {path} (after frame {i}): {_one_line(e)}") from e
    where = "cannot open" if i < 0 else f"frame {i + 1} does not decode in"
    raise ValueError(f"{where} video {path}: {_one_line(e)}") from e
  if wanted is not None and len(frames) != len(wanted) and i >= 0:  # the stream ended first: i + 1 frames
    raise ValueError(f"video {path}: asked for frames up to {wanted[-1]} but it has {i + 1} of them")
  if not frames:
    raise ValueError(f"video {path} has no decodable frames")
  out = np.stack(frames)
  if wanted is not None:
    order = {f: k for k, f in enumerate(wanted)}
    out = out[[order[int(i)] for i in indices]]
  return out, fps


def video_info(path: str | os.PathLike) -> dict:
  """{'n_frames', 'height', 'width', 'fps'} without decoding every frame when the container knows."""
  import av

  path = pathlib.Path(path)
  _check_exists(path)
  try:
    with av.open(str(path)) as container:
      if not container.streams.video:
        raise ValueError("no video stream")
      stream = container.streams.video[0]
      n = stream.frames or sum(1 for _ in container.decode(stream))
      info = {"n_frames": int(n), "height": int(stream.height), "width": int(stream.width),
              "fps": float(stream.average_rate or stream.guessed_rate or 0.0)}
  except Exception as e:
    raise ValueError(f"cannot read video info of {path}: {_one_line(e)}") from e
  if info["n_frames"] == 0 or not info["height"] or not info["width"]:
    raise ValueError(f"video {path} is empty ({info})")
  return info
