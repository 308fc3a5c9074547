"""eva_jax DiT weights -> one PyTorch safetensors file (the converter's mapping table read backwards).

  python -m convert --kind dit --to-torch --src ckpt/dit --out model.safetensors                 # Wan names
  python -m convert --kind dit --to-torch --src outputs/sft_run --out dit.safetensors --layout diffusers

The source is anything `eva_jax.weights.load("dit", ...)` reads: an orbax directory from `python -m convert`
(its eva_convert.json gives the config), an SFT run directory (its config.json gives it), or a PyTorch file.
layout 'wan' writes the original release names (`blocks.0.self_attn.q.weight`, loadable by Wan's own code and
by `python -m convert`); 'diffusers' writes WanTransformer3DModel's names, so
`WanTransformer3DModel(...).load_state_dict(safetensors.torch.load_file(out), strict=True)` takes it as is.
LoRA factors are not exported (merge them first, or export the adapter with `models.lora.export_peft`). The
file is written to a temporary name next to `out` and renamed, so a failed run leaves no partial file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import numpy as np


def _config(src: str, config: str | None, overrides: dict):
  """The WanConfig to load `src` with: a named preset, else a converted directory's eva_convert.json, else None
  (a run directory's config.json, read by weights.load, which applies `overrides` to it)."""
  from eva_jax.models.wan import WanConfig, wan_config
  meta = pathlib.Path(src) / "eva_convert.json"
  if config is None and meta.is_file():
    saved = json.loads(meta.read_text())["config"]
    fields = {f.name for f in dataclasses.fields(WanConfig)}
    cfg = WanConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in fields})
    return dataclasses.replace(cfg, **overrides)
  from eva_jax import weights
  if config is None and weights.source_format(src) == "run":
    return None
  return wan_config(config or "i2v-14b", **overrides)


def export_dit(src: str, out: str, *, config: str | None = None, overrides: dict | None = None,
               layout: str = "wan", dtype: str | None = None, overwrite: bool = False) -> dict:
  """Writes the DiT of `src` to the safetensors file `out`; returns a summary dict."""
  import jax.numpy as jnp
  from flax import nnx
  from safetensors.numpy import save_file
  from convert.wan_dit import iter_torch_tensors
  from eva_jax import weights
  from eva_jax.models.lora import LoRAParam
  if layout not in ("wan", "diffusers"):
    raise ValueError(f"--layout must be 'wan' or 'diffusers', got {layout!r}")
  if not out.endswith(".safetensors"):
    raise ValueError(f"--out {out}: the PyTorch export is one .safetensors file")
  if os.path.exists(out) and not overwrite:
    raise FileExistsError(f"--out {out} exists; pass --overwrite to replace it")
  try:
    np_dtype = np.dtype(jnp.dtype(dtype)) if dtype else None
  except TypeError:
    raise ValueError(f"--dtype {dtype!r} is not a dtype (float32, bfloat16, float16)") from None
  cfg = _config(src, config, overrides or {})
  graphdef, state = weights.load("dit", src, cfg, overrides=None if cfg is not None else overrides)
  cfg = cfg or nnx.merge(graphdef, state).cfg
  base = nnx.split_state(state, nnx.All(nnx.Param, nnx.Not(LoRAParam)), ...)[0]
  tensors = dict(iter_torch_tensors(nnx.to_pure_dict(base), cfg, layout=layout, dtype=np_dtype))
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  tmp = f"{out}.tmp-{os.getpid()}"
  try:
    save_file(tensors, tmp, metadata={"format": "pt", "eva_jax_layout": layout})
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return dict(kind="dit", source=os.path.abspath(src), out=os.path.abspath(out), layout=layout,
              tensors=len(tensors), bytes=int(sum(t.nbytes for t in tensors.values())),
              dtype=str(next(iter(tensors.values())).dtype))
