"""Sampler benchmark: seconds per generated video with EVA's settings (40 UniPC steps, both guidances).

  python scripts/bench.py sampler --size tiny     # CPU smoke: tiny random models, 9x32x48
  python scripts/bench.py sampler --size eva      # GPU: i2v-14B random weights, 49x480x640, bf16, cuDNN

Each step runs the three guidance passes (conditional, no-text, no-history) as one batch-3 DiT
forward, then a UniPC update; the video is then VAE-decoded. Timed: the denoising loop (the compiled
step in a Python loop, as scripts/infer.py runs it) and the decode, after one warm-up generation that
compiles everything. The goal on one H200 is <= 105 s per video for the eva size (the PyTorch eager
diffusers blocks cost ~140 s for the same 120 forwards). The cross-attention K/V are computed once per
video (SamplerConfig.cache_context_kv; --no-context-kv-cache turns it off). `--compare nocache,fp8` adds
A/B runs on the same weights, conditioning and seeds: K/V recomputed every step, and the block matmuls in
FP8 (goal <= 90 s with PSNR >= 35 dB against the main run's video), each with its latent and video error.
"""

from __future__ import annotations

import dataclasses
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


def _share_weights(dit, cfg):
  """The same DiT parameters (no copy) under another WanConfig (e.g. matmul_dtype='fp8')."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: WanModel(cfg, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, nnx.state(dit))


def _psnr(a, b, peak: float) -> float:
  mse = float(jnp.mean(jnp.square(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))
  return float(10 * jnp.log10(peak ** 2 / max(mse, 1e-30)))


def _rel(a, b) -> float:
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def _measure(sampler, cond, steps: int, iters: int) -> dict:
  """One warm-up generation (compiles), then `iters` timed ones (seeds 1..iters); keeps seed 1's output."""
  def generate(seed):
    t_a = time.perf_counter()
    lat = jax.block_until_ready(sampler.sample(cond, jax.random.key(seed), show_progress=False))
    t_b = time.perf_counter()
    video = jax.block_until_ready(sampler.decode(lat))
    return (t_b - t_a, time.perf_counter() - t_b), lat, video

  t0 = time.perf_counter()
  generate(0)  # compiles the step, the cross-attention K/V and the decoder
  warm_s = time.perf_counter() - t0
  runs, outputs = [], None
  for i in range(iters):
    r, lat, video = generate(i + 1)
    runs.append(r)
    if outputs is None:
      outputs = (lat, video)
  loop_s = sorted(r[0] for r in runs)[len(runs) // 2]
  decode_s = sorted(r[1] for r in runs)[len(runs) // 2]
  return dict(first_video_s=warm_s, loop_s=loop_s, per_step_s=loop_s / steps, decode_s=decode_s,
              # what a 40-step video costs at this per-step time (the device check runs only a few steps)
              video_40_steps_s=40 * loop_s / steps + decode_s, times_s=[sum(r) for r in runs],
              outputs=outputs)


def run(size: str, args) -> dict:
  from scripts.benches.dit import fusion_overrides
  on_gpu = jax.devices()[0].platform == "gpu"
  dtype = getattr(args, "dtype", None) or ("bfloat16" if on_gpu else "float32")
  frames, height, width = _video_size(size, args)
  # --quick (the suite's smoke run): 8 steps show the loop and its timing as well as 40
  steps = int(getattr(args, "steps", 0) or (8 if getattr(args, "quick", False) else 40))
  iters = max(1, min(int(getattr(args, "iters", 1) or 1), 3))
  tiny = size == "tiny"
  cache = not getattr(args, "no_context_kv_cache", False)
  cfg = SamplerConfig(num_frames=frames, height=height, width=width, num_steps=steps, cache_context_kv=cache)
  compare = [c.strip() for c in (getattr(args, "compare", None) or "").split(",") if c.strip()]
  unknown = sorted(set(compare) - {"nocache", "fp8"})
  if unknown:
    raise ValueError(f"sampler --compare: unknown variants {unknown}; known: nocache, fp8")

  t0 = time.perf_counter()
  dit_cfg = wan_config("tiny-i2v" if tiny else "i2v-14b", dtype=dtype, param_dtype=dtype,
                       attention="cudnn" if on_gpu else "xla", **fusion_overrides(args))
  dit = nnx.jit(lambda: WanModel(dit_cfg, rngs=nnx.Rngs(0)))()
  # The head starts at zero (velocity 0, the video independent of the blocks): random head weights, so the
  # A/B variants' videos can differ where their blocks do (random weights: a proxy for the released ones).
  head = dit.head.head.kernel
  head[...] = (jax.random.normal(jax.random.key(9), head[...].shape) / dit_cfg.dim ** 0.5).astype(head[...].dtype)
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

  main = _measure(sampler, cond, steps, iters)
  lat_ref, video_ref = main.pop("outputs")
  total = main["loop_s"] + main["decode_s"]
  result = dict(
      video=f"{frames}x{height}x{width}", steps=steps, passes_per_step=3, dtype=dtype, dit=dit_cfg.num_layers,
      cudnn_kv_multiple=dit_cfg.cudnn_kv_multiple or wan_attention.CUDNN_KV_MULTIPLE,
      cache_context_kv=cache, fuse_qkv=dit_cfg.fuse_qkv, fused_rope=dit_cfg.fused_rope,
      matmul_dtype=dit_cfg.matmul_dtype, init_s=init_s, **{k_: v for k_, v in main.items() if k_ != "times_s"},
      jax={"median_s": total, "times_s": main["times_s"]},
      note="s/video = loop + decode; goal on one H200 at eva size: <= 105 s (PyTorch eager ~140 s)")
  # A/B variants on the same weights, conditioning and seeds: K/V recomputed per step; FP8 block matmuls
  for name in compare:
    if name == "nocache":
      other = I2VSampler(dit, vae, None, dataclasses.replace(cfg, cache_context_kv=False))
    else:
      other = I2VSampler(_share_weights(dit, dataclasses.replace(dit_cfg, matmul_dtype="fp8")), vae, None, cfg)
    m = _measure(other, cond, steps, iters)
    lat, video = m.pop("outputs")
    m.pop("times_s")
    # quality against the main run (same seed): latents by relative error, the video ([-1, 1]) by PSNR
    m.update(latent_rel_err=_rel(lat, lat_ref), video_rel_err=_rel(video, video_ref),
             video_psnr_db=_psnr(video, video_ref, peak=2.0), latent_psnr_db=_psnr(lat, lat_ref,
                                                                                    peak=float(jnp.max(jnp.abs(lat_ref)))))
    result[name] = m
    del other
  result["device_peak_mb"] = device_peak_memory_mb()
  return result
