"""Wan 2.1 VAE weights (PyTorch) -> eva_jax.models.vae.WanVAE parameters.

Takes either layout (spec/wan.md B.6):
  * the original `Wan2.1_VAE.pth` names (`encoder.conv1`, `encoder.downsamples.{i}.residual.{0,2,3,6}`,
    `encoder.middle.{0,1,2}`, `encoder.head.{0,2}`, `conv1`, `conv2`, `decoder.upsamples.{i}`, ...);
  * diffusers `AutoencoderKLWan` names (`encoder.conv_in`, `encoder.down_blocks.{i}.norm1`, `mid_block`,
    `quant_conv`, `decoder.up_blocks.{i}.resnets.{j}`, `.upsamplers.0`, ...).

    params = convert_vae_state_dict(torch.load('Wan2.1_VAE.pth'), vae_config('wan2.1'))
    nnx.update(vae, params)

Our module tree mirrors the diffusers names, so the mapping is two small rule tables: our path ->
diffusers key, and diffusers key -> original key. Every parameter of the model must be found exactly
once and every key of the state dict used (or named in `ignore`), else KeyError; shapes are checked
after the layout transform, else ValueError. Conv kernels go from channels-first [O, I, (kt,) kh, kw]
to channels-last [(kt,) kh, kw, I, O]; 1x1 convs used as matmuls and the (C, 1, 1[, 1]) norm gammas
drop their singleton axes.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from flax import nnx

from eva_jax.models.vae import VAEConfig, abstract_vae, vae_config

# Our parameter path (dotted) -> diffusers key.
_TO_DIFFUSERS: tuple[tuple[str, str], ...] = (
    (r"\.kernel$", ".weight"),
    (r"\.resample\.", ".resample.1."),          # nn.Sequential(pad or upsample, conv): the conv is index 1
)

_BLOCKS = r"((?:en|de)coder\.(?:downsamples|upsamples|middle)\.\d+)"


def _diffusers_to_original(cfg: VAEConfig) -> tuple[tuple[str, str | Callable], ...]:
  """Rules diffusers key -> original Wan key. Decoder blocks are flattened into `upsamples.{k}`."""
  per_block = cfg.num_res_blocks + 2  # resnets + the upsampler (every block but the last has one)

  def up_resnet(m: re.Match) -> str:
    return f"decoder.upsamples.{int(m[1]) * per_block + int(m[2])}."

  def up_sampler(m: re.Match) -> str:
    return f"decoder.upsamples.{int(m[1]) * per_block + cfg.num_res_blocks + 1}."

  return (
      (r"^encoder\.conv_in\.", "encoder.conv1."),
      (r"^decoder\.conv_in\.", "decoder.conv1."),
      (r"^quant_conv\.", "conv1."),
      (r"^post_quant_conv\.", "conv2."),
      (r"^encoder\.down_blocks\.", "encoder.downsamples."),
      (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", up_resnet),
      (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", up_sampler),
      (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.middle.0."),
      (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.middle.1."),
      (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.middle.2."),
      (r"^(encoder|decoder)\.norm_out\.", r"\1.head.0."),
      (r"^(encoder|decoder)\.conv_out\.", r"\1.head.2."),
      # inside residual blocks: residual = Sequential(norm, SiLU, conv, norm, SiLU, Dropout, conv)
      (_BLOCKS + r"\.norm1\.", r"\1.residual.0."),
      (_BLOCKS + r"\.conv1\.", r"\1.residual.2."),
      (_BLOCKS + r"\.norm2\.", r"\1.residual.3."),
      (_BLOCKS + r"\.conv2\.", r"\1.residual.6."),
      (_BLOCKS + r"\.conv_shortcut\.", r"\1.shortcut."),
  )


def _apply(rules: Iterable[tuple[str, Any]], key: str) -> str:
  for pattern, repl in rules:
    key = re.sub(pattern, repl, key)
  return key


def detect_layout(state_dict: Mapping[str, Any]) -> str:
  """'original' (Wan2.1_VAE.pth) or 'diffusers' (AutoencoderKLWan)."""
  if "encoder.conv_in.weight" in state_dict:
    return "diffusers"
  if "encoder.conv1.weight" in state_dict:
    return "original"
  sample = sorted(state_dict)[:5]
  raise KeyError(f"convert_vae_state_dict: not a Wan VAE state dict (no 'encoder.conv_in.weight' (diffusers) "
                 f"or 'encoder.conv1.weight' (original)); first keys: {sample}")


def torch_key(path: str, layout: str, cfg: VAEConfig) -> str:
  """Our dotted parameter path -> the key of `layout` ('diffusers' or 'original')."""
  key = _apply(_TO_DIFFUSERS, path)
  return key if layout == "diffusers" else _apply(_diffusers_to_original(cfg), key)


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # torch tensor: convert lazily, one parameter at a time
    value = value.detach().float().cpu().numpy()
  return np.asarray(value, dtype=np.float32)


def _to_channels_last(arr: np.ndarray) -> np.ndarray:
  if arr.ndim == 5:   # Conv3d [O, I, kt, kh, kw] -> [kt, kh, kw, I, O]
    return arr.transpose(2, 3, 4, 1, 0)
  if arr.ndim == 4:   # Conv2d [O, I, kh, kw] -> [kh, kw, I, O]
    return arr.transpose(2, 3, 1, 0)
  return arr


def _fit(key: str, arr: np.ndarray, expected: tuple[int, ...]) -> np.ndarray:
  """Drops singleton axes where our layout has none (1x1 convs as matmuls, gammas); else shapes must match."""
  if arr.shape == expected:
    return arr
  if [d for d in arr.shape if d != 1] == [d for d in expected if d != 1]:
    return arr.reshape(expected)
  raise ValueError(f"convert_vae_state_dict: {key!r} has shape {arr.shape} (after the channels-last transform), "
                   f"expected {expected}")


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat: Mapping[tuple, Any]) -> dict:
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return tree


def convert_vae_state_dict(state_dict: Mapping[str, Any], cfg: VAEConfig | None = None, *,
                           ignore: Iterable[str] = ()) -> dict:
  """PyTorch Wan VAE state dict (original or diffusers layout) -> nested dict like nnx.state(WanVAE(cfg)).

  `cfg` defaults to vae_config('wan2.1'); `ignore`: regexes of state-dict keys that may be present
  without being used.
  """
  cfg = cfg or vae_config("wan2.1")
  layout = detect_layout(state_dict)
  expected = _flatten(nnx.to_pure_dict(abstract_vae(cfg)[1]))
  dtype = np.dtype(cfg.param_dtype)

  out, used, missing = {}, set(), []
  for path, leaf in expected.items():
    key = torch_key(".".join(str(p) for p in path), layout, cfg)
    if key not in state_dict:
      missing.append(key)
      continue
    used.add(key)
    arr = _fit(key, _to_channels_last(_to_numpy(state_dict[key])), tuple(leaf.shape))
    out[path] = arr.astype(dtype, copy=False)
  ignore_re = [re.compile(p) for p in ignore]
  unexpected = sorted(k for k in state_dict if k not in used and not any(r.search(k) for r in ignore_re))
  if missing or unexpected:
    raise KeyError(f"convert_vae_state_dict ({layout} layout): missing keys {missing[:20]}"
                   f"{' ...' if len(missing) > 20 else ''} ({len(missing)} in all); unexpected keys "
                   f"{unexpected[:20]}{' ...' if len(unexpected) > 20 else ''} ({len(unexpected)} in all)")
  return _unflatten(out)
