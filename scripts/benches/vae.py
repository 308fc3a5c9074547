"""Wan 2.1 VAE benchmark: encode and decode time and peak memory, eva_jax vs diffusers AutoencoderKLWan.

  python scripts/bench.py vae --size tiny       # tiny config, 9 x 32 x 32, float32: CPU
  python scripts/bench.py vae --size eva        # real config, 49 x 480 x 640 (EVA's clips): GPU only
  python scripts/bench.py vae --size custom --frames 5 --height 64 --width 64   # real config, any size

Both models hold the same random weights (the torch model is converted with convert.wan_vae). The
reference is timed as its pipelines call it (`encode(x).latent_dist.mean`, `decode(mu).sample`, with
its own chunking), under torch.no_grad. Times exclude compilation (time_fn warms up first). Memory:
for JAX the compiled executable's footprint (arguments + outputs + scratch, from memory_analysis)
and, on GPU, the allocator's peak; for torch `torch.cuda.max_memory_allocated` per call. On GPU run
with XLA_PYTHON_CLIENT_PREALLOCATE=false so both frameworks fit side by side.
"""

from __future__ import annotations

import numpy as np

SIZES = {"tiny": ("tiny", 9, 32, 32), "eva": ("wan2.1", 49, 480, 640)}


def _compiled_mb(compiled) -> float | None:
  try:
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    return total / 2**20
  except Exception:  # not every backend reports it
    return None


def _torch_peak_mb(fn) -> float | None:
  import torch
  if not torch.cuda.is_available():
    return None
  torch.cuda.synchronize()
  torch.cuda.reset_peak_memory_stats()
  with torch.no_grad():
    fn()
  torch.cuda.synchronize()
  return torch.cuda.max_memory_allocated() / 2**20


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def run(size: str, args) -> dict:
  import jax
  import jax.numpy as jnp
  import torch
  from diffusers import AutoencoderKLWan
  from flax import nnx

  from convert.wan_vae import convert_vae_state_dict
  from eva_jax.models.vae import WanVAE, vae_config
  from eva_jax.utils.timing import device_peak_memory_mb, time_fn, time_torch

  on_gpu = jax.default_backend() == "gpu"
  if size == "custom":
    name, frames, height, width = "wan2.1", args.frames or 5, args.height or 64, args.width or 64
  elif size in SIZES:
    name, frames, height, width = SIZES[size]
  else:
    return {"error": f"vae bench has sizes {sorted(SIZES) + ['custom']}, not {size!r}"}
  if size == "eva" and not on_gpu:
    return {"error": "vae --size eva (49x480x640, real config) needs a GPU; use --size custom for a CPU smoke run"}
  dtype_name = getattr(args, "dtype", None) or ("bfloat16" if on_gpu else "float32")
  iters = int(getattr(args, "iters", 3) or 3)
  batch = 1

  # Same random weights in both frameworks: torch init, converted.
  cfg = vae_config(name, dtype=jnp.dtype(dtype_name), param_dtype=jnp.dtype(dtype_name))
  torch.manual_seed(0)
  ref = AutoencoderKLWan(base_dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
                         num_res_blocks=cfg.num_res_blocks, attn_scales=list(cfg.attn_scales),
                         temperal_downsample=list(cfg.temporal_downsample)).eval()
  graphdef, state = nnx.split(nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, convert_vae_state_dict(ref.state_dict(), cfg))
  state = jax.device_put(state)
  tdev = "cuda" if torch.cuda.is_available() else "cpu"
  ref = ref.to(tdev, getattr(torch, dtype_name))

  rng = np.random.default_rng(0)
  video = rng.uniform(-1, 1, (batch, frames, height, width, 3)).astype(np.float32)
  x = jnp.asarray(video, cfg.dtype)
  # Compiled once (ahead of time), timed and measured from the same executables.
  encode = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x)).lower(state, x).compile()
  z = encode(state, x)
  decode = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z)).lower(state, z).compile()
  t_enc = time_fn(encode, state, x, iters=iters)
  t_dec = time_fn(decode, state, z, iters=iters)
  mem_enc, mem_dec = _compiled_mb(encode), _compiled_mb(decode)
  jax_peak = device_peak_memory_mb() if on_gpu else None
  z_jax = np.asarray(z, np.float32)
  v_jax = np.asarray(decode(state, z), np.float32)

  tx = torch.from_numpy(video).permute(0, 4, 1, 2, 3).contiguous().to(tdev, getattr(torch, dtype_name))
  mean = torch.tensor(cfg.latents_mean, device=tdev).view(1, -1, 1, 1, 1)
  std = torch.tensor(cfg.latents_std, device=tdev).view(1, -1, 1, 1, 1)
  with torch.no_grad():
    mu = ref.encode(tx).latent_dist.mean
  r_enc = time_torch(lambda: ref.encode(tx).latent_dist.mean, warmup=1, iters=iters)
  r_dec = time_torch(lambda: ref.decode(mu).sample, warmup=1, iters=iters)
  ref_mem_enc = _torch_peak_mb(lambda: ref.encode(tx).latent_dist.mean)
  ref_mem_dec = _torch_peak_mb(lambda: ref.decode(mu).sample)
  with torch.no_grad():
    z_ref = ((mu.float() - mean) / std).permute(0, 2, 3, 4, 1).cpu().numpy()
    v_ref = ref.decode(mu).sample.float().permute(0, 2, 3, 4, 1).cpu().numpy()

  return {
      "jax": {"median_s": t_enc["median_s"] + t_dec["median_s"], "encode": t_enc, "decode": t_dec},
      "reference": {"median_s": r_enc["median_s"] + r_dec["median_s"], "encode": r_enc, "decode": r_dec},
      "rel_err": max(_rel(z_jax, z_ref), _rel(v_jax, v_ref)),
      "rel_err_encode": _rel(z_jax, z_ref), "rel_err_decode": _rel(v_jax, v_ref),
      "memory_mb": {"jax_encode_compiled": mem_enc, "jax_decode_compiled": mem_dec, "jax_device_peak": jax_peak,
                    "torch_encode_peak": ref_mem_enc, "torch_decode_peak": ref_mem_dec},
      "note": f"{name} VAE, {batch}x{frames}x{height}x{width}, {dtype_name}, encode+decode (each listed)",
  }
