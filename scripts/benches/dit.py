"""Wan DiT benchmarks: one i2v block (`dit-block`) or the whole model (`dit`), forward and forward+backward.

  python scripts/bench.py dit-block --size tiny      # CPU: tiny i2v, diffusers reference in the same run
  python scripts/bench.py dit-block --size eva       # GPU: i2v-14B block at 13x60x80 latents (15,600 tokens)
  python scripts/bench.py dit --size eva             # GPU: the 40-layer i2v-14B forward at 15,600 tokens
  python scripts/bench.py dit-block --size eva --attention=splash:1024,1024,512   # TPU: splash, other blocks

Sizes: tiny (tiny-i2v, latent 5x8x12), eva (i2v-14B dims, latent 13x60x80), wan (21x60x104, 32,760 tokens),
custom (--frames/--height/--width in pixels). On GPU the default is bf16 with cuDNN attention, on TPU bf16 with
splash attention; on CPU float32 with XLA attention (--attention picks another backend). The diffusers reference
runs when it can (always for tiny; for the large sizes only with CUDA torch).
Timings: 'jax' (forward) and 'jax_fwd_bwd' hold the median and min of synchronised calls, 'pipelined_s' (calls
queued back to back) and 'looped' (the call repeated inside one jitted fori_loop: no dispatch at all; forward
+ backward only for one block, whose gradients fit twice). Fusion switches (--no-fuse) and --matmul-dtype fp8
come from the command line; the fp8 run also reports its error against the default matmuls.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eva_jax.models.wan import WanModel, attention as wan_attention, wan_config
from eva_jax.models.wan.rope import rope_tables
from eva_jax.utils.timing import device_peak_memory_mb, profile_kernels, time_fn, time_looped, time_torch

LATENTS = {"tiny": (5, 8, 12), "eva": (13, 60, 80), "wan": (21, 60, 104)}
N_IMG, N_TEXT = 257, 512


def latent_shape(size: str, args) -> tuple[int, int, int]:
  if size == "custom":
    return ((args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
  return LATENTS[size]


def block_flops(cfg, tokens: int) -> float:
  """Forward FLOPs of one block (spec wan.md E): projections, cross-attn k/v on 769 tokens, FFN, attention."""
  d, f, ctx = cfg.dim, cfg.ffn_dim, N_TEXT + (N_IMG if cfg.is_i2v else 0)
  return (8 * tokens * d * d + 4 * tokens * d * d + 4 * ctx * d * d + 4 * tokens * d * f
          + 4 * tokens * tokens * d + 4 * tokens * ctx * d)


def fusion_overrides(args) -> dict:
  """WanConfig switches from the bench flags: --no-fuse (q/k/v and RoPE unfused), --matmul-dtype."""
  out = {}
  if getattr(args, "no_fuse", False):
    out.update(fuse_qkv=False, fused_rope=False)
  if getattr(args, "matmul_dtype", None):
    out["matmul_dtype"] = args.matmul_dtype
  return out


def _config(size, args, num_layers, **overrides):
  on_accel = jax.devices()[0].platform in ("gpu", "tpu")
  dtype = args.dtype or ("bfloat16" if on_accel else "float32")
  base = "tiny-i2v" if size == "tiny" else "i2v-14b"
  remat = getattr(args, "remat", None) or ("full" if num_layers > 1 else "none")
  # --attention; by default the accelerator's flash kernel ('auto': cudnn on GPU, splash on TPU), xla on CPU
  attention = getattr(args, "attention", None) or ("auto" if on_accel else "xla")
  return wan_config(base, num_layers=num_layers, dtype=dtype, param_dtype=dtype, attention=attention, remat=remat,
                    **{**fusion_overrides(args), **overrides})


def _splash_check(cfg, tokens: int) -> dict:
  """Splash at the block's self-attention shape in the compute dtype against 'chunked' in float32: relative
  errors of the output and of the q, k, v gradients (the first numerics check on a TPU)."""
  from eva_jax.models.wan.attention import attention
  keys = jax.random.split(jax.random.key(1), 4)
  q, k, v, g = (jax.random.normal(kk, (1, tokens, cfg.num_heads, cfg.head_dim), jnp.float32) for kk in keys)

  def out_and_grads(backend, dtype):
    def f(q, k, v, g):
      out, vjp = jax.vjp(lambda *x: attention(*x, backend=backend).astype(jnp.float32),
                         *(x.astype(dtype) for x in (q, k, v)))
      return (out, *vjp(g))
    return [np.asarray(x, np.float32) for x in jax.jit(f)(q, k, v, g)]
  got = out_and_grads(cfg.attention, cfg.compute_dtype)
  ref = out_and_grads("chunked", jnp.float32)
  err = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
  return dict(zip(("out_rel_err", "dq_rel_err", "dk_rel_err", "dv_rel_err"), map(err, got, ref)))


def _torch_reference(size, args, full):
  """The diffusers model with the same random weights, where it can run: always for tiny (CPU float32);
  for the large sizes one block (dit-block) when CUDA torch is present. None otherwise."""
  if getattr(args, "no_reference", False):
    return None
  import torch
  from tests.test_wan_dit import diffusers_model
  if size == "tiny":
    return diffusers_model("tiny-i2v")
  if full or not torch.cuda.is_available():
    return None
  return diffusers_model("i2v-14b", num_layers=1)  # built in float32 on the CPU, converted, then moved


def run(size: str, args) -> dict:
  what = getattr(args, "what", "block") or "block"
  iters = getattr(args, "iters", 3)
  grid_lat = latent_shape(size, args)
  f, h, w = grid_lat
  tokens = f * (h // 2) * (w // 2)
  full = what == "model"
  cfg = _config(size, args, num_layers=(2 if size == "tiny" else 40) if full else 1)
  ref_model = _torch_reference(size, args, full)

  t0 = time.perf_counter()
  model = nnx.jit(lambda: WanModel(cfg, rngs=nnx.Rngs(0)))()
  if ref_model is not None:
    from convert.wan_dit import convert_dit_state_dict
    sd = {k: v for k, v in ref_model.state_dict().items()}
    if not full:  # keep only block 0 of the 2-layer tiny reference
      sd = {k: v for k, v in sd.items() if not k.startswith("blocks.1.")}
    nnx.update(model, nnx.State(convert_dit_state_dict(sd, cfg, dtype=cfg.param_dtype)))
  init_s = time.perf_counter() - t0
  dt = cfg.compute_dtype
  key = jax.random.key(0)
  k1, k2, k3, k4 = jax.random.split(key, 4)
  from eva_jax.models.wan.attention import current_platform, resolve_backend
  result = dict(what=what, tokens=tokens, latent=grid_lat, dtype=cfg.dtype,
                attention=resolve_backend(cfg.attention, current_platform()),
                layers=cfg.num_layers, remat=cfg.remat, init_s=init_s,
                cudnn_kv_multiple=cfg.cudnn_kv_multiple or wan_attention.CUDNN_KV_MULTIPLE,
                fuse_qkv=cfg.fuse_qkv, fused_rope=cfg.fused_rope, matmul_dtype=cfg.matmul_dtype)

  if result["attention"].startswith("splash"):
    result["splash_check"] = _splash_check(cfg, tokens)
  if full:
    x = jax.random.normal(k1, (1, f, h, w, 16), jnp.float32)
    t = jnp.array([700.0])
    ctx = jax.random.normal(k2, (1, N_TEXT, cfg.text_dim), dt)
    clip = jax.random.normal(k3, (1, N_IMG, cfg.image_dim), dt)
    apply = lambda m, x, t, c, i: m(x, t, c, i)
    inputs = (x, t, ctx, clip)
    flops = block_flops(cfg, tokens) * cfg.num_layers
  else:
    x = jax.random.normal(k1, (1, tokens, cfg.dim), jnp.float32)
    e0 = 0.1 * jax.random.normal(k2, (1, 1, 6, cfg.dim), jnp.float32)
    ctx = jax.random.normal(k3, (1, N_TEXT, cfg.dim), dt)
    img = jax.random.normal(k4, (1, N_IMG, cfg.dim), dt)
    cos, sin = rope_tables((f, h // 2, w // 2), cfg.head_dim)
    apply = lambda m, x, e0, c, i: m._run_blocks(x, e0, c, i, cos, sin)
    inputs = (x, e0, ctx, img)
    flops = block_flops(cfg, tokens)

  # Pure functions of the parameter state: jax.jit without NNX's per-call graph bookkeeping.
  graphdef, state = nnx.split(model)
  state = jax.device_put(state)  # converted reference weights arrive as host arrays: copy them once, not per call

  def fwd_pure(state, *xs):
    return apply(nnx.merge(graphdef, state), *xs)
  args_j = (state, *inputs)

  # Compiled ahead of time: the timed executables are the ones whose HLO and kernels are reported.
  t0 = time.perf_counter()
  fwd = jax.jit(fwd_pure).lower(*args_j).compile()
  jax.block_until_ready(fwd(*args_j))
  result["compile_fwd_s"] = time.perf_counter() - t0
  timing = time_fn(fwd, *args_j, warmup=1, iters=iters, pipelined=True)
  # the same call chained `calls` times inside one compiled loop (the output has the input's shape)
  looped = not getattr(args, "quick", False)  # --quick (the suite's `all` run): no extra loop compiles
  if looped:
    chain = lambda h, state, *rest: fwd_pure(state, h, *rest).astype(h.dtype)
    timing["looped"] = time_looped(chain, inputs[0], state, *inputs[1:], calls=3 if full else 10,
                                   iters=2 if full else 3)
    result["tflops_fwd_looped"] = flops / timing["looped"]["median_s"] / 1e12
  result["jax"] = timing
  result["tflops_fwd"] = flops / timing["median_s"] / 1e12
  if cfg.matmul_dtype != "default":  # quality next to speed: the same weights and inputs, default matmuls
    ref_cfg = dataclasses.replace(cfg, matmul_dtype="default")
    ref_gd = nnx.graphdef(nnx.eval_shape(lambda: WanModel(ref_cfg, rngs=nnx.Rngs(0))))
    ref_out = jax.jit(lambda st, *xs: apply(nnx.merge(ref_gd, st), *xs))(*args_j)
    out = fwd(*args_j)
    result["matmul_quality"] = _quality(out, ref_out, inputs[0] if not full else None)

  # forward + backward: gradients for every weight and for x (what training needs at most).
  def loss_fn(state, *rest):
    return jnp.mean(jnp.square(fwd_pure(state, *rest).astype(jnp.float32)))
  if cfg.matmul_dtype != "default":
    return result  # FP8 is an inference mode: no backward timing
  t0 = time.perf_counter()
  try:
    grad = jax.jit(jax.grad(loss_fn, argnums=(0, 1))).lower(*args_j).compile()
    jax.block_until_ready(grad(*args_j))
  except Exception as e:  # e.g. out of memory under a remat policy that saves more: keep the forward figures
    result["fwd_bwd_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    result["device_peak_mb"] = device_peak_memory_mb()
    return result
  result["compile_fwd_bwd_s"] = time.perf_counter() - t0
  # the 40-layer gradients are 32 GB: no second set in flight for the pipelined figure
  result["jax_fwd_bwd"] = time_fn(grad, *args_j, warmup=1, iters=iters, pipelined=not full)
  result["tflops_fwd_bwd"] = 3 * flops / result["jax_fwd_bwd"]["median_s"] / 1e12
  if looped and not full:  # the gradients ride in the carry (replaced each call), the input moves by its gradient
    def grad_chain(carry, state, *rest):
      h, _ = carry
      g_state, g_x = jax.grad(loss_fn, argnums=(0, 1))(state, h, *rest)
      return h + g_x.astype(h.dtype), g_state
    carry0 = (inputs[0], jax.tree.map(jnp.zeros_like, state))
    result["jax_fwd_bwd"]["looped"] = time_looped(grad_chain, carry0, state, *inputs[1:], calls=10, iters=3)
    result["tflops_fwd_bwd_looped"] = 3 * flops / result["jax_fwd_bwd"]["looped"]["median_s"] / 1e12
    del carry0
  result["device_peak_mb"] = device_peak_memory_mb()
  if getattr(args, "profile", False):
    result["profile_fwd"] = profile_kernels(fwd, *args_j)
    result["profile_fwd_bwd"] = profile_kernels(grad, *args_j)
    if getattr(args, "out", None):  # the optimised HLO maps the profile's op names to fusions
      import gzip
      import pathlib
      out = pathlib.Path(args.out)
      out.mkdir(parents=True, exist_ok=True)
      for tag, compiled in (("fwd", fwd), ("fwd_bwd", grad)):
        with gzip.open(out / f"{what}_{size}_{tag}.hlo.txt.gz", "wt") as fh:
          fh.write(compiled.as_text())

  if ref_model is not None:
    result.update(_compare_reference(ref_model, fwd, args_j, full, grid_lat, cfg, iters))
  return result


def _quality(out, ref, x=None) -> dict:
  """Relative error and PSNR (peak = the reference's max |value|) of out vs ref; for a block also of its
  update (output - input), which is what the matmuls change (the float32 residual passes through)."""
  o, r = jnp.asarray(out, jnp.float32), jnp.asarray(ref, jnp.float32)
  def stats(o, r):
    mse = jnp.mean(jnp.square(o - r))
    peak = jnp.max(jnp.abs(r))
    return {"rel_err": float(jnp.linalg.norm(o - r) / jnp.maximum(jnp.linalg.norm(r), 1e-30)),
            "psnr_db": float(10 * jnp.log10(jnp.square(peak) / jnp.maximum(mse, 1e-30)))}
  res = {"output": stats(o, r)}
  if x is not None:
    xf = jnp.asarray(x, jnp.float32)
    res["update"] = stats(o - xf, r - xf)
  return res


def _compare_reference(ref_model, fwd, args_j, full, grid_lat, cfg, iters) -> dict:
  """Same weights and inputs through diffusers: its timing (forward, and forward+backward for one block)
  and the relative error of our output. Float32 on the CPU; bf16 on CUDA when our model runs bf16."""
  import torch
  from tests.utils import rel_err
  f, h, w = grid_lat
  cuda = torch.cuda.is_available() and jax.devices()[0].platform == "gpu"
  dev = "cuda" if cuda else "cpu"
  tdtype = torch.bfloat16 if cuda and cfg.dtype == "bfloat16" else torch.float32
  ref_model = ref_model.to(dev, tdtype)
  as_t = lambda a: torch.from_numpy(np.array(a, np.float32)).to(dev, tdtype)
  ours = np.asarray(fwd(*args_j), np.float32)
  out: dict = {}
  with torch.no_grad():
    if full:
      x, t, ctx, clip = args_j[1:]
      xt = np.concatenate([np.asarray(x, np.float32), np.zeros(x.shape[:-1] + (20,), np.float32)], -1)
      hidden = as_t(xt).permute(0, 4, 1, 2, 3).contiguous()
      call = lambda: ref_model(hidden, as_t(t), as_t(ctx), encoder_hidden_states_image=as_t(clip),
                               return_dict=False)[0]
      ref = call().float().permute(0, 2, 3, 4, 1).cpu().numpy()
    else:
      x, e0, ctx, img = args_j[1:]
      block = ref_model.blocks[0]
      rotary = ref_model.rope(torch.zeros(1, cfg.in_dim, f, h, w, device=dev, dtype=tdtype))
      enc = torch.cat([as_t(img), as_t(ctx)], dim=1)
      temb = as_t(e0)[:, 0]                                                  # [1, 6, D]
      xt = as_t(x)
      call = lambda: block(xt, enc, temb, rotary)
      ref = call().float().cpu().numpy()

      def fwd_bwd():
        with torch.enable_grad():
          block.zero_grad(set_to_none=True)
          xg = xt.detach().requires_grad_(True)
          block(xg, enc, temb, rotary).float().square().mean().backward()
      out["reference_fwd_bwd"] = time_torch(fwd_bwd, warmup=1, iters=iters, grad=True, pipelined=True)
      if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd()
        torch.cuda.synchronize()
        out["reference_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
  out.update({"reference": time_torch(call, warmup=1, iters=iters, pipelined=True), "rel_err": rel_err(ours, ref),
              "reference_impl": f"diffusers {'WanTransformer3DModel' if full else 'WanTransformerBlock'} "
                                f"(torch {dev} {str(tdtype).removeprefix('torch.')}, eager)"})
  return out
