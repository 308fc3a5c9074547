"""GRPO benchmark: seconds per iteration (tiny, CPU) and a 14B-shaped rollout/update step (GPU).

  python scripts/bench.py grpo-step --size tiny      # tiny config end to end, seconds per iteration
  python scripts/bench.py grpo-step --size eva       # one SDE rollout step and one trained timestep of
                                                     # the update at EVA's shape (49×480×640, LoRA r32)
  python scripts/bench.py grpo-step --size custom    # the 'eva' code path on a tiny DiT (CPU smoke)

`eva` builds the i2v-14B DiT with random bf16 weights (`--layers` is not a flag of bench.py; set
EVA_BENCH_LAYERS to time fewer blocks) and times (a) policy forward + SDE step, as in each of the 40
rollout steps, and (b) one timestep of the update: policy forward+backward w.r.t. the LoRA factors
plus the LoRA-off reference forward. The PyTorch estimate comes from spec/performance.md (EVA's
block at 15,600 tokens on one H200, float32 weights under bf16 autocast as EVA trains: 34.6 ms
forward, 117.7 ms forward+backward, per block).
"""

from __future__ import annotations

import os
import tempfile
import time

# spec/performance.md, EVA block (fp32 weights, bf16 autocast), 15,600 tokens, H200.
TORCH_BLOCK_FWD_S = 0.0346
TORCH_BLOCK_FWD_BWD_S = 0.1177


def _tiny(args) -> dict:
  import json
  import pathlib

  from flax import nnx

  from configs import grpo as grpo_config
  from eva_jax.models.idm import IDM, idm_config
  from eva_jax.training import grpo
  from eva_jax.training.checkpoints import Checkpointer

  # the first iteration compiles; --quick (the suite's smoke run) times one more, else at least two
  timed = int(getattr(args, "iters", 3) or 3)
  iters = (max(timed, 1) if getattr(args, "quick", False) else max(timed, 2)) + 1
  with tempfile.TemporaryDirectory() as tmp:
    idm = IDM(idm_config("tiny"), rngs=nnx.Rngs(0))
    idm.eval()
    ck = Checkpointer(pathlib.Path(tmp) / "idm", async_save=False)
    ck.save(1, {"model_state_dict": nnx.to_pure_dict(nnx.state(idm))})
    ck.close()
    c = grpo_config.get_config("tiny")
    c.reward.idm_checkpoint = str(pathlib.Path(tmp) / "idm")
    c.num_iterations = iters
    c.sample.eval_every = 0
    c.log.update(dict(checkpoint_every=iters, plot_every=0, video_every=0))
    t0 = time.perf_counter()
    grpo.train_and_evaluate(c, pathlib.Path(tmp) / "run")
    total = time.perf_counter() - t0
    recs = [json.loads(x) for x in (pathlib.Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
  steady = [r["time_rollout"] + r["time_update"] for r in recs[1:]]
  steady.sort()
  return {"jax": {"median_s": steady[len(steady) // 2], "times_s": steady},
          "first_iteration_s": recs[0]["time_rollout"] + recs[0]["time_update"],
          "total_s": total,
          "note": "seconds per GRPO iteration, tiny config (8 rollouts, 4 steps), compile excluded; no torch reference"}


def _eva(args, preset: str = "i2v-14b", latent=(13, 60, 80), text_len: int = 512) -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from eva_jax.diffusion.sde import sde_step_with_logprob
  from eva_jax.models.wan import WanModel, wan_config
  from eva_jax.models.lora import LoRAParam  # noqa: I001
  from eva_jax.rl import grpo as grpo_lib
  from eva_jax.utils.timing import device_peak_memory_mb, time_fn

  on_gpu = jax.default_backend() == "gpu"
  layers = int(os.environ.get("EVA_BENCH_LAYERS", "40" if preset == "i2v-14b" else "2"))
  dtype = "bfloat16" if on_gpu else "float32"
  cfg = wan_config(preset, num_layers=layers, dtype=dtype, param_dtype=dtype,
                   attention="cudnn" if on_gpu else "xla", remat="full", lora_rank=32, lora_alpha=32.0)

  @jax.jit
  def init():
    _, lora, base = nnx.split(WanModel(cfg, rngs=nnx.Rngs(0)), LoRAParam, ...)
    return lora, base
  lora, base = init()
  gdef = nnx.split(nnx.eval_shape(lambda: WanModel(cfg, rngs=nnx.Rngs(0))), LoRAParam, ...)[0]

  b, (f, h, w) = 1, latent
  k = jax.random.split(jax.random.key(1), 4)
  x = jax.random.normal(k[0], (b, f, h, w, 16), jnp.float32)
  ctx = jax.random.normal(k[1], (b, text_len, cfg.text_dim), cfg.compute_dtype)
  clip = jax.random.normal(k[2], (b, 257, cfg.image_dim), cfg.compute_dtype)
  tv = grpo_lib.frame_timesteps(jnp.float32(500.0), b, f, 71.0)

  @jax.jit  # one trace level for all variables (nnx.scan checks), also under jax.grad
  def policy(lora_s, base_s, xx):
    return nnx.merge(gdef, lora_s, base_s)(xx, tv, ctx, clip)

  @jax.jit
  def rollout_step(lora_s, base_s, xx, key):
    v = policy(lora_s, base_s, xx)
    return sde_step_with_logprob(xx, v, 0.5, 0.48, key)[:2]

  def loss(lora_s, base_s, xx, prev, old):
    v = policy(lora_s, base_s, xx)
    _, lp, mean, std = sde_step_with_logprob(xx, v, 0.5, 0.48, None, prev_sample=prev)
    v_ref = jax.lax.stop_gradient(policy(grpo_lib.zeros_like_tree(lora_s), base_s, xx))
    _, _, mean_ref, _ = sde_step_with_logprob(xx, v_ref, 0.5, 0.48, None, prev_sample=prev)
    pg, _ = grpo_lib.ppo_clip_loss(lp, old, jnp.ones((b,)), 1e-5)
    return pg + 0.004 * grpo_lib.mean_kl(mean, mean_ref, std)

  update_step = jax.jit(jax.grad(loss))
  prev, old = rollout_step(lora, base, x, k[3])
  t_roll = time_fn(rollout_step, lora, base, x, k[3], warmup=1, iters=args.iters)
  t_upd = time_fn(update_step, lora, base, x, prev, old, warmup=1, iters=args.iters)
  out = {"jax": t_upd, "rollout_step": t_roll, "peak_memory_mb": device_peak_memory_mb(),
         "per_iteration_estimate_s": {"jax": 40 * t_roll["median_s"] + 4 * 39 * t_upd["median_s"]},
         "note": f"{preset} x{layers} layers {dtype}, latent {latent}, batch 1"}
  if preset == "i2v-14b":  # the PyTorch numbers are per 14B block (spec/performance.md, H200)
    torch_roll = TORCH_BLOCK_FWD_S * layers
    torch_upd = (TORCH_BLOCK_FWD_BWD_S + TORCH_BLOCK_FWD_S) * layers
    out["reference"] = {"median_s": torch_upd, "estimated": True}
    out["reference_rollout_step_s"] = torch_roll
    out["per_iteration_estimate_s"]["torch"] = 40 * torch_roll + 4 * 39 * torch_upd
    out["note"] += "; torch estimated from spec/performance.md (EVA block, H200): compare on an H200"
  return out


def run(size: str, args) -> dict:
  if size == "tiny":
    return _tiny(args)
  if size == "eva":
    return _eva(args)
  if size == "custom":  # CPU smoke of the 'eva' code path: tiny DiT, small latent
    return _eva(args, preset="tiny-i2v", latent=(3, 8, 8), text_len=8)
  raise ValueError(f"grpo bench: size {size!r} not supported; use 'tiny', 'eva' or 'custom' (CPU smoke)")
