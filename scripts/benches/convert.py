"""Peak memory of `python -m convert --kind dit` on a synthetic checkpoint with the real i2v-14B tensor shapes.

  python scripts/bench.py convert --size tiny     # 1 layer of i2v-14B (about 1.1 GB as bf16 safetensors)
  python scripts/bench.py convert --size eva      # 4 layers
  python scripts/bench.py convert --size tiny --quick   # the suite's smoke run: 1 layer of tiny-i2v (KBs, not GBs)

The checkpoint is written shard by shard (embeddings, then one shard per block, plus the index json) in bf16, as
the released fp32 checkpoint would be read tensor by tensor. The converter runs in a subprocess; its peak RSS
(os.wait4) is compared with an import-only subprocess (the fixed cost of python + jax + torch + orbax), the
largest stacked output tensor and the whole checkpoint. For 40 layers the largest stacked tensor is the FFN
kernel, 40 x 5120 x 13824 (5.7 GB in bf16), while the model is 33 GB: peak RSS must follow the former.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

LAYERS = {"tiny": 1, "eva": 4, "wan": 8, "custom": 2}


def _write_checkpoint(folder: str, cfg) -> dict:
  """Wan-layout bf16 safetensors with the real shapes; returns {'bytes', 'largest_tensor_bytes'}."""
  import torch
  from safetensors.torch import save_file
  from convert.wan_dit import _torch_shape, mapping_table
  from eva_jax.models.wan import WanModel
  from flax import nnx
  import jax
  top, block = mapping_table(cfg)
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: WanModel(cfg, rngs=nnx.Rngs(0))), nnx.Param))

  def shape(path, stacked):
    node = abstract
    for p in path:
      node = node[p]
    return node.shape[1:] if stacked else node.shape

  groups = [("embed", [(w, _torch_shape(k, shape(p, False))) for p, w, k in top])]
  for i in range(cfg.num_layers):
    groups.append((f"block{i}", [(f"blocks.{i}.{w}", _torch_shape(k, shape(("blocks",) + p, True)))
                                 for p, w, k in block]))
  weight_map, total, largest = {}, 0, 0
  for n, (name, entries) in enumerate(groups):
    file = f"diffusion_pytorch_model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
    tensors = {key: torch.full(shp, 0.01, dtype=torch.bfloat16) for key, shp in entries}
    save_file(tensors, os.path.join(folder, file))
    for key, t in tensors.items():
      weight_map[key] = file
      total += t.numel() * 2
      largest = max(largest, t.numel() * 2)
    del tensors
  with open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
  del jax
  return {"bytes": total, "largest_tensor_bytes": largest}


def _child_peak_mb(cmd: list[str], cwd: str) -> tuple[float, float, int]:
  """(peak RSS MB, seconds, return code) of a subprocess, from its own rusage."""
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
  return usage.ru_maxrss / 1024, time.perf_counter() - t0, proc.returncode


def run(size: str, args) -> dict:
  from eva_jax.models.wan import wan_config
  layers = LAYERS[size]
  # --quick (the suite's `all` run) checks the harness, not the memory: writing and converting 1.1 GB
  # took half a minute of the suite's 2 cores
  preset = "tiny-i2v" if getattr(args, "quick", False) else "i2v-14b"
  cfg = wan_config(preset, num_layers=layers)
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  tmp = tempfile.mkdtemp(prefix="eva_convert_bench_")
  try:
    src, out = os.path.join(tmp, "src"), os.path.join(tmp, "out")
    os.makedirs(src)
    t0 = time.perf_counter()
    info = _write_checkpoint(src, cfg)
    write_s = time.perf_counter() - t0
    ffn_stacked = layers * cfg.dim * cfg.ffn_dim * 2
    cmd = [sys.executable, "-m", "convert", "--kind", "dit", "--src", src, "--out", out, "--config", preset,
           "--set", f"num_layers={layers}", "--dtype", "bfloat16", "--quiet"]
    peak_mb, seconds, _ = _child_peak_mb(cmd, repo)
    base_mb, _, _ = _child_peak_mb([sys.executable, "-c", "import convert.cli, convert.io, convert.wan_dit, torch, "
                                    "safetensors, orbax.checkpoint.experimental.v1, eva_jax.models.wan.model"], repo)
    return {
        "layers": layers,
        "checkpoint_gb": info["bytes"] / 1e9,
        "largest_source_tensor_gb": info["largest_tensor_bytes"] / 1e9,
        "largest_stacked_tensor_gb": ffn_stacked / 1e9,
        "largest_stacked_tensor_40_layers_gb": 40 * cfg.dim * cfg.ffn_dim * 2 / 1e9,
        "peak_rss_gb": peak_mb / 1e3,
        "import_only_rss_gb": base_mb / 1e3,
        "peak_minus_imports_gb": (peak_mb - base_mb) / 1e3,
        "convert_s": seconds,
        "write_checkpoint_s": write_s,
        "jax": {"median_s": seconds},
        "note": f"peak RSS {peak_mb / 1e3:.2f} GB for a {info['bytes'] / 1e9:.2f} GB checkpoint",
    }
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
