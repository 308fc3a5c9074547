"""VAE training: the loss pieces, the training passes of WanVAE, a short run on toy videos that
learns, its checkpoint read back by SFT and GRPO, and an exact resume after an interruption."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import grpo as grpo_config
from configs import sft as sft_config
from configs.vae import get_config
from eva_jax import parallel
from eva_jax.data import toyworld
from eva_jax.models import vae_layers
from eva_jax.models.vae import vae_config
from eva_jax.training import vae as train_vae
from eva_jax.training.checkpoints import Checkpointer
from eva_jax.utils.metrics import read_metrics


def _rel(a, b) -> float:
  return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


# MARK: the model's training passes


def _config(root, **train) -> ml_collections.ConfigDict:
  c = get_config("tiny")
  c.data.update(dict(data_root=str(root), metadata_path=toyworld.CSV_NAME, height=32, width=32, n_frames=9,
                     train_frames=9, crop_size=16))
  c.train.update(dict(batch_size=8, num_steps=30, log_every=10, checkpoint_every=15))
  c.optim.update(dict(learning_rate=2e-3, warmup_steps=2))
  c.train.update(train)
  c.eval.update(dict(every=30, num_batches=1))
  return c


def _trainer(c):
  # the one trainer (and compiled steps) that every run below shares
  return train_vae._trainer(c, parallel.make_mesh(dict(c.mesh)))


def test_whole_clip_passes_equal_the_streaming_ones(tmp_path):
  trainer = _trainer(_config(tmp_path))
  gdef, state = nnx.split(trainer.merge(trainer.init_state()["params"]))
  video = jax.random.uniform(jax.random.key(1), (1, 9, 16, 16, 3), minval=-1, maxval=1)

  @jax.jit
  def run(state, video):
    vae = nnx.merge(gdef, state)
    z = vae.encode(video)                                  # the reference's chunks, scanned
    return (z, vae.encode_posterior(video, stream=False), vae._moments(video, False), vae.decode(z),
            vae.decode(z, stream=False, clip=False))

  z, (mean, logvar), moments, y, raw = run(state, video)
  assert mean.shape == logvar.shape == (1, 3, 2, 2, 16)
  assert _rel(mean, z) < 1e-5
  assert _rel(np.clip(raw, -1, 1), y) < 1e-5  # the whole-clip decode, clamped, is the streaming one
  # logvar is Wan's clipped log-variance moved into the normalised space: -2 log(std) per channel
  want = np.clip(moments[..., 16:], -30, 20) - 2 * np.log(np.asarray(vae_config("tiny").latents_std))
  np.testing.assert_allclose(logvar, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_cpu_conv3d_as_2d_conv_equals_the_3d_conv(stride):
  x = jax.random.normal(jax.random.key(0), (2, 7, 6, 5, 4))
  k = jax.random.normal(jax.random.key(1), (3, 3, 3, 4, 6))
  want = jax.lax.conv_general_dilated(x, k, (stride, 1, 1), ((0, 0), (1, 1), (1, 1)),
                                      dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
  got = vae_layers._conv3d_as_conv2d(x, k, stride)
  assert got.shape == want.shape == (2, (7 - 3) // stride + 1, 6, 5, 6)
  assert _rel(got, want) < 1e-6


def test_kl_and_random_crop():
  np.testing.assert_allclose(train_vae.kl_to_standard_normal(jnp.zeros(3), jnp.zeros(3)), 0.0)
  # KL(N(1, e^-1) || N(0, 1)) = (1 + e^-1 - 1 + 1) / 2
  np.testing.assert_allclose(train_vae.kl_to_standard_normal(jnp.array(1.0), jnp.array(-1.0)),
                             0.5 * (1 + np.exp(-1) + 1 - 1), rtol=1e-6)
  assert train_vae.psnr(4e-2) == pytest.approx(20.0)
  video = jnp.arange(3 * 2 * 8 * 8 * 1, dtype=jnp.float32).reshape(3, 2, 8, 8, 1)
  crops = np.asarray(train_vae.random_crop(jax.random.key(3), video, 4))
  assert crops.shape == (3, 2, 4, 4, 1)
  for b in range(3):  # each crop is one window of its own clip, the same for every frame
    y, x = divmod(int(crops[b, 0, 0, 0, 0]) % 64, 8)
    np.testing.assert_array_equal(crops[b], np.asarray(video)[b, :, y:y + 4, x:x + 4])


# MARK: training on toy videos


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("toy")
  toyworld.generate_dataset(root, 8, seed=0, size=32, n_frames=9, val_fraction=0.25)  # 2 validation clips
  return root


@pytest.fixture(scope="module")
def full_run(data_root, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("full")
  return workdir, train_vae.train_and_evaluate(_config(data_root), workdir)


def _state(workdir, step):
  ck = Checkpointer(workdir / "checkpoints", async_save=False)
  try:  # restored onto the train state's structure and shardings
    return ck.restore(step, target=_trainer(_config(workdir)).abstract_state())[0]
  finally:
    ck.close()


def test_tiny_run_learns(full_run):
  workdir, out = full_run
  # measured: val MSE 0.208 (12.8 dB) at the random init, 0.090 (16.5 dB) after 30 steps on 16 px crops
  assert out["val_mse"] < 0.5 * out["init_val_mse"]
  assert out["val_psnr"] > out["init_val_psnr"] + 3.0
  rows = read_metrics(workdir)
  assert rows[0]["step"] == 0 and "init_val_mse" in rows[0]
  assert len([r for r in rows if "loss" in r]) == 3
  assert (workdir / "config.json").is_file() and (workdir / "checkpoints" / "best").is_dir()
  assert set(_state(workdir, 30)) == {"step", "rng", "params", "opt_state"}


def test_checkpoint_loads_through_sft_and_grpo(full_run, data_root):
  from eva_jax.training import grpo, sft

  workdir, out = full_run
  c = _config(data_root)
  trainer = _trainer(c)
  trained = _state(workdir, 30)["params"]
  # SFT's Conditioner.vae() with vae.checkpoint = the run dir: its 'params' in WanVAE('tiny')
  s = sft_config.get_config("tiny")
  s.vae.checkpoint = str(workdir)
  gdef, state = sft.Conditioner(s, None, trainer.mesh).vae()
  for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(trained)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # the loaded WanVAE's encode -> decode (the streaming passes) gives back the run's validation metrics
  val = train_vae.evaluate(c, trainer, nnx.to_pure_dict(state))
  assert val == {k: out[k] for k in val}
  # GRPO's build_vae, from the run's checkpoints/ folder
  g = grpo_config.get_config("tiny")
  g.vae.checkpoint = str(workdir / "checkpoints")
  _, gstate = grpo.build_vae(g, trainer.mesh)
  for x, y in zip(jax.tree.leaves(gstate), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resumed_run_equals_uninterrupted(full_run, data_root, tmp_path, caplog):
  workdir, _ = full_run
  train_vae.train_and_evaluate(_config(data_root, stop_at=8), tmp_path)   # killed after 8 steps
  assert int(_state(tmp_path, 8)["step"]) == 8
  train_vae.train_and_evaluate(_config(data_root, stop_at=15), tmp_path)  # resumed to step 15
  for x, y in zip(jax.tree.leaves(_state(tmp_path, 15)), jax.tree.leaves(_state(workdir, 15))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  loss_at = lambda d: {r["step"]: r["loss"] for r in read_metrics(d) if "loss" in r}  # noqa: E731
  assert loss_at(tmp_path)[10] == loss_at(workdir)[10]
  assert read_metrics(tmp_path)[0]["init_val_mse"] == read_metrics(workdir)[0]["init_val_mse"]
  # A resume with fewer steps than the run already made trains nothing and says so; the checkpoints stay.
  train_vae.train_and_evaluate(_config(data_root, num_steps=10), tmp_path)
  assert any("already at step 15 and config.train.num_steps=10: nothing left to train" in r.getMessage()
             for r in caplog.records if r.levelname == "WARNING"), caplog.text
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())[-1] == 15


def test_bad_data_path_is_named(tmp_path):
  missing = tmp_path / "no_such_root"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    train_vae.train_and_evaluate(_config(missing), tmp_path / "run")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no metadata CSV at .*empty/robotwin_videos.csv"):
    train_vae.train_and_evaluate(_config(tmp_path / "empty"), tmp_path / "run")
  c = _config(tmp_path / "empty")
  c.data.train_frames = 6
  (tmp_path / "empty" / toyworld.CSV_NAME).write_text("")
  with pytest.raises(ValueError, match=r"config.data.train_frames=6: expected 0 \(= n_frames\) or 1 \+ 4k frames"):
    train_vae.train_and_evaluate(c, tmp_path / "run")
