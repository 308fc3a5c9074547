"""RoboTwin data root -> `robotwin_videos.csv` for SFT (the original's `generate_robotwin_csv.py`).

  python scripts/prepare_robotwin.py --root=$WORKSPACE/RoboTwin/data
  python scripts/prepare_robotwin.py --root=... --tasks=beat_block_hammer,click_bell --fps=16.667

What it reads, per episode `<root>/<task>/<task_config>/data/episode{i}.hdf5` (RoboTwin 2.0):
  video        `<task>/<task_config>/video/episode{i}.mp4` when it exists; otherwise the head-camera
               frames of the HDF5 (`/observation/head_camera/rgb`, JPEG) are written to that path as
               an H.264 mp4 at --fps (or 250/15 Hz, RoboTwin's recording rate, when --fps=0).
  caption      `<task>/<task_config>/instructions/episode{i}.json`: a dict of instruction lists
               ('seen' first, then 'unseen', then any other list-valued key), a plain list, or a
               string; the first non-empty instruction is used (--instruction_index picks another).
               Without a file the caption is the task name with spaces ('beat block hammer').
  size/length  from the mp4 container (height, width, n_frames, fps).
  fps          --fps overrides the container rate (RoboTwin mp4s say 30 fps, but frames were
               recorded at 250/15 ≈ 16.7 Hz of simulated time; pass --fps=16.667 for real time).
  split        'validation' for the last int(n * val_fraction) rows of a random.Random(seed)
               shuffle (the original loader's rule), 'training' for the rest.

Output: `<root>/robotwin_videos.csv` (--output_csv) with video_path (relative to root), caption,
height, width, fps, n_frames, split, task, task_config, episode. Then cache the prompt embeddings
with scripts/cache_embeddings.py, which adds the prompt_embed_path column.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a file (python scripts/x.py): the checkout's root on sys.path
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROBOTWIN_RECORD_HZ = 250.0 / 15.0  # sim timestep 1/250 s, one saved frame every 15 steps (spec F.1)
_EPISODE = re.compile(r"episode(\d+)\.hdf5$")


def _caption_from(obj: Any, index: int) -> str | None:
  """First usable instruction in an instructions JSON (dict of lists, list, or string)."""
  if isinstance(obj, str):
    return obj.strip() or None
  if isinstance(obj, list):
    items = [s.strip() for s in obj if isinstance(s, str) and s.strip()]
    return items[min(index, len(items) - 1)] if items else None
  if isinstance(obj, dict):
    keys = [k for k in ("seen", "unseen") if k in obj] + [k for k in obj if k not in ("seen", "unseen")]
    for k in keys:
      cap = _caption_from(obj[k], index)
      if cap:
        return cap
  return None


def read_caption(path: Path, task: str, index: int = 0) -> tuple[str, bool]:
  """(caption, found_in_file)."""
  if path.is_file():
    try:
      cap = _caption_from(json.loads(path.read_text()), index)
    except json.JSONDecodeError as e:
      raise ValueError(f"instructions file {path} is not valid JSON: {e}") from e
    if cap:
      return cap, True
  return task.replace("_", " "), False


def find_episodes(root: Path, tasks: Sequence[str] = ()) -> list[tuple[str, str, int, Path]]:
  """(task, task_config, episode index, hdf5 path), sorted, for `<root>/<task>/<config>/data/episode*.hdf5`."""
  out = []
  for h5 in root.glob("*/*/data/episode*.hdf5"):
    m = _EPISODE.search(h5.name)
    task, task_config = h5.parts[-4], h5.parts[-3]
    if m and (not tasks or task in tasks):
      out.append((task, task_config, int(m.group(1)), h5))
  return sorted(out, key=lambda e: (e[0], e[1], e[2]))


def build_records(root: str | Path, *, tasks: Sequence[str] = (), camera: str = "head_camera", fps: float = 0.0,
                  val_fraction: float = 0.01, seed: int = 0, instruction_index: int = 0,
                  overwrite_videos: bool = False, skip_corrupt: bool = False,
                  progress=None) -> tuple[list[dict], dict]:
  """The CSV rows and a summary {'episodes', 'extracted', 'captions_from_files', 'validation', 'skipped'}.

  An unreadable episode (HDF5, JPEG frame, mp4) raises naming its file and frame; with `skip_corrupt` it is
  left out of the CSV with a warning and counted in 'skipped'."""
  from absl import logging
  from eva_jax.data.robotwin import read_episode
  from eva_jax.data.video import video_info, write_video

  root = Path(root)
  episodes = find_episodes(root, tasks)
  if not episodes:
    raise FileNotFoundError(f"no RoboTwin episodes under {root} (expected <task>/<task_config>/data/episode*.hdf5)")
  rows, extracted, from_files, skipped = [], 0, 0, 0
  it = progress(episodes, desc="episodes") if progress else episodes
  for task, task_config, i, h5 in it:
    base = root / task / task_config
    mp4 = base / "video" / f"episode{i}.mp4"
    try:
      if overwrite_videos or not mp4.is_file():
        frames, _ = read_episode(h5, camera=camera)  # its errors name the file, dataset and frame
        write_video(mp4, frames, fps=fps or ROBOTWIN_RECORD_HZ)  # atomic: a failure leaves no mp4
        extracted += 1
      info = video_info(mp4)
    except (OSError, ValueError, KeyError) as e:
      if not skip_corrupt:
        raise
      logging.warning("skipping episode %s (--skip_corrupt): %s", h5, e)
      skipped += 1
      continue
    caption, found = read_caption(base / "instructions" / f"episode{i}.json", task, instruction_index)
    from_files += found
    rows.append(dict(video_path=mp4.relative_to(root).as_posix(), caption=caption, height=info["height"],
                     width=info["width"], fps=round(fps or info["fps"], 4), n_frames=info["n_frames"],
                     task=task, task_config=task_config, episode=i))
  order = list(range(len(rows)))
  random.Random(seed).shuffle(order)
  n_val = int(len(rows) * val_fraction)
  val = set(order[len(order) - n_val:]) if n_val else set()
  for k, r in enumerate(rows):
    r["split"] = "validation" if k in val else "training"
  return rows, {"episodes": len(rows), "extracted": extracted, "captions_from_files": from_files,
                "validation": n_val, "skipped": skipped}


COLUMNS = ("video_path", "caption", "height", "width", "fps", "n_frames", "split", "task", "task_config", "episode")


def main(argv):
  del argv
  from absl import flags
  from eva_jax.data.metadata import write_metadata
  from eva_jax.utils.progress import progress

  f = flags.FLAGS
  root = Path(f.root)
  rows, summary = build_records(root, tasks=[t for t in f.tasks.split(",") if t], camera=f.camera, fps=f.fps,
                                val_fraction=f.val_fraction, seed=f.seed, instruction_index=f.instruction_index,
                                overwrite_videos=f.overwrite_videos, skip_corrupt=f.skip_corrupt,
                                progress=progress)
  out = Path(f.output_csv) if f.output_csv else root / "robotwin_videos.csv"
  write_metadata(out, rows, COLUMNS)
  print(f"wrote {out}: {summary['episodes']} rows ({summary['validation']} validation), "
        f"{summary['extracted']} videos extracted from HDF5, "
        f"{summary['captions_from_files']} captions from instruction files"
        + (f", {summary['skipped']} unreadable episode(s) skipped" if summary["skipped"] else ""))


def _define_flags() -> None:
  from absl import flags
  if "root" in flags.FLAGS:
    return
  flags.DEFINE_string("root", None, "RoboTwin data root (<root>/<task>/<task_config>/data/episode*.hdf5)")
  flags.DEFINE_string("output_csv", "", "output CSV (default <root>/robotwin_videos.csv)")
  flags.DEFINE_string("tasks", "", "comma-separated task names to keep (default all)")
  flags.DEFINE_string("camera", "head_camera", "camera whose frames are extracted when no mp4 exists")
  # Bounds make a bad value a usage error naming the flag, not an encoder or index error later.
  flags.DEFINE_float("fps", 0.0, "fps written to the CSV (and of extracted mp4s); 0 = the container's rate",
                     lower_bound=0.0)
  flags.DEFINE_float("val_fraction", 0.01, "fraction of rows in the 'validation' split", lower_bound=0.0,
                     upper_bound=1.0)
  flags.DEFINE_integer("seed", 0, "seed of the split shuffle")
  flags.DEFINE_integer("instruction_index", 0, "which instruction of the list to use as the caption",
                       lower_bound=0)
  flags.DEFINE_bool("overwrite_videos", False, "re-extract mp4s from the HDF5 even if they exist")
  flags.DEFINE_bool("skip_corrupt", False, "leave unreadable episodes out of the CSV (a warning and a count) "
                    "instead of stopping on the first")
  flags.mark_flag_as_required("root")
  flags.register_validator("output_csv", lambda v: not v or not Path(v).is_dir(),
                           "must be a CSV file path, not a directory")


def cli(argv=None):
  from scripts._common import run
  _define_flags()
  run(main, argv)


if __name__ == "__main__":
  cli()
