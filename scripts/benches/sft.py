"""SFT benchmark: the jitted train step (loss + grads + AdamW update) on synthetic cached inputs.

  python scripts/bench.py sft-step --size tiny     # tiny-i2v, 8 x [3, 4, 4] latents; step time, tokens/s
  python scripts/bench.py sft-step --size eva      # i2v-14B shape: 49 frames 480x640 -> 13x60x80 latents,
                                                   # batch 1, bf16 compute over float32 master weights
  python scripts/bench.py sft-step --size custom   # the 'eva' code path on a tiny DiT (CPU smoke)

'eva' times EVA_BENCH_LAYERS blocks (default 2: float32 master weights + Adam for all 40 blocks
need ~262 GB, i.e. several GPUs with FSDP) under each remat policy in EVA_BENCH_REMAT (default
'full,dots,none'), and reports per-block seconds and the compiled program's memory (arguments +
temporaries, from XLA's memory analysis) for each. The PyTorch figure is spec/performance.md's
diffusers block forward+backward at 15,600 tokens on one H200 (94.2 ms), and EVA's own block
under bf16 autocast with float32 weights, as EVA trains (117.7 ms).
"""

from __future__ import annotations

import os

TORCH_BLOCK_FWD_BWD_S = 0.0942       # diffusers WanTransformerBlock, bf16, H200, 15,600 tokens
TORCH_EVA_BLOCK_FWD_BWD_S = 0.1177   # EVA's block, fp32 weights under bf16 autocast


def _step(preset: str, layers: int | None, dtype: str, remat: str, attention: str, batch: int,
          latent: tuple[int, int, int], text_len: int, iters: int) -> dict:
  import jax
  import jax.numpy as jnp
  import ml_collections
  import numpy as np
  from flax import nnx

  from eva_jax import parallel
  from eva_jax.models.wan import WanModel, wan_config
  from eva_jax.training import sft
  from eva_jax.utils.timing import time_fn

  over = dict(dtype=dtype, param_dtype="float32", remat=remat, attention=attention)
  if layers:
    over["num_layers"] = layers
  cfg = wan_config(preset, **over)
  mesh = parallel.make_mesh({"data": 1, "fsdp": -1})
  optim = ml_collections.ConfigDict(dict(learning_rate=1e-5, warmup_steps=0, schedule="constant"))
  trainer = sft.SFTTrainer(lambda: WanModel(cfg, rngs=nnx.Rngs(0)), optim, {}, mesh)
  state = trainer.init_state(0)
  f, h, w = latent
  rng = np.random.default_rng(0)
  batch_np = {"latents": rng.standard_normal((batch, f, h, w, 16), np.float32),
              "prompt_embeds": rng.standard_normal((batch, text_len, cfg.text_dim), np.float32),
              "clip_fea": rng.standard_normal((batch, 257, cfg.image_dim), np.float32)}
  gb = trainer.global_batch(batch_np)
  holder = {"state": state}

  with jax.set_mesh(mesh):
    # One compile for the timing and the memory figures: the sharded, donating step, ahead of time.
    step = trainer.compile_train_step(state, gb)

    def run():
      holder["state"], m = step(holder["state"], gb)
      return m["loss"]

    t = time_fn(run, warmup=1, iters=iters)
    mem = step.memory_analysis()
  tokens = batch * f * (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
  out = {"jax": t, "tokens_per_step": tokens, "tokens_per_s": tokens / t["median_s"],
         "layers": cfg.num_layers, "remat": remat, "dtype": dtype,
         "loss": float(jax.device_get(run()))}
  if mem is not None:
    gib = 1024 ** 3
    out["memory_gib"] = {"arguments": mem.argument_size_in_bytes / gib, "temporaries": mem.temp_size_in_bytes / gib,
                         "outputs": mem.output_size_in_bytes / gib, "aliased": mem.alias_size_in_bytes / gib}
  return out


def run(size: str, args) -> dict:
  import jax
  iters = int(getattr(args, "iters", 3) or 3)
  on_gpu = jax.default_backend() == "gpu"
  if size == "tiny":
    r = _step("tiny-i2v", 1, "float32", "none", "xla", 8, (3, 4, 4), 16, iters)
    r["note"] = (f"tiny-i2v train step, batch 8 on {jax.device_count()} {jax.default_backend()} devices (FSDP); "
                 "no torch reference at this size")
    return r
  if size in ("eva", "custom"):
    preset = "i2v-14b" if size == "eva" else "tiny-i2v"
    layers = int(os.environ.get("EVA_BENCH_LAYERS", "2" if size == "eva" else "1"))
    latent = (13, 60, 80) if size == "eva" else (3, 4, 4)
    dtype = "bfloat16" if on_gpu else "float32"
    attention = "cudnn" if on_gpu else "xla"
    results = {}
    for remat in os.environ.get("EVA_BENCH_REMAT", "full,dots,none").split(","):
      try:
        results[remat] = _step(preset, layers, dtype, remat, attention, 1, latent, 512 if size == "eva" else 16,
                               iters)
        results[remat]["per_block_s"] = results[remat]["jax"]["median_s"] / layers
      except Exception as e:  # out of memory under one policy must not hide the others
        results[remat] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    ok = [r for r in results.values() if "jax" in r]
    best = min(ok, key=lambda r: r["jax"]["median_s"]) if ok else {"jax": None}
    ref = TORCH_BLOCK_FWD_BWD_S * layers if size == "eva" else None
    return {"jax": best["jax"], "per_remat": results,
            "reference": {"median_s": ref, "estimated": True, "source": "spec/performance.md"} if ref else None,
            "reference_eva_autocast_s": TORCH_EVA_BLOCK_FWD_BWD_S * layers if size == "eva" else None,
            "note": f"{layers} blocks of {preset}, latent {latent}, train step incl. AdamW; jax includes embeddings, "
                    "loss and optimizer, the reference is blocks only"}
  raise ValueError(f"sft bench: unknown size {size!r}")
