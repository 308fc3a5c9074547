"""scripts/prepare_robotwin.py on a fake RoboTwin tree written here."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from eva_jax.data.metadata import load_records, read_metadata
from eva_jax.data.robotwin import write_episode
from eva_jax.data.video import read_video, write_video
from scripts import prepare_robotwin as prep

ROOT = Path(__file__).resolve().parents[1]


def _frames(n, h=16, w=24, shift=0):
  t = np.arange(n)[:, None, None, None]
  y = np.arange(h)[None, :, None, None]
  return np.broadcast_to((t * 12 + y * 4 + shift) % 200 + 20, (n, h, w, 3)).astype(np.uint8).copy()


def _tree(root):
  """beat_hammer/demo_clean: ep0 with a recorded 30-fps mp4 + dict instructions, ep1 HDF5 only + a list;
  click_bell/demo_clean: ep0 HDF5 only, no instructions file; plus a stray non-episode file."""
  joints = np.zeros((10, 14))
  a = root / "beat_hammer" / "demo_clean"
  write_episode(a / "data" / "episode0.hdf5", _frames(10), joints)
  write_episode(a / "data" / "episode1.hdf5", _frames(12, shift=50), np.zeros((12, 14)))
  write_video(a / "video" / "episode0.mp4", _frames(10), fps=30)
  (a / "instructions").mkdir()
  (a / "instructions" / "episode0.json").write_text(json.dumps(
      {"seen": ["Beat the block with the hammer.", "Use the hammer."], "unseen": ["Hit it."]}))
  (a / "instructions" / "episode1.json").write_text(json.dumps(["", "Grab the hammer and beat the block."]))
  b = root / "click_bell" / "demo_clean"
  write_episode(b / "data" / "episode0.hdf5", _frames(8, shift=100), np.zeros((8, 14)))
  (b / "data" / "notes.hdf5").write_bytes(b"")
  return root


def test_build_records_on_fake_tree(tmp_path):
  root = _tree(tmp_path / "data")
  rows, summary = prep.build_records(root, val_fraction=0.4, seed=0)
  assert summary == {"episodes": 3, "extracted": 2, "captions_from_files": 2, "validation": 1, "skipped": 0}
  by = {r["video_path"]: r for r in rows}
  assert sorted(by) == ["beat_hammer/demo_clean/video/episode0.mp4", "beat_hammer/demo_clean/video/episode1.mp4",
                        "click_bell/demo_clean/video/episode0.mp4"]
  r0 = by["beat_hammer/demo_clean/video/episode0.mp4"]
  assert (r0["caption"], r0["height"], r0["width"], r0["n_frames"], r0["fps"]) == (
      "Beat the block with the hammer.", 16, 24, 10, 30.0)   # the recorded mp4 is used as is
  r1 = by["beat_hammer/demo_clean/video/episode1.mp4"]
  assert r1["caption"] == "Grab the hammer and beat the block." and r1["n_frames"] == 12
  assert r1["fps"] == pytest.approx(250 / 15, abs=1e-3)    # extracted at RoboTwin's recording rate
  assert by["click_bell/demo_clean/video/episode0.mp4"]["caption"] == "click bell"
  # the extracted mp4 holds the head-camera frames of the HDF5 (JPEG + H.264: lossy)
  frames, _ = read_video(root / r1["video_path"])
  assert frames.shape == (12, 16, 24, 3)
  assert np.abs(frames.astype(float) - _frames(12, shift=50)).mean() < 4.0
  assert sorted(r["split"] for r in rows) == ["training", "training", "validation"]
  # --fps overrides the rate; --tasks filters
  rows, _ = prep.build_records(root, tasks=["click_bell"], fps=16.0)
  assert len(rows) == 1 and rows[0]["fps"] == 16.0


def test_cli_writes_a_csv_the_dataset_reads(tmp_path):
  root = _tree(tmp_path / "data")
  out = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_robotwin.py"), f"--root={root}",
                        "--val_fraction=0.34"], capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert out.returncode == 0, out.stderr
  assert "3 rows (1 validation), 2 videos extracted" in out.stdout
  csv = root / "robotwin_videos.csv"
  assert csv.read_text().splitlines()[0] == ",".join(prep.COLUMNS)
  assert len(read_metadata(csv)) == 3
  assert len(load_records(root, "robotwin_videos.csv", "training")) == 2
  with pytest.raises(FileNotFoundError, match="no RoboTwin episodes"):
    prep.build_records(tmp_path / "empty")


def test_instruction_formats(tmp_path):
  p = tmp_path / "i.json"
  p.write_text(json.dumps({"unseen": ["b"], "seen": []}))
  assert prep.read_caption(p, "t") == ("b", True)
  p.write_text(json.dumps("just text"))
  assert prep.read_caption(p, "t") == ("just text", True)
  p.write_text("{broken")
  with pytest.raises(ValueError, match="not valid JSON"):
    prep.read_caption(p, "t")
