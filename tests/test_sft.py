"""SFT: rand_history timestep statistics, the loss against a direct computation, a tiny FSDP run
that learns, and kill-and-resume equal to an uninterrupted run."""

import json

import ml_collections
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from configs import sft as sft_config
from eva_jax import parallel
from eva_jax.data.metadata import write_metadata
from eva_jax.training import sft
from eva_jax.training.checkpoints import Checkpointer
from tests.utils import rel_err


# MARK: timesteps
def test_rand_history_statistics():
  n, f = 200_000, 5
  out = jax.jit(lambda k: sft.sample_timesteps(k, n, f))(jax.random.key(0))
  sigma, hist, clean = (np.asarray(out[k]) for k in ("sigma", "hist_len", "clean"))
  assert sigma.shape == (n, f) and hist.shape == (n,)
  se = lambda p: 5 * np.sqrt(p * (1 - p) / n)  # 5 standard errors
  assert abs(np.mean(hist == 1) - 0.9) < se(0.9) and set(np.unique(hist)) == {1, 2}
  assert abs(np.mean(clean) - 0.7) < se(0.7)
  # history frames share one sigma (0 when clean); future frames share another
  frame = np.arange(f)[None]
  is_hist = frame < hist[:, None]
  h_sigma = sigma[:, 0]
  np.testing.assert_array_equal(np.where(is_hist, sigma, h_sigma[:, None]), np.broadcast_to(h_sigma[:, None], (n, f)))
  np.testing.assert_array_equal(sigma[clean, 0], 0.0)
  assert np.all(sigma[~clean, 0] > 0)
  fut = sigma[:, -1]
  np.testing.assert_array_equal(np.where(is_hist, fut[:, None], sigma), np.broadcast_to(fut[:, None], (n, f)))
  # shift 3: u = σ / (3 − 2σ) must be U(0, 1), i.e. P(σ ≤ x) = x / (3 − 2x)
  for x in (0.2, 0.5, 0.75, 0.9):
    p = x / (3 - 2 * x)
    assert abs(np.mean(fut <= x) - p) < se(p), x
    assert abs(np.mean(h_sigma[~clean] <= x) - p) < 5 * np.sqrt(p * (1 - p) / (~clean).sum()), x
  # the history and future draws are independent
  both = ~clean
  assert abs(np.corrcoef(h_sigma[both], fut[both])[0, 1]) < 0.02


def test_independent_and_uniform_modes():
  out = sft.sample_timesteps(jax.random.key(1), 1000, 4, mode="uniform", shift=1.0)
  s = np.asarray(out["sigma"])
  np.testing.assert_array_equal(s, np.broadcast_to(s[:, :1], s.shape))
  out = sft.sample_timesteps(jax.random.key(2), 1000, 4, mode="independent", clean_hist_prob=1.0)
  np.testing.assert_array_equal(np.asarray(out["sigma"])[:, 0], 0.0)
  with pytest.raises(ValueError, match="diffusion.mode"):
    sft.sample_timesteps(jax.random.key(0), 2, 2, mode="discrete")


# MARK: loss
def test_loss_equals_direct_computation():
  from eva_jax.models.wan import WanModel, wan_config
  cfg = wan_config("tiny-i2v", num_layers=1)  # one block: compile time
  model = WanModel(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  batch = {"latents": jnp.asarray(rng.standard_normal((2, 3, 4, 4, 16)), jnp.float32),
           "prompt_embeds": jnp.asarray(rng.standard_normal((2, 7, 24)), jnp.float32),
           "clip_fea": jnp.asarray(rng.standard_normal((2, 257, 20)), jnp.float32)}
  key = jax.random.key(3)
  loss = nnx.jit(lambda m, b, k: sft.sft_loss(m, b, k, {})[0])(model, batch, key)
  # the same draws, written out: σ per frame, ε, x_t = (1−σ)x0 + σε, t = 1000σ, target ε − x0
  k_t, k_n = jax.random.split(key)
  sigma = np.asarray(sft.sample_timesteps(k_t, 2, 3)["sigma"], np.float64)
  eps = np.asarray(jax.random.normal(k_n, (2, 3, 4, 4, 16)), np.float64)
  x0 = np.asarray(batch["latents"], np.float64)
  s = sigma[:, :, None, None, None]
  x_t = (1 - s) * x0 + s * eps
  pred = nnx.jit(lambda m, *a: m(*a))(model, jnp.asarray(x_t, jnp.float32),
                                       jnp.asarray(1000 * sigma, jnp.float32), batch["prompt_embeds"],
                                       batch["clip_fea"])
  pred = np.asarray(pred, np.float64)
  ref = np.mean((pred - (eps - x0)) ** 2)
  assert rel_err(loss, ref) <= 1e-5


# MARK: training runs
def _dataset(root, n_train=8, n_val=4):
  """Cached latents / prompt embeddings / CLIP features for a tiny-i2v model (text 24, image 20)."""
  rng = np.random.default_rng(0)
  (root / "cache").mkdir(parents=True)
  recs = []
  base = rng.standard_normal((1, 4, 4, 16)).astype(np.float32)
  for i in range(n_train + n_val):
    lat = base + 0.3 * rng.standard_normal((3, 4, 4, 16)).astype(np.float32)  # a shared structure
    np.save(root / "cache" / f"lat{i}.npy", lat)
    np.save(root / "cache" / f"txt{i}.npy", rng.standard_normal((5 + i % 3, 24)).astype(np.float32))
    np.save(root / "cache" / f"clip{i}.npy", rng.standard_normal((257, 20)).astype(np.float32))
    recs.append(dict(video_path=f"v{i}.mp4", caption=f"task {i}", height=32, width=32, fps=16, n_frames=9,
                     split="training" if i < n_train else "validation",
                     prompt_embed_path=f"cache/txt{i}.npy", video_latent_path=f"cache/lat{i}.npy",
                     clip_embed_path=f"cache/clip{i}.npy"))
  write_metadata(root / "robotwin_videos.csv", recs)
  return root


def _config(root, **train):
  c = sft_config.get_config("tiny")
  c.data.update(dict(data_root=str(root), load_prompt_embed=True, load_video_latent=True,
                     load_clip_embed=True, max_text_tokens=16))
  c.model.num_layers = 1  # compile time
  c.text.source = "cached"
  c.clip.source = "cached"
  c.train.update(train)
  return c


def _metrics(workdir):
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def _params(workdir, step):
  ck = Checkpointer(workdir / "checkpoints", async_save=False)
  try:
    return ck.restore(step)[0]
  finally:
    ck.close()


def test_tiny_fsdp_run_learns_and_resumes_exactly(tmp_path):
  root = _dataset(tmp_path / "data")
  kw = dict(num_steps=24, log_every=4, checkpoint_every=12)
  c = _config(root, **kw)
  c.eval.every = 12
  assert dict(parallel.make_mesh(dict(c.mesh)).shape)["fsdp"] == 8
  out = sft.train_and_evaluate(c, tmp_path / "full")
  # it learns: the validation loss (fixed noise and timesteps) falls, the training loss too
  val = [m["val_loss"] for m in _metrics(tmp_path / "full") if "val_loss" in m]
  loss = [m["loss"] for m in _metrics(tmp_path / "full") if "loss" in m]
  print("val_loss", val, "loss", loss)
  assert len(val) == 2 and val[-1] < 0.95 * val[0]   # measured 1.910 -> 1.703
  assert np.mean(loss[-2:]) < 0.9 * loss[0]           # measured 2.109 -> 1.785
  assert np.isfinite(out["loss"]) and out["examples_per_s"] > 0
  assert (tmp_path / "full" / "checkpoints" / "best").is_dir()
  state = _params(tmp_path / "full", 24)
  assert set(state) == {"step", "rng", "params", "opt_state"} and int(state["step"]) == 24
  # init.kind='orbax' from a run directory gives back exactly the trained parameters (GRPO's entry)
  trainer, _ = sft._trainer_and_conditioner(c, sft.build_wan_config(c.model), parallel.make_mesh(dict(c.mesh)))
  init = ml_collections.ConfigDict(dict(kind="orbax", path=str(tmp_path / "full"), use_ema=False))
  loaded = sft.initial_params(init, sft.build_wan_config(c.model), trainer)
  for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(state["params"])):
    np.testing.assert_array_equal(x, np.asarray(y))

  # kill after 12 steps, resume to 24: the same parameters and losses as the uninterrupted run
  c_cut = _config(root, **dict(kw, num_steps=12))
  c_cut.eval.every = 12
  sft.train_and_evaluate(c_cut, tmp_path / "cut")
  sft.train_and_evaluate(c, tmp_path / "cut")
  b = _params(tmp_path / "cut", 24)
  for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert [m["loss"] for m in _metrics(tmp_path / "cut") if "loss" in m] == loss


def test_online_clip_features_are_those_of_each_clips_first_frame():
  """clip.source='online' (EVA): the CLIP features that go into the step are the frozen encoder's output
  on frame 0 of that step's clips (not zeros, different for different crops)."""
  from eva_jax import weights as weights_lib
  from eva_jax.models.clip import clip_config
  from eva_jax.models.wan import wan_config
  c = sft_config.get_config("tiny")
  c.clip.update(dict(source="online", preset="tiny", checkpoint="", dtype="float32"))
  wan_cfg = wan_config("tiny-i2v", image_dim=32)
  mesh = parallel.make_mesh(dict(c.mesh))
  cond = sft.Conditioner(c, wan_cfg, mesh)
  rng = np.random.default_rng(0)
  video = rng.uniform(-1, 1, (8, 5, 32, 32, 3)).astype(np.float32)
  video[1] = video[0]
  video[1, 0, :, :16] = -1.0                                    # another crop of the same first frame
  out = cond({"video": video, "caption_id": np.arange(8)})
  clip = weights_lib.load_module("clip", "random", clip_config("tiny"), seed=c.seed + 2)
  want = np.asarray(clip.encode_image(jax.numpy.asarray(video[:, 0])))
  assert rel_err(out["clip_fea"], want) < 1e-5                  # sharded over 8 devices vs one
  assert out["clip_fea"].shape == (8, clip_config("tiny").num_tokens, 32) and np.abs(out["clip_fea"]).max() > 0
  assert not np.allclose(out["clip_fea"][0], out["clip_fea"][1])
  c.data.load_video_latent = True
  with pytest.raises(ValueError, match="load_video_latent=True loads no pixels"):
    sft.Conditioner(c, wan_cfg, mesh)
