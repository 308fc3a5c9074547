"""Ahead-of-time memory plan for the 14B i2v model: will a step fit on a target mesh?

  python scripts/plan_memory.py                                # all steps, all targets in TARGETS
  python scripts/plan_memory.py --target 8xH100 --step grpo-update --layers 40
  python scripts/plan_memory.py --target v5p-16 --target v6e-16-ulysses4   # TPU slices

Each step is lowered and compiled with `jax.jit(...).lower(abstract inputs).compile()` on a mesh of fake
CPU devices (no weights, nothing is run), and `compiled.memory_analysis()` gives the per-device bytes of
arguments, outputs and temporaries. The CPU compiler's buffer plan stands in for the accelerator's, and
the memory-bounded 'chunked' attention stands in for cuDNN/splash flash attention (neither materialises
L×L scores), so the figures are estimates; the table in docs/scale.md says how they compare.

TPU targets also lower the same step for the TPU with the 'splash' backend (the program a TPU compiles: the
Pallas splash kernels as Mosaic custom calls, checked for EVA's shapes and the block sizes) and report how
many kernels it holds; compiling it, and so its memory plan, needs a TPU.

Steps (EVA's shapes: 49 frames at 480×640 → latent 13×60×80, 15,600 tokens, text 512, CLIP 257):
  sampler-step   one guided DiT forward: 3 passes (cond, no-text, no-history) batched, bf16 weights
  sft-step       SFT train step: fp32 master weights + AdamW states, bf16 compute, full remat, FSDP
  grpo-update    GRPO update: LoRA r=32 on q,k,v,o,k_img,v_img over bf16 base weights, 39 trained
                 timesteps for one micro-batch of rollouts, KL against the LoRA-off reference, full remat

The planner re-executes itself with XLA_FLAGS=--xla_force_host_platform_device_count=<devices>.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (devices, GiB per device, mesh axis sizes). TPU slice names count TensorCores on v5p (2 per chip,
# one jax device per chip) and chips on v6e (32 GiB each).
TARGETS = {
    "8xH100": (8, 80, {"fsdp": 8}),
    "8xH200": (8, 141, {"fsdp": 8}),
    "8xH100-ulysses4": (8, 80, {"fsdp": 2, "context": 4}),
    "v5p-16": (8, 95, {"fsdp": 8}),
    "v5p-64": (32, 95, {"fsdp": 32}),
    "v6e-8-ulysses4": (8, 32, {"fsdp": 2, "context": 4}),
    "v6e-16-ulysses4": (16, 32, {"fsdp": 4, "context": 4}),
}
TPU_TARGETS = {t for t in TARGETS if t.startswith("v")}
STEPS = ("sampler-step", "sft-step", "grpo-update")
LATENT = (13, 60, 80)


def _abstract(tree, shardings):
  """Abstract leaves with their shardings; `shardings` from parallel.state_shardings (a NamedSharding per
  Variable) or a tree of the same structure as `tree`."""
  import jax
  leaves, treedef = jax.tree.flatten(tree)
  shard_leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  assert len(leaves) == len(shard_leaves), (len(leaves), len(shard_leaves))
  return treedef.unflatten([jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) for x, s in zip(leaves, shard_leaves)])


ATTENTION = "chunked"   # the stand-in for the memory plan; "splash" for the TPU lowering (splash_check)


def _wan_cfg(layers: int, **kw):
  from eva_jax.models.wan import wan_config
  return wan_config("i2v-14b", num_layers=layers, attention=ATTENTION, attn_chunk_size=1024, **kw)


def _batch(mesh, shapes: dict):
  import jax
  import jax.numpy as jnp
  from eva_jax import parallel
  return {k: jax.ShapeDtypeStruct(s, dt, sharding=parallel.named_sharding(mesh, ("act_batch",) + (None,) * (len(s) - 1)))
          for k, (s, dt) in shapes.items()} if shapes else {}


def compile_sampler_step(mesh, layers: int):
  """Guided DiT forward on 3·B_dev samples (cond / no-text / no-history share one batch)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from eva_jax import parallel
  from eva_jax.models.wan import WanModel
  cfg = _wan_cfg(layers, dtype="bfloat16", param_dtype="bfloat16")
  gdef, state = nnx.split(nnx.eval_shape(lambda: WanModel(cfg, rngs=nnx.Rngs(0))))
  shard = parallel.state_shardings(state, mesh)
  b = 3 * mesh.shape["data"] * mesh.shape["fsdp"]
  f, h, w = LATENT
  ins = _batch(mesh, {"x": ((b, f, h, w, 16), jnp.float32), "t": ((b, f), jnp.float32),
                      "ctx": ((b, 512, 4096), jnp.bfloat16), "clip": ((b, 257, 1280), jnp.bfloat16)})
  fn = jax.jit(lambda st, x, t, ctx, clip: nnx.merge(gdef, st)(x, t, ctx, clip))
  return fn, (_abstract(state, shard), ins["x"], ins["t"], ins["ctx"], ins["clip"]), b


def compile_sft_step(mesh, layers: int):
  import jax.numpy as jnp
  import jax
  from flax import nnx
  from configs.sft import get_config
  from eva_jax.models.wan import WanModel
  from eva_jax.training.sft import SFTTrainer, diffusion_kwargs
  config = get_config("14b")
  cfg = _wan_cfg(layers, dtype="bfloat16", param_dtype="float32", remat="full")
  trainer = SFTTrainer(lambda: WanModel(cfg, rngs=nnx.Rngs(0)), config.optim, diffusion_kwargs(config.diffusion), mesh)
  b = mesh.shape["data"] * mesh.shape["fsdp"]  # one video per batch shard (EVA: batch 1 per GPU)
  f, h, w = LATENT
  batch = _batch(mesh, {"latents": ((b, f, h, w, 16), jnp.float32), "prompt_embeds": ((b, 512, 4096), jnp.bfloat16),
                        "clip_fea": ((b, 257, 1280), jnp.bfloat16)})
  fn = jax.jit(trainer._train_step_impl, in_shardings=(trainer.state_shardings, {k: v.sharding for k, v in batch.items()}),
               out_shardings=(trainer.state_shardings, trainer.replicated), donate_argnums=(0,))
  return fn, (trainer.abstract_state(), batch), b


def compile_grpo_update(mesh, layers: int):
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from configs.grpo import get_config
  from eva_jax import parallel
  from eva_jax.diffusion.schedules import wan_timesteps
  from eva_jax.models.lora import LoRAParam
  from eva_jax.models.wan import WanModel
  from eva_jax.rl.grpo import GRPOUpdateConfig, make_update_fn
  from eva_jax.training.optim import make_optimizer
  config = get_config(None)
  cfg = _wan_cfg(layers, dtype="bfloat16", param_dtype="bfloat16", remat="full", lora_rank=32, lora_alpha=32.0)
  gdef, lora, base = nnx.split(nnx.eval_shape(lambda: WanModel(cfg, rngs=nnx.Rngs(0))), LoRAParam, ...)
  lora_sh, base_sh = parallel.state_shardings(lora, mesh), parallel.state_shardings(base, mesh)
  tx = make_optimizer(config.optim)
  abs_lora = _abstract(lora, lora_sh)
  opt = jax.eval_shape(tx.init, abs_lora)

  @jax.jit  # merged inside its own jit: its variables then live at one trace level inside the scans
  def policy_fn(lora_s, base_s, x, t, cond):
    return nnx.merge(gdef, lora_s, base_s)(x, t, cond["context"], cond["clip_fea"])

  timesteps, sigmas = wan_timesteps(40, 3.0)
  b = mesh.shape["data"] * mesh.shape["fsdp"]  # one rollout per batch shard per micro-batch
  ucfg = GRPOUpdateConfig(num_inner_epochs=1, micro_batch=b)  # peak memory is one micro-batch's fwd+bwd
  update = make_update_fn(policy_fn, tx, timesteps, sigmas, ucfg)
  f, h, w = LATENT
  batch = _batch(mesh, {"latents": ((b, 41, f, h, w, 16), jnp.float32), "log_probs": ((b, 40), jnp.float32),
                        "advantages": ((b,), jnp.float32), "clean_first": ((b, 1, h, w, 16), jnp.float32)})
  batch["cond"] = _batch(mesh, {"context": ((b, 512, 4096), jnp.bfloat16), "clip_fea": ((b, 257, 1280), jnp.bfloat16)})
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  fn = jax.jit(update, donate_argnums=(0, 1))
  return fn, (abs_lora, opt, _abstract(base, base_sh), batch, key), b


COMPILERS = {"sampler-step": compile_sampler_step, "sft-step": compile_sft_step, "grpo-update": compile_grpo_update}


def plan_one(target: str, step: str, layers: int) -> dict:
  """Runs inside the re-executed process (fake devices already set)."""
  import jax
  from eva_jax import parallel
  devices, gib, sizes = TARGETS[target]
  mesh = parallel.make_mesh(sizes)
  t0 = time.perf_counter()
  fn, args, batch = COMPILERS[step](mesh, layers)
  with jax.set_mesh(mesh):
    compiled = fn.lower(*args).compile()
  mem = compiled.memory_analysis()
  arg, out, tmp = mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.temp_size_in_bytes
  alias = getattr(mem, "alias_size_in_bytes", 0)
  peak = arg + out + tmp - alias
  return {"target": target, "step": step, "layers": layers, "devices": devices, "mesh": sizes,
          "global_batch": batch, "argument_gib": arg / 2**30, "output_gib": out / 2**30, "temp_gib": tmp / 2**30,
          "alias_gib": alias / 2**30, "peak_gib": peak / 2**30, "device_gib": gib, "fits": peak <= 0.9 * gib * 2**30,
          "compile_s": time.perf_counter() - t0, **(splash_check(step, mesh, layers) if target in TPU_TARGETS else {})}


def splash_check(step: str, mesh, layers: int) -> dict:
  """Lowers `step` for the TPU with attention='splash' (on the fake CPU devices: lowering needs no TPU) and
  counts the Mosaic kernels in it. The splash kernels' shape and block rules are checked while tracing."""
  global ATTENTION
  import jax
  from eva_jax.models.wan import attention as wan_attention
  from eva_jax.models.wan.splash import DEFAULT_BLOCKS, padded_fraction
  t0 = time.perf_counter()
  ATTENTION, wan_attention.TARGET_PLATFORM = "splash", "tpu"
  try:
    fn, args, _ = COMPILERS[step](mesh, layers)
    with jax.set_mesh(mesh):
      text = fn.trace(*args).lower(lowering_platforms=("tpu",)).as_text()
  finally:
    ATTENTION, wan_attention.TARGET_PLATFORM = "chunked", None
  tokens = LATENT[0] * (LATENT[1] // 2) * (LATENT[2] // 2)
  return {"splash_kernels": text.count("tpu_custom_call"), "splash_blocks": list(DEFAULT_BLOCKS),
          "splash_padding": padded_fraction(tokens), "splash_lower_s": time.perf_counter() - t0}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--target", action="append", choices=sorted(TARGETS), help="default: all")
  p.add_argument("--step", action="append", choices=STEPS, help="default: all")
  p.add_argument("--layers", type=int, default=40, help="DiT depth (40 = i2v-14B)")
  p.add_argument("--json", default=None, help="also write the rows here")
  p.add_argument("--_child", nargs=2, metavar=("TARGET", "STEP"), help=argparse.SUPPRESS)
  args = p.parse_args(argv)

  if args._child:
    print("ROW " + json.dumps(plan_one(args._child[0], args._child[1], args.layers)), flush=True)
    return 0

  rows = []
  for target in args.target or list(TARGETS):
    for step in args.step or list(STEPS):
      env = dict(os.environ, JAX_PLATFORMS="cpu", EVA_JAX_NO_DISTRIBUTED="1",
                 XLA_FLAGS=f"--xla_force_host_platform_device_count={TARGETS[target][0]}")
      proc = subprocess.run([sys.executable, __file__, "--layers", str(args.layers), "--_child", target, step],
                            env=env, capture_output=True, text=True)
      row = next((json.loads(l[4:]) for l in proc.stdout.splitlines() if l.startswith("ROW ")), None)
      if row is None:
        row = {"target": target, "step": step, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
      rows.append(row)
      print(_fmt(row), flush=True)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(rows, indent=2))
  return 0 if all("error" not in r for r in rows) else 1


def _fmt(r: dict) -> str:
  if "error" in r:
    return f"{r['target']:<16} {r['step']:<13} ERROR {r['error']}"
  splash = f"  splash: {r['splash_kernels']} TPU kernels lowered" if "splash_kernels" in r else ""
  return (f"{r['target']:<16} {r['step']:<13} batch {r['global_batch']:>3}  args {r['argument_gib']:6.1f} GiB  "
          f"temp {r['temp_gib']:6.1f} GiB  peak {r['peak_gib']:6.1f} / {r['device_gib']} GiB  "
          f"{'fits' if r['fits'] else 'DOES NOT FIT'}  (compile {r['compile_s']:.0f} s){splash}")


if __name__ == "__main__":
  sys.exit(main())
