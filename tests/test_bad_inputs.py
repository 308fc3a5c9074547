"""Bad inputs: every reader and entry point stops with a message naming the file / key / field, and
nothing written before (an output folder, a CSV) is changed or left half-written.

Readers are called directly; entry points through their `cli(argv)` in this process (tests/cli_utils.py),
which is what `python scripts/x.py` runs, without a subprocess per case.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib

import h5py
import numpy as np
import pytest

from eva_jax.data import embeddings, metadata, robotwin, video
from tests.cli_utils import run_cli

N = 4  # frames per test episode


def _episode(path, n=N, actions=None):
  frames = np.zeros((n, 8, 8, 3), np.uint8) + np.arange(n, dtype=np.uint8)[:, None, None, None] * 40
  return robotwin.write_episode(path, frames, np.zeros((n, 14)) if actions is None else actions)


def _digest(folder: pathlib.Path) -> dict:
  """{relative path: sha256} of every file under `folder` (or of the file itself)."""
  if folder.is_file():
    return {folder.name: hashlib.sha256(folder.read_bytes()).hexdigest()}
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob("*")) if p.is_file()}


# MARK: RoboTwin HDF5


def _h5_missing_actions(p):
  with h5py.File(p, "w") as f:
    f.create_dataset(robotwin.rgb_key(), data=np.array([robotwin.encode_frame(np.zeros((8, 8, 3), np.uint8))]))


def _h5_rewrite(p, key, value):
  _episode(p)
  with h5py.File(p, "a") as f:
    del f[key]
    f.create_dataset(key, data=value)


def _h5_corrupt_frame(p):
  _episode(p)
  with h5py.File(p, "a") as f:
    raw = f[robotwin.rgb_key()][()]
    raw[2] = b"\xff\xd8 not a jpeg"
    del f[robotwin.rgb_key()]
    f.create_dataset(robotwin.rgb_key(), data=raw)


def _h5_truncated(p):
  _episode(p)
  data = p.read_bytes()
  p.write_bytes(data[:len(data) // 2])


def _h5_nan(p):
  actions = np.zeros((N, 14))
  actions[1, 5] = np.nan
  _episode(p, actions=actions)


H5_CASES = {
    "missing_file": (lambda p: None, "does not exist"),
    "empty_file": (lambda p: p.write_bytes(b""), "not a readable HDF5"),
    "not_hdf5": (lambda p: p.write_text("hello"), "not a readable HDF5"),
    "truncated": (_h5_truncated, "not a readable HDF5"),
    "missing_key": (_h5_missing_actions, "joint_action/vector"),
    "wrong_shape": (lambda p: _h5_rewrite(p, robotwin.ACTION_KEY, np.zeros((N, 7))), "joint_action/vector"),
    "wrong_type": (lambda p: _h5_rewrite(p, robotwin.ACTION_KEY, np.array([[b"x"] * 14] * N)),
                   "joint_action/vector"),
    "frames_wrong_type": (lambda p: _h5_rewrite(p, robotwin.rgb_key(), np.zeros((N, 8, 8, 3), np.uint8)),
                          "observation/head_camera/rgb"),
    "length_mismatch": (lambda p: _h5_rewrite(p, robotwin.ACTION_KEY, np.zeros((N + 1, 14))), "length mismatch"),
    "no_frames": (lambda p: _h5_rewrite(p, robotwin.rgb_key(), np.array([], dtype="S4")), "no frames"),
    "corrupt_jpeg": (_h5_corrupt_frame, "frame 2 is not a decodable JPEG"),
    "nan_action": (_h5_nan, "non-finite value(s), the first at step 1, joint 5"),
}


@pytest.mark.parametrize("case", sorted(H5_CASES))
def test_robotwin_reader_names_the_file(tmp_path, case):
  make, expected = H5_CASES[case]
  path = tmp_path / "task" / "episode3.hdf5"
  path.parent.mkdir()
  make(path)
  with pytest.raises((ValueError, KeyError, OSError)) as e:
    robotwin.read_episode(path)
  msg = e.value.args[0]
  assert str(path) in msg and expected in msg, msg


def test_robotwin_joint_stats_rejects_nan(tmp_path):
  _h5_nan(tmp_path / "e.hdf5")
  with pytest.raises(ValueError, match="e.hdf5.*non-finite"):
    robotwin.joint_stats([tmp_path / "e.hdf5"])


# MARK: metadata CSV

HEADER = "video_path,caption,height,width,fps,n_frames\n"
CSV_CASES = {
    "missing_file": (None, "does not exist"),
    "empty": ("", "is empty"),
    "missing_column": ("video_path,caption,height\na.mp4,x,4\n", "missing required column(s) ['width'"),
    "wrong_type": (HEADER + "a.mp4,x,4,4,16,5\nb.mp4,y,tall,4,16,5\n", "row 1 (video_path='b.mp4'): column 'height'"),
    "nan_fps": (HEADER + "a.mp4,x,4,4,nan,5\n", "column 'fps' must be a finite number"),
    "empty_required": (HEADER + "a.mp4,x,4,4,16,\n", "required column 'n_frames' is empty"),
    "extra_cells": (HEADER + "a.mp4,x,4,4,16,5,9\n", "more cells than the 6 header columns"),
    "binary": (b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x00", "not a UTF-8 text CSV"),
    # values that parse but cannot describe a video: they failed later as a negative frame index
    "zero_fps": (HEADER + "a.mp4,x,4,4,0,5\n", "row 0 (video_path='a.mp4'): column 'fps' must be a finite number > 0"),
    "negative_frames": (HEADER + "a.mp4,x,4,4,16,-5\n", "column 'n_frames' must be an integer >= 1, found '-5'"),
    "zero_height": (HEADER + "a.mp4,x,0,4,16,5\n", "column 'height' must be an integer >= 1"),
    "trim_order": ("video_path,caption,height,width,fps,n_frames,trim_start,trim_end\na.mp4,x,4,4,16,5,4,2\n",
                   "column 'trim_end' (2) must be greater than 'trim_start' (4)"),
}


@pytest.mark.parametrize("case", sorted(CSV_CASES))
def test_metadata_reader_names_the_file_and_row(tmp_path, case):
  text, expected = CSV_CASES[case]
  path = tmp_path / "meta.csv"
  if isinstance(text, bytes):
    path.write_bytes(text)
  elif text is not None:
    path.write_text(text)
  with pytest.raises((ValueError, OSError)) as e:
    metadata.read_metadata(path)
  assert str(path) in str(e.value) and expected in str(e.value), str(e.value)


def test_write_metadata_is_atomic(tmp_path, monkeypatch):
  path = tmp_path / "meta.csv"
  metadata.write_metadata(path, [dict(video_path="a.mp4", caption="x", height=4, width=4, fps=16, n_frames=5)])
  before = path.read_bytes()

  class Bad:
    def __str__(self):
      raise RuntimeError("disk full")
  with pytest.raises(RuntimeError):
    metadata.write_metadata(path, [dict(video_path="b.mp4", caption=Bad(), height=4, width=4, fps=16, n_frames=5)])
  assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["meta.csv"]


# MARK: mp4


def _mp4_truncated(p):
  video.write_video(p, np.zeros((8, 16, 16, 3), np.uint8), fps=8)
  data = p.read_bytes()
  p.write_bytes(data[:len(data) // 3])


MP4_CASES = {
    "missing_file": (lambda p: None, "video not found"),
    "directory": (lambda p: p.mkdir(), "is not a file"),
    "empty_file": (lambda p: p.write_bytes(b""), "video"),
    "not_a_video": (lambda p: p.write_text("definitely not an mp4 " * 50), "video"),
    "truncated": (_mp4_truncated, "video"),
}


@pytest.mark.parametrize("reader", ["read_video", "video_info"])
@pytest.mark.parametrize("case", sorted(MP4_CASES))
def test_video_reader_names_the_file(tmp_path, case, reader):
  make, expected = MP4_CASES[case]
  path = tmp_path / "clip.mp4"
  make(path)
  with pytest.raises((ValueError, OSError)) as e:
    getattr(video, reader)(path)
  assert str(path) in str(e.value) and expected in str(e.value), str(e.value)


def test_video_shorter_than_asked_names_its_length(tmp_path):
  path = video.write_video(tmp_path / "clip.mp4", np.zeros((4, 16, 16, 3), np.uint8), fps=8)
  for wanted in ([2, 9], [7, 9]):  # some frames past the end, or all of them
    with pytest.raises(ValueError, match=rf"video {path}: asked for frames up to 9 but it has 4 of them"):
      video.read_video(path, wanted)


def test_failed_video_write_leaves_nothing(tmp_path):
  with pytest.raises(ValueError):
    video.write_video(tmp_path / "v.mp4", np.zeros((2, 4, 4, 5), np.uint8))
  video.write_video(tmp_path / "v.mp4", np.zeros((2, 4, 4, 3), np.uint8))
  before = (tmp_path / "v.mp4").read_bytes()
  with pytest.raises(Exception):
    video.write_video(tmp_path / "v.mp4", np.zeros((2, 4, 4, 3), np.uint8), fps=-1)
  assert (tmp_path / "v.mp4").read_bytes() == before and os.listdir(tmp_path) == ["v.mp4"]


# MARK: cached arrays


def _npy_truncated(p):
  np.save(p, np.ones((6, 8), np.float32))
  p.write_bytes(p.read_bytes()[:100])


NPY_CASES = {
    "missing_file": ("e.npy", lambda p: None, "does not exist"),
    "truncated": ("e.npy", _npy_truncated, "not a readable .npy"),
    "not_npy": ("e.npy", lambda p: p.write_text("[1, 2, 3]"), "not a readable .npy"),
    "empty_file": ("e.npy", lambda p: p.write_bytes(b""), "not a readable .npy"),
    "wrong_type": ("e.npy", lambda p: np.save(p, np.array([["a", "b"]])), "not numeric"),
    "nan": ("e.npy", lambda p: np.save(p, np.array([[1.0, np.nan]], np.float32)), "NaN / inf"),
    "wrong_dim": ("e.npy", lambda p: np.save(p, np.ones((2, 3, 4), np.float32)), "must be [L, D]"),
    "no_rows": ("e.npy", lambda p: np.save(p, np.ones((0, 4), np.float32)), "must be [L, D] with L >= 1"),
    "unknown_suffix": ("e.txt", lambda p: p.write_text("1"), "unknown format"),
    "bad_safetensors": ("e.safetensors", lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad"),
                        "not a readable .safetensors"),
}


@pytest.mark.parametrize("case", sorted(NPY_CASES))
def test_cached_embedding_reader_names_the_file(tmp_path, case):
  name, make, expected = NPY_CASES[case]
  path = tmp_path / "prompt_embeds" / name
  path.parent.mkdir()
  make(path)
  with pytest.raises((ValueError, OSError)) as e:
    embeddings.load_prompt_embedding(path, text_len=8)
  assert str(path) in str(e.value) and expected in str(e.value), str(e.value)
  assert not embeddings.is_valid_file(path, lambda shape: True) or case in ("wrong_dim", "no_rows")


def _loader_records(tmp_path, shapes):
  from eva_jax.data import video_dataset
  recs = []
  for i, shape in enumerate(shapes):
    np.save(tmp_path / f"p{i}.npy", np.ones(shape, np.float32))
    recs.append(dict(row=i, video_path=f"v{i}.mp4", caption="x", height=8, width=8, fps=16.0, n_frames=5,
                     prompt_embed_path=f"p{i}.npy"))
  return recs, functools.partial(video_dataset.ExampleLoader, tmp_path, dict(
      height=8, width=8, n_frames=5, load_prompt_embed=True, max_text_tokens=8, decode_video=False))


def test_cached_embedding_of_another_width_names_the_row(tmp_path):
  """A prompt cache made with another umT5 (or one odd file) fails naming the row, not as grain's 'Expected all
  input elements to have the same structure' or a matmul shape error after compiling."""
  recs, loader = _loader_records(tmp_path, [(3, 24), (3, 24), (5, 7)])
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match=r"metadata row 0 .*has shape \(3, 24\); expected \[L <= 8 "
                                       r"\(data.max_text_tokens\), 32\]"):
    loader(prompt_dim=32)(recs[0], rng)
  odd = loader()
  odd(recs[0], rng), odd(recs[1], rng)
  with pytest.raises(ValueError, match=r"metadata row 2 \(video_path='v2.mp4'\): array 'prompt_embeds' has shape "
                                       r"\(8, 7\), but metadata row 0 \(video_path='v0.mp4'\) gave \(8, 24\)"):
    odd(recs[2], rng)


def test_cache_embeddings_checks_the_csv_before_writing(tmp_path):
  from configs import cache_embeddings as cfg
  config = cfg.get_config("tiny")
  csv = tmp_path / "meta.csv"
  config.metadata_path = str(csv)
  for text, expected in ((HEADER, "no data rows under the header"),
                         (HEADER + "a.mp4,x,tall,4,16,5\n", "row 0 (video_path='a.mp4'): column 'height'")):
    csv.write_text(text)
    with pytest.raises(ValueError) as e:
      embeddings.cache_embeddings(config)
    assert str(csv) in str(e.value) and expected in str(e.value)
    assert csv.read_text() == text and sorted(os.listdir(tmp_path)) == ["meta.csv"]


# MARK: python -m convert


def _fake_converter(monkeypatch, fail_at=None):
  """`--kind vae` on a fake state dict: three arrays, or a failure at the `fail_at`-th one (after the earlier
  ones were written: partial saves of one array each)."""
  import convert.cli as cli
  import convert.io
  import convert.wan

  class Boom:
    def __array__(self, *a, **k):
      raise RuntimeError("tensor 'decoder.conv.weight' is corrupt")

  def fake(sd, cfg):
    values = [np.full((4, 4), i, np.float32) for i in range(3)]
    if fail_at is not None:
      values[fail_at] = Boom()
    return {"a": {str(i): v for i, v in enumerate(values)}}
  monkeypatch.setattr(convert.io, "open_state_dict", lambda src: {})
  monkeypatch.setattr(convert.wan, "convert_vae_state_dict", fake)
  monkeypatch.setattr(cli, "stream_to_orbax", functools.partial(cli.stream_to_orbax.__wrapped__
                                                                if hasattr(cli.stream_to_orbax, "__wrapped__")
                                                                else cli.stream_to_orbax, batch_bytes=1))


def test_convert_failure_leaves_old_output_and_no_partial(tmp_path, monkeypatch, capsys):
  from convert.cli import main
  out = tmp_path / "ckpt" / "vae"
  _fake_converter(monkeypatch)
  assert main(["--kind", "vae", "--src", "x.pth", "--out", str(out), "--quiet"]) == 0
  before = _digest(out)
  assert "eva_convert.json" in before

  _fake_converter(monkeypatch, fail_at=2)
  assert main(["--kind", "vae", "--src", "x.pth", "--out", str(out), "--quiet", "--overwrite"]) == 1
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith("error: RuntimeError: tensor 'decoder.conv.weight' is corrupt"), err
  assert _digest(out) == before
  assert os.listdir(out.parent) == ["vae"]                        # no staging folder left
  fresh = tmp_path / "new"
  assert main(["--kind", "vae", "--src", "x.pth", "--out", str(fresh), "--quiet"]) == 1
  assert not fresh.exists() and os.listdir(tmp_path) == ["ckpt"]  # a failed first run leaves nothing

  # Ctrl-C midway: the same; a killed run's staging folder (its process gone) is removed by the next run
  monkeypatch.setattr(np, "asarray", _interrupt_after(np.asarray, 2))
  assert main(["--kind", "vae", "--src", "x.pth", "--out", str(out), "--quiet", "--overwrite"]) == 130
  monkeypatch.undo()
  assert _digest(out) == before and os.listdir(out.parent) == ["vae"]
  stale = out.parent / "vae.incomplete-999999999"
  stale.mkdir()
  (stale / "half").write_text("x")
  _fake_converter(monkeypatch)
  assert main(["--kind", "vae", "--src", "x.pth", "--out", str(out), "--quiet", "--overwrite"]) == 0
  assert os.listdir(out.parent) == ["vae"]
  assert json.loads((out / "eva_convert.json").read_text())["params"] == 3


def _interrupt_after(fn, n):
  calls = [0]

  def wrapped(*a, **k):
    calls[0] += 1
    if calls[0] > n:
      raise KeyboardInterrupt
    return fn(*a, **k)
  return wrapped


CONVERT_CASES = {
    "missing_src": (lambda d: d / "nope.pth", "checkpoint {src} does not exist"),
    "corrupt_safetensors": (lambda d: _write(d / "w.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{{{{{{{{"),
                            "{src} is not a readable safetensors file"),
    "corrupt_pth": (lambda d: _write(d / "w.pth", b"PK\x03\x04 truncated zip"), "{src} is not a readable PyTorch checkpoint"),
    "bad_index_json": (lambda d: _write(d / "m.safetensors.index.json", b'{"weight_map": '),
                       "{src} is not a safetensors index json"),
    "unknown_format": (lambda d: _write(d / "w.txt", b"x"), "{src}: unknown checkpoint format"),
    "empty_dir": (lambda d: (d / "empty").mkdir() or d / "empty", "{src}: expected *.safetensors"),
    "empty_file": (lambda d: _write(d / "w.pth", b""), "checkpoint {src} is empty (0 bytes)"),
}


def _write(path, data):
  path.write_bytes(data)
  return path


@pytest.mark.parametrize("case", sorted(CONVERT_CASES))
def test_convert_cli_bad_source(tmp_path, capsys, case):
  make, expected = CONVERT_CASES[case]
  src = make(tmp_path)
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("old")
  code, err = run_cli("convert", ["--kind", "idm", "--src", str(src), "--out", str(out), "--overwrite"], capsys)
  assert code == 1 and expected.format(src=src) in err.splitlines()[-1], err
  assert _digest(out) == {"keep.txt": hashlib.sha256(b"old").hexdigest()}


def test_convert_refuses_nan_weights_and_bad_overrides(tmp_path, monkeypatch, capsys):
  from convert.cli import main
  import convert.wan
  _fake_converter(monkeypatch)
  monkeypatch.setattr(convert.wan, "convert_vae_state_dict",
                      lambda sd, cfg: {"a": {"0": np.zeros(4, np.float32), "1": np.array([1, np.nan], np.float32)}})
  out = tmp_path / "vae"
  assert main(["--kind", "vae", "--src", "x.pth", "--out", str(out), "--quiet"]) == 1
  assert "parameter a/1 of the source holds NaN / inf values" in capsys.readouterr().err.splitlines()[-1]
  assert os.listdir(tmp_path) == []                                  # nothing written
  assert main(["--kind", "dit", "--config", "tiny-i2v", "--set", "num_layers=abc", "--src", "x.pth",
               "--out", str(out)]) == 1
  assert "--set num_layers='abc': expected a value of type int" in capsys.readouterr().err.splitlines()[-1]
  (tmp_path / "afile").write_text("x")
  _fake_converter(monkeypatch)
  assert main(["--kind", "vae", "--src", "x.pth", "--out", str(tmp_path / "afile" / "vae"), "--quiet"]) == 1
  assert f"cannot create its folder {tmp_path / 'afile'}" in capsys.readouterr().err.splitlines()[-1]


# MARK: weights from the wrong kind of run


def _fake_run(folder, config_module):
  """A trainer's run directory as weights.load sees it (config.json and a numbered step), without training."""
  import importlib
  from eva_jax.utils.rundir import save_config
  (folder / "checkpoints" / "2" / "state").mkdir(parents=True)
  save_config(folder, importlib.import_module(config_module).get_config("tiny"))
  return folder


@pytest.mark.parametrize("module, argv, run_of, expected", [
    ("scripts.train_sft", ["--config=configs/sft.py:tiny", "--config.init.kind=orbax", "--config.init.path={run}"],
     "configs.vae", "config.init.path: dit weights {run}: this is a train_vae run directory"),
    ("scripts.train_grpo", ["--config=configs/grpo.py:tiny", "--config.reward.idm_checkpoint={run}"],
     "configs.sft", "config.reward.idm_checkpoint: idm weights {run}: this is a train_sft run directory"),
    ("scripts.eval_idm", ["--config=configs/idm.py:tiny", "--config.eval.checkpoint={run}"],
     "configs.vae", "idm weights {run}: this is a train_vae run directory (its config.json), which holds vae"),
    ("convert", ["--kind", "dit", "--to-torch", "--src", "{run}", "--out", "{t}/dit.safetensors"],
     "configs.idm", "dit weights {run}: this is a train_idm run directory"),
], ids=["sft_init_vae_run", "grpo_reward_sft_run", "eval_idm_vae_run", "export_idm_run"])
def test_weights_from_another_trainers_run(tmp_path, capsys, module, argv, run_of, expected):
  run = _fake_run(tmp_path / "run", run_of)
  before = _digest(run)
  argv = [a.format(run=run, t=tmp_path) for a in argv]
  if module != "convert":
    argv.append(f"--workdir={tmp_path / 'out'}")
  code, err = run_cli(module, argv, capsys)
  assert code == 1 and expected.format(run=run) in err.splitlines()[-1], err
  assert _digest(run) == before


def test_lora_adapter_that_is_not_safetensors(tmp_path):
  from eva_jax.models import lora
  path = tmp_path / "adapter_model.safetensors"
  path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
  with pytest.raises(ValueError, match=f"LoRA adapter {path} is not a readable safetensors file"):
    lora._read_adapter(str(tmp_path))  # pylint: disable=protected-access


# MARK: entry points


def test_prepare_robotwin_bad_episode(tmp_path, capsys):
  root = tmp_path / "data"
  ep = root / "click_bell" / "demo" / "data" / "episode0.hdf5"
  ep.parent.mkdir(parents=True)
  _h5_truncated(ep)
  csv = root / "robotwin_videos.csv"
  csv.write_text("old csv\n")
  code, err = run_cli("scripts.prepare_robotwin", [f"--root={root}"], capsys)
  assert code == 1 and str(ep) in err.splitlines()[-1], err
  assert csv.read_text() == "old csv\n" and not (ep.parent.parent / "video").exists()
  code, err = run_cli("scripts.prepare_robotwin", [f"--root={tmp_path / 'nowhere'}"], capsys)
  assert code == 1 and "no RoboTwin episodes" in err and str(tmp_path / "nowhere") in err


def test_prepare_robotwin_skip_corrupt(tmp_path, capsys, caplog):
  root = tmp_path / "data"
  data = root / "click_bell" / "demo" / "data"
  data.mkdir(parents=True)
  for i in range(3):
    (_h5_corrupt_frame if i == 1 else _episode)(data / f"episode{i}.hdf5")
  code, err = run_cli("scripts.prepare_robotwin", [f"--root={root}"], capsys)
  assert code == 1 and "episode1.hdf5: frame 2 is not a decodable JPEG" in err.splitlines()[-1], err
  assert not (root / "robotwin_videos.csv").exists()
  code, err = run_cli("scripts.prepare_robotwin", [f"--root={root}", "--skip_corrupt"], capsys)
  assert code == 0, err
  rows = metadata.read_metadata(root / "robotwin_videos.csv")
  assert [int(r["episode"]) for r in rows] == [0, 2]
  assert "skipping episode" in caplog.text and "episode1.hdf5: frame 2" in caplog.text
  assert sorted(p.name for p in (data.parent / "video").iterdir()) == ["episode0.mp4", "episode2.mp4"]


def test_cache_embeddings_corrupt_video_names_row_and_file(tmp_path, capsys):
  from eva_jax.data import toyworld
  root = tmp_path / "toy"
  toyworld.generate_dataset(root, num_episodes=3, seed=0, size=32, n_frames=5, val_fraction=0.0)
  csv = root / toyworld.CSV_NAME
  rows = metadata.read_metadata(csv)
  bad = root / rows[1]["video_path"]
  bad.write_bytes(bad.read_bytes()[:300])                 # a truncated mp4
  before = _digest(root)
  code, err = run_cli("scripts.cache_embeddings", ["--config=configs/cache_embeddings.py:tiny",
                                                   f"--config.data_root={root}", f"--config.metadata_path={csv.name}",
                                                   "--config.prompts=False", "--config.vae_latents=True"], capsys)
  last = err.splitlines()[-1]
  assert code == 1 and "metadata row 1" in last and f"cannot open video {bad}" in last, err
  assert _digest(root) == before                          # the CSV and every file as they were


def test_cache_embeddings_missing_csv(tmp_path, capsys):
  csv = tmp_path / "none.csv"
  code, err = run_cli("scripts.cache_embeddings", ["--config=configs/cache_embeddings.py:tiny",
                                                   f"--config.metadata_path={csv}"], capsys)
  assert code == 1 and f"metadata CSV {csv} does not exist" in err.splitlines()[-1], err


def test_train_idm_missing_data_root(tmp_path, capsys):
  run = tmp_path / "run"
  code, err = run_cli("scripts.train_idm", ["--config=configs/idm.py:tiny", f"--config.data.root={tmp_path / 'no'}",
                                            f"--workdir={run}"], capsys)
  last = err.splitlines()[-1]
  assert code == 1 and str(tmp_path / "no") in last and str(run / "eva_jax.log") in last, err
  assert "Traceback" in (run / "eva_jax.log").read_text()


_IMAGE_CSV_HEADER = "image_path,height,width,fps,n_frames,caption\n"
INFER_CASES = {
    "missing_csv": (None, "image_csv {csv} does not exist"),
    "empty_csv": ("", "missing column(s)"),
    "missing_column": ("image_path,height,width\nimg.png,64,64\n", "missing column(s) ['fps', 'n_frames', 'caption']"),
    "wrong_type": (_IMAGE_CSV_HEADER + "img.png,tall,64,16,17,a robot\n", "{csv} row 0: height/width/n_frames"),
    "too_many_cells": (_IMAGE_CSV_HEADER + "img.png,64,64,16,17,a robot,extra\n", "{csv} row 0: more cells"),
    "missing_image": (_IMAGE_CSV_HEADER + "nope.png,64,64,16,17,a robot\n", "image {root}/nope.png does not exist"),
    "corrupt_image": (_IMAGE_CSV_HEADER + "bad.png,64,64,16,17,a robot\n", "image {root}/bad.png: not a readable image"),
    "not_utf8": (_IMAGE_CSV_HEADER.encode() + b"\xff\xfe,64,64,16,17,x\n", "{csv}: not a UTF-8 text CSV"),
}


@pytest.mark.parametrize("case", sorted(INFER_CASES))
def test_infer_bad_image_csv(tmp_path, capsys, case):
  content, expected = INFER_CASES[case]
  csv = tmp_path / "images.csv"
  if content is not None:
    (csv.write_bytes if isinstance(content, bytes) else csv.write_text)(content)
  (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
  run = tmp_path / "run"
  run.mkdir()
  (run / "config.json").write_text("{}")            # a previous run's outputs stay as they were
  before = _digest(run)
  code, err = run_cli("scripts.infer", ["--config=configs/infer.py:tiny", f"--config.data.data_root={tmp_path}",
                                        "--config.data.metadata_path=images.csv", f"--workdir={run}"], capsys)
  assert code == 1 and expected.format(csv=csv, root=tmp_path) in err.splitlines()[-1], err
  after = _digest(run)
  assert after.pop("eva_jax.log") and after == before      # only the log (with the traceback) is new
  assert "Traceback" in (run / "eva_jax.log").read_text()


# Each entry point with a missing input: it stops within seconds (before building or compiling a model),
# one line naming the config field and the path, and the run directory's earlier files are untouched.
ENTRY_POINT_CASES = {
    "train_sft": ("scripts.train_sft", ["--config=configs/sft.py:tiny", "--config.data.data_root={t}/none"],
                  "metadata CSV {t}/none/robotwin_videos.csv does not exist"),
    "train_sft_init": ("scripts.train_sft", ["--config=configs/sft.py:tiny", "--config.init.kind=orbax",
                                             "--config.init.path={t}/lvp"], "config.init.path: weights source {t}/lvp"),
    "train_vae": ("scripts.train_vae", ["--config=configs/vae.py:tiny", "--config.data.data_root={t}/none"],
                  "config.data.data_root: {t}/none does not exist"),
    "train_grpo": ("scripts.train_grpo", ["--config=configs/grpo.py:tiny", "--config.reward.idm_checkpoint={t}/idm"],
                   "config.reward.idm_checkpoint: weights source {t}/idm does not exist"),
    "train_grpo_base": ("scripts.train_grpo", ["--config=configs/grpo.py:tiny", "--config.reward.idm_checkpoint=random",
                                               "--config.model.checkpoint={t}/sft"],
                        "config.model.checkpoint: weights source {t}/sft does not exist"),
    "train_idm": ("scripts.train_idm", ["--config=configs/idm.py:tiny", "--config.data.root={t}/episodes"],
                  "{t}/episodes"),
    "eval_idm": ("scripts.eval_idm", ["--config=configs/idm.py:tiny", "--config.eval.checkpoint={t}/idm"],
                 "weights source {t}/idm does not exist"),
    "infer_lora": ("scripts.infer", ["--config=configs/infer.py:tiny", "--config.ckpt.lora={t}/adapter"],
                   "config.ckpt.lora: weights source {t}/adapter does not exist"),
    "serve_planner": ("scripts.serve_planner", ["--config=configs/planner.py:tiny", "--config.ckpt.lora={t}/adapter",
                                                "--config.output_root={t}/run"],
                      "config.ckpt.lora: weights source {t}/adapter does not exist"),
}


@pytest.mark.parametrize("case", sorted(ENTRY_POINT_CASES))
def test_entry_point_missing_input(tmp_path, capsys, case):
  import time
  module, argv, expected = ENTRY_POINT_CASES[case]
  run = tmp_path / "run"
  run.mkdir()
  (run / "config.json").write_text("{}")
  (run / "checkpoints").mkdir()
  (run / "checkpoints" / "note.txt").write_text("an earlier run's files")
  before = _digest(run)
  argv = [a.format(t=tmp_path) for a in argv]
  if module != "scripts.serve_planner":
    argv.append(f"--workdir={run}")
  t0 = time.perf_counter()
  code, err = run_cli(module, argv, capsys)
  assert code == 1 and expected.format(t=tmp_path) in err.splitlines()[-1], err
  assert time.perf_counter() - t0 < 30          # nothing was built or compiled first
  assert {k: v for k, v in _digest(run).items() if "eva_jax.log" not in k} == before


@pytest.mark.parametrize("argv, code, expected", [
    (["--config=configs/nope.py"], 2, "configs/nope.py"),
    (["--config=configs/idm.py:tiny", "--config.train.num_steps=many"], 2, "--config.train.num_steps=many"),
    (["--config=configs/idm.py:tiny", "--config.trian.num_steps=1"], 2, "--config.trian.num_steps=1"),
    (["--config=configs/idm.py:tiny", "--wrkdir=x"], 2, "wrkdir"),
    (["--config=configs/idm.py:tiny", "episodes/"], 2, "unexpected positional argument(s) ['episodes/']"),
])
def test_command_line_errors_are_one_line(capsys, argv, code, expected):
  got, err = run_cli("scripts.train_idm", argv, capsys)
  assert got == code and expected in err.strip().splitlines()[-1] and "Traceback" not in err, err


def test_prepare_robotwin_bad_flags(tmp_path, capsys):
  (tmp_path / "out").mkdir()
  for flag, expected in (("--fps=-1", "flag --fps=-1: -1.0 is not a non-negative number"),
                         ("--val_fraction=2", "flag --val_fraction=2: 2.0 is not a number in the range [0.0, 1.0]"),
                         ("--instruction_index=-5", "flag --instruction_index=-5"),
                         (f"--output_csv={tmp_path / 'out'}", "must be a CSV file path, not a directory")):
    code, err = run_cli("scripts.prepare_robotwin", [f"--root={tmp_path}", flag], capsys)
    assert code == 2 and expected in err.strip().splitlines()[-1], err


def test_atomic_path_to_a_folder_or_under_a_file(tmp_path):
  from eva_jax.utils.files import atomic_path
  (tmp_path / "afile").write_text("x")
  for path, expected in ((tmp_path, "it is a directory"), (tmp_path / "afile" / "m.csv", "a file is in the way")):
    with pytest.raises(OSError, match=expected):
      with atomic_path(path):
        pass
  assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_atomic_path_keeps_the_old_file_on_failure(tmp_path):
  from eva_jax.utils.files import atomic_path
  from eva_jax.utils.rundir import save_config
  save_config(tmp_path, {"a": 1})
  before = (tmp_path / "config.json").read_bytes()
  with pytest.raises(RuntimeError):
    with atomic_path(tmp_path / "config.json") as tmp:
      tmp.write_text('{"a": ')
      raise RuntimeError("killed midway")
  assert (tmp_path / "config.json").read_bytes() == before and os.listdir(tmp_path) == ["config.json"]


# MARK: the IDM's TFDS build


def _idm_episodes(folder, n=3, corrupt=()):
  paths = []
  for i in range(n):
    p = folder / f"episode{i}.hdf5"
    (_h5_corrupt_frame if i in corrupt else _episode)(p)
    paths.append(p)
  return {"train": [str(p) for p in paths]}


def test_idm_build_names_a_corrupt_middle_frame_and_leaves_nothing(tmp_path):
  from eva_jax.data import idm_dataset
  splits = _idm_episodes(tmp_path, corrupt=(1,))
  with pytest.raises(ValueError, match=r"episode1\.hdf5: frame 2 is not a decodable JPEG"):
    idm_dataset.build_idm_dataset(splits, tmp_path / "tfds")
  with pytest.raises(FileNotFoundError, match="no prepared robotwin_idm dataset"):
    idm_dataset.load_idm_sources(tmp_path / "tfds")
  assert [p.name for p in (tmp_path / "tfds" / idm_dataset.DATASET_NAME).iterdir()] == []  # no staging left


def test_idm_build_names_an_episode_of_another_frame_size(tmp_path):
  from eva_jax.data import idm_dataset
  splits = _idm_episodes(tmp_path, n=2)
  big = tmp_path / "episode2.hdf5"
  robotwin.write_episode(big, np.zeros((N, 12, 12, 3), np.uint8), np.zeros((N, 14)))
  with pytest.raises(ValueError, match=rf"{big}: frame 0 is 12x12, but the frames of .*episode0.hdf5 are 8x8"):
    idm_dataset.build_idm_dataset({"train": splits["train"] + [str(big)]}, tmp_path / "tfds")


def test_idm_build_skips_corrupt_episodes_when_asked(tmp_path):
  from eva_jax.data import idm_dataset
  splits = _idm_episodes(tmp_path, corrupt=(1,))
  out = idm_dataset.build_idm_dataset(splits, tmp_path / "tfds", skip_corrupt=True)
  sources = idm_dataset.load_idm_sources(tmp_path / "tfds")
  assert len(sources["train"]) == 2 * N                       # episodes 0 and 2
  assert {int(sources["train"][k]["episode"]) for k in range(2 * N)} == {0, 2}
  skipped = idm_dataset.skipped_episodes(out)
  assert [s["path"] for s in skipped] == [splits["train"][1]] and "frame 2" in skipped[0]["error"]


def test_idm_rebuild_failing_midway_keeps_the_old_dataset(tmp_path):
  from eva_jax.data import idm_dataset
  good = _idm_episodes(tmp_path / "good")
  out = idm_dataset.build_idm_dataset(good, tmp_path / "tfds")
  before = _digest(out)
  bad = _idm_episodes(tmp_path / "bad", corrupt=(2,))
  with pytest.raises(ValueError, match="episode2.hdf5: frame 2"):
    idm_dataset.build_idm_dataset(bad, tmp_path / "tfds", overwrite=True)
  assert _digest(out) == before and idm_dataset.load_idm_sources(tmp_path / "tfds")["train"] is not None
  assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


_KILL_BUILD = """
import os, signal, sys
from eva_jax.data import idm_dataset, robotwin
read, calls = robotwin.read_jpeg_bytes, []
def killed_on_the_third(path, camera):
  calls.append(path)
  if len(calls) == 3:
    os.kill(os.getpid(), signal.SIGKILL)   # as an OOM kill or a preemption would
  return read(path, camera)
robotwin.read_jpeg_bytes = killed_on_the_third
idm_dataset.build_idm_dataset({"train": sys.argv[2:]}, sys.argv[1], overwrite=True)
"""


def test_idm_build_killed_midway_leaves_no_dataset_a_later_run_would_load(tmp_path):
  import subprocess
  import sys
  from eva_jax.data import idm_dataset
  splits = _idm_episodes(tmp_path, n=4)
  root = pathlib.Path(__file__).resolve().parents[1]
  killed = subprocess.run([sys.executable, "-c", _KILL_BUILD, str(tmp_path / "tfds"), *splits["train"]],
                          cwd=root, capture_output=True, text=True, timeout=300)
  assert killed.returncode == -9, killed.stderr[-2000:]
  with pytest.raises(FileNotFoundError):
    idm_dataset.load_idm_sources(tmp_path / "tfds")
  out = idm_dataset.build_idm_dataset(splits, tmp_path / "tfds")  # the next run builds it whole
  assert len(idm_dataset.load_idm_sources(out)["train"]) == 4 * N
