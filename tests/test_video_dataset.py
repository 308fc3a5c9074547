"""Temporal sampling, crops, cached embeddings and the grain pipeline (deterministic, resumable, sharded)."""

import numpy as np
import pytest

from eva_jax.data import video_dataset as vd
from eva_jax.data.video import write_video


# MARK: temporal sampling (the original's rule, written out by hand per case)
def test_temporal_cut_slowdown_and_exact():
  rng = np.random.default_rng(0)
  # 30 fps source, 49 frames at 16 fps span round(49 / 16 * 30) = 92 source frames.
  starts = set()
  for _ in range(200):
    idx = vd.temporal_indices(300, 30.0, 49, 16.0, "random_cut", "slowdown", rng)
    start = idx[0]
    np.testing.assert_array_equal(idx, np.round(start + np.linspace(0, 91, 49)).astype(int))
    starts.add(int(start))
  assert min(starts) == 0 and max(starts) <= 300 - 92 - 1 and len(starts) > 100
  # shorter than 92: slow down over all frames
  np.testing.assert_array_equal(vd.temporal_indices(40, 30.0), np.round(np.linspace(0, 39, 49)).astype(int))
  np.testing.assert_array_equal(vd.temporal_indices(40, 30.0, pad_mode="pad_last"),
                                np.clip(np.round(np.linspace(0, 91, 49)), 0, 39).astype(int))
  # longer, sped up; and exactly the right length
  np.testing.assert_array_equal(vd.temporal_indices(300, 30.0, trim_mode="speedup"),
                                np.round(np.linspace(0, 299, 49)).astype(int))
  np.testing.assert_array_equal(vd.temporal_indices(49, 16.0), np.arange(49))
  with pytest.raises(ValueError, match="pad_mode"):
    vd.temporal_indices(10, 30.0, pad_mode="discard")


def test_random_resized_crop_ranges():
  rng = np.random.default_rng(1)
  ratio = (0.98 * 4 / 3, 1.02 * 4 / 3)
  for _ in range(300):
    top, left, h, w = vd.random_resized_crop_box(480, 640, (0.8, 1.0), ratio, rng)
    assert 0 <= top and top + h <= 480 and 0 <= left and left + w <= 640
    assert 0.8 - 0.01 <= h * w / (480 * 640) <= 1.0
    assert ratio[0] - 0.01 <= w / h <= ratio[1] + 0.01
  # impossible constraints fall back to the largest centred crop with the nearest ratio
  assert vd.random_resized_crop_box(100, 100, (5.0, 6.0), (2.0, 2.0), rng) == (25, 0, 50, 100)


def test_resize_frames_matches_pil_crop():
  from PIL import Image
  rng = np.random.default_rng(2)
  frames = rng.integers(0, 256, (2, 30, 40, 3), dtype=np.uint8)
  out = vd.resize_frames(frames, 12, 16, box=(3, 5, 24, 32))
  ref = np.asarray(Image.fromarray(frames[1][3:27, 5:37]).resize((16, 12), Image.BICUBIC))
  assert out.shape == (2, 12, 16, 3)
  np.testing.assert_array_equal(out[1], ref)


# MARK: examples from files
def _tree(tmp_path, n=6, with_missing_embed=False):
  """n tiny 30-fps mp4s with cached prompt embeddings and latents."""
  recs = []
  (tmp_path / "emb").mkdir()
  for i in range(n):
    t = np.arange(20)[:, None, None, None]
    frames = np.broadcast_to((t * 10 + i * 3) % 256, (20, 24, 32, 3)).astype(np.uint8)
    write_video(tmp_path / f"v{i}.mp4", frames, fps=30)
    np.save(tmp_path / "emb" / f"p{i}.npy", np.full((3 + i, 8), i, np.float32))
    np.save(tmp_path / "emb" / f"l{i}.npy", np.full((2, 2, 2, 16), i, np.float32))  # 5 frames at 16x16
    rec = dict(row=i, video_path=f"v{i}.mp4", caption=f"c{i}", height=24, width=32, fps=30.0, n_frames=20,
               prompt_embed_path=f"emb/p{i}.npy", video_latent_path=f"emb/l{i}.npy")
    recs.append(rec)
  if with_missing_embed:
    recs[1]["prompt_embed_path"] = "emb/missing.npy"
  return recs


CFG = dict(height=16, width=16, n_frames=5, fps=16, max_text_tokens=12, trim_mode="random_cut",
           pad_mode="slowdown", augment=True)


def test_example_loader_video_and_embeddings(tmp_path):
  recs = _tree(tmp_path, 2)
  loader = vd.ExampleLoader(tmp_path, CFG)
  ex = loader(recs[1], np.random.default_rng(0))
  assert ex["video"].shape == (5, 16, 16, 3) and ex["video"].dtype == np.float32
  assert -1.0 <= ex["video"].min() and ex["video"].max() <= 1.0
  assert ex["prompt_len"] == 4 and ex["prompt_embeds"].shape == (12, 8)
  np.testing.assert_array_equal(ex["prompt_embeds"][:4], 1.0)
  np.testing.assert_array_equal(ex["prompt_embeds"][4:], 0.0)  # zero padding, as the original
  # cached latents skip decoding
  lat = vd.ExampleLoader(tmp_path, dict(CFG, load_video_latent=True))(recs[0], np.random.default_rng(0))
  assert "video" not in lat and lat["latents"].shape == (2, 2, 2, 16)
  # latents cached at another size: the expected size is named
  with pytest.raises(ValueError, match=r"expected \[F, 3, 4, 16\].*24x32"):
    vd.ExampleLoader(tmp_path, dict(CFG, height=24, width=32, load_video_latent=True))(recs[0],
                                                                                   np.random.default_rng(0))
  # validation: no augmentation, deterministic
  val = vd.ExampleLoader(tmp_path, dict(CFG, trim_mode="speedup"), train=False)
  np.testing.assert_array_equal(val(recs[0], np.random.default_rng(0))["video"],
                                val(recs[0], np.random.default_rng(9))["video"])


def test_errors_name_the_row(tmp_path):
  recs = _tree(tmp_path, 2, with_missing_embed=True)
  loader = vd.ExampleLoader(tmp_path, CFG)
  with pytest.raises(FileNotFoundError, match=r"row 1 \(video_path='v1.mp4'\).*missing.npy"):
    loader(recs[1], np.random.default_rng(0))
  del recs[0]["prompt_embed_path"]
  with pytest.raises(KeyError, match=r"row 0.*prompt_embed_path"):
    loader(recs[0], np.random.default_rng(0))
  (tmp_path / "broken.mp4").write_bytes(b"not a video")
  bad = dict(recs[0], video_path="broken.mp4")
  with pytest.raises(ValueError, match=r"row 0 \(video_path='broken.mp4'\): cannot read frames"):
    vd.ExampleLoader(tmp_path, dict(CFG, load_prompt_embed=False))(bad, np.random.default_rng(0))


# MARK: grain pipeline
def _batches(it, k):
  return [next(it) for _ in range(k)]


def test_pipeline_deterministic_resumable_sharded(tmp_path):
  recs = _tree(tmp_path, 6)
  loader = vd.ExampleLoader(tmp_path, CFG)
  mk = lambda **kw: vd.make_dataset(recs, loader, batch_size=4, seed=3, process_index=0, process_count=1, **kw)
  a = _batches(iter(mk()), 5)  # 20 examples: crosses epoch boundaries (6 records)
  b = _batches(iter(mk()), 5)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["video"], y["video"])
  assert a[0]["video"].shape == (4, 5, 16, 16, 3) and a[0]["prompt_embeds"].shape == (4, 12, 8)
  rows = np.concatenate([x["row"] for x in a[:3]])
  assert sorted(rows[:6]) == list(range(6)) and sorted(rows[6:12]) == list(range(6))  # each epoch once
  assert list(rows[:6]) != list(rows[6:12])  # re-shuffled per epoch
  # resume from the state after 2 batches
  it = iter(mk())
  _batches(it, 2)
  state = it.get_state()
  it2 = iter(mk())
  it2.set_state(state)
  for x, y in zip(_batches(it2, 3), a[2:]):
    np.testing.assert_array_equal(x["row"], y["row"])
    np.testing.assert_array_equal(x["video"], y["video"])
  # two hosts: disjoint halves, per-host batch 2
  h0 = vd.make_dataset(recs, loader, 4, seed=3, train=False, process_index=0, process_count=2)
  h1 = vd.make_dataset(recs, loader, 4, seed=3, train=False, process_index=1, process_count=2)
  r0 = np.concatenate([x["row"] for x in h0])
  r1 = np.concatenate([x["row"] for x in h1])
  assert list(r0) == [0, 2, 4] and list(r1) == [1, 3, 5]
  with pytest.raises(ValueError, match="not divisible"):
    vd.make_dataset(recs, loader, 3, process_index=0, process_count=2)

