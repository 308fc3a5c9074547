"""A procedural two-arm robot world, rendered with numpy, for the built-in demo and for tests.

The robot has EVA's 14-d action layout (spec/eva.md B, F.1): `[left_arm(6 rad), left_gripper(0..1),
right_arm(6 rad), right_gripper(0..1)]`. Each arm is a planar chain of six revolute joints seen from
the front, drawn with one colour per link, dark joint discs and a two-finger gripper whose opening
shows the gripper value, so every joint can be read back from the picture (an IDM can learn it).

Trajectories come in two families, labelled per episode:
- smooth: minimum-jerk moves between random key poses, timed to stay well inside the PiPER
  velocity and acceleration limits at 16 fps (the motion EVA's reward prefers);
- non-smooth: the same moves plus frame noise (`jitter`), abrupt offsets (`jump`), or moves that
  are far too fast for the arm (`fast`).

`generate_dataset` writes them as a RoboTwin data root (spec/eva.md F.1) plus the EVA CSV (F.2):

  <root>/<task>/<task_config>/data/episode{i}.hdf5      head_camera JPEG frames + joint_action/vector
  <root>/<task>/<task_config>/video/episode{i}.mp4      the same frames at `fps`
  <root>/<task>/<task_config>/instructions/episode{i}.json   {"seen": [caption, ...], "unseen": []}
  <root>/robotwin_videos.csv       video_path, caption, height, width, fps, n_frames, split
  <root>/toyworld.json                                 the summary (per-episode kind, caption, seed)

Usage:
  from eva_jax.data import toyworld
  summary = toyworld.generate_dataset('data/toy', 64, seed=0, size=64, n_frames=33)
  frames = toyworld.render(joints)  # joints [N, 14] -> uint8 [N, 64, 64, 3]
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

NUM_JOINTS = 14
LEFT_ARM = slice(0, 6)
RIGHT_ARM = slice(7, 13)
GRIPPERS = (6, 13)
ARM_DIMS = tuple(range(0, 6)) + tuple(range(7, 13))

FPS = 16
TASK = "toy_bimanual"
TASK_CONFIG = "demo_toy"
CSV_NAME = "robotwin_videos.csv"
CSV_COLUMNS = ("video_path", "caption", "height", "width", "fps", "n_frames", "split")
KINDS = ("smooth", "jitter", "jump", "fast")

# PiPER joint speed limits × 0.85 (rad/s) and the acceleration limit of EVA's reward (spec/eva.md C).
ARM_V_MAX = 0.85 * np.array([3.1416, 3.4034, 3.1416, 3.9270, 3.9270, 3.9270])
ARM_A_MAX = 5.0
GRIPPER_V_MAX = 2.0
GRIPPER_A_MAX = 10.0
# Smooth moves use at most this fraction of every limit, so they score near the reward's maximum.
SMOOTH_MARGIN = 0.5

# Joint limits of the toy arm (rad): symmetric around the rest pose, tighter at the shoulder so the
# arm stays in the picture.
ARM_LIMITS = np.array([0.6, 0.7, 0.7, 0.8, 0.8, 0.9])
JOINT_LIMITS = np.concatenate([ARM_LIMITS, [1.0], ARM_LIMITS, [1.0]])  # grippers: [0, 1]

# Geometry as fractions of the image size. Links get shorter and thinner towards the gripper.
LINK_LENGTHS = np.array([0.15, 0.13, 0.11, 0.085, 0.065, 0.05])
LINK_WIDTHS = np.array([0.075, 0.065, 0.055, 0.048, 0.042, 0.036])
# Rest-pose relative angles (rad): upper arm leaning outwards, the chain curling in over the table.
REST_ANGLES = np.array([-np.pi / 2 - 0.1, 0.3, 0.25, 0.2, 0.15, 0.1])
TABLE_Y = 0.88             # the table's top edge
LEFT_BASE = (0.22, 0.9)   # (x, y) in image fractions, y grows downwards
RIGHT_BASE = (0.78, 0.9)
FINGER_LENGTH = 0.1
FINGER_WIDTH = 0.04
JOINT_RADIUS = 0.018

# One colour per link, warm for the left arm and cool for the right arm, so links and arms differ.
LEFT_COLORS = np.array([[230, 60, 50], [245, 140, 40], [240, 215, 50], [170, 230, 60],
                        [250, 120, 170], [200, 90, 250]], np.float32)
RIGHT_COLORS = np.array([[40, 90, 240], [40, 200, 230], [60, 220, 140], [140, 100, 240],
                         [30, 150, 120], [120, 200, 255]], np.float32)
FINGER_COLOR = np.array([250, 250, 250], np.float32)
JOINT_COLOR = np.array([25, 25, 30], np.float32)
BASE_COLOR = np.array([90, 90, 100], np.float32)

# Caption templates: the moving arms and what the gripper does decide the sentence.
ARM_PHRASES = {"left": "the left arm", "right": "the right arm", "both": "both arms"}
VERBS = ("move", "raise", "wave", "swing", "reach out with")
GRIPPER_PHRASES = {"open": "open the gripper", "close": "close the gripper", "none": None}


# MARK: rendering


def _arm_points(q: np.ndarray, base: tuple[float, float], mirror: bool, size: int):
  """Joint positions of one arm. q: [N, 6] (rad) -> points [N, 7, 2] (pixels), angles [N, 6]."""
  rel = REST_ANGLES[None] + q  # [N, 6]
  absolute = np.cumsum(rel, axis=-1)  # [N, 6] link directions, in the arm's own frame
  # Mirroring about the vertical axis maps a direction θ to π − θ.
  angles = absolute if not mirror else np.pi - absolute
  step = LINK_LENGTHS[None, :, None] * size * np.stack([np.cos(angles), np.sin(angles)], -1)
  origin = np.array([base[0] * size, base[1] * size])
  pts = np.concatenate([np.broadcast_to(origin, (q.shape[0], 1, 2)),
                        origin + np.cumsum(step, axis=1)], axis=1)  # [N, 7, 2]
  return pts, angles


def _paint_segments(img: np.ndarray, yy: np.ndarray, xx: np.ndarray, p0: np.ndarray, p1: np.ndarray,
                    radius: float, color: np.ndarray) -> None:
  """Alpha-blends thick antialiased segments (round caps) into img in place.

  img: [N, S, S, 3] float; p0, p1: [N, 2] (x, y) pixel endpoints; radius: half the width (px).
  Only the box that any frame's segment can touch is computed (a link covers a few % of the image).
  """
  reach = radius + 1.5  # coverage is 0 beyond radius + 0.5 from the segment; one pixel to spare
  ends = np.concatenate([p0, p1])  # [2N, 2]
  (x0, y0), (x1, y1) = np.floor(ends.min(0) - reach), np.ceil(ends.max(0) + reach)
  size = img.shape[1]
  rows = slice(int(np.clip(y0, 0, size)), int(np.clip(y1, 0, size)))
  cols = slice(int(np.clip(x0, 0, size)), int(np.clip(x1, 0, size)))
  if rows.start >= rows.stop or cols.start >= cols.stop:
    return
  img, yy, xx = img[:, rows, cols], yy[rows, cols], xx[rows, cols]
  d = p1 - p0  # [N, 2]
  length2 = np.maximum((d ** 2).sum(-1), 1e-9)[:, None, None]  # [N, 1, 1]
  px = xx[None] - p0[:, 0, None, None]  # [N, S, S]
  py = yy[None] - p0[:, 1, None, None]
  t = np.clip((px * d[:, 0, None, None] + py * d[:, 1, None, None]) / length2, 0.0, 1.0)
  dist = np.hypot(px - t * d[:, 0, None, None], py - t * d[:, 1, None, None])
  # Coverage falls off linearly over one pixel at the edge: cheap antialiasing.
  alpha = np.clip(radius + 0.5 - dist, 0.0, 1.0)[..., None]  # [N, S, S, 1]
  img *= 1.0 - alpha
  img += alpha * color


def _background(size: int) -> np.ndarray:
  """A fixed scene: a dark wall with a vertical gradient and a lighter table at the bottom."""
  y = (np.arange(size, dtype=np.float32) + 0.5) / size
  wall = np.array([40, 44, 56], np.float32) + 30 * y[:, None]  # [S, 3]
  img = np.broadcast_to(wall[:, None, :], (size, size, 3)).copy()
  img[y > TABLE_Y] = np.array([120, 105, 85], np.float32)
  return img


def render(joints: np.ndarray, size: int = 64) -> np.ndarray:
  """Draws the two arms for every row of joints.

  Args:
    joints: [N, 14] joint vector (arm joints in rad, grippers in [0, 1]), or [14].
    size: image height and width in pixels.

  Returns:
    uint8 frames [N, size, size, 3] (RGB).
  """
  joints = np.asarray(joints, np.float64)
  if joints.ndim == 1:
    joints = joints[None]
  if joints.ndim != 2 or joints.shape[-1] != NUM_JOINTS:
    raise ValueError(f"toyworld.render: joints must be [N, {NUM_JOINTS}], found {joints.shape}")
  n = joints.shape[0]
  img = np.broadcast_to(_background(size), (n, size, size, 3)).copy()
  yy, xx = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
  arms = ((joints[:, LEFT_ARM], joints[:, 6], LEFT_BASE, False, LEFT_COLORS),
          (joints[:, RIGHT_ARM], joints[:, 13], RIGHT_BASE, True, RIGHT_COLORS))
  for q, grip, base, mirror, colors in arms:
    pts, angles = _arm_points(q, base, mirror, size)
    base_pt = pts[:, 0]
    _paint_segments(img, yy, xx, base_pt - [0.06 * size, 0], base_pt + [0.06 * size, 0],
                    0.04 * size, BASE_COLOR)
    for k in range(6):
      _paint_segments(img, yy, xx, pts[:, k], pts[:, k + 1], 0.5 * LINK_WIDTHS[k] * size, colors[k])
      _paint_segments(img, yy, xx, pts[:, k], pts[:, k], JOINT_RADIUS * size * (1 - 0.08 * k),
                      JOINT_COLOR)
    # Two fingers spread symmetrically around the last link: 0 = closed, 1 = fully open.
    spread = 0.15 + 0.75 * np.clip(grip, 0.0, 1.0)  # [N] rad
    tip = pts[:, 6]
    for side in (-1.0, 1.0):
      a = angles[:, 5] + side * spread
      end = tip + FINGER_LENGTH * size * np.stack([np.cos(a), np.sin(a)], -1)
      _paint_segments(img, yy, xx, tip, end, 0.5 * FINGER_WIDTH * size + 0.3, FINGER_COLOR)
  return np.clip(np.round(img), 0, 255).astype(np.uint8)


# MARK: trajectories


def _min_jerk(s: np.ndarray) -> np.ndarray:
  """The minimum-jerk profile 10s³ − 15s⁴ + 6s⁵ on s ∈ [0, 1]."""
  return s ** 3 * (10 - 15 * s + 6 * s ** 2)


def _segment_frames(delta: np.ndarray, fps: float, margin: float) -> int:
  """Frames a minimum-jerk move of `delta` (per joint) needs to stay within margin × limits.

  Peak speed of the profile is 1.875·d/T and peak acceleration 5.774·d/T² (d: distance, T: seconds).
  """
  v_max = np.concatenate([ARM_V_MAX, [GRIPPER_V_MAX], ARM_V_MAX, [GRIPPER_V_MAX]]) * margin
  a_max = np.array([ARM_A_MAX] * 6 + [GRIPPER_A_MAX] + [ARM_A_MAX] * 6 + [GRIPPER_A_MAX]) * margin
  d = np.abs(delta)
  t = max(float(np.max(1.875 * d / v_max)), float(np.max(np.sqrt(5.774 * d / a_max))))
  return int(np.ceil(t * fps)) + 1


def _in_view(pose: np.ndarray, margin: float = 0.04) -> bool:
  """Whether every joint of both arms lies inside the image and above the table."""
  for q, base, mirror in ((pose[LEFT_ARM], LEFT_BASE, False), (pose[RIGHT_ARM], RIGHT_BASE, True)):
    pts, _ = _arm_points(q[None], base, mirror, 1)
    x, y = pts[0, 1:, 0], pts[0, 1:, 1]
    if x.min() < margin or x.max() > 1 - margin or y.min() < margin or y.max() > TABLE_Y - 0.02:
      return False
  return True


def _rest_pose(rng: np.random.Generator) -> np.ndarray:
  pose = np.zeros(NUM_JOINTS)
  pose[list(ARM_DIMS)] = rng.uniform(-0.15, 0.15, 12)
  pose[list(GRIPPERS)] = rng.uniform(0.3, 0.7, 2)
  return pose


@dataclasses.dataclass(frozen=True)
class Motif:
  """What an episode does: which arms move, how, and what the gripper does (drives the caption)."""
  arms: str     # 'left' | 'right' | 'both'
  verb: str
  gripper: str  # 'open' | 'close' | 'none'

  @property
  def caption(self) -> str:
    text = f"{self.verb.capitalize()} {ARM_PHRASES[self.arms]}"
    grip = GRIPPER_PHRASES[self.gripper]
    return f"{text} and {grip}." if grip else f"{text}."


def _sample_motif(rng: np.random.Generator) -> Motif:
  return Motif(arms=str(rng.choice(list(ARM_PHRASES))), verb=str(rng.choice(VERBS)),
               gripper=str(rng.choice(list(GRIPPER_PHRASES))))


def _moving_dims(motif: Motif) -> list[int]:
  dims = []
  if motif.arms in ("left", "both"):
    dims += list(range(0, 6))
  if motif.arms in ("right", "both"):
    dims += list(range(7, 13))
  return dims


def _smooth_trajectory(rng: np.random.Generator, motif: Motif, n_frames: int, fps: float,
                       speed: float = 1.0) -> np.ndarray:
  """Minimum-jerk moves between random key poses. speed > 1 compresses time (violates limits)."""
  dims = _moving_dims(motif)
  grip_dims = [g for g, side in zip(GRIPPERS, ("left", "right")) if motif.arms in (side, "both")]
  pose = _rest_pose(rng)
  if motif.gripper != "none":
    pose[grip_dims] = 0.0 if motif.gripper == "open" else 1.0
  out = [pose.copy()]
  wave_sign = rng.choice([-1.0, 1.0], len(dims))
  segment = 0
  while len(out) < n_frames:
    target = pose.copy()
    # The verb shapes the key poses: 'wave' swings back and forth, 'raise' first uncurls the arm
    # upwards, 'reach out with' first leans it in over the table; the others go anywhere in range.
    sign = rng.choice([-1.0, 1.0], len(dims))
    if motif.verb == "wave":
      sign = wave_sign * (-1.0) ** segment
    elif motif.verb == "raise" and segment == 0:
      sign = -np.ones(len(dims))
    elif motif.verb == "reach out with" and segment == 0:
      sign = np.ones(len(dims))
    lim = JOINT_LIMITS[dims]
    for _ in range(20):  # key poses keep the whole arm in the picture, above the table
      amplitude = rng.uniform(0.25, 0.6, len(dims))
      target[dims] = np.clip(pose[dims] + sign * amplitude, -lim, lim)
      if _in_view(target):
        break
      sign = rng.choice([-1.0, 1.0], len(dims))
    else:
      target = pose.copy()
    if motif.gripper != "none":
      target[grip_dims] = rng.uniform(0.6, 1.0) if motif.gripper == "open" else rng.uniform(0.0, 0.4)
    frames = max(2, int(np.ceil(_segment_frames(target - pose, fps, SMOOTH_MARGIN) / speed)))
    s = _min_jerk(np.arange(1, frames + 1) / frames)[:, None]  # [frames, 1]
    out.extend(pose + s * (target - pose))
    # Smooth episodes sometimes pause at a key pose (holding still is smooth too).
    if speed == 1.0 and rng.uniform() < 0.3:
      out.extend([target.copy()] * int(rng.integers(2, 6)))
    pose = target
    segment += 1
  return np.stack(out[:n_frames])  # [n_frames, 14]


def _clip_to_limits(traj: np.ndarray) -> np.ndarray:
  # Non-smooth kinds may overshoot the smooth range a little, never leave the picture.
  traj = np.clip(traj, -JOINT_LIMITS - 0.3, JOINT_LIMITS + 0.3)
  traj[:, list(GRIPPERS)] = np.clip(traj[:, list(GRIPPERS)], 0.0, 1.0)
  return traj


def make_trajectory(rng: np.random.Generator, kind: str, motif: Motif, n_frames: int,
                    fps: float = FPS) -> np.ndarray:
  """A [n_frames, 14] joint trajectory of the given kind ('smooth', 'jitter', 'jump', 'fast')."""
  if kind == "smooth":
    return _smooth_trajectory(rng, motif, n_frames, fps)
  if kind == "fast":
    # The same moves, 4–8× faster: far over the velocity and acceleration limits.
    return _clip_to_limits(_smooth_trajectory(rng, motif, n_frames, fps, speed=rng.uniform(4, 8)))
  base = _smooth_trajectory(rng, motif, n_frames, fps)
  dims = _moving_dims(motif)
  if kind == "jitter":
    noise = np.zeros_like(base)
    noise[:, dims] = rng.normal(0.0, rng.uniform(0.04, 0.08), (n_frames, len(dims)))
    noise[:, list(GRIPPERS)] = rng.normal(0.0, 0.05, (n_frames, 2))
    return _clip_to_limits(base + noise)
  if kind == "jump":
    # A few abrupt offsets that persist: the arm teleports between frames.
    offset = np.zeros_like(base)
    for start in rng.choice(np.arange(2, n_frames - 1), size=min(3, n_frames - 3), replace=False):
      offset[start:, dims] += rng.choice([-1.0, 1.0], len(dims)) * rng.uniform(0.2, 0.5, len(dims))
    return _clip_to_limits(base + offset)
  raise ValueError(f"toyworld.make_trajectory: unknown kind {kind!r}; expected one of {KINDS}")


# MARK: dataset


def episode_paths(root: str | Path, index: int) -> dict[str, Path]:
  """Where episode `index` lives in the RoboTwin layout under root."""
  base = Path(root) / TASK / TASK_CONFIG
  return {"hdf5": base / "data" / f"episode{index}.hdf5",
          "video": base / "video" / f"episode{index}.mp4",
          "instructions": base / "instructions" / f"episode{index}.json"}


def generate_dataset(root: str | Path, num_episodes: int, *, seed: int, size: int = 64,
                     n_frames: int = 33, smooth_fraction: float = 0.5, fps: int = FPS,
                     val_fraction: float = 0.1, write_videos: bool = True,
                     first_index: int = 0) -> dict[str, Any]:
  """Writes `num_episodes` toy episodes as a RoboTwin data root with the EVA CSV.

  Deterministic for a seed: episode i draws from `np.random.default_rng([seed, i])`, so the same
  seed gives the same joints and frames whatever else was generated before.

  Args:
    root: output folder (created).
    num_episodes: number of episodes.
    seed: the random seed.
    size: image height and width (a multiple of 16 keeps the VAE and patch sizes happy).
    n_frames: frames per episode (1 + 4k suits the Wan VAE, e.g. 17 or 33).
    smooth_fraction: fraction of smooth episodes; the rest cycle through jitter, jump, fast.
    fps: frame rate written to the videos and the CSV (EVA's reward assumes 16).
    val_fraction: the last ceil(val_fraction·num_episodes) episodes get split 'validation' (the
      split names of eva_jax.data.metadata); the others 'training'.
    write_videos: also write mp4s (the CSV then points at them).
    first_index: the episodes are first_index, first_index + 1, ... of the seed's stream (file names
      and random streams), so a second root continues the first with new episodes (the demo's IDM
      corpus). Kinds and splits follow the position in this root.

  Returns:
    the summary dict (also saved as <root>/toyworld.json).
  """
  # Imported here so that rendering and trajectories work without the writers' dependencies.
  from eva_jax.data import metadata, robotwin, video

  if size % 16:
    raise ValueError(f"toyworld.generate_dataset: size must be a multiple of 16, found {size}")
  if n_frames < 4:
    raise ValueError(f"toyworld.generate_dataset: n_frames must be >= 4, found {n_frames}")
  root = Path(root)
  n_smooth = int(round(smooth_fraction * num_episodes))
  n_val = int(np.ceil(val_fraction * num_episodes)) if num_episodes > 1 and val_fraction > 0 else 0
  episodes, rows = [], []
  for i in range(num_episodes):
    index = first_index + i
    rng = np.random.default_rng([seed, index])
    # Smooth and non-smooth episodes interleave so every split holds both.
    kind = "smooth" if _is_smooth(i, num_episodes, n_smooth) else KINDS[1 + i % 3]
    motif = _sample_motif(rng)
    joints = make_trajectory(rng, kind, motif, n_frames, fps).astype(np.float32)  # [T, 14]
    frames = render(joints, size)  # [T, S, S, 3]
    paths = episode_paths(root, index)
    for p in paths.values():
      p.parent.mkdir(parents=True, exist_ok=True)
    robotwin.write_episode(str(paths["hdf5"]), frames, joints, camera="head_camera")
    if write_videos:
      video.write_video(str(paths["video"]), frames, fps=fps)
    paths["instructions"].write_text(json.dumps({"seen": [motif.caption], "unseen": []}, indent=1))
    split = "validation" if i >= num_episodes - n_val else "training"
    rel = lambda p: p.relative_to(root).as_posix()  # noqa: E731
    episodes.append({"index": index, "kind": kind, "smooth": kind == "smooth", "caption": motif.caption,
                     "split": split, "hdf5": rel(paths["hdf5"]),
                     "video": rel(paths["video"]) if write_videos else None})
    if write_videos:
      rows.append({"video_path": rel(paths["video"]), "caption": motif.caption, "height": size,
                   "width": size, "fps": fps, "n_frames": n_frames, "split": split})
  if write_videos:
    metadata.write_metadata(root / CSV_NAME, rows, columns=CSV_COLUMNS)
  summary = {"root": str(root), "task": TASK, "task_config": TASK_CONFIG, "seed": seed,
             "num_episodes": num_episodes, "size": size, "n_frames": n_frames, "fps": fps,
             "num_smooth": n_smooth, "csv": CSV_NAME if write_videos else None,
             "episodes": episodes}
  (root / "toyworld.json").write_text(json.dumps(summary, indent=1))
  return summary


def _is_smooth(i: int, n: int, n_smooth: int) -> bool:
  """Spreads n_smooth smooth episodes evenly over n indices (Bresenham-style)."""
  return (i + 1) * n_smooth // max(n, 1) > i * n_smooth // max(n, 1)
