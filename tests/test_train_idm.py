"""IDM training: augmentation, a short run that learns, exact resume after an interruption, evaluation."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.idm import get_config
from eva_jax.data import robotwin
from eva_jax.training import idm as train_idm
from eva_jax.training.checkpoints import Checkpointer


# MARK: augmentation


def test_flip_swaps_arms_and_negates_documented_dims():
  frames = jnp.arange(2 * 3 * 2 * 4 * 3, dtype=jnp.float32).reshape(2, 3, 2, 4, 3)
  actions = jnp.arange(1, 15, dtype=jnp.float32)[None].repeat(2, 0)
  ff, fa = train_idm.flip_left_right(frames, actions)
  np.testing.assert_array_equal(ff, frames[..., ::-1, :])
  want = np.array([8, 9, 10, 11, 12, 13, 14, 1, 2, 3, 4, 5, 6, 7], np.float32)
  want[[0, 4, 5, 7, 11, 12]] *= -1
  np.testing.assert_array_equal(fa[0], want)
  np.testing.assert_array_equal(train_idm.flip_left_right(ff, fa)[1], actions)  # an involution


def test_color_jitter_ranges_follow_progress():
  x = jax.random.uniform(jax.random.key(0), (3, 8, 8, 3), minval=0.05, maxval=0.45)
  key = jax.random.key(1)
  jit = jax.jit(train_idm.color_jitter, static_argnums=(3,))
  ident = train_idm.AugmentConfig(brightness=((1, 1), (1, 1)), contrast=((1, 1), (1, 1)),
                                  saturation=((1, 1), (1, 1)), hue=(0.0, 0.0))
  np.testing.assert_allclose(jit(key, x, jnp.float32(0.5), ident), x, atol=2e-6)  # hsv round trip
  # Brightness only, range (1, 1) at progress 0 and (2, 2) at progress 1: progress 0.5 scales by 1.5.
  bright = train_idm.AugmentConfig(brightness=((1, 1), (2, 2)), contrast=((1, 1), (1, 1)),
                                   saturation=((1, 1), (1, 1)), hue=(0.0, 0.0))
  np.testing.assert_allclose(jit(key, x, jnp.float32(0.5), bright), x * 1.5, rtol=1e-5)
  # Saturation 0 turns every frame grey (ITU-R 601 luma), whatever order the ops run in.
  grey = train_idm.AugmentConfig(brightness=((1, 1), (1, 1)), contrast=((1, 1), (1, 1)),
                                 saturation=((0, 0), (0, 0)), hue=(0.0, 0.0))
  out = jit(key, x, jnp.float32(0.0), grey)
  luma = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
  np.testing.assert_allclose(out, jnp.repeat(luma[..., None], 3, -1), atol=2e-6)
  # Default ranges: the same draw for the 3 frames of a window (equal frames stay equal).
  same = jnp.repeat(x[:1], 3, 0)
  out = jit(key, same, jnp.float32(1.0), train_idm.AugmentConfig())
  np.testing.assert_allclose(out[0], out[2], atol=1e-7)
  assert float(jnp.abs(out - same).max()) > 1e-3 and float(out.min()) >= 0 and float(out.max()) <= 1


def test_regression_losses():
  d = jnp.array([0.01, -0.2, 1.0])
  np.testing.assert_allclose(train_idm.regression_loss(d, 0 * d, "smooth_l1", 0.05),
                             np.mean([0.5 * 0.01 ** 2 / 0.05, 0.2 - 0.025, 1.0 - 0.025]), rtol=1e-6)
  np.testing.assert_allclose(train_idm.regression_loss(d, 0 * d, "l1"), np.abs(d).mean(), rtol=1e-6)
  with pytest.raises(ValueError, match="unknown loss 'huber2'"):
    train_idm.regression_loss(d, d, "huber2")


# MARK: training


def _write_episodes(root: pathlib.Path, n_episodes=4, n=10):
  """A bright square whose position is a function of joints 0 and 7: learnable from one frame."""
  rng = np.random.default_rng(0)
  for e in range(n_episodes):
    acts = np.cumsum(rng.normal(0, 0.15, (n, 14)), 0)
    frames = np.full((n, 24, 32, 3), 30, np.uint8)
    for i in range(n):
      x = int(16 + 12 * np.tanh(acts[i, 0]))
      y = int(12 + 9 * np.tanh(acts[i, 7]))
      frames[i, max(y - 3, 0):y + 3, max(x - 3, 0):x + 3] = 230
    robotwin.write_episode(root / f"episode{e}.hdf5", frames, acts)


def _config(root, **train):
  c = get_config("tiny")
  c.data.root = str(root)
  c.data.tfds_dir = str(root.parent / "tfds")  # shared by the runs: prepared once
  c.model.blocks = (1,)                         # one stage is enough here and compiles fast
  c.model.image_size = (32, 32)                 # -> an 8x8 map for the spatial softmax
  c.optim.update(dict(total_steps=8, warmup_steps=1, learning_rate=3e-3))
  c.train.update(dict(num_steps=8, log_every=1, checkpoint_every=100))
  c.train.update(train)
  c.eval.update(dict(every=8, max_plots=1))
  return c


def _losses(workdir):
  rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _final_state(workdir):
  ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
  tree, _ = ckpt.restore()
  ckpt.close()
  return tree


def test_train_learns_resumes_exactly_and_evaluates(tmp_path):
  root = tmp_path / "episodes"
  _write_episodes(root)

  full = tmp_path / "full"
  out = train_idm.train_and_evaluate(_config(root), full)
  losses = _losses(full)
  assert sorted(losses) == list(range(1, 9))
  assert np.mean([losses[s] for s in (6, 7, 8)]) < np.mean([losses[s] for s in (1, 2, 3)])
  assert np.isfinite(out["val_mae"]) and "val_mae/13" in out

  # Interrupted after step 4, resumed from the checkpoint: the same losses and the same parameters.
  part = tmp_path / "part"
  train_idm.train_and_evaluate(_config(root, stop_at=4), part)
  assert Checkpointer(part / "checkpoints", async_save=False).latest_step() == 4
  train_idm.train_and_evaluate(_config(root), part)
  resumed = _losses(part)
  np.testing.assert_allclose([resumed[s] for s in range(1, 9)], [losses[s] for s in range(1, 9)], rtol=1e-6)
  a, b = _final_state(full), _final_state(part)
  assert set(a) == {"model_state_dict", "optimizer_state_dict", "step"} and int(a["step"]) == 8
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
  # BatchNorm running statistics moved away from their initial (0, 1).
  assert np.abs(np.asarray(a["model_state_dict"]["backbone"]["bn1"]["mean"])).max() > 0

  # Episode evaluation of the best checkpoint: metrics, per-episode rows, PNG plots.
  cfg = _config(root)
  cfg.eval.checkpoint = str(full)
  summary = train_idm.evaluate(cfg, tmp_path / "eval")
  assert summary["num_episodes"] == 1  # the validation episode of 4 (val_fraction 0.25)
  for k in ("mae", "mae/06", "pred/jerk", "true/jerk", "pred/reward", "true/total"):
    assert np.isfinite(summary[k]), k
  assert list((tmp_path / "eval" / "plots").glob("*.png"))
  assert (tmp_path / "eval" / "per_episode.jsonl").read_text().count("\n") == 1


def test_authors_recipe_trains_and_predicts_with_its_input(tmp_path):
  """configs/idm.py:tiny,recipe=authors: frame-level split, stride-2 windows of R<->B-swapped,
  per-frame-jittered frames, torch's AdamW schedule; the episode prediction uses the same input,
  crop included (tiny leaves the crop off in training: at 480x832 it costs minutes of CPU here)."""
  root = tmp_path / "episodes"
  _write_episodes(root, n_episodes=2, n=8)
  c = get_config("tiny,recipe=authors")
  c.data.update(dict(root=str(root), tfds_dir=str(tmp_path / "tfds"), val_fraction=0.25))
  c.model.update(dict(blocks=(1,), image_size=(32, 32)))
  c.optim.total_steps = 3
  c.train.update(dict(num_steps=3, log_every=1, checkpoint_every=100, batch_size=8))
  c.eval.every = 0
  out = train_idm.train_and_evaluate(c, tmp_path / "run")
  assert np.isfinite(out["loss"])
  rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  lr = [r["learning_rate"] for r in rows if "learning_rate" in r]  # warm-up int(0.1 * 3) = 0 steps
  np.testing.assert_allclose(lr, [1e-3 / 2 * (1 + np.cos(np.pi * s / 3)) for s in (1, 2, 3)], rtol=1e-5, atol=1e-12)
  # Episode prediction: stride-2 windows, crop (small here) and swap, equal to running the windows directly.
  model = train_idm.load_trained_idm(tmp_path / "run", c)
  frames, _ = robotwin.read_episode(root / "episode0.hdf5")
  tf = train_idm.FrameTransform("bgr_swapped", crop_and_resize=True, crop_size=(20, 40))
  pred = train_idm.predict_episode(model, frames[:5], 0, tf, 2)
  idx = robotwin.window_indices(5, 3, 2)
  direct = nnx.jit(lambda m, x: m(tf(x)))(model, jnp.asarray(frames[:5][idx], jnp.float32) / 255.0)
  np.testing.assert_allclose(pred, np.asarray(direct), rtol=1e-4, atol=1e-5)


def test_nan_in_the_data_stops_training_and_no_checkpoint_holds_it(tmp_path, monkeypatch):
  """A NaN target reaching a training batch (past the readers' checks) stops the run naming the steps
  (the log check) or the checkpoint (the save check), and only the last good checkpoint is on disk."""
  from eva_jax.data import idm_dataset
  root = tmp_path / "episodes"
  _write_episodes(root)
  real = idm_dataset.train_loader

  def poisoned(*args, **kwargs):
    for k, batch in enumerate(real(*args, **kwargs)):
      if k == 2:  # the batch of step 3
        batch = dict(batch, action=np.full_like(batch["action"], np.nan))
      yield batch

  monkeypatch.setattr(idm_dataset, "train_loader", poisoned)
  for log_every, expected in ((4, r"IDM training: non-finite .*'loss'.* between steps 0 and 4"),
                              (100, r"checkpoint .* at step 4 not written: non-finite")):
    workdir = tmp_path / f"log{log_every}"
    with pytest.raises(FloatingPointError, match=expected):
      train_idm.train_and_evaluate(_config(root, log_every=log_every, checkpoint_every=2), workdir)
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    assert ckpt.all_steps() == [2]
    tree, _ = ckpt.restore()
    ckpt.close()
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree)
               if np.issubdtype(np.asarray(x).dtype, np.inexact))
