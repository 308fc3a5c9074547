"""Wan 2.1 VAE (eva_jax.models.vae): float32 parity with diffusers AutoencoderKLWan, API checks,
the real config on a tiny clip, batch sharding, and memory bounded by one time chunk."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from convert.wan_vae import convert_vae_state_dict
from eva_jax import parallel
from eva_jax.models.vae import LATENTS_MEAN, LATENTS_STD, WanVAE, vae_config
from tests.utils import rel_err, to_numpy

# Test-only XLA CPU option: the VAE graph is conv-heavy and LLVM optimisation dominates compile time
# on the shared 2-core machine; level 1 halves it and keeps fast conv kernels (level 0 does not).
# Numerics are unchanged (no fast-math).
FAST_COMPILE = {"xla_backend_optimization_level": 1}


def _jit_methods(vae):
  graphdef, state = nnx.split(vae)
  enc = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x), compiler_options=FAST_COMPILE)
  dec = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z), compiler_options=FAST_COMPILE)
  return state, enc, dec


def _cl(t):  # torch [B, C, T, H, W] -> numpy [B, T, H, W, C]
  return to_numpy(t).transpose(0, 2, 3, 4, 1)


@pytest.fixture(scope="module")
def tiny():
  """A random tiny diffusers VAE and our converted copy."""
  from diffusers import AutoencoderKLWan
  # attn_scales stays (): diffusers 0.42 crashes on attention blocks outside the middle block
  # (it passes them feat_cache), and the released config has none.
  cfg = vae_config("tiny")
  torch.manual_seed(0)
  ref = AutoencoderKLWan(base_dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
                         num_res_blocks=cfg.num_res_blocks, attn_scales=list(cfg.attn_scales),
                         temperal_downsample=list(cfg.temporal_downsample)).eval()
  with torch.no_grad():  # non-trivial norm scales and attention projections
    for name, p in ref.named_parameters():
      if name.endswith("gamma"):
        p.add_(0.2 * torch.randn_like(p))
      if ".proj." in name or "to_qkv" in name:
        p.normal_(0.0, 0.2)
  # Built abstract and filled by the converter: no random init (eager init compiles per shape).
  graphdef, state = nnx.split(nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, convert_vae_state_dict(ref.state_dict(), cfg))
  vae = nnx.merge(graphdef, state)
  state, enc, dec = _jit_methods(vae)
  return dict(cfg=cfg, ref=ref, vae=vae, state=state, enc=enc, dec=dec)


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_encode_decode_match_diffusers(tiny, frames):
  ref, state = tiny["ref"], tiny["state"]
  x = torch.rand(2, 3, frames, 16, 24, generator=torch.Generator().manual_seed(frames)) * 2 - 1
  mean = torch.tensor(LATENTS_MEAN).view(1, -1, 1, 1, 1)
  std = torch.tensor(LATENTS_STD).view(1, -1, 1, 1, 1)
  with torch.no_grad():
    mu = ref.encode(x).latent_dist.mean                          # [B, 16, 1 + k, 2, 3]
    video_ref = ref.decode(mu).sample                            # [B, 3, T, 16, 24]
  z_ref = _cl((mu - mean) / std)

  z = tiny["enc"](state, jnp.asarray(_cl(x)))
  assert z.shape == (2, 1 + (frames - 1) // 4, 2, 3, 16)
  assert rel_err(z, z_ref) <= 1e-5

  video = tiny["dec"](state, jnp.asarray(z_ref))
  assert video.shape == (2, frames, 16, 24, 3)
  video_ref = _cl(video_ref)
  assert np.mean(np.abs(video_ref) < 1) > 0.5  # the comparison is not dominated by clipping
  assert rel_err(video, video_ref) <= 1e-5


def test_encode_is_causal_over_chunks(tiny):
  # Latents of a 5-frame prefix equal the first 2 latents of the 9-frame clip (chunked causal semantics).
  x = jax.random.uniform(jax.random.key(1), (2, 9, 16, 24, 3), minval=-1, maxval=1)
  z9 = tiny["enc"](tiny["state"], x)
  z5 = tiny["enc"](tiny["state"], x[:, :5])
  assert rel_err(z5, z9[:, :2]) <= 1e-6


def test_bad_clip_length_and_size_are_rejected(tiny):
  vae = tiny["vae"]
  with pytest.raises(ValueError, match=r"T=6 is not 1 \+ 4k"):
    vae.encode(jnp.zeros((1, 6, 16, 16, 3)))
  with pytest.raises(ValueError, match="not a multiple of 8"):
    vae.encode(jnp.zeros((1, 5, 12, 16, 3)))
  with pytest.raises(ValueError, match=r"\[B, T, H, W, 3\]"):
    vae.encode(jnp.zeros((1, 5, 16, 16)))
  with pytest.raises(ValueError, match="latents"):
    vae.decode(jnp.zeros((1, 2, 2, 2, 8)))


def test_config_presets_and_overrides():
  real = vae_config("wan2.1")
  assert (real.base_dim, real.z_dim, real.dim_mult, real.num_res_blocks) == (96, 16, (1, 2, 4, 4), 2)
  assert real.attn_scales == () and real.temporal_downsample == (False, True, True)
  assert vae_config("tiny", base_dim=4, dim_mult=[1, 1, 1, 1]).dim_mult == (1, 1, 1, 1)
  with pytest.raises(ValueError, match="base_dimm"):
    vae_config("tiny", base_dimm=4)
  with pytest.raises(ValueError, match="temporal_downsample"):
    vae_config("tiny", temporal_downsample=(True,))
  with pytest.raises(ValueError, match="unknown VAE config"):
    vae_config("wan9")


def test_real_config_round_trip_matches_diffusers_on_cpu():
  from diffusers import AutoencoderKLWan
  cfg = vae_config("wan2.1")
  torch.manual_seed(0)
  ref = AutoencoderKLWan().eval()  # the released architecture, random weights
  graphdef, state = nnx.split(nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0))))
  assert sum(x.size for x in jax.tree.leaves(state)) == 126_892_531  # spec/wan.md B.1
  nnx.replace_by_pure_dict(state, convert_vae_state_dict(ref.state_dict(), cfg))
  _, enc, dec = _jit_methods(nnx.merge(graphdef, state))
  x = torch.rand(1, 3, 5, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
  with torch.no_grad():
    mu = ref.encode(x).latent_dist.mean
    video_ref = _cl(ref.decode(mu).sample)
  del ref
  z = enc(state, jnp.asarray(_cl(x)))
  assert z.shape == (1, 2, 1, 1, 16) and bool(jnp.all(jnp.isfinite(z)))
  mean, std = np.asarray(LATENTS_MEAN), np.asarray(LATENTS_STD)
  assert rel_err(z, (_cl(mu) - mean) / std) <= 1e-5
  video = dec(state, z)
  assert video.shape == (1, 5, 8, 8, 3) and bool(jnp.all(jnp.isfinite(video)))
  assert np.mean(np.abs(video_ref) < 1) > 0.5, np.mean(np.abs(video_ref) < 1)  # not dominated by clipping
  assert rel_err(video, video_ref) <= 1e-5, rel_err(video, video_ref)


def test_batch_sharded_decode_equals_single_device(tiny):
  # Batch 2 over a 2-device 'data' mesh: the same shape as the 5-frame parity case, so the
  # single-device executable is reused and only the sharded one compiles.
  mesh = parallel.make_mesh({"data": 2}, devices=jax.devices()[:2])
  z = jax.random.normal(jax.random.key(2), (2, 2, 2, 3, 16))
  single = tiny["dec"](tiny["state"], z)
  sharded_z = jax.device_put(z, NamedSharding(mesh, P("data")))
  with jax.set_mesh(mesh):
    out = tiny["dec"](tiny["state"], sharded_z)
  assert out.sharding.spec[0] == "data"
  # measured ~1e-6: a per-device batch of 1 changes XLA's conv blocking (summation order).
  assert rel_err(out, single) <= 1e-5


def test_decode_memory_is_bounded_by_a_chunk(tiny):
  # With the lax.scan over latent frames, XLA's scratch memory must not grow with the clip length
  # beyond output-sized buffers (a whole-clip decoder would add ~activations per frame).
  def temp_and_out(frames):
    z = jax.ShapeDtypeStruct((1, frames, 4, 4, 16), jnp.float32)
    mem = tiny["dec"].lower(tiny["state"], z).compile().memory_analysis()
    return mem.temp_size_in_bytes, mem.output_size_in_bytes
  t3, o3 = temp_and_out(3)
  t9, o9 = temp_and_out(9)
  assert t9 - t3 <= 2 * (o9 - o3), (t3, t9, o3, o9)
