"""Benchmarks of eva_jax against the PyTorch reference, measured in the same process.

  python scripts/bench.py dit-block --size tiny
  python scripts/bench.py vae --size eva
  python scripts/bench.py all --size tiny            # every subcommand
  python scripts/bench.py --device-check             # the prepared GPU run (< 8 min on one GPU)
  python scripts/bench.py dit-block --size eva --attention=splash   # TPU: one 14B block with splash attention

Each subcommand lives in scripts/benches/<module>.py as `run(size, args) -> dict`. Results are printed
as a table and written as JSON under outputs/<date>/<time>/bench/. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import pathlib
import platform
import sys
import time
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# subcommand -> (module in scripts/benches, extra keyword passed as args.what)
SUBCOMMANDS = {
    "dit-block": ("dit", "block"),
    "dit": ("dit", "model"),
    "vae": ("vae", None),
    "idm": ("idm", None),
    "encoders": ("encoders", None),
    "sampler": ("sampler", None),
    "sft-step": ("sft", None),
    "grpo-step": ("grpo", None),
    "convert": ("convert", None),
    "compile": ("compile", None),
    "scaling": ("scaling", None),
}
SIZES = ("tiny", "eva", "wan", "custom")


_VERSIONS: dict | None = None


def machine_info() -> dict:
  """Where the results were measured; 'versions' (eva_jax.utils.versions) holds what decides GPU speed:
  jax, jaxlib, the CUDA plugin, cuDNN / CUDA / cuBLAS as loaded, the driver, the device name."""
  global _VERSIONS
  import jax
  from eva_jax.utils.versions import runtime_versions
  if _VERSIONS is None:  # once per process (nvidia-smi is a subprocess); saved after every bench
    _VERSIONS = runtime_versions()
  dev = jax.devices()[0]
  info = {"platform": dev.platform, "device": getattr(dev, "device_kind", str(dev)), "device_count": jax.device_count(),
          "host": platform.node(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
          "jax": jax.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "versions": _VERSIONS}
  try:
    import flax
    info["flax"] = flax.__version__
  except ImportError:
    pass
  try:
    import torch
    info["torch"] = torch.__version__
  except ImportError:
    info["torch"] = None
  return info


def run_one(name: str, size: str, args) -> dict:
  module_name, what = SUBCOMMANDS[name]
  try:
    module = importlib.import_module(f"scripts.benches.{module_name}")
  except ModuleNotFoundError as e:
    if e.name == f"scripts.benches.{module_name}":
      return {"name": name, "size": size, "error": f"benchmark module scripts/benches/{module_name}.py not present"}
    raise
  args.what = what
  start = time.perf_counter()
  try:
    result = module.run(size, args)
  except Exception as e:  # one failing bench must not hide the others
    traceback.print_exc()
    return {"name": name, "size": size, "error": f"{type(e).__name__}: {e}"}
  # the whole bench (compiles, reference, checks): where a run's time goes
  return {"name": name, "size": size, **result, "bench_wall_s": round(time.perf_counter() - start, 1)}


def format_table(results: list[dict]) -> str:
  rows = [("bench", "size", "jax s", "ref s", "jax/ref", "rel err", "note")]
  for r in results:
    jax_s = r.get("jax", {}).get("median_s") if isinstance(r.get("jax"), dict) else None
    ref_s = r.get("reference", {}).get("median_s") if isinstance(r.get("reference"), dict) else None
    ratio = f"{jax_s / ref_s:.2f}" if jax_s and ref_s else ""
    rel = r.get("rel_err")
    rows.append((r["name"], r["size"], f"{jax_s:.4g}" if jax_s else "", f"{ref_s:.4g}" if ref_s else "", ratio,
                 f"{rel:.2e}" if isinstance(rel, float) else "", r.get("error", r.get("note", ""))[:60]))
  widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
  return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("command", nargs="?", default="all", choices=sorted(SUBCOMMANDS) + ["all"])
  parser.add_argument("--size", default="tiny", choices=SIZES)
  parser.add_argument("--frames", type=int, default=None, help="custom size: pixel frames (1+4k)")
  parser.add_argument("--height", type=int, default=None)
  parser.add_argument("--width", type=int, default=None)
  parser.add_argument("--dtype", default=None, help="compute dtype (default: float32 on CPU, bfloat16 on GPU/TPU)")
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--no-reference", action="store_true", help="skip the PyTorch reference")
  parser.add_argument("--device-check", action="store_true", help="the prepared one-GPU run")
  parser.add_argument("--out", default=None, help="output directory (default outputs/<date>/<time>/bench)")
  parser.add_argument("--steps", type=int, default=0, help="sampler steps (0 = 40)")
  parser.add_argument("--quick", action="store_true", help="smaller sweeps where a bench has them (tests)")
  parser.add_argument("--profile", action="store_true",
                      help="dit/dit-block: per-kernel device time from a profiler trace, optimised HLO to --out")
  parser.add_argument("--remat", default=None, choices=("none", "full", "dots", "offload"),
                      help="dit: the layer rematerialisation policy of the forward+backward (default full)")
  parser.add_argument("--attention", "--config.model.attention", dest="attention", default=None,
                      help="dit/dit-block: the attention backend (auto, xla, cudnn, chunked, splash or "
                           "splash:BQ,BKV,BKVC; default cudnn on GPU, splash on TPU, xla on CPU)")
  parser.add_argument("--kv-multiple", type=int, default=None,
                      help="cuDNN attention: pad key lengths to a multiple of this (default "
                           "eva_jax.models.wan.attention.CUDNN_KV_MULTIPLE); the device check probes what is safe")
  parser.add_argument("--no-fuse", action="store_true",
                      help="dit/dit-block/sampler: WanConfig fuse_qkv=False, fused_rope=False (the unfused A/B)")
  parser.add_argument("--matmul-dtype", default=None, choices=("default", "fp8"),
                      help="dit/dit-block/sampler: WanConfig.matmul_dtype (fp8: inference only, with its error "
                           "against the default matmuls)")
  parser.add_argument("--no-context-kv-cache", action="store_true",
                      help="sampler: recompute the cross-attention K/V at every step (SamplerConfig.cache_context_kv)")
  parser.add_argument("--compare", default=None,
                      help="sampler: comma-separated A/B variants on the same weights and seeds (nocache, fp8)")
  parser.add_argument("--only", default=None,
                      help="--device-check: comma-separated steps to run (versions, dit-block, dit-block-unfused, "
                           "dit-block-fp8, cudnn-lengths, dit-block-kv, dit, sampler, cudnn-attention, bf16-block, "
                           "vae)")
  parser.add_argument("--budget-s", type=float, default=None,
                      help="--device-check: start no step after this many seconds (default 400 on GPU, so the "
                           "run ends within ~8 min; no limit on the CPU dry run)")
  args = parser.parse_args(argv)
  from eva_jax.utils.xla_flags import apply_default_xla_flags
  apply_default_xla_flags()  # what the entry points run with (before the backend starts)
  if args.command in ("scaling", "all") and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # the scaling bench needs several devices; on a CPU-only host fake 8 (before jax is imported)
    if os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
      os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

  if args.device_check:
    # JAX and torch share the GPU in one process: allocate on demand rather than grabbing 75% up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

  if args.kv_multiple:
    from eva_jax.models.wan import attention as wan_attention
    wan_attention.CUDNN_KV_MULTIPLE = args.kv_multiple  # read when the models are traced
  from eva_jax.utils.rundir import make_run_dir
  out = pathlib.Path(args.out) if args.out else make_run_dir() / "bench"
  out.mkdir(parents=True, exist_ok=True)
  args.out = str(out)

  def save(results):  # after every bench, so an interrupted run keeps what it measured
    payload = {"machine": machine_info(), "results": results}
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str))

  if args.device_check:
    from scripts.benches import device_check
    results = device_check.run(args, save)
  else:
    names = sorted(SUBCOMMANDS) if args.command == "all" else [args.command]
    results = []
    for n in names:
      results.append(run_one(n, args.size, args))
      save(results)
  save(results)
  print(format_table(results))
  print(f"\nJSON: {out / 'results.json'}")
  return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
  sys.exit(main())
