"""The released EVA IDM checkpoint (`IDM_singleview.pt`) -> eva_jax `IDM` state.

The release is a dict `{'model_state_dict': {...}, 'optimizer_state_dict': {...}, 'step': ...}` (or a bare
state dict) with torchvision ResNet-50 names under `model.backbone.*`, `model.spatial_softmax.temperature`,
`model.mlp_head.{0,1,4,6}.*`, and the buffers `train_mean` / `train_std` (spec/eva.md B).

One declarative table (`idm_param_mapping`) pairs every eva_jax path with its torch key and a transform;
the conversion is strict: a missing key, a leftover key that is not in `IGNORABLE`, or a wrong shape
raises, naming the key and both shapes.

  from convert.idm import convert_idm_state_dict, infer_idm_config
  sd = torch.load('IDM_singleview.pt', map_location='cpu', weights_only=True)
  params = convert_idm_state_dict(sd)                  # nested dict == nnx.state(IDM(cfg)) structure
  idm = IDM(infer_idm_config(sd), rngs=nnx.Rngs(0)); nnx.update(idm, params)
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any, Callable, Mapping

import numpy as np

# Keys of the torch state dict that carry nothing for inference: the classifier that `Resnet_plus`
# never calls and BatchNorm's step counters.
IGNORABLE = ("model.backbone.fc.weight", "model.backbone.fc.bias", "*.num_batches_tracked")
# Top-level entries of the training checkpoint next to `model_state_dict` (optimizer state, counters).
IGNORABLE_TOP_LEVEL = ("optimizer_state_dict", "step", "epoch", "scheduler_state_dict", "global_step",
                       "lr_scheduler", "args", "config")

_BN = (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"), ("var", "running_var"))


def _to_numpy(v) -> np.ndarray:
  if hasattr(v, "detach"):  # torch tensor: converted lazily, one key at a time
    return v.detach().float().cpu().numpy()
  return np.asarray(v, dtype=np.float32)


TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "copy": lambda a: a,
    "conv": lambda a: a.transpose(2, 3, 1, 0),    # torch OIHW -> HWIO
    "linear": lambda a: a.T,                      # torch [out, in] -> [in, out]
}


def _torch_shape(transform: str, shape: tuple) -> tuple:
  """The torch-layout shape that `TRANSFORMS[transform]` maps to the eva_jax `shape`."""
  if transform == "conv":   # HWIO -> OIHW
    return (shape[3], shape[2], shape[0], shape[1])
  if transform == "linear":
    return tuple(reversed(shape))
  return shape


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
  """The model weights of a training checkpoint (`model_state_dict`) or a bare state dict."""
  if "model_state_dict" in checkpoint:
    unknown = [k for k in checkpoint if k != "model_state_dict" and k not in IGNORABLE_TOP_LEVEL]
    if unknown:
      raise KeyError(f"IDM checkpoint: unexpected top-level keys {unknown} next to 'model_state_dict' "
                     f"(ignorable: {IGNORABLE_TOP_LEVEL})")
    return checkpoint["model_state_dict"]
  return checkpoint


def _has_downsample(stage: int, j: int, width: int, expansion: int) -> bool:
  # First block of every stage: stride 2 (stages 2..4) or a width change (stage 1).
  return j == 0 and (stage > 0 or expansion != 1)


def idm_param_mapping(cfg) -> list[tuple[tuple, str, str]]:
  """[(eva_jax state path, torch key, transform)] for an `IDMConfig`; every leaf exactly once."""
  rows: list[tuple[tuple, str, str]] = []

  def conv(path, key):
    rows.append((path + ("kernel",), f"{key}.weight", "conv"))

  def bn(path, key):
    rows.extend((path + (ours,), f"{key}.{theirs}", "copy") for ours, theirs in _BN)

  def linear(path, key):
    rows.append((path + ("kernel",), f"{key}.weight", "linear"))
    rows.append((path + ("bias",), f"{key}.bias", "copy"))

  conv(("backbone", "conv1"), "model.backbone.conv1")
  bn(("backbone", "bn1"), "model.backbone.bn1")
  for s, n in enumerate(cfg.blocks):
    for j in range(n):
      path, key = ("backbone", f"layer{s + 1}", j), f"model.backbone.layer{s + 1}.{j}"
      for i in (1, 2, 3):
        conv(path + (f"conv{i}",), f"{key}.conv{i}")
        bn(path + (f"bn{i}",), f"{key}.bn{i}")
      if _has_downsample(s, j, cfg.width, cfg.expansion):
        conv(path + ("downsample_conv",), f"{key}.downsample.0")
        bn(path + ("downsample_bn",), f"{key}.downsample.1")
  rows.append((("spatial_softmax", "temperature"), "model.spatial_softmax.temperature", "copy"))
  linear(("mlp_head", "fc1"), "model.mlp_head.0")
  rows.append((("mlp_head", "norm", "scale"), "model.mlp_head.1.weight", "copy"))
  rows.append((("mlp_head", "norm", "bias"), "model.mlp_head.1.bias", "copy"))
  linear(("mlp_head", "fc2"), "model.mlp_head.4")
  linear(("mlp_head", "fc3"), "model.mlp_head.6")
  rows.append((("train_mean",), "train_mean", "copy"))
  rows.append((("train_std",), "train_std", "copy"))
  return rows


def infer_idm_config(checkpoint: Mapping[str, Any], **overrides):
  """The `IDMConfig` a state dict was made for (depths, widths, frames, head, mean/std)."""
  from eva_jax.models.idm import IDMConfig  # local: keeps `python -m convert --help` light
  sd = unwrap_state_dict(checkpoint)
  shape = lambda k: tuple(_require(sd, k).shape)
  blocks = []
  for s in range(1, 10):
    idx = {int(m.group(1)) for k in sd if (m := re.match(rf"model\.backbone\.layer{s}\.(\d+)\.", k))}
    if not idx:
      break
    blocks.append(max(idx) + 1)
  width, in_ch = shape("model.backbone.conv1.weight")[:2]
  expansion = shape("model.backbone.layer1.0.conv3.weight")[0] // shape("model.backbone.layer1.0.conv1.weight")[0]
  fields = dict(
      blocks=tuple(blocks), width=width, expansion=expansion, num_frames=in_ch // 3,
      mlp_dims=(shape("model.mlp_head.0.weight")[0], shape("model.mlp_head.4.weight")[0]),
      action_dim=shape("model.mlp_head.6.weight")[0],
      train_mean=tuple(float(x) for x in _to_numpy(_require(sd, "train_mean"))),
      train_std=tuple(float(x) for x in _to_numpy(_require(sd, "train_std"))))
  fields.update(overrides)
  return IDMConfig(**fields)


def _require(sd: Mapping[str, Any], key: str):
  if key not in sd:
    raise KeyError(f"IDM state dict: missing key {key!r}")
  return sd[key]


def _expected_shapes(cfg) -> dict:
  import jax
  from flax import nnx
  from eva_jax.models.idm import IDM
  abstract = jax.eval_shape(lambda: nnx.state(IDM(cfg, rngs=nnx.Rngs(0))))
  return nnx.to_pure_dict(abstract)


def _flatten(tree, prefix=()) -> dict[tuple, Any]:
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, prefix + (k,)))
    return out
  return {prefix: tree}


def convert_idm_state_dict(state_dict: Mapping[str, Any], cfg=None,
                           ignore: tuple[str, ...] = ()) -> dict:
  """torch IDM checkpoint -> nested dict of float32 numpy arrays shaped like `nnx.state(IDM(cfg))`.

  `cfg` defaults to `infer_idm_config(state_dict)`. `ignore` adds glob patterns of torch keys that
  may be left unused (on top of `IGNORABLE`). Raises KeyError for missing or unexpected keys and
  ValueError for shape mismatches, naming the key and both shapes.
  """
  sd = unwrap_state_dict(state_dict)
  cfg = cfg if cfg is not None else infer_idm_config(sd)
  expected = _flatten(_expected_shapes(cfg))
  rows = idm_param_mapping(cfg)
  produced = [path for path, _, _ in rows]
  if sorted(map(str, produced)) != sorted(map(str, expected)):  # table and module must agree
    missing = set(expected) - set(produced)
    extra = set(produced) - set(expected)
    raise AssertionError(f"convert/idm.py mapping table out of sync with IDM: missing {missing}, extra {extra}")

  out: dict = {}
  used = set()
  for path, key, transform in rows:
    value = TRANSFORMS[transform](_to_numpy(_require(sd, key)))
    want = tuple(expected[path].shape)
    if value.shape != want:
      raise ValueError(f"IDM state dict: {key!r} -> {'/'.join(map(str, path))}: expected shape {want} "
                       f"(after {transform!r}), found {value.shape}")
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = np.ascontiguousarray(value, dtype=np.float32)
    used.add(key)

  patterns = IGNORABLE + tuple(ignore)
  leftover = [k for k in sd if k not in used and not any(fnmatch.fnmatchcase(k, p) for p in patterns)]
  if leftover:
    raise KeyError(f"IDM state dict: unexpected keys {leftover[:10]}{' ...' if len(leftover) > 10 else ''} "
                   f"({len(leftover)} in all; ignorable patterns: {patterns})")
  return out


def convert_resnet_backbone(state_dict: Mapping[str, Any], cfg, *, source: str = "ResNet state dict") -> dict:
  """A torchvision ResNet state dict (ImageNet `resnet50` weights: `conv1.weight`, `bn1.*`,
  `layer1..4.*`, `fc.*`) -> the `backbone` subtree of the IDM state, the way the authors initialise
  training: the 3-channel stem is repeated over the stacked frames and divided by their number
  (channel t*3 + c of the 9-channel stem = ImageNet channel c / 3). `fc.*` and the BatchNorm step
  counters are not used; anything else left over, a missing key or a wrong shape raises, naming
  `source` (the file) and the key."""
  sd = dict(state_dict)
  if "model_state_dict" in sd or any(k.startswith("model.backbone.") for k in sd):
    raise ValueError(f"{source}: this is an IDM checkpoint (keys 'model.backbone.*'), not a torchvision "
                     "ResNet state dict; load it with init.kind='torch' to fine-tune it")
  if "conv1.weight" not in sd:
    prefixes = sorted({k.split(".")[0] for k in sd})[:8]
    hint = " (strip the 'module.' prefix of a DataParallel save)" if "module" in prefixes else ""
    raise KeyError(f"{source}: not a torchvision ResNet state dict: no 'conv1.weight'{hint}; "
                   f"top-level names found: {prefixes}")
  w = _to_numpy(sd["conv1.weight"])
  in_ch = 3 * cfg.num_frames
  if w.ndim != 4 or w.shape[1] not in (3, in_ch):
    raise ValueError(f"{source}: 'conv1.weight' has shape {w.shape}; expected [{cfg.width}, 3, 7, 7] "
                     f"(ImageNet) or [{cfg.width}, {in_ch}, 7, 7]")
  if w.shape[1] == 3 and in_ch != 3:
    sd["conv1.weight"] = np.tile(w, (1, cfg.num_frames, 1, 1)) / cfg.num_frames
  prefix = "model.backbone."
  expected = _flatten(_expected_shapes(cfg))
  out: dict = {}
  used = set()
  for path, key, transform in idm_param_mapping(cfg):
    if path[0] != "backbone":
      continue
    name = key[len(prefix):]
    if name not in sd:
      raise KeyError(f"{source}: missing key {name!r} (the config's trunk has blocks {tuple(cfg.blocks)}, "
                     f"width {cfg.width}: resnet50 is (3, 4, 6, 3), 64)")
    raw, want = _to_numpy(sd[name]), _torch_shape(transform, tuple(expected[path].shape))
    if raw.shape != want:
      raise ValueError(f"{source}: {name!r}: expected shape {want}, found {raw.shape}")
    value = TRANSFORMS[transform](raw)
    node = out
    for p in path[1:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = np.ascontiguousarray(value, dtype=np.float32)
    used.add(name)
  ignorable = ("fc.weight", "fc.bias", "*.num_batches_tracked")
  leftover = [k for k in sd if k not in used and not any(fnmatch.fnmatchcase(k, p) for p in ignorable)]
  if leftover:
    raise KeyError(f"{source}: unexpected keys {leftover[:10]} ({len(leftover)} in all; the config's trunk "
                   f"has blocks {tuple(cfg.blocks)})")
  return out


def _map_tree(fn, tree):
  if isinstance(tree, Mapping):
    return {k: _map_tree(fn, v) for k, v in tree.items()}
  return fn(tree)


def load_idm(checkpoint: Mapping[str, Any], cfg=None, **cfg_overrides):
  """Builds an `IDM` in eval mode and loads a torch checkpoint into it (cfg inferred if not given)."""
  from flax import nnx
  from eva_jax.models.idm import IDM
  cfg = cfg if cfg is not None else infer_idm_config(checkpoint, **cfg_overrides)
  import jax.numpy as jnp
  # Built abstractly: no random initialisation (which costs a compile) for weights overwritten anyway.
  model = nnx.eval_shape(lambda: IDM(cfg, rngs=nnx.Rngs(0)))
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, _map_tree(jnp.asarray, convert_idm_state_dict(checkpoint, cfg)))
  nnx.update(model, state)
  model.eval()
  return model
