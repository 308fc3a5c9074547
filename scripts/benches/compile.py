"""Compile time of the Wan DiT as depth grows: 2 vs 40 layers scanned (nnx.scan), 2 vs 10 in a python loop.

  python scripts/bench.py compile --size tiny

With scan the block is traced and compiled once, so compile time stays flat with depth; the python loop unrolls
every block into the program. Each entry reports trace+lower and XLA compile seconds for forward and for
forward+backward (remat 'full'), plus the first-call forward time after compilation.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx

from eva_jax.models.wan import WanModel, wan_config
from eva_jax.utils.timing import time_fn

# The python loop unrolls every block: its 40-layer backward takes many minutes to compile on a small CPU, so the
# loop is measured at 2 and 10 layers (already enough to show the linear growth) and scan at 2 and 40.
DEPTHS = {True: (2, 40), False: (2, 10)}


def _measure(cfg, inputs) -> dict:
  model = nnx.eval_shape(lambda: WanModel(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)

  def forward(state, *xs):
    return nnx.merge(graphdef, state)(*xs)

  def loss(state, *xs):
    return jnp.mean(jnp.square(forward(state, *xs)))

  out = {}
  for name, fn in (("fwd", forward), ("fwd_bwd", jax.grad(loss))):
    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(state, *inputs)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    out[f"{name}_lower_s"], out[f"{name}_compile_s"] = t1 - t0, t2 - t1
  return out


def run(size: str, args) -> dict:
  if size != "tiny":
    return {"note": "compile bench is defined for --size tiny only"}
  base = wan_config("tiny-i2v")
  x = jnp.zeros((1, 3, 8, 8, 16))
  inputs = (x, jnp.array([500.0]), jnp.zeros((1, 16, base.text_dim)), jnp.zeros((1, 257, base.image_dim)))
  results = {}
  depths = dict(DEPTHS)
  if getattr(args, "quick", False):  # test runs: the harness, at depths whose growth (or not) already shows
    depths = {True: (1, 4), False: (1, 2)}
  for scan in (True, False):
    for depth in depths[scan]:
      cfg = wan_config("tiny-i2v", num_layers=depth, scan_layers=scan, remat="full")
      results[f"{'scan' if scan else 'loop'}_{depth}"] = _measure(cfg, inputs)
  # A real forward of the deepest scanned model, to record run time next to compile time.
  deep = depths[True][1]
  model = WanModel(wan_config("tiny-i2v", num_layers=deep), rngs=nnx.Rngs(0))
  fwd = nnx.jit(lambda m, *xs: m(*xs))
  results[f"scan_{deep}_forward"] = time_fn(fwd, model, *inputs, warmup=1, iters=3)
  lo, lo_loop = depths[True][0], depths[False][0]
  s2, sd = results[f"scan_{lo}"], results[f"scan_{deep}"]
  return {"results": results, "jax": results[f"scan_{deep}_forward"],
          "note": (f"scan fwd+bwd compile {lo}->{deep} layers: {s2['fwd_bwd_compile_s']:.2f}s -> "
                   f"{sd['fwd_bwd_compile_s']:.2f}s; loop: {results[f'loop_{lo_loop}']['fwd_bwd_compile_s']:.2f}s -> "
                   f"{results[f'loop_{depths[False][1]}']['fwd_bwd_compile_s']:.2f}s ({depths[False][1]} layers)")}
