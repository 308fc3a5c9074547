"""The procedural toy world: rendering, trajectories, and the RoboTwin-format dataset it writes."""

import json

import numpy as np
import pytest

from eva_jax.data import toyworld as tw
from eva_jax.rl.reward import smoothness_reward


def _trajectories(kind, n=12, n_frames=33):
  out = []
  for i in range(n):
    rng = np.random.default_rng([7, i])
    out.append(tw.make_trajectory(rng, kind, tw._sample_motif(rng), n_frames))
  return np.stack(out).astype(np.float32)  # [n, T, 14]


def test_render_shape_dtype_and_background():
  frames = tw.render(np.zeros((3, 14)), size=32)
  assert frames.shape == (3, 32, 32, 3) and frames.dtype == np.uint8
  np.testing.assert_array_equal(frames[0], frames[2])
  assert tw.render(np.zeros(14), size=48).shape == (1, 48, 48, 3)
  with pytest.raises(ValueError, match=r"\[N, 14\]"):
    tw.render(np.zeros((2, 13)))


@pytest.mark.parametrize("size", [32, 64])
def test_every_joint_changes_the_picture(size):
  """Each of the 14 joints moves pixels on its own, so an IDM can read every joint back."""
  base = np.zeros(14)
  base[[6, 13]] = 0.5
  ref = tw.render(base, size)[0].astype(np.int32)
  for d in range(14):
    q = base.copy()
    q[d] += 0.4 if d not in tw.GRIPPERS else 0.5
    changed = np.abs(tw.render(q, size)[0].astype(np.int32) - ref).max(-1) > 30
    # The smallest change (a distal wrist joint or a gripper at 32 px) still moves a few pixels.
    assert changed.sum() >= 3, f"joint {d} barely changes the image at {size} px: {changed.sum()} px"
  # The left arm lives in the left half and the right arm in the right half at rest.
  q = base.copy()
  q[0] += 0.4
  diff = np.abs(tw.render(q, size)[0].astype(np.int32) - ref).max(-1) > 30
  assert diff[:, : size // 2].sum() > diff[:, size // 2:].sum()


def test_smooth_trajectories_respect_limits():
  traj = _trajectories("smooth", n=20)
  vel = np.diff(traj, axis=1) * tw.FPS  # [n, T-1, 14]
  acc = np.diff(vel, axis=1) * tw.FPS
  v_max = np.concatenate([tw.ARM_V_MAX, [tw.GRIPPER_V_MAX]] * 2)
  a_max = np.array(([tw.ARM_A_MAX] * 6 + [tw.GRIPPER_A_MAX]) * 2)
  assert np.all(np.abs(vel) <= v_max * tw.SMOOTH_MARGIN + 1e-6)
  # Finite differences of a sampled minimum-jerk profile overshoot its analytic peak slightly.
  assert np.all(np.abs(acc) <= a_max * tw.SMOOTH_MARGIN * 1.1)
  assert np.all(np.abs(traj[..., list(tw.ARM_DIMS)]) <= np.tile(tw.ARM_LIMITS, 2) + 1e-6)
  grips = traj[..., list(tw.GRIPPERS)]
  assert grips.min() >= 0.0 and grips.max() <= 1.0
  # The whole arm stays in the picture (so every joint can be seen in every frame).
  assert all(tw._in_view(pose, margin=0.0) for pose in traj.reshape(-1, 14))
  # Episodes move (not a constant pose).
  assert np.all(np.abs(vel).max(axis=(1, 2)) > 0.3)


def test_non_smooth_kinds_break_the_limits():
  v_max = np.concatenate([tw.ARM_V_MAX, [tw.GRIPPER_V_MAX]] * 2)
  for kind in ("jitter", "jump", "fast"):
    vel = np.diff(_trajectories(kind), axis=1) * tw.FPS
    acc = np.diff(vel, axis=1) * tw.FPS
    assert np.all(np.abs(acc).max(axis=(1, 2)) > tw.ARM_A_MAX), kind
    if kind == "fast":
      assert np.all((np.abs(vel) > v_max).any(axis=(1, 2)))
  with pytest.raises(ValueError, match="unknown kind"):
    tw.make_trajectory(np.random.default_rng(0), "wobbly", tw._sample_motif(np.random.default_rng(0)), 9)


def test_smooth_trajectories_get_higher_eva_reward():
  """EVA's reward (spec C) separates the two families with a wide margin."""
  smooth = np.asarray(smoothness_reward(_trajectories("smooth")))
  rough = np.concatenate([np.asarray(smoothness_reward(_trajectories(k))) for k in ("jitter", "jump", "fast")])
  assert smooth.min() > 9.9, smooth
  assert rough.max() < 8.0, rough
  assert smooth.min() > rough.max()


def test_captions_follow_the_motif():
  m = tw.Motif(arms="left", verb="wave", gripper="close")
  assert m.caption == "Wave the left arm and close the gripper."
  assert tw.Motif(arms="both", verb="raise", gripper="none").caption == "Raise both arms."


def _read_all(root, summary):
  from eva_jax.data import robotwin
  out = []
  for ep in summary["episodes"]:
    out.append(robotwin.read_episode(str(root / ep["hdf5"]), camera="head_camera"))
  return out


def test_generate_dataset_deterministic_and_readable(tmp_path):
  from eva_jax.data import metadata, video

  kw = dict(seed=3, size=32, n_frames=9, smooth_fraction=0.5)
  s1 = tw.generate_dataset(tmp_path / "a", 4, **kw)
  s2 = tw.generate_dataset(tmp_path / "b", 4, **kw)
  s3 = tw.generate_dataset(tmp_path / "c", 4, **{**kw, "seed": 4})
  eps1, eps2, eps3 = (_read_all(tmp_path / r, s) for r, s in (("a", s1), ("b", s2), ("c", s3)))

  # Deterministic for a seed, different for another seed.
  strip = lambda s: [{k: v for k, v in e.items()} for e in s["episodes"]]  # noqa: E731
  assert strip(s1) == strip(s2)
  for (f1, a1), (f2, a2) in zip(eps1, eps2):
    np.testing.assert_array_equal(f1, f2)
    np.testing.assert_array_equal(a1, a2)
  # The mp4s too, byte for byte: the VAE and SFT stages decode them (video.write_video's mbtree note).
  for e in s1["episodes"]:
    assert (tmp_path / "a" / e["video"]).read_bytes() == (tmp_path / "b" / e["video"]).read_bytes(), e["video"]
  assert not np.allclose(eps1[0][1], eps3[0][1])

  # Labels: half smooth, every episode has a caption, the last one is the validation split.
  assert [e["smooth"] for e in s1["episodes"]].count(True) == 2
  assert {e["kind"] for e in s1["episodes"]} <= set(tw.KINDS)
  assert [e["split"] for e in s1["episodes"]] == ["training"] * 3 + ["validation"]
  assert json.loads((tmp_path / "a" / "toyworld.json").read_text())["episodes"] == s1["episodes"]

  root = tmp_path / "a"
  records = metadata.read_metadata(root / tw.CSV_NAME)
  assert len(records) == 4
  for ep, rec, (frames, actions) in zip(s1["episodes"], records, eps1):
    # HDF5 (read back by the real RoboTwin reader): joints exact, frames = render through JPEG.
    assert actions.shape == (9, 14) and frames.shape == (9, 32, 32, 3) and frames.dtype == np.uint8
    ref = tw.render(actions, 32).astype(np.float32)
    # JPEG at 32 px blurs edges; the mean error stays a few grey levels.
    assert np.abs(frames.astype(np.float32) - ref).mean() < 6.0
    # CSV row per the F.2 columns.
    assert rec["video_path"] == ep["video"] and rec["caption"] == ep["caption"]
    assert (rec["height"], rec["width"], rec["fps"], rec["n_frames"]) == (32, 32, 16.0, 9)
    assert rec["split"] == ep["split"]
    # mp4 (read back by the real video reader).
    info = video.video_info(root / rec["video_path"])
    assert (info["n_frames"], info["height"], info["width"]) == (9, 32, 32)
    assert info["fps"] == pytest.approx(16.0)
    mp4, _ = video.read_video(root / rec["video_path"])
    assert np.abs(mp4.astype(np.float32) - ref).mean() < 8.0  # H.264 yuv420p at 32 px
    # Instructions in RoboTwin's per-episode JSON.
    instr = json.loads((root / ep["hdf5"].replace("/data/", "/instructions/").replace(".hdf5", ".json")).read_text())
    assert instr["seen"] == [ep["caption"]]


def test_generate_dataset_rejects_bad_sizes(tmp_path):
  with pytest.raises(ValueError, match="multiple of 16"):
    tw.generate_dataset(tmp_path, 1, seed=0, size=40)
  with pytest.raises(ValueError, match="n_frames"):
    tw.generate_dataset(tmp_path, 1, seed=0, size=32, n_frames=3)


def test_generate_dataset_first_index_continues_the_seed_stream(tmp_path):
  """A second root with first_index=n holds episodes n, n+1, ... of the seed (the demo's IDM corpus)."""
  kw = dict(seed=3, size=32, n_frames=5, write_videos=False)
  a = tw.generate_dataset(tmp_path / "a", 4, **kw)
  b = tw.generate_dataset(tmp_path / "b", 2, first_index=4, **kw)
  c = tw.generate_dataset(tmp_path / "c", 6, **kw)
  assert [e["index"] for e in b["episodes"]] == [4, 5]
  assert [e["hdf5"].rsplit("/", 1)[1] for e in b["episodes"]] == ["episode4.hdf5", "episode5.hdf5"]
  # Episode i draws from rng([seed, i]) wherever it is written: the captions of c's episodes 4, 5.
  assert [e["caption"] for e in b["episodes"]] == [e["caption"] for e in c["episodes"][4:]]
  # Kinds and splits follow the position in the root, as for any 2-episode root.
  two = tw.generate_dataset(tmp_path / "d", 2, **kw)
  assert [(e["kind"], e["split"]) for e in b["episodes"]] == [(e["kind"], e["split"]) for e in two["episodes"]]
  # New episodes: none of b's trajectories is one of a's.
  ja = [a_ for _, a_ in _read_all(tmp_path / "a", a)]
  for _, jb in _read_all(tmp_path / "b", b):
    assert all(not np.allclose(jb, x) for x in ja)


def test_segment_painting_inside_its_box_equals_the_whole_frame():
  """_paint_segments computes only the box a segment can reach; outside it coverage must be zero, so the
  result equals the coverage formula evaluated over every pixel (here written out independently)."""
  rng = np.random.default_rng(0)
  size, n, radius = 24, 5, 1.7
  # long segments running off the frame, and short ones well inside it (their round caps decide the box)
  p0 = np.concatenate([rng.uniform(-4, size + 4, (n, 2)), rng.uniform(6, size - 6, (n, 2))])
  p1 = np.concatenate([rng.uniform(-4, size + 4, (n, 2)), p0[n:] + rng.uniform(-2, 2, (n, 2))])
  n *= 2
  yy, xx = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
  base = rng.uniform(0, 255, (n, size, size, 3))
  color = np.array([10.0, 200.0, 90.0])
  got = base.copy()
  # one frame per call: the box is shared by a call's frames, so only then is it as tight as it gets
  for i in range(n):
    tw._paint_segments(got[i:i + 1], yy, xx, p0[i:i + 1], p1[i:i + 1], radius, color)
  d = (p1 - p0)[:, None, None]
  rel = np.stack([xx, yy], -1)[None] - p0[:, None, None]
  t = np.clip((rel * d).sum(-1) / np.maximum((d ** 2).sum(-1), 1e-9), 0, 1)
  dist = np.linalg.norm(rel - t[..., None] * d, axis=-1)
  alpha = np.clip(radius + 0.5 - dist, 0, 1)[..., None]
  np.testing.assert_allclose(got, base * (1 - alpha) + alpha * color, rtol=1e-12, atol=1e-9)
  assert (alpha > 0).any() and (alpha == 0).any()
