"""`python scripts/bench.py --device-check`: one prepared run that uses a short GPU slot well (< 8 min on one GPU).

In order, what the open speed goals need first, each step isolated so one failure does not hide the rest
(a step that would start after --budget-s seconds is skipped and says so):
  1. versions: jax, jaxlib, the CUDA plugin, cuDNN / CUDA / cuBLAS as loaded, the driver, the GPU
     (eva_jax.utils.versions; also in every results.json under machine.versions).
  2. dit-block at EVA's shape (15,600 tokens; forward, forward+backward, TFLOP/s; diffusers when CUDA torch
     exists; per-kernel profile and HLO), with today's defaults (fuse_qkv, fused_rope on): median, min,
     pipelined and looped (10 calls inside one fori_loop: no dispatch) figures.
  3. dit-block-unfused: the same with fuse_qkv and fused_rope off (the A/B that decides their defaults).
  4. dit-block-fp8: the forward with matmul_dtype='fp8', its error and PSNR against the bf16 block.
  5. cudnn-lengths: which unpadded key lengths cuDNN's forward and backward accept (15,600 self-attention keys,
     257/258/264/272 image keys), checked against float32; the largest safe multiple < the default is kept
     for the steps after it (--kv-multiple to force one).
  6. dit-block-kv: dit-block again at the probed multiple (15,600 keys unpadded and unmasked), no reference.
  7. dit: the 40-layer i2v-14B forward (+ looped) and forward+backward at EVA's shape.
  8. sampler: a few guided steps of the 14B sampler at EVA's shape, extrapolated to 40 steps, with the
     cross-attention K/V cached; A/B on the same weights and seeds: K/V recomputed per step, and FP8
     (its video PSNR and latent error against the bf16 run).
  9. cudnn-attention: cuDNN flash attention forward and backward with padded keys (257 CLIP keys -> 320,
     masked by key_value_seq_lengths) against the float32 XLA kernel: relative errors of output and gradients.
 10. bf16-block: one i2v-14B-wide DiT block in bf16 vs float32 on the same weights and inputs.
 11. vae at EVA's shape (49x480x640, encode/decode vs diffusers when CUDA torch exists).
On CPU it runs the same steps at tiny sizes (a dry run of the script before a GPU slot).
"""

from __future__ import annotations

import copy
import gc
import time
import traceback

import jax
import jax.numpy as jnp


def _rel(a, b) -> float:
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def check_cudnn_attention(on_gpu: bool) -> dict:
  from eva_jax.models.wan.attention import attention, cudnn_attention
  b, lq, lk, n, d = (1, 4096, 257, 40, 128) if on_gpu else (1, 64, 20, 2, 16)
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (b, lq, n, d), jnp.float32)
  k = jax.random.normal(ks[1], (b, lk, n, d), jnp.float32)
  v = jax.random.normal(ks[2], (b, lk, n, d), jnp.float32)
  impl = "cudnn" if on_gpu else "xla"  # off GPU the padding and masking logic runs on the xla kernel
  fast = lambda q, k, v: cudnn_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                                          implementation=impl).astype(jnp.float32)
  ref = lambda q, k, v: attention(q, k, v, backend="xla")
  out = {"shape": [b, lq, lk, n, d], "implementation": impl, "fwd_rel_err": _rel(jax.jit(fast)(q, k, v), ref(q, k, v))}
  loss = lambda f: (lambda q, k, v: jnp.sum(f(q, k, v) * jnp.cos(jnp.arange(d))))
  g_fast = jax.jit(jax.grad(loss(fast), argnums=(0, 1, 2)))(q, k, v)
  g_ref = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
  out.update({f"grad_{n_}_rel_err": _rel(a, r) for n_, a, r in zip("qkv", g_fast, g_ref)})
  out["ok"] = max(v_ for k_, v_ in out.items() if k_.endswith("rel_err")) < 2e-2  # bf16 kernel vs fp32
  return out


PROBE_KEY_LENGTHS = (15600, 257, 258, 264, 272, 512)


def probe_cudnn_lengths(on_gpu: bool, candidates=(1, 2, 8, 16, 32)) -> dict:
  """Runs unpadded, unmasked cuDNN attention forward + backward at each of PROBE_KEY_LENGTHS against float32 XLA.

  Returns per-length results and `kv_multiple`: the smallest candidate m such that every probed length that
  is a multiple of m passed (and at least one such length was probed), else None.
  """
  impl = "cudnn" if on_gpu else "xla"
  n, d = (4, 128) if on_gpu else (2, 16)
  lengths = PROBE_KEY_LENGTHS if on_gpu else (17, 24)  # CPU dry run: an odd length and a multiple of 8
  per_length = {}
  for lk in lengths:
    lq = lk if lk > 4096 else (1024 if on_gpu else 32)    # self-attention at 15,600; cross-attention otherwise
    ks = jax.random.split(jax.random.key(lk), 3)
    q = jax.random.normal(ks[0], (1, lq, n, d), jnp.float32)
    k, v = (jax.random.normal(kk, (1, lk, n, d), jnp.float32) for kk in ks[1:])
    fast = lambda q, k, v: jax.nn.dot_product_attention(
        q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
        implementation=impl).astype(jnp.float32)
    ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")
    loss = lambda f: (lambda q, k, v: jnp.sum(f(q, k, v) * jnp.cos(jnp.arange(d))))
    try:
      out_err = _rel(jax.jit(fast)(q, k, v), jax.jit(ref)(q, k, v))
      g_fast = jax.jit(jax.grad(loss(fast), argnums=(0, 1, 2)))(q, k, v)
      g_ref = jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(q, k, v)
      grad_err = max(_rel(a, r) for a, r in zip(g_fast, g_ref))
      per_length[lk] = {"lq": lq, "fwd_rel_err": out_err, "grad_rel_err": grad_err,
                        "ok": out_err < 2e-2 and grad_err < 2e-2}
    except Exception as e:  # noqa: BLE001 - a refused length is the answer, not a failure
      per_length[lk] = {"lq": lq, "ok": False, "error": f"{type(e).__name__}: {str(e)[:200]}"}
  chosen = None
  for m in candidates:
    probed = [lk for lk in per_length if lk % m == 0]
    if probed and all(per_length[lk]["ok"] for lk in probed):
      chosen = m
      break
  return {"implementation": impl, "heads": n, "head_dim": d, "lengths": {str(k): v for k, v in per_length.items()},
          "kv_multiple": chosen, "ok": chosen is not None}


def check_bf16_block(on_gpu: bool) -> dict:
  """One block (the model's head is zero-initialised, so the block output is what carries the signal):
  bf16 compute with cuDNN attention vs float32 compute (chunked attention) on the same float32 weights."""
  from flax import nnx
  from eva_jax.models.wan import WanModel, wan_config
  from eva_jax.models.wan.rope import rope_tables
  name, grid = ("i2v-14b", (13, 30, 40)) if on_gpu else ("tiny-i2v", (3, 4, 4))  # EVA's 15,600 tokens on GPU
  tokens = grid[0] * grid[1] * grid[2]
  outputs = {}
  for dtype in ("float32", "bfloat16"):
    cfg = wan_config(name, num_layers=1, dtype=dtype, param_dtype="float32",
                     attention="cudnn" if on_gpu and dtype == "bfloat16" else ("chunked" if on_gpu else "xla"))
    model = nnx.jit(lambda: WanModel(cfg, rngs=nnx.Rngs(0)))()
    ks = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(ks[0], (1, tokens, cfg.dim))
    e0 = 0.1 * jax.random.normal(ks[1], (1, 1, 6, cfg.dim))
    ctx = jax.random.normal(ks[2], (1, 512, cfg.dim)).astype(cfg.compute_dtype)
    img = jax.random.normal(ks[3], (1, 257, cfg.dim)).astype(cfg.compute_dtype)
    cos, sin = rope_tables(grid, cfg.head_dim)
    outputs[dtype] = nnx.jit(lambda m, *a: m._run_blocks(*a, cos, sin))(model, x, e0, ctx, img)
  # the block's update (output - input) is what bf16 perturbs; the residual x passes through in float32
  delta = {k: v.astype(jnp.float32) - x for k, v in outputs.items()}
  out = {"tokens": tokens, "bf16_vs_fp32_rel_err": _rel(outputs["bfloat16"], outputs["float32"]),
         "bf16_vs_fp32_update_rel_err": _rel(delta["bfloat16"], delta["float32"])}
  out["ok"] = 0 < out["bf16_vs_fp32_update_rel_err"] < 5e-2
  return out


def _torch_empty_cache():
  """Hands torch's cached CUDA blocks back so the JAX benches that follow can use them."""
  try:
    import torch
    if torch.cuda.is_available():
      torch.cuda.empty_cache()
  except ImportError:
    pass


def run(args, save=lambda results: None) -> list[dict]:
  from scripts.bench import run_one
  on_gpu = jax.devices()[0].platform == "gpu"
  size = "eva" if on_gpu else "tiny"
  # no step starts after budget_s: the longest (the sampler, ~2.5 min) then still ends within ~8 min on GPU
  budget_s = getattr(args, "budget_s", None) or (400.0 if on_gpu else float("inf"))
  start = time.perf_counter()
  results = []

  def step(name, fn):
    t0 = time.perf_counter()
    if t0 - start > budget_s:
      r = {"error": f"skipped: the {budget_s:.0f} s budget was spent before this step"}
    else:
      try:
        r = fn()
      except Exception as e:  # noqa: BLE001 - report and go on
        traceback.print_exc()
        r = {"error": f"{type(e).__name__}: {e}"}
    r = dict(r) if isinstance(r, dict) else {"results": r}
    r.setdefault("name", name)
    r.setdefault("size", size)
    r["wall_s"] = time.perf_counter() - t0
    results.append(r)
    save(results)
    gc.collect()  # the previous bench's models go before the next one allocates
    _torch_empty_cache()
    print(f"[device-check] {name}: {r.get('error', 'ok')} ({r['wall_s']:.1f} s, "
          f"{time.perf_counter() - start:.0f} s in)", flush=True)

  from eva_jax.models.wan import attention as wan_attention
  profiled = copy.copy(args)
  profiled.profile = True  # per-kernel times and the optimised HLO: what to speed up next
  profiled.iters = max(int(getattr(args, "iters", 3) or 3), 10) if on_gpu else 3  # spec: median of 10
  model_args = profiled if not getattr(args, "remat", None) else copy.copy(args)
  model_args = copy.copy(model_args)
  model_args.iters = 5 if on_gpu else 3
  sampler_args = copy.copy(args)
  sampler_args.steps = 3 if on_gpu else 0  # a few steps on GPU; extrapolated per-video time in the result
  sampler_args.iters = 1
  default_multiple = wan_attention.CUDNN_KV_MULTIPLE
  forced = getattr(args, "kv_multiple", None)

  def lengths_probe():
    r = probe_cudnn_lengths(on_gpu)
    use = forced or r["kv_multiple"]
    if use:  # the steps after this one trace their models with it
      wan_attention.CUDNN_KV_MULTIPLE = use
    r["used_kv_multiple"] = wan_attention.CUDNN_KV_MULTIPLE
    return r

  def block_at_probed_multiple():
    if wan_attention.CUDNN_KV_MULTIPLE == default_multiple:
      return {"error": "skipped: the probe kept the default key multiple"}
    return {**run_one("dit-block", size, variant(f"kv{wan_attention.CUDNN_KV_MULTIPLE}")), "name": "dit-block-kv"}

  def variant(tag, **flags):
    """The profiled block bench without the diffusers reference, its HLO under --out/<tag>."""
    v = copy.copy(profiled)
    v.no_reference = True
    for k, val in flags.items():
      setattr(v, k, val)
    if getattr(args, "out", None):  # its HLO next to, not over, the baseline's
      v.out = f"{args.out}/{tag}"
    return v

  sampler_args.compare = getattr(args, "compare", None) or ("nocache,fp8" if on_gpu else None)

  def versions():
    from eva_jax.utils.versions import runtime_versions
    r = runtime_versions()
    print("[device-check] versions: " + ", ".join(f"{k}={v}" for k, v in r.items() if k != "nvidia_packages"),
          flush=True)
    return {**r, "ok": True}

  steps = {
      "versions": versions,
      "dit-block": lambda: run_one("dit-block", size, profiled),
      "dit-block-unfused": lambda: {**run_one("dit-block", size, variant("unfused", no_fuse=True)),
                                    "name": "dit-block-unfused"},
      "dit-block-fp8": lambda: {**run_one("dit-block", size, variant("fp8", matmul_dtype="fp8")),
                                "name": "dit-block-fp8"},
      "cudnn-lengths": lengths_probe,
      "dit-block-kv": block_at_probed_multiple,
      "dit": lambda: run_one("dit", size, model_args),
      "sampler": lambda: run_one("sampler", size, sampler_args),
      "cudnn-attention": lambda: check_cudnn_attention(on_gpu),
      "bf16-block": lambda: check_bf16_block(on_gpu),
      "vae": lambda: run_one("vae", size, copy.copy(args)),
  }
  only = [s.strip() for s in (getattr(args, "only", None) or "").split(",") if s.strip()]
  unknown = sorted(set(only) - set(steps))
  if unknown:
    raise SystemExit(f"--only: unknown device-check steps {unknown}; known: {list(steps)}")
  for name, fn in steps.items():
    if not only or name in only:
      step(name, fn)
  return results
