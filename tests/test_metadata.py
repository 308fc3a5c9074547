"""Metadata CSV reading, validation, filtering and the original's split rule."""

import random

import pytest

from eva_jax.data import metadata


def _write(path, text):
  path.write_text(text)
  return path


CSV = """video_path,caption,height,width,fps,n_frames,prompt_embed_path,gemini_caption
a.mp4,pick the cup,480,640,30,300,emb/a.npy,
b.mp4,,480,640,16.7,120,,fallback caption
c.mp4,too long,480,640,30,5000,emb/c.npy,
d.mp4,too fast,480,640,240,100,emb/d.npy,
"""


def test_read_types_and_caption_fallback(tmp_path):
  recs = metadata.read_metadata(_write(tmp_path / "m.csv", CSV))
  assert len(recs) == 4
  a, b = recs[0], recs[1]
  assert a == {"row": 0, "video_path": "a.mp4", "caption": "pick the cup", "height": 480, "width": 640,
               "fps": 30.0, "n_frames": 300, "prompt_embed_path": "emb/a.npy"}
  assert b["caption"] == "fallback caption" and b["fps"] == pytest.approx(16.7)
  assert "prompt_embed_path" not in b  # empty optional cells are dropped


def test_missing_column_and_bad_cells(tmp_path):
  with pytest.raises(ValueError, match=r"missing required column\(s\) \['fps'\]"):
    metadata.read_metadata(_write(tmp_path / "m.csv", "video_path,caption,height,width,n_frames\n"))
  with pytest.raises(ValueError, match=r"row 1 \(video_path='y.mp4'\).*'n_frames' is empty"):
    metadata.read_metadata(_write(tmp_path / "m.csv", "video_path,caption,height,width,fps,n_frames\n"
                                  "x.mp4,a,1,1,1,1\ny.mp4,b,1,1,1,\n"))
  with pytest.raises(ValueError, match=r"row 0.*'height' must be an integer, found 'tall'"):
    metadata.read_metadata(_write(tmp_path / "m.csv", "video_path,caption,height,width,fps,n_frames\n"
                                  "x.mp4,a,tall,1,1,1\n"))
  with pytest.raises(FileNotFoundError, match="nope.csv"):
    metadata.read_metadata(tmp_path / "nope.csv")


def test_filter_uses_eva_ranges_and_trims(tmp_path):
  recs = metadata.read_metadata(_write(tmp_path / "m.csv", CSV))
  kept = [r["video_path"] for r in metadata.filter_records(recs)]
  assert kept == ["a.mp4", "b.mp4"]  # c: 5000 frames > 2000; d: 240 fps > 100
  recs[2].update(trim_start=100, trim_end=400)  # a trimmed record is judged by its trimmed length
  assert "c.mp4" in [r["video_path"] for r in metadata.filter_records(recs)]
  assert len(metadata.filter_records(recs, {"n_frames": None, "fps": None})) == 4


def test_split_matches_original_seeded_shuffle():
  recs = [{"row": i, "video_path": f"{i}.mp4"} for i in range(250)]
  order = list(range(250))
  random.Random(0).shuffle(order)  # the original's rule: last int(n * pct) of a Random(0) shuffle
  val = metadata.split_records(recs, "validation", 0.02)
  train = metadata.split_records(recs, "training", 0.02)
  assert [r["row"] for r in val] == order[-5:]
  assert [r["row"] for r in train] == order[:-5]
  assert len(metadata.split_records(recs, "validation", 0.001)) == 0
  assert len(metadata.split_records(recs, "training", 0.001)) == 250
  with pytest.raises(ValueError, match="split must be one of"):
    metadata.split_records(recs, "train")


def test_split_column_and_load_records(tmp_path):
  _write(tmp_path / "m.csv", "video_path,caption,height,width,fps,n_frames,split,prompt_embed_path\n"
         "a.mp4,x,8,8,16,49,training,a.npy\nb.mp4,y,8,8,16,49,validation,b.npy\n"
         "c.mp4,z,8,8,16,49,training,\n")
  recs = metadata.load_records(tmp_path, "m.csv", "validation", require=("prompt_embed_path",))
  assert [r["video_path"] for r in recs] == ["b.mp4"]
  with pytest.raises(ValueError, match=r"row 2 \(video_path='c.mp4'\).*prompt_embed_path"):
    metadata.load_records(tmp_path, "m.csv", "training", require=("prompt_embed_path",))
  with pytest.raises(ValueError, match="no records left for split 'test'"):
    metadata.load_records(tmp_path, "m.csv", "test")


def test_write_read_round_trip(tmp_path):
  recs = [{"row": 0, "video_path": "a/b.mp4", "caption": 'say "hi", then go', "height": 480,
           "width": 640, "fps": 30.0, "n_frames": 10, "split": "training"}]
  metadata.write_metadata(tmp_path / "o.csv", recs)
  assert (tmp_path / "o.csv").read_text().splitlines()[0] == "video_path,caption,height,width,fps,n_frames,split"
  assert metadata.read_metadata(tmp_path / "o.csv") == recs
