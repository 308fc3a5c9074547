"""Step-time scaling of the tiny DiT train step (forward + backward + AdamW) from 1 to 8 devices.

  python scripts/bench.py scaling --size tiny     # 8 fake CPU devices (bench.py sets them up)

The global batch is fixed (8 videos) and sharded over ('data', 'fsdp'); each device count gets its own
mesh over the first n devices. On one CPU the fake devices share the same cores, so this measures the
overhead of the sharded program (collectives, partitioning), not a speed-up; on a GPU node it is strong
scaling.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from eva_jax import parallel
from eva_jax.models.wan import WanModel, wan_config
from eva_jax.utils.timing import time_fn


def run(size: str, args) -> dict:
  if size != "tiny":
    return {"note": "scaling bench is defined for --size tiny"}
  cfg = wan_config("tiny-i2v", dim=64, num_heads=4, ffn_dim=128)
  gdef, params = nnx.split(WanModel(cfg, rngs=nnx.Rngs(0)))
  tx = optax.adamw(1e-4)
  ks = jax.random.split(jax.random.key(0), 4)
  batch = (jax.random.normal(ks[0], (8, 3, 8, 8, 16)), jax.random.uniform(ks[1], (8, 3), maxval=1000.0),
           jax.random.normal(ks[2], (8, 16, cfg.text_dim)), jax.random.normal(ks[3], (8, 257, cfg.image_dim)))

  def step(params, opt, x, t, ctx, clip):
    loss = lambda p: jnp.mean(nnx.merge(gdef, p)(x, t, ctx, clip) ** 2)
    l, g = jax.value_and_grad(loss)(params)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, l

  results = {}
  sweep = (1, 8) if getattr(args, "quick", False) else (1, 2, 4, 8)  # --quick (tests): the two ends
  counts = [n for n in sweep if n <= jax.device_count()]
  for n in counts:
    mesh = parallel.make_mesh({"data": n}, devices=jax.devices()[:n])
    p = jax.device_put(params, parallel.state_shardings(params, mesh))
    opt = tx.init(p)
    xs = [parallel.shard_batch(a, mesh) for a in batch]
    fn = jax.jit(step)
    results[f"{n}_devices"] = time_fn(fn, p, opt, *xs, warmup=1, iters=getattr(args, "iters", 3))
  base = results["1_devices"]["median_s"]
  return {"results": results, "jax": results[f"{counts[-1]}_devices"],
          "note": "step s by devices: " + ", ".join(f"{n}: {results[f'{n}_devices']['median_s']:.3f}" for n in counts)
                  + f" (1-device {base:.3f} s)"}
