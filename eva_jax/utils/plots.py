"""PNG and GIF helpers for reports: reward curves, joint trajectories, frame strips.

Shared by the demo, the IDM evaluation and the GRPO trainer. Everything uses matplotlib's
object API (`matplotlib.figure.Figure`, no pyplot state), so it is safe in threads and never opens a
window. Every function writes one file, creates its folder and returns the path.

  from eva_jax.utils import plots
  plots.plot_curves('r.png', {'reward': (steps, mean)}, bands={'reward': std}, ylabel='reward')
  plots.plot_joint_trajectories('j.png', {'true': a_true, 'IDM': a_pred}, fps=16)  # [T, 14] each
  plots.save_frame_strips('s.png', {'before': video0, 'after': video1})         # [T, H, W, 3] each
  plots.save_gif('v.gif', video, fps=16)
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from eva_jax.utils import frames as video

# The 14-d action layout of EVA's dual-arm embodiment (spec/eva.md B, F.1).
JOINT_NAMES = tuple([f"left_j{i}" for i in range(6)] + ["left_gripper"]
                    + [f"right_j{i}" for i in range(6)] + ["right_gripper"])


def _figure(width: float, height: float):
  from matplotlib.figure import Figure
  return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, path: str | os.PathLike) -> Path:
  from eva_jax.utils.files import atomic_path
  path = Path(path)
  with atomic_path(path) as tmp:  # a killed run leaves no truncated PNG
    fig.savefig(tmp, format="png")
  return path


def plot_curves(path: str | os.PathLike,
                series: Mapping[str, tuple[Sequence[float], Sequence[float]] | Sequence[float]],
                *, bands: Mapping[str, Sequence[float]] | None = None, title: str = "",
                xlabel: str = "step", ylabel: str = "", hlines: Mapping[str, float] | None = None
                ) -> Path:
  """Line plot of named series, each `(x, y)` or just `y` (x = 0..n−1).

  bands: optional ± half-widths per series name (e.g. the reward std across a group).
  hlines: optional named horizontal reference lines (e.g. a baseline's mean).
  """
  fig = _figure(6.4, 3.6)
  ax = fig.add_subplot()
  for name, s in series.items():
    x, y = (s if isinstance(s, tuple) else (np.arange(len(s)), s))
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    (line,) = ax.plot(x, y, marker="o" if len(y) <= 30 else None, ms=3, label=name)
    if bands and name in bands:
      w = np.asarray(bands[name], np.float64)
      ax.fill_between(x, y - w, y + w, color=line.get_color(), alpha=0.2, lw=0)
  for k, (name, v) in enumerate((hlines or {}).items()):
    ax.axhline(v, ls="--", lw=1, color=f"C{k + len(series)}", label=name)
  ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
  ax.grid(alpha=0.3)
  if len(series) + len(hlines or {}) > 1:
    ax.legend(fontsize=8)
  return _save(fig, path)


def plot_joint_trajectories(path: str | os.PathLike, trajectories: Mapping[str, np.ndarray], *,
                            fps: float = 16.0, title: str = "",
                            joint_names: Sequence[str] = JOINT_NAMES) -> Path:
  """One small panel per joint, every named `[T, D]` trajectory overlaid (time in seconds)."""
  trajs = {k: np.asarray(v, np.float64) for k, v in trajectories.items()}
  dims = {v.shape[-1] for v in trajs.values()}
  if len(dims) != 1 or any(v.ndim != 2 for v in trajs.values()):
    shapes = {k: v.shape for k, v in trajs.items()}
    raise ValueError(f"plot_joint_trajectories({path}): trajectories must all be [T, D]; got {shapes}")
  d = dims.pop()
  names = list(joint_names) if len(joint_names) == d else [f"dim {i}" for i in range(d)]
  cols = 7 if d == 14 else min(d, 6)
  rows = math.ceil(d / cols)
  fig = _figure(2.0 * cols, 1.6 * rows + 0.4)
  axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
  for i in range(rows * cols):
    ax = axes[i // cols, i % cols]
    if i >= d:
      ax.set_visible(False)
      continue
    for k, (name, v) in enumerate(trajs.items()):
      ax.plot(np.arange(len(v)) / fps, v[:, i], lw=1.2, color=f"C{k}", label=name)
    ax.set_title(names[i], fontsize=8)
    ax.tick_params(labelsize=6)
    ax.grid(alpha=0.3)
  if len(trajs) > 1:
    axes[0, 0].legend(fontsize=6)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.supxlabel("time (s)", fontsize=8)
  return _save(fig, path)


def plot_bars(path: str | os.PathLike, groups: Mapping[str, Mapping[str, float]], *, title: str = "",
              ylabel: str = "", log: bool = False) -> Path:
  """Grouped bars: {'before': {'jerk': 1.0, ...}, 'after': {...}} (e.g. per-term penalties)."""
  keys = list(dict.fromkeys(k for g in groups.values() for k in g))
  fig = _figure(min(12.0, max(5.5, 1.0 + 0.6 * len(keys) * max(len(groups), 1))), 3.4)
  ax = fig.add_subplot()
  width = 0.8 / max(len(groups), 1)
  for j, (name, g) in enumerate(groups.items()):
    x = np.arange(len(keys)) + (j - (len(groups) - 1) / 2) * width
    ax.bar(x, [float(g.get(k, np.nan)) for k in keys], width, label=name)
  ax.set_xticks(np.arange(len(keys)), keys, rotation=45 if len(keys) > 6 else 0, fontsize=8)
  if log:
    ax.set_yscale("log")
  ax.set_title(title, fontsize=10)
  ax.set_ylabel(ylabel)
  if len(groups) > 1:
    ax.legend(fontsize=8)
  return _save(fig, path)


def save_frame_strips(path: str | os.PathLike, videos: Mapping[str, np.ndarray], *,
                      max_frames: int = 8, scale: int = 2, fps: float | None = None) -> Path:
  """One labelled row of evenly spaced frames per named video (`[T, H, W, 3]`), as a PNG.

  scale: integer upscaling (nearest) so low-resolution frames stay readable.
  fps: when given, each row's label shows the frame times it samples.
  """
  rows = {k: video.frame_strip(v, max_frames) for k, v in videos.items()}
  fig_w = max(r.shape[1] for r in rows.values()) * scale / 100 + 1.2
  fig_h = sum(r.shape[0] for r in rows.values()) * scale / 100 + 0.3 * len(rows)
  fig = _figure(fig_w, fig_h)
  axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
  for ax, (name, strip) in zip(axes, rows.items()):
    ax.imshow(strip, interpolation="nearest")
    w = videos[name].shape[2]
    for k in range(1, strip.shape[1] // w):  # white separators between frames
      ax.axvline(k * w - 0.5, color="white", lw=1)
    ax.set_xticks([])
    ax.set_yticks([])
    label = name
    if fps:
      n = len(videos[name])
      label += f"  ({n} frames, {n / fps:.2f} s)"
    ax.set_title(label, fontsize=8, loc="left")
  return _save(fig, path)


def save_gif(path: str | os.PathLike, frames, *, fps: float = 16.0, scale: int = 1) -> Path:
  """An animated, looping GIF of `[T, H, W, 3]` frames (uint8, or float in [-1, 1])."""
  from PIL import Image

  frames = video.to_uint8(frames)
  if scale > 1:
    frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  images = [Image.fromarray(f) for f in frames]
  images[0].save(path, save_all=True, append_images=images[1:], loop=0,
                 duration=max(int(round(1000 / fps)), 20))
  return path
