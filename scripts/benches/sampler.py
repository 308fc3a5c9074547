"""Sampler benchmark: seconds per generated video with EVA's settings (40 UniPC steps, both guidances).

  python scripts/bench.py sampler --size tiny     # CPU smoke: tiny random models, 9x32x48
  python scripts/bench.py sampler --size eva      # GPU: i2v-14B random weights, 49x480x640, bf16, cuDNN

Each step runs the three guidance passes (conditional, no-text, no-history) as one batch-3 DiT
forward, then a UniPC update; the video is then VAE-decoded. Timed: the denoising loop (the compiled
step in a Python loop, as scripts/infer.py runs it) and the decode, after one warm-up generation that
compiles everything. The goal on one H200 is <= 110 s per video for the eva size (the PyTorch eager
diffusers blocks cost ~140 s for the same 120 forwards).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx

from eva_jax.diffusion.sampler import Conditioning, I2VSampler, SamplerConfig
from eva_jax.models.vae import WanVAE, vae_config
from eva_jax.models.wan import WanModel, attention as wan_attention, wan_config
from eva_jax.utils.timing import device_peak_memory_mb

SIZES = {"tiny": (9, 32, 48), "eva": (49, 480, 640), "wan": (81, 480, 832)}
N_IMG, N_TEXT = 257, 512


def _video_size(size: str, args) -> tuple[int, int, int]:
  if size == "custom":
    return args.frames, args.height, args.width
  return SIZES[size]


def run(size: str, args) -> dict:
  on_gpu = jax.devices()[0].platform == "gpu"
  dtype = getattr(args, "dtype", None) or ("bfloat16" if on_gpu else "float32")
  frames, height, width = _video_size(size, args)
  steps = int(getattr(args, "steps", 0) or 40)
  iters = max(1, min(int(getattr(args, "iters", 1) or 1), 3))
  tiny = size == "tiny"
  cfg = SamplerConfig(num_frames=frames, height=height, width=width, num_steps=steps)

  t0 = time.perf_counter()
  dit_cfg = wan_config("tiny-i2v" if tiny else "i2v-14b", dtype=dtype, param_dtype=dtype,
                       attention="cudnn" if on_gpu else "xla")
  dit = nnx.jit(lambda: WanModel(dit_cfg, rngs=nnx.Rngs(0)))()
  vae = nnx.jit(lambda: WanVAE(vae_config("tiny" if tiny else "wan2.1"), rngs=nnx.Rngs(1)))()
  sampler = I2VSampler(dit, vae, None, cfg)
  init_s = time.perf_counter() - t0

  # Conditioning as the encoders would produce it (their cost is one call per video, benched elsewhere).
  k = jax.random.split(jax.random.key(0), 4)
  f, h, w = 1, height // 8, width // 8
  cdt = jnp.dtype(dtype)
  cond = Conditioning(clean=jax.random.normal(k[0], (1, f, h, w, 16)),
                      context=jax.random.normal(k[1], (1, N_TEXT, dit_cfg.text_dim), cdt),
                      neg_context=jax.random.normal(k[2], (1, N_TEXT, dit_cfg.text_dim), cdt),
                      clip_fea=jax.random.normal(k[3], (1, N_IMG, dit_cfg.image_dim), cdt))

  def generate(seed):
    t_a = time.perf_counter()
    lat = jax.block_until_ready(sampler.sample(cond, jax.random.key(seed), show_progress=False))
    t_b = time.perf_counter()
    jax.block_until_ready(sampler.decode(lat))
    return t_b - t_a, time.perf_counter() - t_b

  t0 = time.perf_counter()
  generate(0)  # compiles the step and the decoder
  warm_s = time.perf_counter() - t0
  runs = [generate(i + 1) for i in range(iters)]
  loop_s = sorted(r[0] for r in runs)[len(runs) // 2]
  decode_s = sorted(r[1] for r in runs)[len(runs) // 2]
  total = loop_s + decode_s
  return dict(
      video=f"{frames}x{height}x{width}", steps=steps, passes_per_step=3, dtype=dtype, dit=dit_cfg.num_layers,
      cudnn_kv_multiple=wan_attention.CUDNN_KV_MULTIPLE,
      init_s=init_s, first_video_s=warm_s, loop_s=loop_s, per_step_s=loop_s / steps, decode_s=decode_s,
      # what a 40-step video costs at this per-step time (the device check runs only a few steps)
      video_40_steps_s=40 * loop_s / steps + decode_s,
      jax={"median_s": total, "times_s": [sum(r) for r in runs]}, device_peak_mb=device_peak_memory_mb(),
      note="s/video = loop + decode; goal on one H200 at eva size: <= 110 s (PyTorch eager ~140 s)")
