"""RoboTwin 2.0 HDF5 episodes: reading, writing, and the IDM's frame windows (spec/eva.md F.1).

An episode file holds, per recorded step i (about 16.7 Hz):
  /observation/<camera>/rgb   [N] fixed-length `S{max_len}` byte strings: JPEG, zero-padded
  /joint_action/vector        [N, 14] = [left_arm(6), left_gripper, right_arm(6), right_gripper]
  /joint_action/{left_arm, left_gripper, right_arm, right_gripper}  (the same numbers, split)

Channel order: the recorder hands RGB arrays to `cv2.imencode`, which takes them for BGR, so the JPEG
stores the channels reversed. Decoding with PIL (no OpenCV dependency) therefore returns [B, G, R] of
the original; we reverse the channels after decoding to get the recorder's RGB back, and `write_episode`
reverses them before encoding, so files written here decode identically with cv2 or with this reader.

  frames, actions = read_episode('episode0.hdf5')          # [N, H, W, 3] uint8, [N, 14] float32
  for window, action in iter_windows('episode0.hdf5'):     # [3, H, W, 3] uint8, [14]
    ...
"""

from __future__ import annotations

import io
import os
import pathlib
from typing import Iterator, Mapping, Sequence

import h5py
import numpy as np
from PIL import Image

ACTION_KEY = "joint_action/vector"
ACTION_DIM = 14


def rgb_key(camera: str = "head_camera") -> str:
  return f"observation/{camera}/rgb"


# MARK: JPEG bytes

def encode_frame(frame_rgb: np.ndarray, quality: int = 95) -> bytes:
  """uint8 [H, W, 3] RGB -> JPEG bytes laid out like the recorder's (channels stored reversed)."""
  buf = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(frame_rgb[..., ::-1])).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def decode_frame(data: bytes, *, path: str | os.PathLike = "<bytes>", index: int = -1) -> np.ndarray:
  """JPEG bytes as stored by RoboTwin -> uint8 [H, W, 3] in the recorder's RGB order."""
  try:
    with Image.open(io.BytesIO(bytes(data))) as im:
      arr = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
  except Exception as e:  # PIL raises several types for corrupt data
    raise ValueError(f"{path}: frame {index} is not a decodable JPEG ({len(data)} bytes): "
                     f"{' '.join(str(e).split())}") from e
  return np.ascontiguousarray(arr[..., ::-1])


# MARK: writing

def write_episode(path: str | os.PathLike, frames_rgb: np.ndarray, joint_vector: np.ndarray,
                  camera: str = "head_camera", extra: Mapping[str, np.ndarray] | None = None,
                  quality: int = 95) -> pathlib.Path:
  """Writes a RoboTwin-format episode.

  Args:
    frames_rgb: uint8 [N, H, W, 3] RGB frames of `camera`.
    joint_vector: [N, 14] joint drive targets; also split into left/right arm and gripper datasets.
    extra: more datasets, {'endpose/left_endpose': array, ...} (paths relative to the file root).
  """
  frames_rgb = np.asarray(frames_rgb)
  joint_vector = np.asarray(joint_vector, np.float64)
  if frames_rgb.ndim != 4 or frames_rgb.shape[-1] != 3 or frames_rgb.dtype != np.uint8:
    raise ValueError(f"write_episode({path}): frames must be uint8 [N, H, W, 3], got "
                     f"{frames_rgb.dtype} {frames_rgb.shape}")
  if joint_vector.shape != (len(frames_rgb), ACTION_DIM):
    raise ValueError(f"write_episode({path}): joint_vector must be [{len(frames_rgb)}, {ACTION_DIM}] "
                     f"(one row per frame), got {joint_vector.shape}")
  encoded = [encode_frame(f, quality) for f in frames_rgb]
  max_len = max(len(b) for b in encoded)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp")  # renamed when complete: no half-written episode under `path`
  try:
    _write_datasets(tmp, encoded, max_len, joint_vector, camera, extra)
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  return path


def _write_datasets(path, encoded, max_len, joint_vector, camera, extra) -> None:
  with h5py.File(path, "w") as f:
    # Fixed-length byte strings; numpy zero-pads the shorter ones, as the recorder's files are.
    f.create_dataset(rgb_key(camera), data=np.array(encoded, dtype=f"S{max_len}"))
    f.create_dataset(ACTION_KEY, data=joint_vector)
    f.create_dataset("joint_action/left_arm", data=joint_vector[:, 0:6])
    f.create_dataset("joint_action/left_gripper", data=joint_vector[:, 6])
    f.create_dataset("joint_action/right_arm", data=joint_vector[:, 7:13])
    f.create_dataset("joint_action/right_gripper", data=joint_vector[:, 13])
    for key, value in (extra or {}).items():
      f.create_dataset(key, data=np.asarray(value))


# MARK: reading
#
# Every failure names the episode file, and the dataset and frame where there is one: h5py's own
# messages ("Unable to synchronously open file (truncated file ...)") name neither.


def open_episode(path: str | os.PathLike) -> h5py.File:
  """h5py.File(path, 'r'), with errors that name the file and say what it should be."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"RoboTwin episode {path} does not exist")
  if os.path.isdir(path):
    raise IsADirectoryError(f"RoboTwin episode {path} is a directory, not an HDF5 file")
  try:
    return h5py.File(path, "r")
  except OSError as e:  # truncated, not HDF5, unreadable
    raise ValueError(f"RoboTwin episode {path} is not a readable HDF5 file: {' '.join(str(e).split())}") from e


def _dataset(f: h5py.File, key: str, path) -> h5py.Dataset:
  try:
    node = f[key] if key in f else None
  except (KeyError, OSError, RuntimeError) as e:  # a corrupt group header
    raise ValueError(f"{path}: cannot read '/{key}': {e}") from e
  if node is None:
    raise KeyError(f"{path}: missing dataset '/{key}' (has: {_list_datasets(f)})")
  if not isinstance(node, h5py.Dataset):
    raise ValueError(f"{path}: '/{key}' is a group, expected a dataset (has: {_list_datasets(f)})")
  return node


def _read(ds: h5py.Dataset, path) -> np.ndarray:
  try:
    return ds[()]
  except (OSError, RuntimeError, ValueError, TypeError) as e:  # corrupt chunks, unknown filters
    raise ValueError(f"{path}: cannot read dataset '{ds.name}': {' '.join(str(e).split())}") from e


def _list_datasets(f: h5py.File) -> list[str]:
  names: list[str] = []
  try:
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
  except (OSError, RuntimeError):
    pass
  return names[:20]


def episode_length(path: str | os.PathLike, camera: str = "head_camera") -> int:
  """Number of frames, after checking that frames and actions agree."""
  with open_episode(path) as f:
    return _checked_length(f, camera, path)


def _checked_length(f: h5py.File, camera: str, path) -> int:
  frames = _dataset(f, rgb_key(camera), path)
  if frames.ndim != 1 or frames.dtype.kind not in "SO":
    raise ValueError(f"{path}: '/{rgb_key(camera)}' must be [N] JPEG byte strings, found {frames.dtype} "
                     f"{frames.shape}")
  n_frames = len(frames)
  if n_frames == 0:
    raise ValueError(f"{path}: episode has no frames ('/{rgb_key(camera)}' is empty)")
  actions = _dataset(f, ACTION_KEY, path)
  if actions.ndim != 2 or actions.shape[1] != ACTION_DIM:
    raise ValueError(f"{path}: '/{ACTION_KEY}' must be [N, {ACTION_DIM}], found {actions.shape}")
  if actions.dtype.kind not in "fiu":
    raise ValueError(f"{path}: '/{ACTION_KEY}' must hold numbers, found dtype {actions.dtype}")
  if actions.shape[0] != n_frames:
    raise ValueError(f"{path}: length mismatch: '/{rgb_key(camera)}' has {n_frames} frames but "
                     f"'/{ACTION_KEY}' has {actions.shape[0]} rows")
  return n_frames


def check_finite_actions(actions: np.ndarray, path) -> np.ndarray:
  """Raises naming the file, step and joint of the first NaN / inf action."""
  bad = ~np.isfinite(actions)
  if bad.any():
    row, col = (int(i) for i in np.argwhere(bad)[0])
    raise ValueError(f"{path}: '/{ACTION_KEY}' holds {int(bad.sum())} non-finite value(s), the first at "
                     f"step {row}, joint {col} ({actions[row, col]})")
  return actions


def read_jpeg_bytes(path: str | os.PathLike, camera: str = "head_camera") -> tuple[list[bytes], np.ndarray]:
  """The raw stored JPEG byte strings (padding stripped) and the [N, 14] float32 actions (all finite)."""
  with open_episode(path) as f:
    _checked_length(f, camera, path)
    raw = _read(f[rgb_key(camera)], path)
    actions = check_finite_actions(np.asarray(_read(f[ACTION_KEY], path), np.float32), path)
  # numpy 'S' arrays drop trailing NULs on access; JPEG data ends in FF D9, so nothing real is lost.
  return [bytes(b).rstrip(b"\0") for b in raw], actions


def read_episode(path: str | os.PathLike, camera: str = "head_camera") -> tuple[np.ndarray, np.ndarray]:
  """-> (frames uint8 [N, H, W, 3] RGB, actions float32 [N, 14])."""
  data, actions = read_jpeg_bytes(path, camera)
  frames = [decode_frame(b, path=path, index=i) for i, b in enumerate(data)]
  shapes = {fr.shape for fr in frames}
  if len(shapes) > 1:
    first = next(i for i, fr in enumerate(frames) if fr.shape != frames[0].shape)
    raise ValueError(f"{path}: frames of '/{rgb_key(camera)}' differ in size: frame 0 is {frames[0].shape}, "
                     f"frame {first} is {frames[first].shape}")
  return np.stack(frames), actions


def window_indices(n: int, num_frames: int = 3, stride: int = 1) -> np.ndarray:
  """[n, num_frames] frame indices centred on every frame, clamped at the ends ([i-1, i, i+1])."""
  half = num_frames // 2
  offsets = (np.arange(num_frames) - half) * stride
  return np.clip(np.arange(n)[:, None] + offsets[None, :], 0, n - 1)


def iter_windows(path: str | os.PathLike, camera: str = "head_camera", num_frames: int = 3,
                 stride: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields (frames uint8 [num_frames, H, W, 3], action float32 [14]) for every frame of an episode;
  the target is the action of the centre frame, the window is clamped at the episode ends."""
  frames, actions = read_episode(path, camera)
  for i, idx in enumerate(window_indices(len(frames), num_frames, stride)):
    yield frames[idx], actions[i]


def list_episodes(root: str | os.PathLike, pattern: str = "**/episode*.hdf5") -> list[pathlib.Path]:
  """Episode files under `root` in a stable (natural) order: episode2 before episode10."""
  import re
  def key(p: pathlib.Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))]
  files = sorted(pathlib.Path(root).glob(pattern), key=key)
  if not files:
    raise FileNotFoundError(f"no RoboTwin episodes matching {pattern!r} under {root}")
  return files


def joint_stats(paths: Sequence[str | os.PathLike]) -> tuple[np.ndarray, np.ndarray]:
  """Per-joint mean and std of `/joint_action/vector` over episodes (for normalising IDM targets)."""
  rows = []
  for p in paths:
    with open_episode(p) as f:
      actions = _dataset(f, ACTION_KEY, p)
      if actions.ndim != 2 or actions.shape[1] != ACTION_DIM or actions.dtype.kind not in "fiu":
        raise ValueError(f"{p}: '/{ACTION_KEY}' must be [N, {ACTION_DIM}] numbers, found {actions.dtype} "
                         f"{actions.shape}")
      rows.append(check_finite_actions(np.asarray(_read(actions, p), np.float64), p))
  if not rows:
    raise ValueError("joint_stats: no episodes given")
  allrows = np.concatenate(rows)
  return allrows.mean(0).astype(np.float32), np.maximum(allrows.std(0), 1e-6).astype(np.float32)
