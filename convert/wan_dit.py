"""Wan 2.1 DiT weights (PyTorch) -> eva_jax WanModel parameters.

Accepted layouts, detected from the key names:
  'wan'        the original Wan release: `blocks.0.self_attn.q.weight`, `patch_embedding.weight`, ...
  'diffusers'  diffusers WanTransformer3DModel: `blocks.0.attn1.to_q.weight`, `condition_embedder...`
  'lightning'  EVA / LVP Lightning checkpoints: the DiT under a `model.` prefix (Wan or diffusers names);
               keys with any other prefix (`vae.`, `clip.`, `text_encoder.`, ...) are ignored.

The mapping is declarative (one table: our path <-> Wan key <-> transform); diffusers names are first renamed to
Wan names with the table of spec wan.md A.9. Conversion is strict: a missing or unexpected key, or a shape that
does not fit the config, raises with the key and both shapes before anything is converted.

`iter_dit_params` yields one output parameter at a time (per-layer tensors stacked into one preallocated array
when cfg.scan_layers) and touches the source tensors one by one, so the CLI converts a 14B model in bounded
memory. `convert_dit_state_dict` collects everything into the nested dict of `nnx.state(model)`.
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

# MARK: mapping table

# (our path below the model / below one block, Wan key, transform). '{i}' is the block index.
_TOP = [
    ("patch_embedding/kernel", "patch_embedding.weight", "patch"),
    ("patch_embedding/bias", "patch_embedding.bias", "copy"),
    ("text_embedding/fc1", "text_embedding.0", "linear"),
    ("text_embedding/fc2", "text_embedding.2", "linear"),
    ("time_embedding/fc1", "time_embedding.0", "linear"),
    ("time_embedding/fc2", "time_embedding.2", "linear"),
    ("time_projection", "time_projection.1", "linear"),
    ("head/modulation", "head.modulation", "modulation"),
    ("head/head", "head.head", "linear"),
]
_I2V_TOP = [
    ("img_emb/norm1", "img_emb.proj.0", "norm"),
    ("img_emb/fc1", "img_emb.proj.1", "linear"),
    ("img_emb/fc2", "img_emb.proj.3", "linear"),
    ("img_emb/norm2", "img_emb.proj.4", "norm"),
]
_BLOCK = [
    ("modulation", "modulation", "modulation"),
    *[(f"self_attn/{p}", f"self_attn.{p}", "linear") for p in ("q", "k", "v", "o")],
    ("self_attn/norm_q/scale", "self_attn.norm_q.weight", "copy"),
    ("self_attn/norm_k/scale", "self_attn.norm_k.weight", "copy"),
    ("norm3", "norm3", "norm"),
    *[(f"cross_attn/{p}", f"cross_attn.{p}", "linear") for p in ("q", "k", "v", "o")],
    ("cross_attn/norm_q/scale", "cross_attn.norm_q.weight", "copy"),
    ("cross_attn/norm_k/scale", "cross_attn.norm_k.weight", "copy"),
    ("ffn/fc1", "ffn.0", "linear"),
    ("ffn/fc2", "ffn.2", "linear"),
]
_I2V_BLOCK = [
    ("cross_attn/k_img", "cross_attn.k_img", "linear"),
    ("cross_attn/v_img", "cross_attn.v_img", "linear"),
    ("cross_attn/norm_k_img/scale", "cross_attn.norm_k_img.weight", "copy"),
]

# diffusers <-> Wan key renames (spec wan.md A.9), as (diffusers, Wan) name templates applied to the start
# of a key: {b} is a block prefix `blocks.<i>`, {qkv}/{qk} one of those letters; a template that does not end
# in '.' names a whole key. Both directions are compiled from this one table.
_DIFFUSERS_WAN_NAMES = [
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.image_embedder.norm1.", "img_emb.proj.0."),
    ("condition_embedder.image_embedder.ff.net.0.proj.", "img_emb.proj.1."),
    ("condition_embedder.image_embedder.ff.net.2.", "img_emb.proj.3."),
    ("condition_embedder.image_embedder.norm2.", "img_emb.proj.4."),
    ("condition_embedder.image_embedder.pos_embed", "img_emb.emb_pos"),
    ("scale_shift_table", "head.modulation"),
    ("proj_out.", "head.head."),
    ("{b}.scale_shift_table", "{b}.modulation"),
    ("{b}.attn1.to_{qkv}.", "{b}.self_attn.{qkv}."),
    ("{b}.attn1.to_out.0.", "{b}.self_attn.o."),
    ("{b}.attn1.norm_{qk}.", "{b}.self_attn.norm_{qk}."),
    ("{b}.attn2.to_{qkv}.", "{b}.cross_attn.{qkv}."),
    ("{b}.attn2.to_out.0.", "{b}.cross_attn.o."),
    ("{b}.attn2.norm_{qk}.", "{b}.cross_attn.norm_{qk}."),
    ("{b}.attn2.add_k_proj.", "{b}.cross_attn.k_img."),
    ("{b}.attn2.add_v_proj.", "{b}.cross_attn.v_img."),
    ("{b}.attn2.norm_added_k.", "{b}.cross_attn.norm_k_img."),
    ("{b}.norm2.", "{b}.norm3."),   # diffusers' affine cross-attn norm is Wan's norm3
    ("{b}.ffn.net.0.proj.", "{b}.ffn.0."),
    ("{b}.ffn.net.2.", "{b}.ffn.2."),
]
_GROUPS = {"{b}": r"(blocks\.\d+)", "{qkv}": "([qkv])", "{qk}": "([qk])"}


def _rename_rule(source: str, target: str) -> tuple[re.Pattern, str]:
  """(compiled pattern of `source`, replacement building `target`): placeholders become groups, in order."""
  pattern, repl, group = "^", target, 0
  for piece in re.split(r"(\{\w+\})", source):
    if piece in _GROUPS:
      group += 1
      pattern += _GROUPS[piece]
      repl = repl.replace(piece, f"\\{group}", 1)
    else:
      pattern += re.escape(piece)
  return re.compile(pattern if source.endswith(".") else pattern + "$"), repl


_DIFFUSERS_RULES = [_rename_rule(d, w) for d, w in _DIFFUSERS_WAN_NAMES]
_WAN_RULES = [_rename_rule(w, d) for d, w in _DIFFUSERS_WAN_NAMES]   # for exporting under diffusers names


def _expand(entries):
  """Linear/norm entries -> one row per tensor: (our path tuple, Wan key suffix, transform)."""
  rows = []
  for ours, wan, kind in entries:
    if kind == "linear":
      rows += [(ours + "/kernel", wan + ".weight", "transpose"), (ours + "/bias", wan + ".bias", "copy")]
    elif kind == "norm":
      rows += [(ours + "/scale", wan + ".weight", "copy"), (ours + "/bias", wan + ".bias", "copy")]
    else:
      rows.append((ours, wan, kind))
  return [(tuple(o.split("/")), w, k) for o, w, k in rows]


def mapping_table(cfg) -> tuple[list, list]:
  """(top-level rows, per-block rows), each row (our path, Wan key, transform)."""
  top = _TOP + (_I2V_TOP if cfg.is_i2v else [])
  block = _BLOCK + (_I2V_BLOCK if cfg.is_i2v else [])
  return _expand(top), _expand(block)


# MARK: transforms (torch layout <-> ours)

def _to_ours(kind: str, x: np.ndarray) -> np.ndarray:
  if kind == "transpose":       # Linear weight [out, in] -> kernel [in, out]
    return x.T
  if kind == "patch":           # Conv3d [D, C, pt, ph, pw] -> [pt, ph, pw, C, D]
    return x.transpose(2, 3, 4, 1, 0)
  if kind == "modulation":      # [1, n, D] -> [n, D]
    return x.reshape(x.shape[1:])
  return x


def _to_torch(kind: str, x: np.ndarray) -> np.ndarray:
  """The inverse of `_to_ours` (one per-layer parameter back to its PyTorch layout)."""
  if kind == "transpose":
    return x.T
  if kind == "patch":           # [pt, ph, pw, C, D] -> Conv3d [D, C, pt, ph, pw]
    return x.transpose(4, 3, 0, 1, 2)
  if kind == "modulation":
    return x[None]
  return x


def _torch_shape(kind: str, ours: tuple[int, ...]) -> tuple[int, ...]:
  """The source shape that maps onto one (per-layer) parameter of shape `ours`."""
  if kind == "transpose":
    return ours[::-1]
  if kind == "patch":
    pt, ph, pw, c, d = ours
    return (d, c, pt, ph, pw)
  if kind == "modulation":
    return (1, *ours)
  return tuple(ours)


# MARK: layout detection and key normalisation

def detect_layout(keys: Sequence[str]) -> str:
  """'lightning', 'diffusers' or 'wan' from the key names."""
  keys = list(keys)
  if any(k.startswith("model.") for k in keys):
    return "lightning"
  if any(k.startswith("condition_embedder.") or ".attn1." in k for k in keys):
    return "diffusers"
  return "wan"


def _rename(rules, key: str) -> str:
  """`key` renamed by the first rule whose pattern matches it (unchanged when none does)."""
  for pattern, repl in rules:
    new, n = pattern.subn(repl, key)
    if n:
      return new
  return key


def _diffusers_to_wan(key: str) -> str:
  return _rename(_DIFFUSERS_RULES, key)


def wan_to_diffusers(key: str) -> str:
  """A Wan key under its diffusers WanTransformer3DModel name (the inverse of `_diffusers_to_wan`)."""
  return _rename(_WAN_RULES, key)


def wan_key_map(keys: Sequence[str]) -> tuple[dict[str, str], str]:
  """{Wan key: source key} for the DiT tensors among `keys`, and the detected layout."""
  layout = detect_layout(keys)
  keys = list(keys)
  if layout == "lightning":
    keys = [k for k in keys if k.startswith("model.")]
    inner = [k[len("model."):] for k in keys]
    sub = detect_layout(inner)
    rename = _diffusers_to_wan if sub == "diffusers" else (lambda k: k)
    return {rename(i): k for i, k in zip(inner, keys)}, f"lightning/{sub}"
  rename = _diffusers_to_wan if layout == "diffusers" else (lambda k: k)
  return {rename(k): k for k in keys}, layout


def _shape_of(state_dict: Mapping[str, Any], key: str) -> tuple[int, ...]:
  shape_of = getattr(state_dict, "shape_of", None)  # convert.io.LazyStateDict knows shapes without loading
  if shape_of is not None:
    return tuple(shape_of(key))
  return tuple(int(s) for s in state_dict[key].shape)


def to_numpy(x) -> np.ndarray:
  """torch tensor (any dtype) or array -> numpy; bf16/fp16 torch tensors go through float32."""
  if hasattr(x, "detach"):
    import torch
    x = x.detach()
    if x.dtype not in (torch.float32, torch.float64):
      x = x.float()
    return x.cpu().numpy()
  return np.asarray(x)


# MARK: conversion

def _abstract_params(cfg) -> dict:
  """Nested dict of ShapeDtypeStructs = nnx.state(WanModel(cfg)) without the LoRA factors (no memory used)."""
  from flax import nnx
  from eva_jax.models.lora import LoRAParam
  from eva_jax.models.wan.loading import abstract_dit
  _, state = abstract_dit(cfg)
  return nnx.to_pure_dict(nnx.split_state(state, nnx.All(nnx.Param, nnx.Not(LoRAParam)), ...)[0])


def _lookup(tree: dict, path: tuple):
  for p in path:
    tree = tree[p]
  return tree


def plan_dit(state_dict: Mapping[str, Any], cfg, *, ignore: Sequence[str] = ()) -> list[dict]:
  """Validates keys and shapes (without loading tensors) and returns the conversion plan, one entry per output
  parameter: {'path', 'shape', 'kind', 'sources': [source keys, one per layer for stacked params]}."""
  key_map, layout = wan_key_map(list(state_dict.keys()))
  abstract = _abstract_params(cfg)
  top, block = mapping_table(cfg)
  plan, expected = [], set()

  def check(wan_key, kind, our_shape):
    expected.add(wan_key)
    if wan_key not in key_map:
      raise KeyError(f"DiT checkpoint ({layout} layout) is missing key {wan_key!r} "
                     f"(expected shape {_torch_shape(kind, our_shape)})")
    src = key_map[wan_key]
    found, want = _shape_of(state_dict, src), _torch_shape(kind, our_shape)
    if found != want:
      raise ValueError(f"DiT checkpoint key {src!r}: shape {found} does not fit the config "
                       f"(expected {want} for {'/'.join(map(str, path))})")
    return src

  for path, wan, kind in top:
    shape = tuple(_lookup(abstract, path).shape)
    plan.append(dict(path=path, shape=shape, kind=kind, sources=[check(wan, kind, shape)], stacked=False))
  for rel, wan, kind in block:
    if cfg.scan_layers:
      path = ("blocks",) + rel
      shape = tuple(_lookup(abstract, path).shape)                            # [layers, ...]
      sources = [check(f"blocks.{i}.{wan}", kind, shape[1:]) for i in range(cfg.num_layers)]
      plan.append(dict(path=path, shape=shape, kind=kind, sources=sources, stacked=True))
    else:
      for i in range(cfg.num_layers):
        path = ("blocks", i) + rel
        shape = tuple(_lookup(abstract, path).shape)
        plan.append(dict(path=path, shape=shape, kind=kind, sources=[check(f"blocks.{i}.{wan}", kind, shape)],
                         stacked=False))
  unexpected = sorted(k for k in set(key_map) - expected if k not in set(ignore))
  if unexpected:
    shown = ", ".join(f"{key_map[k]!r} {_shape_of(state_dict, key_map[k])}" for k in unexpected[:8])
    raise KeyError(f"DiT checkpoint ({layout} layout) has {len(unexpected)} unexpected key(s) for config "
                   f"{cfg.model_type} dim={cfg.dim} layers={cfg.num_layers}: {shown}"
                   f"{' ...' if len(unexpected) > 8 else ''}")
  return plan


def iter_dit_params(state_dict: Mapping[str, Any], cfg, *, dtype=None,
                    ignore: Sequence[str] = ()) -> Iterator[tuple[tuple, np.ndarray]]:
  """Yields (our path, numpy array) per output parameter, loading source tensors one at a time.

  dtype: numpy/ml_dtypes dtype of the output (default: cfg.param_dtype).
  """
  import jax.numpy as jnp
  out_dtype = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
  for item in plan_dit(state_dict, cfg, ignore=ignore):
    if item["stacked"]:
      out = np.empty(item["shape"], out_dtype)
      for i, src in enumerate(item["sources"]):
        out[i] = _to_ours(item["kind"], to_numpy(state_dict[src]))
    else:
      out = np.ascontiguousarray(_to_ours(item["kind"], to_numpy(state_dict[item["sources"][0]]))
                                 .astype(out_dtype))
    yield item["path"], out


def convert_dit_state_dict(state_dict: Mapping[str, Any], cfg, *, dtype=None,
                           ignore: Sequence[str] = ()) -> dict:
  """Nested dict of numpy arrays with the tree structure of nnx.state(WanModel(cfg)) (LoRA factors excluded):
  `nnx.update(model, nnx.State(converted))` or `nnx.replace_by_pure_dict(state, converted)` loads it."""
  tree: dict = {}
  for path, value in iter_dit_params(state_dict, cfg, dtype=dtype, ignore=ignore):
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return tree


# MARK: export (ours -> PyTorch)

def _param(tree: Mapping, path: tuple):
  for p in path:
    tree = tree[p] if p in tree else tree[str(p)]   # orbax trees key unscanned layers by their string
  return tree


def iter_torch_tensors(params: Mapping, cfg, *, layout: str = "wan", dtype=None) -> Iterator[tuple[str, np.ndarray]]:
  """The mapping table read backwards: (PyTorch key, array) for every DiT parameter of the nested dict
  `params` (`nnx.to_pure_dict` of a WanModel without LoRA factors), stacked layers split per block,
  kernels transposed back. layout 'wan' (the original release names) or 'diffusers' (WanTransformer3DModel)."""
  if layout not in ("wan", "diffusers"):
    raise ValueError(f"layout must be 'wan' or 'diffusers', got {layout!r}")
  rename = wan_to_diffusers if layout == "diffusers" else (lambda k: k)
  top, block = mapping_table(cfg)

  def out(x):
    x = np.asarray(x)
    return np.ascontiguousarray(x.astype(dtype) if dtype is not None else x)

  for path, wan, kind in top:
    yield rename(wan), out(_to_torch(kind, np.asarray(_param(params, path))))
  for rel, wan, kind in block:
    stacked = np.asarray(_param(params, ("blocks",) + rel)) if cfg.scan_layers else None
    for i in range(cfg.num_layers):
      x = stacked[i] if stacked is not None else np.asarray(_param(params, ("blocks", i) + rel))
      yield rename(f"blocks.{i}.{wan}"), out(_to_torch(kind, x))
