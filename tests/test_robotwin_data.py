"""RoboTwin HDF5 episodes (JPEG bytes, channel convention, errors) and the TFDS/grain IDM pipeline."""

from __future__ import annotations

import io
import logging

import h5py
import numpy as np
import pytest
from PIL import Image

from eva_jax.data import idm_dataset, robotwin


def _episode(n: int, seed: int, h: int = 24, w: int = 32):
  """Smooth frames (JPEG-friendly) that change over time, and a [n, 14] joint trajectory."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w]
  frames = []
  for t in range(n):
    base = rng.uniform(40, 200, size=3)
    img = base + 30 * np.sin((xx[..., None] + 3 * t) / 6.0 + np.arange(3)) + 20 * np.cos(yy[..., None] / 5.0)
    frames.append(np.clip(img, 0, 255).astype(np.uint8))
  actions = np.cumsum(rng.normal(0, 0.05, size=(n, 14)), axis=0)
  return np.stack(frames), actions


@pytest.fixture(scope="module")
def episodes(tmp_path_factory):
  root = tmp_path_factory.mktemp("robotwin")
  paths = []
  for e, n in enumerate((5, 7, 6)):
    frames, actions = _episode(n, e)
    paths.append(robotwin.write_episode(root / "task" / "data" / f"episode{e}.hdf5", frames, actions))
  return root, paths


def test_round_trip_frames_actions_and_layout(tmp_path):
  frames, actions = _episode(6, 0)
  path = robotwin.write_episode(tmp_path / "episode0.hdf5", frames, actions,
                                extra={"endpose/left_endpose": np.zeros((6, 7))})
  got_frames, got_actions = robotwin.read_episode(path)
  assert got_frames.shape == frames.shape and got_frames.dtype == np.uint8
  # JPEG is lossy (quality 95): mean error of a couple of grey levels on smooth content.
  assert np.abs(got_frames.astype(float) - frames).mean() < 2.0
  np.testing.assert_array_equal(got_actions, actions.astype(np.float32))
  with h5py.File(path) as f:
    rgb = f["observation/head_camera/rgb"]
    assert rgb.dtype.kind == "S" and rgb.shape == (6,)
    lengths = [len(bytes(b)) for b in rgb[()]]
    # fixed-length strings: the dtype holds the longest JPEG, the others are zero-padded
    assert rgb.dtype.itemsize == max(lengths) and min(lengths) < max(lengths)
    np.testing.assert_allclose(f["joint_action/right_arm"][()], actions[:, 7:13])
    np.testing.assert_allclose(f["joint_action/left_gripper"][()], actions[:, 6])
    assert f["endpose/left_endpose"].shape == (6, 7)
  assert robotwin.episode_length(path) == 6


def test_channel_order_follows_the_recorder(tmp_path):
  """cv2.imencode took RGB arrays for BGR: a raw PIL decode sees swapped channels, the reader does not."""
  red = np.zeros((2, 16, 16, 3), np.uint8)
  red[..., 0] = 255
  path = robotwin.write_episode(tmp_path / "episode0.hdf5", red, np.zeros((2, 14)))
  with h5py.File(path) as f:
    raw = bytes(f["observation/head_camera/rgb"][0])
  plain = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")).astype(int)
  assert plain[..., 2].mean() > 240 and plain[..., 0].mean() < 15   # stored as "BGR"
  frames, _ = robotwin.read_episode(path)
  assert frames[..., 0].mean() > 240 and frames[..., 2].mean() < 15  # red again


def test_windows_are_clamped(episodes):
  _, paths = episodes
  frames, actions = robotwin.read_episode(paths[0])
  windows = list(robotwin.iter_windows(paths[0]))
  assert len(windows) == 5
  np.testing.assert_array_equal(windows[0][0], frames[[0, 0, 1]])
  np.testing.assert_array_equal(windows[2][0], frames[[1, 2, 3]])
  np.testing.assert_array_equal(windows[4][0], frames[[3, 4, 4]])
  np.testing.assert_array_equal(windows[3][1], actions[3])
  assert [p.name for p in robotwin.list_episodes(episodes[0])] == ["episode0.hdf5", "episode1.hdf5", "episode2.hdf5"]


def test_missing_key_names_file_and_key(tmp_path):
  frames, actions = _episode(3, 1)
  path = robotwin.write_episode(tmp_path / "episode0.hdf5", frames, actions)
  with h5py.File(path, "a") as f:
    del f["joint_action/vector"]
  with pytest.raises(KeyError, match=r"episode0\.hdf5.*joint_action/vector"):
    robotwin.read_episode(path)
  with pytest.raises(KeyError, match=r"episode0\.hdf5.*observation/left_camera/rgb"):
    robotwin.read_episode(path, camera="left_camera")


def test_undecodable_frame_names_file_and_index(tmp_path):
  frames, actions = _episode(4, 2)
  path = robotwin.write_episode(tmp_path / "episode0.hdf5", frames, actions)
  with h5py.File(path, "a") as f:
    data = f["observation/head_camera/rgb"][()]
    data[2] = b"\xff\xd8 not a jpeg"
    del f["observation/head_camera/rgb"]
    f.create_dataset("observation/head_camera/rgb", data=data)
  with pytest.raises(ValueError, match=r"episode0\.hdf5: frame 2 is not a decodable JPEG"):
    robotwin.read_episode(path)


def test_length_mismatch_names_file_and_lengths(tmp_path):
  frames, actions = _episode(4, 3)
  path = robotwin.write_episode(tmp_path / "episode0.hdf5", frames, actions)
  with h5py.File(path, "a") as f:
    del f["joint_action/vector"]
    f.create_dataset("joint_action/vector", data=np.zeros((3, 14)))
  with pytest.raises(ValueError, match=r"episode0\.hdf5: length mismatch.*4 frames.*3 rows"):
    robotwin.read_episode(path)
  with pytest.raises(ValueError, match=r"joint_vector must be \[4, 14\]"):
    robotwin.write_episode(tmp_path / "bad.hdf5", frames, np.zeros((4, 13)))


def test_tfds_dataset_windows_and_grain_resume(episodes, tmp_path, caplog):
  _, paths = episodes
  splits = idm_dataset.split_episodes(paths, val_fraction=0.34, seed=0)
  assert len(splits["val"]) == 1 and len(splits["train"]) == 2
  with caplog.at_level(logging.INFO):
    built = idm_dataset.build_idm_dataset(splits, tmp_path / "tfds")
  # the log names where the dataset lands, not the staging folder it is built in
  ours = [r.getMessage() for r in caplog.records if r.getMessage().startswith("prepar")]
  assert ours == [f"preparing the robotwin_idm dataset in {built}", f"prepared the robotwin_idm dataset in {built}"]
  sources = idm_dataset.load_idm_sources(tmp_path / "tfds")
  n_train = sum(robotwin.episode_length(p) for p in splits["train"])
  assert len(sources["train"]) == n_train and len(sources["val"]) == robotwin.episode_length(splits["val"][0])

  # A window from the array_record dataset equals the one read from HDF5 directly.
  windows = idm_dataset.WindowSource(sources["train"])
  second = splits["train"][1]
  n_first = robotwin.episode_length(splits["train"][0])
  direct = list(robotwin.iter_windows(second))
  for i in (0, 2, len(direct) - 1):
    item = windows[n_first + i]
    assert item["episode"] == 1 and item["index"] == i
    np.testing.assert_array_equal(item["frames"], direct[i][0])
    np.testing.assert_array_equal(item["action"], direct[i][1])

  # Shuffled, batched, endless; restarting at step k gives exactly the batches from k on.
  full = list(_take(idm_dataset.train_loader(windows, batch_size=4, seed=3), 6))
  resumed = list(_take(idm_dataset.train_loader(windows, batch_size=4, seed=3, start_step=4), 2))
  for a, b in zip(full[4:], resumed):
    np.testing.assert_array_equal(a["frames"], b["frames"])
    np.testing.assert_array_equal(a["action"], b["action"])
  seen = np.concatenate([(b["episode"] * 100 + b["index"]) for b in full])[:n_train]  # the first epoch
  assert len(set(seen.tolist())) == n_train and full[0]["frames"].shape == (4, 3, 24, 32, 3)
  other_seed = next(iter(idm_dataset.train_loader(windows, batch_size=4, seed=4)))
  assert not np.array_equal(other_seed["index"], full[0]["index"]) or not np.array_equal(
      other_seed["episode"], full[0]["episode"])
  # Worker processes give the same batches as the in-process pipeline.
  workers = list(_take(idm_dataset.train_loader(windows, batch_size=4, seed=3, num_workers=1), 3))
  for a, b in zip(full[:3], workers):
    np.testing.assert_array_equal(a["frames"], b["frames"])

  evaluated = list(idm_dataset.eval_batches(idm_dataset.WindowSource(sources["val"]), batch_size=4))
  assert sum(len(b["action"]) for b in evaluated) == len(sources["val"])


def _take(it, n):
  for i, x in enumerate(it):
    if i >= n:
      return
    yield x
