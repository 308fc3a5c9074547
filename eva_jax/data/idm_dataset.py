"""RoboTwin episodes as a TFDS dataset (array_record, no TensorFlow) and the grain pipeline of IDM training.

Preparation (once): every frame of every episode becomes one record, in episode order (shuffling is
off at write time, so a window's neighbours are the adjacent records):

  {'jpeg': stored JPEG bytes, 'action': [14] float32, 'episode': int, 'index': int,
   'episode_start': record position of the episode's frame 0, 'episode_length': int}

Splits are by episode (a seeded shuffle puts `val_fraction` of them in 'val'); the authors' recipe
instead splits the frames of the 'train' split (`frame_split`, like their `random_split`).

  build_idm_dataset(list_episodes('/data/RoboTwin/data/click_bell'), data_dir='data/tfds')
  sources = load_idm_sources('data/tfds')                 # {'train': ..., 'val': ...}
  windows = WindowSource(sources['train'])                 # [3, H, W, 3] uint8 windows + targets
  loader = train_loader(windows, batch_size=32, seed=0, start_step=resume_step, num_workers=8)

Deterministic resume: batch k of `train_loader(..., start_step=0)` equals batch 0 of
`train_loader(..., start_step=k)` (the pipeline is a random-access MapDataset sliced at the step), so
a restart needs only the step number from the checkpoint.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import tempfile
from typing import Any, Iterable, Mapping, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from eva_jax.data import robotwin, video_dataset
from eva_jax.utils.files import atomic_path

DATASET_NAME = "robotwin_idm"
SKIPPED_FILE = "skipped_episodes.json"  # written by every build: the episodes skip_corrupt left out


# MARK: TFDS builder

class RobotwinIdm(tfds.core.GeneratorBasedBuilder):
  """RoboTwin HDF5 episodes -> per-frame array_record records (see module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Per-frame JPEG bytes + 14-d joint vector, episode order kept."}

  # tfds' default lookup of the builder's source file imports `importlib_resources`, which is not a
  # dependency here; the answer is simply this file.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    from etils import epath
    return epath.Path(__file__)

  def __init__(self, *, episodes: Mapping[str, Sequence[str | os.PathLike]] | None = None,
               camera: str = "head_camera", skip_corrupt: bool = False, location: str | os.PathLike | None = None,
               **kwargs):
    self._location = location  # where the build will land (it is made in a staging folder first)
    self._episodes = {k: [str(p) for p in v] for k, v in (episodes or {}).items()}
    self._camera = camera
    self._skip_corrupt = skip_corrupt
    self.skipped: list[dict[str, str]] = []  # {'path', 'error'} of episodes left out (skip_corrupt)
    self._frame_shape: tuple[tuple[int, ...], str] | None = None  # (shape, episode) of the first frame
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  # tfds prints these two lines to stdout whatever the logging level: here they go to the log instead
  # (the entry points print the dataset's location themselves).
  def _log_download_bytes(self) -> None:
    logging.info("preparing the %s dataset in %s", self.name, self._location or self.data_dir)

  def _log_download_done(self) -> None:
    logging.info("prepared the %s dataset in %s", self.name, self._location or self.data_dir)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="RoboTwin 2.0 episodes for inverse dynamics (one record per frame).",
        disable_shuffling=True,  # windows read their neighbours as the adjacent records
        features=tfds.features.FeaturesDict({
            "jpeg": tfds.features.Scalar(dtype=np.object_),
            "action": tfds.features.Tensor(shape=(robotwin.ACTION_DIM,), dtype=np.float32),
            "episode": np.int32,
            "index": np.int32,
            "episode_start": np.int64,
            "episode_length": np.int32,
        }),
        metadata=tfds.core.MetadataDict(camera=self._camera,
                                        episodes={k: v for k, v in self._episodes.items()}),
    )

  def _split_generators(self, dl_manager):
    if not self._episodes:
      raise ValueError("RobotwinIdm: pass episodes={'train': [...], 'val': [...]} to build the dataset")
    return {split: self._generate_examples(paths) for split, paths in self._episodes.items()}

  def _generate_examples(self, paths: Sequence[str]):
    start = 0
    for e, path in enumerate(paths):
      try:
        data, actions = robotwin.read_jpeg_bytes(path, self._camera)
        # Every frame is decoded now, so a corrupt one fails here naming file and frame, not in a training
        # step's data loader hours later (decoding is ~1 ms a frame, once per dataset).
        for i, jpeg in enumerate(data):
          self._same_size(robotwin.decode_frame(jpeg, path=path, index=i).shape, path, i)
      except (OSError, ValueError, KeyError) as err:
        if not self._skip_corrupt:
          raise
        logging.warning("skipping episode %s (skip_corrupt): %s", path, err)
        self.skipped.append({"path": path, "error": str(err)})
        continue
      for i, (jpeg, action) in enumerate(zip(data, actions)):
        yield f"{e:07d}_{i:07d}", dict(jpeg=jpeg, action=action, episode=e, index=i,
                                       episode_start=start, episode_length=len(data))
      start += len(data)

  def _same_size(self, shape: tuple[int, ...], path: str, index: int) -> None:
    """Every frame of the dataset has one size: the IDM batches windows of any episodes together."""
    if self._frame_shape is None:
      self._frame_shape = (shape, path)
    elif shape != self._frame_shape[0]:
      (h, w, _), (h0, w0, _) = shape, self._frame_shape[0]
      raise ValueError(f"{path}: frame {index} is {h}x{w}, but the frames of {self._frame_shape[1]} are {h0}x{w0}; "
                       "every episode of one IDM dataset must be recorded at one camera size")


def split_episodes(paths: Sequence[str | os.PathLike], val_fraction: float = 0.1,
                   seed: int = 0) -> dict[str, list[str]]:
  """Seeded split by episode; at least one validation episode when there are two or more."""
  paths = [str(p) for p in paths]
  order = list(paths)
  random.Random(seed).shuffle(order)
  n_val = min(max(int(round(val_fraction * len(paths))), 1 if len(paths) > 1 and val_fraction > 0 else 0),
              len(paths) - 1)
  val = set(order[:n_val])
  return {"train": [p for p in paths if p not in val], "val": [p for p in paths if p in val]}


def build_idm_dataset(episodes: Sequence[str | os.PathLike] | Mapping[str, Sequence[str | os.PathLike]],
                      data_dir: str | os.PathLike, *, val_fraction: float = 0.1, seed: int = 0,
                      camera: str = "head_camera", overwrite: bool = False,
                      skip_corrupt: bool = False) -> pathlib.Path:
  """Writes the array_record dataset under `data_dir/robotwin_idm/1.0.0`; returns that directory.

  Atomic: the dataset is built in a temporary folder under `data_dir` and renamed into place once
  complete, so a failed or killed build leaves the previous dataset (or none), never a partial one that
  the next run would load. An existing dataset is kept unless `overwrite`. A corrupt or unreadable
  episode stops the build naming its file and frame; with `skip_corrupt` it is left out with a warning
  and listed in SKIPPED_FILE (`skipped_episodes(path)`).
  """
  splits = episodes if isinstance(episodes, Mapping) else split_episodes(episodes, val_fraction, seed)
  splits = {k: v for k, v in splits.items() if len(v)}
  final = pathlib.Path(data_dir) / DATASET_NAME / str(RobotwinIdm.VERSION)
  if (final / "dataset_info.json").exists() and not overwrite:
    return final
  final.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{DATASET_NAME}-building-", dir=final.parent))
  try:
    builder = RobotwinIdm(episodes=splits, camera=camera, skip_corrupt=skip_corrupt, location=final,
                          data_dir=str(staging))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=False))
    built = pathlib.Path(builder.data_dir)
    with atomic_path(built / SKIPPED_FILE) as tmp:
      tmp.write_text(json.dumps(builder.skipped, indent=1))
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
      os.replace(final, old)
    os.replace(built, final)
    shutil.rmtree(old, ignore_errors=True)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return final


def skipped_episodes(data_dir: str | os.PathLike) -> list[dict[str, str]]:
  """The episodes a `skip_corrupt` build left out ({'path', 'error'}); [] for a dataset without the list."""
  path = _version_dir(data_dir) / SKIPPED_FILE
  return json.loads(path.read_text()) if path.exists() else []


def _version_dir(data_dir: str | os.PathLike) -> pathlib.Path:
  path = pathlib.Path(data_dir)
  return path if (path / "dataset_info.json").exists() else path / DATASET_NAME / str(RobotwinIdm.VERSION)


def load_idm_sources(data_dir: str | os.PathLike) -> dict[str, Any]:
  """{split: random-access source of records} from a prepared directory (the dataset root or its
  versioned subdirectory); works without TensorFlow and without importing the builder class."""
  path = _version_dir(data_dir)
  if not (path / "dataset_info.json").exists():
    raise FileNotFoundError(f"no prepared {DATASET_NAME} dataset at {data_dir} (expected {path}/dataset_info.json)")
  return tfds.builder_from_directory(str(path)).as_data_source()


# MARK: windows


class WindowSource(grain.sources.RandomAccessDataSource if hasattr(grain, "sources") else object):
  """Record source -> {'frames': uint8 [num_frames, H, W, 3], 'action': [14], 'episode', 'index'}.

  Window of record i: frames i + (k - num_frames // 2) * stride of its episode (k = 0..num_frames-1),
  each clamped to [0, length - 1], decoded from the stored JPEG bytes into the recorder's RGB order.
  stride 1 gives [i-1, i, i+1] (what the reward scores); stride 2 gives [i-2, i, i+2] (the authors'
  training windows, V-ds `__getitem__`). Every frame of an episode is a window centre, as in the
  authors' dataset: at the edges the clamped index repeats the first or last frame ([0, 0, 2] for
  frame 0, [n-3, n-1, n-1] for the last frame).

  indices: the record positions that are window centres (a frame-level split); None = all records.
  Neighbours are read from all records either way.
  """

  def __init__(self, records, num_frames: int = 3, stride: int = 1, indices: Sequence[int] | None = None):
    if stride < 1:
      raise ValueError(f"config.data.stride must be >= 1, got {stride}")
    self.records = records
    self.offsets = (np.arange(num_frames) - num_frames // 2) * stride
    self.indices = None if indices is None else np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.records) if self.indices is None else len(self.indices)

  def _centre(self, i: int):
    pos = int(i) if self.indices is None else int(self.indices[int(i)])
    rec = self.records[pos]
    n, idx = int(rec["episode_length"]), int(rec["index"])
    return pos, rec, np.clip(idx + self.offsets, 0, n - 1)

  def frame_indices(self, i: int) -> tuple[int, np.ndarray]:
    """(record position of window i's centre, the episode-local frame indices of its frames)."""
    pos, _, frame_idx = self._centre(i)
    return pos, frame_idx

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    # Each record read parses a stored example (most of a window's cost): the centre is read once.
    _, rec, frame_idx = self._centre(i)
    start, idx = int(rec["episode_start"]), int(rec["index"])
    frames = []
    for t in frame_idx:
      r = rec if t == idx else self.records[start + int(t)]
      where = f"{DATASET_NAME} record {start + int(t)} (episode {int(rec['episode'])})"
      frames.append(robotwin.decode_frame(r["jpeg"], path=where, index=int(t)))
    return {"frames": np.stack(frames), "action": np.asarray(rec["action"], np.float32),
            "episode": np.int32(rec["episode"]), "index": np.int32(idx)}

  def __repr__(self) -> str:
    return f"WindowSource({len(self)} windows, offsets={self.offsets.tolist()})"


def frame_split(num_records: int, val_fraction: float = 0.05, max_val: int = 10_000,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(train, val) record positions of a seeded frame-level split, the authors' `random_split`:
  min(int(val_fraction * N), max_val) random frames for validation, the rest for training (sorted).
  Validation frames then come from training episodes (neighbours of training frames): val MAE
  measures fit, not generalisation to new episodes."""
  n_val = min(int(val_fraction * num_records), int(max_val)) if max_val > 0 else int(val_fraction * num_records)
  order = np.random.default_rng(seed).permutation(num_records)
  return np.sort(order[n_val:]), np.sort(order[:n_val])


# MARK: grain pipelines


def _host_shard(ds: grain.MapDataset) -> grain.MapDataset:
  import jax
  n, i = jax.process_count(), jax.process_index()
  return ds[i::n] if n > 1 else ds


def train_dataset(windows, *, batch_size: int, seed: int, start_step: int = 0) -> grain.MapDataset:
  """Endless, per-epoch reshuffled, batched MapDataset of this host's windows, from `start_step` on."""
  ds = _host_shard(grain.MapDataset.source(windows)).shuffle(seed=seed).repeat(None)
  ds = ds.batch(batch_size, drop_remainder=True)
  return ds[start_step:]


def train_loader(windows, *, batch_size: int, seed: int, start_step: int = 0, num_workers: int = 0,
                 num_threads: int = 4, prefetch: int = 2) -> Iterable[dict[str, np.ndarray]]:
  """Iterator of training batches; decoding runs in `num_workers` processes (0 = in this process)."""
  ds = train_dataset(windows, batch_size=batch_size, seed=seed, start_step=start_step)
  it = ds.to_iter_dataset(video_dataset.read_options(prefetch, max_threads=num_threads))
  if num_workers > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():
      # grain's workers read their (default) absl flags; outside an absl app (tests, notebooks) the
      # defaults are made readable here. Nothing is parsed from the command line.
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=prefetch))
  return it


def eval_batches(windows, *, batch_size: int, num_threads: int = 4) -> Iterable[dict[str, np.ndarray]]:
  """Every window once, in order; the last batch may be short."""
  ds = grain.MapDataset.source(windows).batch(batch_size, drop_remainder=False)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=num_threads))
