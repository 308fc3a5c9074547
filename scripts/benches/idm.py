"""IDM benchmark: frames/s of the reward's video -> joint trajectory pass, JAX vs the PyTorch reference.

  python scripts/bench.py idm --size tiny     # tiny IDM (128 px), 9-frame 96x128 video, CPU-friendly
  python scripts/bench.py idm --size eva      # ResNet-50 IDM at 512x512, a 49-frame 480x640 video
  python scripts/bench.py idm --size custom --frames 5 --height 480 --width 640   # real model, shorter video

Both sides compute the same thing with the same random weights (the reference is the plain-torch IDM of
tests/test_idm_model.py, loaded through convert.idm): resize every frame to the IDM size once
(bilinear, antialias), ImageNet-normalise, build the clamped windows [i-1, i, i+1] and run the IDM on
all of them. JAX: `actions_from_video` (one jitted program). Frames/s = video frames / median seconds
(compilation excluded). EVA_BENCH_IDM_CHUNK bounds the windows per IDM call on both sides (default:
all at once); EVA_BENCH_BATCH sets the number of videos (default 1).
"""

from __future__ import annotations

import os

import numpy as np

SIZES = {
    "tiny": dict(preset="tiny", frames=9, height=96, width=128),
    "eva": dict(preset="resnet50", frames=49, height=480, width=640),
    "wan": dict(preset="resnet50", frames=49, height=480, width=640),
    "custom": dict(preset="resnet50", frames=49, height=480, width=640),
}


def _torch_trajectory(ref, video, size, chunk, autocast_dtype):
  """Reference pass: [B, T, H, W, 3] float tensor on the model's device -> [B, T, 14]."""
  import torch
  import torch.nn.functional as F
  from eva_jax.models.idm import IMAGENET_MEAN, IMAGENET_STD
  b, t = video.shape[:2]
  dev = video.device
  x = F.interpolate(video.permute(0, 1, 4, 2, 3).flatten(0, 1), size=size, mode="bilinear",
                    align_corners=False, antialias=True)
  mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)
  std = torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1)
  x = ((x - mean) / std).unflatten(0, (b, t))                       # [B, T, 3, S, S]
  idx = torch.clamp(torch.arange(t, device=dev)[:, None] + torch.tensor([-1, 0, 1], device=dev), 0, t - 1)
  windows = x[:, idx].flatten(0, 1)                                  # [B*T, 3, 3, S, S]
  outs = []
  with torch.autocast(dev.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
    for s in range(0, len(windows), chunk or len(windows)):
      outs.append(ref(windows[s:s + (chunk or len(windows))]).float())
  return torch.cat(outs).view(b, t, -1)


def run(size: str, args) -> dict:
  import jax
  import jax.numpy as jnp
  import torch

  from convert.idm import load_idm
  from eva_jax.models import idm as idm_lib
  from eva_jax.utils.timing import device_peak_memory_mb, peak_rss_mb, time_fn, time_torch
  from tests.test_idm_model import TorchIDM, randomize, release_checkpoint

  spec = dict(SIZES[size])
  for k in ("frames", "height", "width"):
    if getattr(args, k, None):
      spec[k] = int(getattr(args, k))
  on_accel = jax.default_backend() != "cpu"
  dtype = getattr(args, "dtype", None) or ("bfloat16" if on_accel else "float32")
  iters = int(getattr(args, "iters", 3) or 3)
  chunk = int(os.environ.get("EVA_BENCH_IDM_CHUNK", "0")) or None
  batch = int(os.environ.get("EVA_BENCH_BATCH", "1"))

  torch.manual_seed(0)
  cfg = idm_lib.idm_config(spec["preset"], dtype=jnp.dtype(dtype))
  ref = randomize(TorchIDM(blocks=cfg.blocks, width=cfg.width, mlp_dims=cfg.mlp_dims)).eval()
  idm = load_idm(release_checkpoint(ref), cfg)
  video = np.random.default_rng(0).uniform(0, 1, (batch, spec["frames"], spec["height"], spec["width"], 3))
  video = video.astype(np.float32)
  vj = jnp.asarray(video)

  fn = lambda v: idm_lib.actions_from_video(idm, v, chunk)
  t_jax = time_fn(fn, vj, warmup=1, iters=iters)
  out = np.asarray(fn(vj), np.float32)
  n_frames = batch * spec["frames"]
  result = {
      "what": f"IDM {spec['preset']} {cfg.image_size[0]}px, {batch}x{spec['frames']} frames "
              f"{spec['height']}x{spec['width']}, {dtype}",
      "jax": t_jax, "jax_frames_per_s": n_frames / t_jax["median_s"],
      "peak_rss_mb": peak_rss_mb(), "device_peak_mb": device_peak_memory_mb(),
  }
  if getattr(args, "no_reference", False):
    return result

  dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  ref = ref.to(dev)
  vt = torch.from_numpy(video).to(dev)
  autocast = torch.bfloat16 if (dtype == "bfloat16" and dev.type == "cuda") else None
  if dtype == "bfloat16" and dev.type == "cpu":
    result["note"] = "reference in float32 (no bf16 autocast on CPU)"
  t_ref = time_torch(lambda: _torch_trajectory(ref, vt, cfg.image_size, chunk, autocast), warmup=1, iters=iters)
  with torch.no_grad():
    want = _torch_trajectory(ref, vt, cfg.image_size, chunk, autocast).cpu().numpy()
  result.update({
      "reference": t_ref, "reference_frames_per_s": n_frames / t_ref["median_s"],
      "speedup": t_ref["median_s"] / t_jax["median_s"],
      "rel_err": float(np.linalg.norm(out - want) / np.linalg.norm(want)),
      "torch_device": str(dev), "torch_threads": torch.get_num_threads(),
  })
  return result
