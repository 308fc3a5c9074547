"""LoRA adapters as their own nnx.Variable type.

`LoRAParam` subclasses `nnx.Param`, so `nnx.Optimizer(model, tx, wrt=LoRAParam)` trains only the adapters while
`nnx.Param` still selects everything for checkpointing. `LoRALinear` is a Linear with a low-rank update
`x @ A @ B * alpha / r` (A [in, r] initialised like PEFT's kaiming-uniform, B [r, out] zeros, so a fresh adapter
is a no-op). The GRPO reference policy is the same model with the adapters switched off:

  with disable_lora(model):
    ref = model(...)          # exactly the base model, no copy of its weights

`merge_lora` folds the adapters into the kernels; `export_peft` / `load_peft` / `merge_peft` write and read
safetensors adapters in two layouts: 'peft' (`base_model.model.blocks.0.self_attn.q.lora_A.weight` [r, in],
`lora_B` [out, r], for `PeftModel.from_pretrained`) and 'diffusers' (`diffusion_model.blocks.0.self_attn.q.lora_A
.weight` plus `.alpha`, the Wan LoRA layout diffusers' `load_lora_weights` converts).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eva_jax.models.wan.layers import Linear, Names, xavier_uniform


class LoRAParam(nnx.Param):
  """A low-rank adapter factor: a Param, but selectable on its own (`wrt=LoRAParam`)."""


def peft_a_init(key, shape, dtype=jnp.float32):
  """PEFT's kaiming_uniform_(a=sqrt(5)) on lora_A [r, in]: U(-1/sqrt(in), 1/sqrt(in)); shape here is [.., in, r]."""
  bound = 1.0 / math.sqrt(shape[-2])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class LoRALinear(Linear):
  """Linear plus `(x @ lora_a @ lora_b) * alpha / rank`, computed in the compute dtype."""

  def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float, names: Names = ("embed", "mlp"),
               use_bias: bool = True, dtype=jnp.float32, param_dtype=jnp.float32, kernel_init=xavier_uniform,
               matmul_dtype: str = "default", rngs: nnx.Rngs):
    super().__init__(in_features, out_features, names=names, use_bias=use_bias, dtype=dtype,
                     param_dtype=param_dtype, kernel_init=kernel_init, matmul_dtype=matmul_dtype, rngs=rngs)
    if rank <= 0:
      raise ValueError(f"LoRALinear needs rank > 0, got {rank}")
    self.rank, self.alpha = rank, float(alpha)
    self.lora_enabled = True
    self.lora_a = LoRAParam(peft_a_init(rngs.params(), (in_features, rank), param_dtype),
                            out_sharding=(names[0], None))
    self.lora_b = LoRAParam(jnp.zeros((rank, out_features), param_dtype), out_sharding=(None, names[1]))

  @property
  def lora_scale(self) -> float:
    return self.alpha / self.rank

  def delta(self, x: jax.Array) -> jax.Array | None:
    """(x @ A) @ B * alpha / r in the compute dtype (never in FP8); None while the adapter is disabled.
    `Linear.__call__` and `fused_linear` (q/k/v as one matmul) add it to the base output."""
    if not self.lora_enabled:
      return None
    xa = jnp.dot(x.astype(self.dtype), self.lora_a[...].astype(self.dtype))
    return jnp.dot(xa, self.lora_b[...].astype(self.dtype)) * jnp.asarray(self.lora_scale, self.dtype)


def lora_modules(model: nnx.Module) -> Iterator[tuple[tuple, LoRALinear]]:
  """(path, LoRALinear) for every adapter in the model."""
  for path, module in nnx.iter_modules(model):
    if isinstance(module, LoRALinear):
      yield tuple(path), module


def lora_state(model: nnx.Module) -> nnx.State:
  """Only the adapter factors (what a LoRA checkpoint needs to keep)."""
  return nnx.state(model, LoRAParam)


def zero_lora(state):
  """A copy of a state (or pure dict) whose LoRA factors B are zero, i.e. the adapters are no-ops."""
  def zero(path, leaf):
    # In an nnx.State the path ends in (..., DictKey('lora_b'), GetAttrKey('value')); in a pure dict in 'lora_b'.
    keys = [getattr(p, "key", None) for p in path[-2:]]
    return jnp.zeros_like(leaf) if "lora_b" in keys else leaf
  return jax.tree_util.tree_map_with_path(zero, state)


@contextlib.contextmanager
def disable_lora(model: nnx.Module):
  """Within the block the model computes exactly its base weights (adapters skipped, not zeroed)."""
  mods = [m for _, m in lora_modules(model)]
  old = [m.lora_enabled for m in mods]
  for m in mods:
    m.lora_enabled = False
  try:
    yield model
  finally:
    for m, flag in zip(mods, old):
      m.lora_enabled = flag


def merge_lora(model: nnx.Module) -> None:
  """kernel += scale * A @ B for every adapter, then B = 0 (in place; the forward is unchanged)."""
  for _, m in lora_modules(model):
    a = m.lora_a[...].astype(jnp.float32)
    b = m.lora_b[...].astype(jnp.float32)
    delta = jnp.einsum("...ir,...ro->...io", a, b) * m.lora_scale
    m.kernel[...] = (m.kernel[...].astype(jnp.float32) + delta).astype(m.kernel[...].dtype)
    m.lora_b[...] = jnp.zeros_like(m.lora_b[...])


# MARK: PEFT / diffusers adapter files

# layout -> (key prefix, file name inside the adapter directory)
LAYOUTS = {
    "peft": ("base_model.model.", "adapter_model.safetensors"),            # PeftModel.from_pretrained
    "diffusers": ("diffusion_model.", "pytorch_lora_weights.safetensors"),  # diffusers load_lora_weights
}
# Our module names where they differ from the original Wan names (the 'diffusers' layout uses Wan's).
_WAN_NAMES = ((".ffn.fc1", ".ffn.0"), (".ffn.fc2", ".ffn.2"))


def _peft_prefixes(path: tuple, layers: int | None, layer_container: str) -> list[str]:
  """Torch-style module names for a LoRALinear path; a stacked (scanned) module expands to one per layer."""
  parts = [str(p) for p in path]
  if layers is None:
    return [".".join(parts)]
  if layer_container not in parts:
    raise ValueError(f"stacked adapter at {'.'.join(parts)} is not under {layer_container!r}")
  at = parts.index(layer_container) + 1
  return [".".join(parts[:at] + [str(i)] + parts[at:]) for i in range(layers)]


def _stacked_layers(m: LoRALinear) -> int | None:
  return m.lora_a[...].shape[0] if m.lora_a[...].ndim == 3 else None


def _rename(name: str, to_wan: bool) -> str:
  for ours, wan in _WAN_NAMES:
    old, new = (ours, wan) if to_wan else (wan, ours)
    if name.endswith(old):
      return name[:-len(old)] + new
  return name


def _atomic_write(file: str, write) -> None:
  """write(tmp) then os.replace(tmp, file): a failed or killed export leaves the old file or none."""
  tmp = f"{file}.tmp-{os.getpid()}"
  try:
    write(tmp)
    os.replace(tmp, file)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def export_peft(model: nnx.Module, path: str, *, layer_container: str = "blocks", layout: str = "peft",
                prefix: str | None = None) -> str:
  """Writes the model's adapters into directory `path`; returns the safetensors file written.

  layout 'peft' (default): `adapter_model.safetensors` with `base_model.model.blocks.0.self_attn.q.lora_A.weight`
    [r, in] / `lora_B.weight` [out, r], plus `adapter_config.json`: `PeftModel.from_pretrained` loads it onto a
    torch module with Wan's names.
  layout 'diffusers': `pytorch_lora_weights.safetensors` with the original Wan names under `diffusion_model.`
    and one `<module>.alpha` scalar each, the Wan/ComfyUI LoRA layout that diffusers' Wan pipelines convert
    (`pipe.load_lora_weights(path)`); the scale alpha / r travels with the file.
  prefix: replaces the layout's key prefix. Each file is written to a temporary name and renamed."""
  from safetensors.numpy import save_file
  if layout not in LAYOUTS:
    raise ValueError(f"export_peft: layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
  prefix = LAYOUTS[layout][0] if prefix is None else prefix
  tensors, targets, rank, alpha = {}, set(), None, None
  for mpath, m in lora_modules(model):
    a = np.asarray(jax.device_get(m.lora_a[...]), np.float32)
    b = np.asarray(jax.device_get(m.lora_b[...]), np.float32)
    layers = _stacked_layers(m)
    for i, name in enumerate(_peft_prefixes(mpath, layers, layer_container)):
      ai, bi = (a[i], b[i]) if layers is not None else (a, b)
      name = prefix + (_rename(name, to_wan=True) if layout == "diffusers" else name)
      tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(ai.T)   # [r, in]
      tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(bi.T)   # [out, r]
      if layout == "diffusers":
        tensors[f"{name}.alpha"] = np.asarray(m.alpha, np.float32)
    targets.add(str(mpath[-1]))
    rank, alpha = m.rank, m.alpha
  if not tensors:
    raise ValueError("export_peft: the model has no LoRA adapters (lora_rank = 0?)")
  os.makedirs(path, exist_ok=True)
  file = os.path.join(path, LAYOUTS[layout][1])
  _atomic_write(file, lambda tmp: save_file(tensors, tmp))
  config = dict(peft_type="LORA", r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                target_modules=sorted(targets))

  def write_config(tmp):
    with open(tmp, "w") as f:
      json.dump(config, f, indent=2)
  _atomic_write(os.path.join(path, "adapter_config.json"), write_config)
  return file


def _adapter_file(path: str) -> str:
  """The safetensors file of an adapter directory (either layout) or `path` itself."""
  if path.endswith(".safetensors"):
    return path
  for _, name in LAYOUTS.values():
    if os.path.exists(os.path.join(path, name)):
      return os.path.join(path, name)
  raise FileNotFoundError(f"{path}: no adapter file ({' or '.join(n for _, n in LAYOUTS.values())})")


def _read_adapter(path: str) -> tuple[str, dict[str, dict]]:
  """(file, {module name in our naming, `blocks.3.self_attn.q`: {'A', 'B', 'alpha' (or None), 'keys'}}).
  Keys with the 'peft' or 'diffusers' prefix (or none) are accepted; Wan names map back to ours."""
  from safetensors.numpy import load_file
  file = _adapter_file(path)
  try:
    tensors = load_file(file)
  except Exception as e:  # noqa: BLE001  safetensors raises its own error type (a damaged or truncated file)
    raise ValueError(f"LoRA adapter {file} is not a readable safetensors file: {' '.join(str(e).split())}") from None
  modules: dict[str, dict] = {}
  for key, value in tensors.items():
    name, part = key, None
    for suffix, label in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".alpha", "alpha")):
      if key.endswith(suffix):
        name, part = key[:-len(suffix)], label
    if part is None:
      raise KeyError(f"{file}: unexpected adapter key {key!r} (expected .lora_A.weight, .lora_B.weight, .alpha)")
    wan = name.startswith(LAYOUTS["diffusers"][0])
    for p, _ in LAYOUTS.values():
      name = name.removeprefix(p)
    name = _rename(name, to_wan=False) if wan else name
    entry = modules.setdefault(name, dict(A=None, B=None, alpha=None, keys={}))
    entry[part] = float(value) if part == "alpha" else value
    entry["keys"][part] = key
  for name, entry in modules.items():
    for part, label in (("A", "lora_A"), ("B", "lora_B")):
      if entry[part] is None:
        other = next(iter(entry["keys"].values()))
        raise KeyError(f"{file}: {label} of {name!r} is missing (found {other!r})")
  return file, modules


def load_peft(model: nnx.Module, path: str, *, layer_container: str = "blocks", strict: bool = True) -> None:
  """Loads an adapter directory (or .safetensors file) written by `export_peft` (either layout) or PEFT into the
  model's LoRA factors. A per-module `.alpha` that disagrees with the model's lora_alpha raises."""
  file, modules = _read_adapter(path)
  used = set()
  for mpath, m in lora_modules(model):
    layers = _stacked_layers(m)
    names = _peft_prefixes(mpath, layers, layer_container)
    a_list, b_list = [], []
    for name in names:
      if name not in modules:
        raise KeyError(f"{file}: adapter key {name + '.lora_A.weight'!r} is missing")
      entry = modules[name]
      if entry["alpha"] is not None and not math.isclose(entry["alpha"], m.alpha):
        raise ValueError(f"{file}: {name}.alpha is {entry['alpha']}, the model's lora_alpha is {m.alpha}")
      a_list.append(entry["A"].T)
      b_list.append(entry["B"].T)
      used.add(name)
    a = np.stack(a_list) if layers is not None else a_list[0]
    b = np.stack(b_list) if layers is not None else b_list[0]
    for var, new, label in ((m.lora_a, a, "lora_A"), (m.lora_b, b, "lora_B")):
      if tuple(new.shape) != tuple(var[...].shape):
        raise ValueError(f"{file}: {names[0]}.{label} has shape {new.shape} (transposed), "
                         f"expected {tuple(var[...].shape)}")
      var[...] = jnp.asarray(new, var[...].dtype)
  unused = sorted(modules[n]["keys"]["A"] for n in set(modules) - used)
  if strict and unused:
    raise KeyError(f"{file}: unexpected adapter keys {unused[:5]}{' ...' if len(unused) > 5 else ''}")


def merge_peft(model: nnx.Module, path: str, *, layer_container: str = "blocks") -> int:
  """Adds a LoRA adapter (`export_peft`'s layouts or PEFT's) into the kernels of a model *without*
  adapters: kernel += (alpha / r) · Aᵀ Bᵀ, alpha from the module's `.alpha` key, else adapter_config.json.
  This is how inference applies a GRPO adapter to a base or SFT DiT. Stacked (scanned) layers take
  `<container>.<i>.` keys into slice i. Returns the modules updated. Every adapter key must land on a
  module; a missing module or a shape mismatch raises naming the key."""
  file, adapters = _read_adapter(path)
  cfg_file = os.path.join(os.path.dirname(file), "adapter_config.json")
  peft_alpha = None
  if any(e["alpha"] is None for e in adapters.values()):
    if not os.path.exists(cfg_file):
      raise FileNotFoundError(f"{cfg_file}: PEFT adapter_config.json (r, lora_alpha) is missing")
    with open(cfg_file) as f:
      peft_cfg = json.load(f)
    peft_alpha = (float(peft_cfg["lora_alpha"]), float(peft_cfg["r"]))
  modules = {".".join(str(p) for p in path_): m for path_, m in nnx.iter_modules(model)}
  count = 0
  for name in sorted(adapters):
    entry = adapters[name]
    rank = entry["A"].shape[0]
    scale = entry["alpha"] / rank if entry["alpha"] is not None else peft_alpha[0] / peft_alpha[1]
    module, index = modules.get(name), None
    parts = name.split(".")
    if module is None and layer_container in parts:
      at = parts.index(layer_container) + 1
      if at < len(parts) and parts[at].isdigit():
        index = int(parts[at])
        module = modules.get(".".join(parts[:at] + parts[at + 1:]))
    if module is None or not hasattr(module, "kernel"):
      raise KeyError(f"{file}: adapter {name!r} matches no linear layer of the model")
    delta = (entry["A"].T.astype(np.float32) @ entry["B"].T.astype(np.float32)) * scale   # [in, out]
    kernel = jnp.asarray(module.kernel[...])
    target = kernel[index] if index is not None else kernel
    if tuple(target.shape) != delta.shape:
      raise ValueError(f"{file}: adapter {name!r} gives a delta of shape {delta.shape}, the kernel is {target.shape}")
    new = target.astype(jnp.float32) + delta
    module.kernel[...] = (kernel.at[index].set(new.astype(kernel.dtype)) if index is not None
                          else new.astype(kernel.dtype))
    count += 1
  if not count:
    raise ValueError(f"{file}: no LoRA adapter tensors found")
  return count
