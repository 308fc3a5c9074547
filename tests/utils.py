"""Helpers shared by the tests."""

import numpy as np


def rel_err(out, ref) -> float:
  """‖out − ref‖ / ‖ref‖ in float64 (the parity metric of DESIGN.md)."""
  out = np.asarray(out, dtype=np.float64)
  ref = np.asarray(ref, dtype=np.float64)
  assert out.shape == ref.shape, f"shape {out.shape} != reference {ref.shape}"
  return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def to_numpy(t):
  """torch tensor or array -> float numpy array."""
  if hasattr(t, "detach"):
    t = t.detach().float().cpu().numpy()
  return np.asarray(t)


def diffusers_vae(cfg, seed: int = 0):
  """A diffusers AutoencoderKLWan with the architecture of an eva_jax VAEConfig, random weights."""
  import torch
  from diffusers import AutoencoderKLWan
  torch.manual_seed(seed)
  return AutoencoderKLWan(base_dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
                          num_res_blocks=cfg.num_res_blocks, attn_scales=list(cfg.attn_scales),
                          temperal_downsample=list(cfg.temporal_downsample))
