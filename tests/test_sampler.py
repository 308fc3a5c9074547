"""The jitted I2V sampler on tiny random models: sizes, loop == scan, determinism, sharding, mp4 out."""

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eva_jax.data.video import read_video, video_info, write_video
from eva_jax.diffusion import sampler as sampler_lib
from eva_jax.diffusion.sampler import I2VSampler, SamplerConfig
from eva_jax.models.vae import WanVAE, vae_config
from eva_jax.models.wan import WanModel, wan_config
from eva_jax.parallel import make_mesh
from tests.utils import rel_err

FRAMES, SIZE, STEPS = 5, 32, 3


class StandInClip(nnx.Module):
  """Stands in for the CLIP image encoder: [B, H, W, 3] -> [B, 257, image_dim] (a pooled projection)."""

  def __init__(self, dim: int, rngs: nnx.Rngs):
    self.proj = nnx.Linear(3, dim, rngs=rngs)

  def encode_image(self, frames):
    b = frames.shape[0]
    pooled = jax.image.resize(frames, (b, 16, 16, 3), "bilinear").reshape(b, 256, 3)
    return self.proj(jnp.concatenate([pooled.mean(1, keepdims=True), pooled], axis=1))


@pytest.fixture(scope="module")
def models():
  dit = WanModel(wan_config("tiny-i2v"), rngs=nnx.Rngs(0))
  vae = WanVAE(vae_config("tiny"), rngs=nnx.Rngs(1))
  return dit, vae, StandInClip(dit.cfg.image_dim, nnx.Rngs(2))


@pytest.fixture(scope="module")
def inputs(models):
  text_dim = models[0].cfg.text_dim
  k = jax.random.split(jax.random.key(123), 3)
  first = jax.random.uniform(k[0], (2, SIZE, SIZE, 3), minval=-1, maxval=1)
  ctx = jax.random.normal(k[1], (2, 12, text_dim))
  neg = jax.random.normal(k[2], (1, 3, text_dim)) * 0.1
  return first, ctx, neg


@pytest.fixture(scope="module")
def tiny_sampler(models):
  cfg = SamplerConfig(num_frames=FRAMES, height=SIZE, width=SIZE, num_steps=STEPS)
  return I2VSampler(*models, cfg)


def test_context_kv_cache_equals_recomputing(models, inputs, tiny_sampler):
  """The cross-attention K/V computed once per video (the default) give the latents of recomputing them at
  every step and pass. The tiny DiT's head starts at zero (velocity 0, nothing to compare): a copy with
  random head weights makes the velocity depend on the cross-attention."""
  dit, vae, clip = models
  dit = nnx.clone(dit)
  dit.head.head.kernel[...] = 0.1 * jax.random.normal(jax.random.key(9), dit.head.head.kernel[...].shape)
  cfg = SamplerConfig(num_frames=FRAMES, height=SIZE, width=SIZE, num_steps=2)
  cached, plain = I2VSampler(dit, vae, clip, cfg), I2VSampler(dit, vae, clip, replace(cfg, cache_context_kv=False))
  first, ctx, neg = inputs
  cond = tiny_sampler.condition(first, ctx, neg)   # the same VAE and CLIP: its compiled encoder
  kv = cached.context_kv(cond)
  assert plain.context_kv(cond) is None
  assert kv["k"].shape[:3] == (dit.cfg.num_layers, 2 * 3, dit.cfg.text_len)   # B x 3 guidance passes
  a = cached.sample(cond, jax.random.key(5), show_progress=False)
  b = plain.sample(cond, jax.random.key(5), show_progress=False)
  noise = cached.initial_noise(jax.random.split(jax.random.key(5))[0], 2)
  assert float(jnp.abs(a - noise)[:, 1:].max()) > 1e-2   # the velocity moved the latents: not a no-op check
  assert rel_err(a, b) <= 1e-6


def test_invalid_sizes_raise():
  with pytest.raises(ValueError, match="num_frames=48 is not 1 \\+ 4k"):
    SamplerConfig(num_frames=48)
  with pytest.raises(ValueError, match="height=470 is not a positive multiple of 16"):
    SamplerConfig(height=470)
  with pytest.raises(ValueError, match="width=-16"):
    SamplerConfig(width=-16)
  with pytest.raises(ValueError, match="solver"):
    SamplerConfig(solver="ddim")
  assert sampler_lib.latent_shape(SamplerConfig(), 1) == (1, 13, 60, 80, 16)


def test_loop_equals_scan_and_is_deterministic(tiny_sampler, inputs, tmp_path):
  first, ctx, neg = inputs
  cond = tiny_sampler.condition(first, ctx, neg)
  assert cond.clean.shape == (2, 1, SIZE // 8, SIZE // 8, 16)
  ticks = []
  lat_a = tiny_sampler.sample(cond, jax.random.key(5), show_progress=True, on_step=ticks.append)
  lat_b = tiny_sampler.sample(cond, jax.random.key(5), show_progress=False)
  lat_s = tiny_sampler.sample_scanned(cond, jax.random.key(5))
  lat_c = tiny_sampler.sample(cond, jax.random.key(6), show_progress=False)
  assert ticks == list(range(STEPS))
  assert lat_a.shape == (2, 2, SIZE // 8, SIZE // 8, 16)
  np.testing.assert_array_equal(np.asarray(lat_a), np.asarray(lat_b))
  np.testing.assert_allclose(np.asarray(lat_s), np.asarray(lat_a), rtol=0, atol=1e-6)
  assert not np.allclose(np.asarray(lat_c), np.asarray(lat_a))
  # The history frame is the clean first-frame latent.
  np.testing.assert_array_equal(np.asarray(lat_a[:, :1]), np.asarray(cond.clean))

  video = np.asarray(tiny_sampler.decode(lat_a))
  assert video.shape == (2, FRAMES, SIZE, SIZE, 3) and np.all(np.abs(video) <= 1) and np.all(np.isfinite(video))
  path = write_video(tmp_path / "videos" / "sample_0.mp4", video[0], fps=16)
  frames, fps = read_video(path)
  assert frames.shape == (FRAMES, SIZE, SIZE, 3) and frames.dtype == np.uint8
  assert fps == pytest.approx(16)
  assert video_info(path)["n_frames"] == FRAMES


def test_sharded_equals_single_device(models, inputs, tiny_sampler):
  first, ctx, neg = inputs
  mesh = make_mesh({"data": 2}, devices=jax.devices()[:2])
  sharded = I2VSampler(*models, tiny_sampler.cfg, mesh=mesh)
  cond = tiny_sampler.condition(first, ctx, neg)
  # The conditioning is laid out on the mesh as `condition` would (its VAE/CLIP jit is covered above).
  cond_s = cond._replace(clean=sharded._batch(cond.clean), context=sharded._batch(cond.context),
                         clip_fea=sharded._batch(cond.clip_fea),
                         neg_context=jax.device_put(cond.neg_context, jax.sharding.NamedSharding(
                             mesh, jax.sharding.PartitionSpec())))
  lat_s = sharded.sample_scanned(cond_s, jax.random.key(5))
  assert len(lat_s.sharding.device_set) == 2
  lat = tiny_sampler.sample_scanned(cond, jax.random.key(5))
  np.testing.assert_allclose(np.asarray(lat_s), np.asarray(lat), rtol=0, atol=1e-5)


def test_condition_checks_shapes(tiny_sampler, inputs):
  first, ctx, neg = inputs
  with pytest.raises(ValueError, match="first_frame must be \\[B, 32, 32, 3\\]"):
    tiny_sampler.condition(first[:, :16], ctx, neg)
  with pytest.raises(ValueError, match="neg_context"):
    tiny_sampler.condition(first, ctx, None)


def test_eva_size_traces_with_14b_shapes():
  """EVA's real setting (i2v-14B, 49x480x640, 40 steps, both guidances) traces abstractly: no compile, no memory."""
  cfg = SamplerConfig()
  dit_cfg = wan_config("i2v-14b", dtype="bfloat16", param_dtype="bfloat16")
  graphdef, params = nnx.split(nnx.eval_shape(lambda: WanModel(dit_cfg, rngs=nnx.Rngs(0))))
  sched = sampler_lib.make_schedule(cfg)
  shape = sampler_lib.latent_shape(cfg, 1)
  sds = jax.ShapeDtypeStruct
  cond = sampler_lib.Conditioning(clean=sds((1, 1) + shape[2:], jnp.float32),
                                  context=sds((1, 512, 4096), jnp.bfloat16),
                                  neg_context=sds((1, 512, 4096), jnp.bfloat16),
                                  clip_fea=sds((1, 257, 1280), jnp.bfloat16))
  out = jax.eval_shape(
      lambda p, c, n, k: sampler_lib.sample_latents(sampler_lib._nnx_apply(graphdef), p, cfg, sched, c, n, k),
      params, cond, sds(shape, jnp.float32), jax.random.key(0))
  assert out.shape == (1, 13, 60, 80, 16) and out.dtype == jnp.float32


def test_full_loop_matches_torch_reference():
  """Our jitted loop vs EVA's loop written out in PyTorch: diffusers' tiny Wan DiT (converted into ours),
  three separate guidance passes, history re-imposed every step, diffusers' UniPC on the same sigmas."""
  import diffusers
  import torch

  from convert.wan_dit import convert_dit_state_dict
  from eva_jax.diffusion import schedules
  from tests.test_wan_dit import diffusers_model
  from tests.utils import rel_err

  ref = diffusers_model("tiny-i2v", seed=0)
  wcfg = wan_config("tiny-i2v")
  dit = WanModel(wcfg, rngs=nnx.Rngs(0))
  nnx.update(dit, nnx.State(convert_dit_state_dict(ref.state_dict(), wcfg)))
  lang, hist = 2.5, 1.5
  cfg = SamplerConfig(num_frames=5, height=32, width=32, num_steps=5, lang_guidance=lang, hist_guidance=hist)
  b, f, h, w, c = sampler_lib.latent_shape(cfg, 1)
  rng = np.random.default_rng(0)
  noise = rng.standard_normal((b, f, h, w, c)).astype(np.float32)
  clean = rng.standard_normal((b, 1, h, w, c)).astype(np.float32)
  ctx = np.zeros((b, 512, wcfg.text_dim), np.float32)  # diffusers splits image/text at len - 512: pad to 512
  ctx[:, :7] = rng.standard_normal((b, 7, wcfg.text_dim))
  neg = np.zeros_like(ctx)
  neg[:, :2] = rng.standard_normal((b, 2, wcfg.text_dim))
  clip = rng.standard_normal((b, 257, wcfg.image_dim)).astype(np.float32)
  key = jax.random.key(9)

  graphdef, params = nnx.split(dit)
  cond = sampler_lib.Conditioning(jnp.asarray(clean), jnp.asarray(ctx), jnp.asarray(neg), jnp.asarray(clip))
  sched = sampler_lib.make_schedule(cfg)
  ours = jax.jit(lambda p, n: sampler_lib.sample_latents(sampler_lib._nnx_apply(graphdef), p, cfg, sched, cond, n,
                                                         key))(params, jnp.asarray(noise))

  def forward(x, t_frames, context):  # channels-last numpy in and out; per-frame t as per-token t
    xt = np.concatenate([x, np.zeros(x.shape[:-1] + (20,), np.float32)], -1)
    t_tok = np.repeat(t_frames, (h // 2) * (w // 2), axis=1).astype(np.float32)
    with torch.no_grad():
      out = ref(torch.from_numpy(xt).permute(0, 4, 1, 2, 3).contiguous(), torch.from_numpy(t_tok),
                torch.from_numpy(context), encoder_hidden_states_image=torch.from_numpy(clip), return_dict=False)[0]
    return out.permute(0, 2, 3, 4, 1).numpy()

  ts, sigmas = schedules.wan_timesteps(cfg.num_steps, cfg.shift)
  unipc = diffusers.UniPCMultistepScheduler(num_train_timesteps=1000, use_flow_sigmas=True, flow_shift=1.0,
                                            prediction_type="flow_prediction", solver_order=2, solver_type="bh2",
                                            predict_x0=True, lower_order_final=True, final_sigmas_type="zero")
  unipc.set_timesteps(sigmas=sigmas[:-1].astype(np.float64))
  x = noise.copy()
  for i, t in enumerate(ts):
    x[:, :1] = clean
    t_vec = np.full((b, f), t, np.float32)
    t_vec[:, 0] = ts[-1]
    f_c = forward(x, t_vec, ctx)
    f_l = forward(x, t_vec, neg)
    x_nh, t_nh = x.copy(), t_vec.copy()
    x_nh[:, :1] = np.asarray(jax.random.normal(jax.random.fold_in(key, i), (b, 1, h, w, c)))
    t_nh[:, 0] = ts[0]
    f_h = forward(x_nh, t_nh, ctx)
    v = (1 + lang + hist) * f_c - lang * f_l - hist * f_h
    x = unipc.step(torch.from_numpy(v), unipc.timesteps[i], torch.from_numpy(x)).prev_sample.numpy()
  x[:, :1] = clean
  err = rel_err(ours, x)
  assert err <= 1e-5, f"full-loop relative error {err:.2e}"  # measured 6.6e-7
