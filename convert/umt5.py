"""umT5 encoder weights: Wan's `models_t5_umt5-xxl-enc-bf16.pth` or HF `UMT5EncoderModel` -> eva_jax.

    sd = torch.load('models_t5_umt5-xxl-enc-bf16.pth', map_location='cpu')
    params = convert_umt5_state_dict(sd, umt5_config('umt5-xxl'))
    nnx.update(encoder, params)

The layout is detected from the keys. Mappings are tables (jax path <- torch key, transform); the
per-layer keys carry `{i}` and are stacked along the leading 'layers' axis of the scanned blocks.
`convert_with_table` is the shared strict engine (also used by convert/clip.py): every jax parameter
must be produced exactly once with its expected shape, and every torch key must be consumed or named
as ignorable.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np

# A transform maps one torch array (numpy float32, PyTorch [out, in] convention) to the jax layout.
Transform = Callable[[np.ndarray], np.ndarray]
Entry = tuple[str, str, Transform]  # (jax path 'a/b/c', torch key (may hold '{i}'), transform)

IDENTITY: Transform = lambda w: w
TRANSPOSE: Transform = lambda w: w.T  # torch Linear [out, in] -> flax kernel [in, out]


def to_numpy(value: Any) -> np.ndarray:
  """torch tensor (any dtype, bf16 included) or array-like -> float32 numpy."""
  if hasattr(value, "detach"):
    return value.detach().to("cpu").float().numpy()
  arr = np.asarray(value)
  return arr.astype(np.float32) if arr.dtype != np.float32 else arr


def expected_shapes(model_fn: Callable[[], Any]) -> dict:
  """Nested dict of parameter shapes of the module `model_fn()` builds, without allocating it."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  abstract = nnx.eval_shape(model_fn)
  return jax.tree.map(lambda x: tuple(x.shape), nnx.to_pure_dict(nnx.state(abstract)))


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    path = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      out.update(_flatten(v, path))
    else:
      out[path] = v
  return out


def _set(tree: dict, path: str, value) -> None:
  *parents, leaf = path.split("/")
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = value


def convert_with_table(state_dict: Mapping[str, Any], table: Sequence[Entry], num_layers: int,
                       shapes: Mapping, *, ignore: Sequence[str] = (), dtype: Any = np.float32,
                       name: str = "checkpoint") -> dict:
  """Applies a mapping table strictly; returns the nested dict of numpy arrays matching `shapes`.

  `{i}` in a torch key means "one key per layer, i = 0..num_layers-1, stacked on axis 0". A torch key
  may feed several entries (e.g. a fused qkv split three ways). `ignore` holds regexes of torch keys
  that are known and deliberately unused.
  """
  want = _flatten(shapes)
  produced: dict = {}
  consumed: set[str] = set()
  missing: list[str] = []

  def fetch(key: str, transform: Transform) -> np.ndarray | None:
    if key not in state_dict:
      missing.append(key)
      return None
    consumed.add(key)
    return transform(to_numpy(state_dict[key]))

  for jax_path, torch_key, transform in table:
    if jax_path not in want:
      raise KeyError(f"{name}: mapping table names {jax_path!r}, which the model does not have")
    if jax_path in produced:
      raise KeyError(f"{name}: mapping table produces {jax_path!r} twice")
    if "{i}" in torch_key:
      parts = [fetch(torch_key.format(i=i), transform) for i in range(num_layers)]
      if any(p is None for p in parts):
        continue
      arr = np.stack(parts)
    else:
      arr = fetch(torch_key, transform)
      if arr is None:
        continue
    if tuple(arr.shape) != tuple(want[jax_path]):
      raise ValueError(f"{name}: {torch_key!r} -> {jax_path!r}: expected shape {tuple(want[jax_path])}, "
                       f"found {tuple(arr.shape)}")
    produced[jax_path] = arr.astype(dtype, copy=False)

  if missing:
    raise KeyError(f"{name}: missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''} "
                   f"({len(missing)} in all)")
  not_made = sorted(set(want) - set(produced))
  if not_made:
    raise KeyError(f"{name}: no mapping produces the model parameters {not_made}")
  patterns = [re.compile(p) for p in ignore]
  unexpected = sorted(k for k in state_dict
                      if k not in consumed and not any(p.fullmatch(k) for p in patterns))
  if unexpected:
    raise KeyError(f"{name}: unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} "
                   f"({len(unexpected)} in all)")
  out: dict = {}
  for path, arr in produced.items():
    _set(out, path, arr)
  return out


# MARK: umT5 tables

# HF UMT5EncoderModel names (`encoder.block.{i}.layer.{0: attention, 1: FFN}`).
HF_TABLE: tuple[Entry, ...] = (
    ("embed/embedding", "shared.weight", IDENTITY),
    ("blocks/norm1/scale", "encoder.block.{i}.layer.0.layer_norm.weight", IDENTITY),
    ("blocks/attn/q/kernel", "encoder.block.{i}.layer.0.SelfAttention.q.weight", TRANSPOSE),
    ("blocks/attn/k/kernel", "encoder.block.{i}.layer.0.SelfAttention.k.weight", TRANSPOSE),
    ("blocks/attn/v/kernel", "encoder.block.{i}.layer.0.SelfAttention.v.weight", TRANSPOSE),
    ("blocks/attn/o/kernel", "encoder.block.{i}.layer.0.SelfAttention.o.weight", TRANSPOSE),
    ("blocks/attn/rel_bias",
     "encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight", IDENTITY),
    ("blocks/norm2/scale", "encoder.block.{i}.layer.1.layer_norm.weight", IDENTITY),
    ("blocks/ffn/wi_0/kernel", "encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight", TRANSPOSE),
    ("blocks/ffn/wi_1/kernel", "encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight", TRANSPOSE),
    ("blocks/ffn/wo/kernel", "encoder.block.{i}.layer.1.DenseReluDense.wo.weight", TRANSPOSE),
    ("final_norm/scale", "encoder.final_layer_norm.weight", IDENTITY),
)
# The tied copy of the token embedding that HF state dicts may also hold.
HF_IGNORE = (r"encoder\.embed_tokens\.weight",)

# Wan `wan/modules/t5.py` names (spec/wan.md C.2). `ffn.gate.0` is the GELU branch (HF wi_0).
WAN_TABLE: tuple[Entry, ...] = (
    ("embed/embedding", "token_embedding.weight", IDENTITY),
    ("blocks/norm1/scale", "blocks.{i}.norm1.weight", IDENTITY),
    ("blocks/attn/q/kernel", "blocks.{i}.attn.q.weight", TRANSPOSE),
    ("blocks/attn/k/kernel", "blocks.{i}.attn.k.weight", TRANSPOSE),
    ("blocks/attn/v/kernel", "blocks.{i}.attn.v.weight", TRANSPOSE),
    ("blocks/attn/o/kernel", "blocks.{i}.attn.o.weight", TRANSPOSE),
    ("blocks/attn/rel_bias", "blocks.{i}.pos_embedding.embedding.weight", IDENTITY),
    ("blocks/norm2/scale", "blocks.{i}.norm2.weight", IDENTITY),
    ("blocks/ffn/wi_0/kernel", "blocks.{i}.ffn.gate.0.weight", TRANSPOSE),
    ("blocks/ffn/wi_1/kernel", "blocks.{i}.ffn.fc1.weight", TRANSPOSE),
    ("blocks/ffn/wo/kernel", "blocks.{i}.ffn.fc2.weight", TRANSPOSE),
    ("final_norm/scale", "norm.weight", IDENTITY),
)


def detect_umt5_layout(state_dict: Mapping[str, Any]) -> str:
  """'wan' or 'hf', from the key names."""
  keys = list(state_dict)
  if any(k.startswith("blocks.") for k in keys) or "token_embedding.weight" in state_dict:
    return "wan"
  if any(k.startswith("encoder.block.") for k in keys):
    return "hf"
  raise KeyError(f"umT5 checkpoint: neither Wan ('blocks.*', 'token_embedding.weight') nor HF "
                 f"('encoder.block.*') key names; first keys: {keys[:5]}")


def convert_umt5_state_dict(state_dict: Mapping[str, Any], cfg) -> dict:
  """Wan or HF umT5 encoder state dict -> nested numpy dict equal in structure to `nnx.state(UMT5Encoder)`.

  Arrays are cast to `cfg.param_dtype`. Raises KeyError/ValueError naming the key and shapes.
  """
  from eva_jax.models.umt5 import UMT5Encoder  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  layout = detect_umt5_layout(state_dict)
  sd = dict(state_dict)
  if layout == "hf" and "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
    sd["shared.weight"] = sd.pop("encoder.embed_tokens.weight")
  table, ignore = (WAN_TABLE, ()) if layout == "wan" else (HF_TABLE, HF_IGNORE)
  shapes = expected_shapes(lambda: UMT5Encoder(cfg, rngs=nnx.Rngs(0)))
  return convert_with_table(sd, table, cfg.num_layers, shapes, ignore=ignore,
                            dtype=np.dtype(cfg.param_dtype), name=f"umT5 ({layout} layout)")


def hf_to_wan_keys(state_dict: Mapping[str, Any], num_layers: int) -> dict:
  """Renames an HF UMT5EncoderModel state dict into Wan's names (tests and tooling)."""
  out = {}
  for (_, hf_key, _), (_, wan_key, _) in zip(HF_TABLE, WAN_TABLE):
    for i in range(num_layers if "{i}" in hf_key else 1):
      out[wan_key.format(i=i)] = state_dict[hf_key.format(i=i)]
  return out
