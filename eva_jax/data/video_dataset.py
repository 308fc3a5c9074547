"""The SFT video dataset: CSV records -> clips of 49 frames at 16 fps -> grain batches.

Per record (EVA's `datasets/video_base.py`, spec eva.md F.2):
  * temporal sampling: the clip covers `round(n_frames / fps * src_fps)` source frames; a longer
    video is cut at a random start ('random_cut') or sped up ('speedup'); a shorter one is slowed
    down ('slowdown': linspace over all its frames) or padded with its last frame ('pad_last');
  * spatial: RandomResizedCrop to (height, width), bicubic, area scale in [0.8, 1] and aspect ratio
    (width / height) x [0.98, 1.02] (the original's `augmentation` block); validation resizes to
    (height, width) directly; optional horizontal flip (off in EVA);
  * pixels to [-1, 1]; cached umT5 prompt embeddings [L, 4096] zero-padded to `max_text_tokens`,
    and optionally cached VAE latents [F, h, w, 16] and CLIP features [257, 1280].

Videos are mp4 files (`eva_jax.data.video.read_video`) or RoboTwin HDF5 episodes (head camera,
`eva_jax.data.robotwin.read_episode`). Errors name the CSV row and the file.

The grain pipeline (`make_dataset`) is deterministic given the seed: records are sliced per host
(`jax.process_index()::jax.process_count()`), shuffled with a fresh order every epoch, and every
example draws its crop / cut from a generator seeded by (seed, position in the stream). The
iterator's `get_state()` / `set_state()` resume the stream exactly, also with worker processes.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Any, Mapping

import grain
import numpy as np
from PIL import Image

from eva_jax.data.shapes import SameShapes

TRIM_MODES = ("random_cut", "speedup")
PAD_MODES = ("slowdown", "pad_last")


# MARK: temporal sampling
def temporal_indices(n_src: int, src_fps: float, n_frames: int = 49, fps: float = 16.0,
                     trim_mode: str = "random_cut", pad_mode: str = "slowdown",
                     rng: np.random.Generator | None = None) -> np.ndarray:
  """Source frame indices [n_frames] for a clip of `n_frames` at `fps` from `n_src` frames at `src_fps`."""
  target_len = round(n_frames / fps * src_fps)  # source frames that span the clip's duration
  if n_src < target_len:
    if pad_mode == "slowdown":
      idx = np.linspace(0, n_src - 1, n_frames)
    elif pad_mode == "pad_last":
      idx = np.clip(np.linspace(0, target_len - 1, n_frames), 0, n_src - 1)
    else:
      raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
  elif n_src > target_len:
    if trim_mode == "random_cut":
      if rng is None:
        raise ValueError("trim_mode='random_cut' needs an rng")
      start = int(rng.integers(0, n_src - target_len))  # high exclusive, as np.random.randint
      idx = start + np.linspace(0, target_len - 1, n_frames)
    elif trim_mode == "speedup":
      idx = np.linspace(0, n_src - 1, n_frames)
    else:
      raise ValueError(f"trim_mode must be one of {TRIM_MODES}, got {trim_mode!r}")
  else:
    idx = np.linspace(0, n_src - 1, n_frames)
  return np.round(idx).astype(np.int64)


# MARK: spatial transforms
def random_resized_crop_box(height: int, width: int, scale=(0.8, 1.0), ratio=(4 / 3, 4 / 3),
                            rng: np.random.Generator | None = None) -> tuple[int, int, int, int]:
  """(top, left, crop_h, crop_w) by torchvision's RandomResizedCrop rule (10 tries, then a centre crop)."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def resize_frames(frames: np.ndarray, height: int, width: int,
                  box: tuple[int, int, int, int] | None = None) -> np.ndarray:
  """Bicubic resize of uint8 frames [T, H, W, 3] (optionally of a crop box) to [T, height, width, 3]."""
  if box is None and frames.shape[1:3] == (height, width):
    return frames
  if box is not None:
    # crop first, then resize (torchvision's resized_crop): no filter taps from outside the box
    top, left, h, w = box
    frames = frames[:, top:top + h, left:left + w]
  out = [np.asarray(Image.fromarray(np.ascontiguousarray(f)).resize((width, height), Image.BICUBIC))
         for f in frames]
  return np.stack(out)


def to_unit_range(frames: np.ndarray) -> np.ndarray:
  """uint8 -> float32 in [-1, 1] (Normalize(0.5, 0.5) of the original)."""
  return frames.astype(np.float32) / 127.5 - 1.0


# MARK: files
def load_array(path: str | Path) -> np.ndarray:
  """A cached tensor as float32 (.npy / .safetensors / the original's .pt), via eva_jax.data.embeddings."""
  from eva_jax.data.embeddings import load_array as _load
  return _load(path)


def _read_frames(path: Path, indices: np.ndarray | None, camera: str) -> tuple[np.ndarray, float]:
  if path.suffix in (".hdf5", ".h5"):
    from eva_jax.data.robotwin import read_episode
    frames = read_episode(path, camera=camera)[0]
    return (frames if indices is None else frames[indices]), float("nan")
  from eva_jax.data.video import read_video
  return read_video(path, indices)


# MARK: one example
class ExampleLoader:
  """record, np.random.Generator -> dict of arrays (the grain random_map of the pipeline).

  Output keys: 'video' [T, H, W, 3] float32 in [-1, 1] (unless latents are cached and
  `decode_video` is off), 'prompt_embeds' [max_text_tokens, D], 'prompt_len' int32,
  'latents' [F, h, w, 16] and 'clip_fea' [257, 1280] when cached, 'row' int32, and 'caption_id'
  (crc32 of the caption) when prompt embeddings are not loaded.
  """

  def __init__(self, data_root: str | Path, cfg: Mapping[str, Any] | Any, train: bool = True,
               prompt_dim: int | None = None):
    """prompt_dim: the width D that cached prompt embeddings must have (the DiT's text_dim); None: any."""
    g = (lambda k, d=None: cfg.get(k, d)) if isinstance(cfg, Mapping) else (lambda k, d=None: getattr(cfg, k, d))
    self.prompt_dim = prompt_dim
    self.same_shapes = SameShapes("array")
    self.data_root = Path(data_root)
    self.train = train
    self.height, self.width = int(g("height", 480)), int(g("width", 640))
    self.n_frames, self.fps = int(g("n_frames", 49)), float(g("fps", 16))
    self.trim_mode = g("trim_mode", "random_cut")
    self.pad_mode = g("pad_mode", "slowdown")
    self.augment = bool(g("augment", True)) and train
    self.scale = tuple(g("aug_scale", (0.8, 1.0)))
    self.ratio = tuple(r * self.width / self.height for r in g("aug_ratio", (0.98, 1.02)))
    self.random_flip = float(g("random_flip", 0.0) or 0.0)
    self.camera = g("camera", "head_camera")
    self.load_prompt_embed = bool(g("load_prompt_embed", True))
    self.max_text_tokens = int(g("max_text_tokens", 512))
    self.load_video_latent = bool(g("load_video_latent", False))
    self.load_clip_embed = bool(g("load_clip_embed", False))
    self.decode_video = bool(g("decode_video", not self.load_video_latent))
    if self.trim_mode not in TRIM_MODES or self.pad_mode not in PAD_MODES:
      raise ValueError(f"data config: trim_mode {self.trim_mode!r} must be in {TRIM_MODES} and pad_mode "
                       f"{self.pad_mode!r} in {PAD_MODES}")

  def _where(self, rec) -> str:
    return f"metadata row {rec.get('row')} (video_path={rec.get('video_path')!r})"

  def _cached(self, rec, column: str) -> np.ndarray:
    if column not in rec:
      raise KeyError(f"{self._where(rec)}: column {column!r} is missing or empty; "
                     "run scripts/cache_embeddings.py first")
    try:
      return load_array(self.data_root / rec[column])
    except (FileNotFoundError, ValueError) as e:
      raise FileNotFoundError(f"{self._where(rec)}: cannot load {column}: {e}") from e

  def video(self, rec, rng: np.random.Generator, first_frame_only: bool = False) -> np.ndarray:
    """[T, H, W, 3] float32 in [-1, 1]. first_frame_only: [1, H, W, 3], the clip's frame 0 under the
    same draws (cut, flip, crop) as the whole clip, reading one frame instead of T (GRPO's starts)."""
    n_src = rec.get("trim_end", rec["n_frames"]) - rec.get("trim_start", 0)
    idx = rec.get("trim_start", 0) + temporal_indices(
        n_src, rec["fps"], self.n_frames, self.fps, self.trim_mode, self.pad_mode, rng)
    if first_frame_only:
      idx = idx[:1]
    path = self.data_root / rec["video_path"]
    try:
      frames, _ = _read_frames(path, idx, self.camera)
    except Exception as e:
      raise ValueError(f"{self._where(rec)}: cannot read frames {idx.min()}..{idx.max()} of {path} (the row says "
                       f"n_frames={rec['n_frames']}, fps={rec['fps']:g}): {e}") from e
    if "crop_top" in rec and "crop_bottom" in rec:
      frames = frames[:, rec["crop_top"]:rec["crop_bottom"]]
    if "crop_left" in rec and "crop_right" in rec:
      frames = frames[:, :, rec["crop_left"]:rec["crop_right"]]
    if self.random_flip and self.train and rng.uniform() < self.random_flip:
      frames = frames[:, :, ::-1]
    box = None
    if self.augment:
      box = random_resized_crop_box(frames.shape[1], frames.shape[2], self.scale, self.ratio, rng)
    return to_unit_range(resize_frames(np.ascontiguousarray(frames), self.height, self.width, box))

  def __call__(self, rec: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {"row": np.int32(rec.get("row", -1))}
    if self.decode_video:
      out["video"] = self.video(rec, rng)
    if self.load_prompt_embed:
      emb = self._cached(rec, "prompt_embed_path")  # [L, D]
      if (emb.ndim != 2 or emb.shape[0] > self.max_text_tokens
          or self.prompt_dim is not None and emb.shape[1] != self.prompt_dim):
        raise ValueError(f"{self._where(rec)}: prompt embedding {rec['prompt_embed_path']} has shape "
                         f"{emb.shape}; expected [L <= {self.max_text_tokens} (data.max_text_tokens), "
                         f"{'D' if self.prompt_dim is None else self.prompt_dim}] "
                         f"{'' if self.prompt_dim is None else '(D: the DiT text_dim of config.model.preset) '}"
                         "as scripts/cache_embeddings.py writes it with the matching umT5")
      out["prompt_len"] = np.int32(emb.shape[0])
      out["prompt_embeds"] = np.pad(emb, ((0, self.max_text_tokens - emb.shape[0]), (0, 0)))
    else:
      # a stable id of the caption, for encoders that run later (or synthetic text in smoke runs)
      out["caption_id"] = np.int64(zlib.crc32(str(rec.get("caption", "")).encode()))
    if self.load_video_latent:
      lat = self._cached(rec, "video_latent_path")  # [F, h, w, 16]
      want = (self.height // 8, self.width // 8)  # the clip length is the cache's (it was cut when cached)
      if lat.ndim != 4 or tuple(lat.shape[1:3]) != want or lat.shape[3] != 16:
        raise ValueError(f"{self._where(rec)}: latent {rec['video_latent_path']} has shape {lat.shape}; "
                         f"expected [F, {want[0]}, {want[1]}, 16] (channels-last) for data.height x data.width = "
                         f"{self.height}x{self.width}; re-cache the latents at this size "
                         "(scripts/cache_embeddings.py) or pick the matching config variant (e.g. "
                         "configs/sft.py:14b_832 for 480x832)")
      out["latents"] = lat
    if self.load_clip_embed:
      out["clip_fea"] = self._cached(rec, "clip_embed_path")  # [257, 1280]
    self.same_shapes.check(out, self._where(rec))  # a batch stacks them: name the odd row here
    return out


# MARK: grain pipeline
def make_dataset(records, loader: ExampleLoader, batch_size: int, *, seed: int = 0, train: bool = True,
                 num_epochs: int | None = None, num_workers: int = 0, prefetch: int = 2,
                 process_index: int | None = None, process_count: int | None = None) -> grain.IterDataset:
  """Batches of `batch_size // process_count` examples for this host.

  Training: shuffled per epoch, repeated (`num_epochs=None`: forever), incomplete batches dropped.
  Evaluation (`train=False`): one pass in CSV order, last batch kept.
  `iter(ds)` gives an iterator with `get_state()` / `set_state()` for exact resumption.
  prefetch: batches read ahead of the one the trainer takes, by as many threads (grain's default, 500
  batches in 16 threads, decoded 500 batches of video ahead: host memory for 49-frame clips, and CPU spent
  on batches a short run never takes; the data do not change with it).
  """
  import jax
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} is not divisible by the {process_count} hosts")
  per_host = batch_size // process_count
  ds = grain.MapDataset.source(list(records))[process_index::process_count]
  if len(ds) == 0:
    raise ValueError(f"host {process_index}/{process_count} got no records out of {len(records)}")
  if train:
    ds = ds.shuffle(seed=seed).repeat(num_epochs)  # repeat() re-shuffles every epoch
  ds = ds.random_map(loader, seed=seed)
  ds = ds.batch(per_host, drop_remainder=train)
  it = ds.to_iter_dataset(read_options(prefetch))
  if num_workers > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():
      # grain's workers read absl flags; inside a library call (tests, notebooks) use their defaults
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=prefetch))
  return it


def read_options(prefetch: int, max_threads: int | None = None) -> grain.ReadOptions:
  """Reading `prefetch` batches ahead in as many threads (at most max_threads). Elements of the iterator are
  whole batches (the MapDataset is batched before it is read), so grain's buffer counts batches, not examples."""
  prefetch = max(1, prefetch)
  return grain.ReadOptions(num_threads=min(prefetch, max_threads or prefetch), prefetch_buffer_size=prefetch)
