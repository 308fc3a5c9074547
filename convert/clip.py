"""CLIP ViT-H/14 image-tower weights -> eva_jax `CLIPVisionEncoder`.

Two layouts, detected from the keys:
- Wan's `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth` (`wan/modules/clip.py` names,
  spec/wan.md C.1): `visual.*` is converted (fused `attn.to_qkv` split into q/k/v by rows);
  `textual.*` (the XLM-R text tower) and `log_scale` are known and ignored.
- Hugging Face `CLIPVisionModel` / `CLIPVisionModelWithProjection` / `CLIPModel` state dicts, with or
  without the `vision_model.` prefix of older transformers versions; the text model is ignored.

In both, the blocks the model does not run (the last `skip_last`), the post norm and the projection
head are ignored by name: Wan's features come from before them.

    sd = torch.load('models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth', map_location='cpu')
    nnx.update(clip, convert_clip_state_dict(sd, clip_config('vit-h-14')))
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from convert.umt5 import IDENTITY, TRANSPOSE, Entry, convert_with_table, expected_shapes

CONV: Any = lambda w: w.transpose(2, 3, 1, 0)  # torch [out, in, kh, kw] -> flax [kh, kw, in, out]


def _hf_table() -> tuple[Entry, ...]:
  layer = "encoder.layers.{i}."
  table = [
      ("patch_embed/kernel", "embeddings.patch_embedding.weight", CONV),
      ("cls_embedding", "embeddings.class_embedding", IDENTITY),
      ("pos_embedding", "embeddings.position_embedding.weight", IDENTITY),
      ("pre_norm/scale", "pre_layrnorm.weight", IDENTITY),
      ("pre_norm/bias", "pre_layrnorm.bias", IDENTITY),
  ]
  for ours, theirs in (("norm1", "layer_norm1"), ("norm2", "layer_norm2")):
    table += [(f"blocks/{ours}/scale", f"{layer}{theirs}.weight", IDENTITY),
              (f"blocks/{ours}/bias", f"{layer}{theirs}.bias", IDENTITY)]
  for ours, theirs in (("attn/q", "self_attn.q_proj"), ("attn/k", "self_attn.k_proj"),
                       ("attn/v", "self_attn.v_proj"), ("attn/o", "self_attn.out_proj"),
                       ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")):
    table += [(f"blocks/{ours}/kernel", f"{layer}{theirs}.weight", TRANSPOSE),
              (f"blocks/{ours}/bias", f"{layer}{theirs}.bias", IDENTITY)]
  return tuple(table)


def _wan_table(width: int) -> tuple[Entry, ...]:
  layer = "transformer.{i}."
  rows = lambda j: slice(j * width, (j + 1) * width)  # q, k, v = rows 0:D, D:2D, 2D:3D of to_qkv
  table = [
      ("patch_embed/kernel", "patch_embedding.weight", CONV),
      ("cls_embedding", "cls_embedding", lambda w: w.reshape(-1)),  # (1, 1, D) -> (D,)
      ("pos_embedding", "pos_embedding", lambda w: w[0]),            # (1, L, D) -> (L, D)
      ("pre_norm/scale", "pre_norm.weight", IDENTITY),
      ("pre_norm/bias", "pre_norm.bias", IDENTITY),
  ]
  for ours in ("norm1", "norm2"):
    table += [(f"blocks/{ours}/scale", f"{layer}{ours}.weight", IDENTITY),
              (f"blocks/{ours}/bias", f"{layer}{ours}.bias", IDENTITY)]
  for j, name in enumerate("qkv"):
    table += [(f"blocks/attn/{name}/kernel", f"{layer}attn.to_qkv.weight", lambda w, s=rows(j): w[s].T),
              (f"blocks/attn/{name}/bias", f"{layer}attn.to_qkv.bias", lambda w, s=rows(j): w[s])]
  for ours, theirs in (("attn/o", "attn.proj"), ("fc1", "mlp.0"), ("fc2", "mlp.2")):
    table += [(f"blocks/{ours}/kernel", f"{layer}{theirs}.weight", TRANSPOSE),
              (f"blocks/{ours}/bias", f"{layer}{theirs}.bias", IDENTITY)]
  return tuple(table)


def _unused_layers(prefix: str, cfg) -> str:
  """Regex for the blocks after the ones Wan runs (e.g. block index 31 of ViT-H/14)."""
  idx = "|".join(str(i) for i in range(cfg.used_layers, cfg.num_layers)) or "(?!)"
  return rf"{prefix}({idx})\..*"


HF_IGNORE = (r"post_layernorm\..*", r"visual_projection\..*", r"embeddings\.position_ids",
             r"text_model\..*", r"text_projection\..*", r"logit_scale")
WAN_IGNORE = (r"post_norm\..*", r"head", r"textual\..*", r"log_scale")


def detect_clip_layout(state_dict: Mapping[str, Any]) -> str:
  """'wan' or 'hf', from the key names (prefixes `visual.` / `vision_model.` allowed)."""
  for key in state_dict:
    if key.removeprefix("visual.").startswith("transformer.0.attn.to_qkv"):
      return "wan"
    if key.removeprefix("vision_model.").startswith("encoder.layers.0.self_attn"):
      return "hf"
  raise KeyError("CLIP checkpoint: neither Wan ('visual.transformer.0.attn.to_qkv.*') nor HF "
                 f"('encoder.layers.0.self_attn.*') key names; first keys: {list(state_dict)[:5]}")


def convert_clip_state_dict(state_dict: Mapping[str, Any], cfg) -> dict:
  """Wan or HF CLIP state dict -> nested numpy dict equal in structure to `nnx.state(CLIPVisionEncoder)`.

  Arrays are cast to `cfg.param_dtype`. Raises KeyError/ValueError naming the key and shapes.
  """
  from eva_jax.models.clip import CLIPVisionEncoder  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  layout = detect_clip_layout(state_dict)
  strip = "visual." if layout == "wan" else "vision_model."
  sd = {k.removeprefix(strip): v for k, v in state_dict.items()}
  if layout == "wan":
    table, ignore = _wan_table(cfg.width), WAN_IGNORE + (_unused_layers(r"transformer\.", cfg),)
  else:
    table, ignore = _hf_table(), HF_IGNORE + (_unused_layers(r"encoder\.layers\.", cfg),)
  shapes = expected_shapes(lambda: CLIPVisionEncoder(cfg, rngs=nnx.Rngs(0)))
  return convert_with_table(sd, table, cfg.used_layers, shapes, ignore=ignore,
                            dtype=np.dtype(cfg.param_dtype), name=f"CLIP ({layout} layout)")


def hf_to_wan_keys(state_dict: Mapping[str, Any], num_layers: int) -> dict:
  """Renames an HF CLIPVisionModel state dict into Wan's `visual.*` names (tests and tooling).

  Follows the mapping of spec/wan.md C.1 backwards: q/k/v fused into `to_qkv`, class and position
  embeddings given their leading singleton axes. Needs torch tensors or numpy arrays.
  """
  sd = {k.removeprefix("vision_model."): np.asarray(_np(v)) for k, v in state_dict.items()}
  out = {
      "visual.patch_embedding.weight": sd["embeddings.patch_embedding.weight"],
      "visual.cls_embedding": sd["embeddings.class_embedding"][None, None],
      "visual.pos_embedding": sd["embeddings.position_embedding.weight"][None],
      "visual.pre_norm.weight": sd["pre_layrnorm.weight"],
      "visual.pre_norm.bias": sd["pre_layrnorm.bias"],
      "visual.post_norm.weight": sd["post_layernorm.weight"],
      "visual.post_norm.bias": sd["post_layernorm.bias"],
  }
  for i in range(num_layers):
    hf, wan = f"encoder.layers.{i}.", f"visual.transformer.{i}."
    for suffix in ("weight", "bias"):
      out[wan + f"norm1.{suffix}"] = sd[hf + f"layer_norm1.{suffix}"]
      out[wan + f"norm2.{suffix}"] = sd[hf + f"layer_norm2.{suffix}"]
      out[wan + f"attn.to_qkv.{suffix}"] = np.concatenate(
          [sd[hf + f"self_attn.{n}_proj.{suffix}"] for n in "qkv"], axis=0)
      out[wan + f"attn.proj.{suffix}"] = sd[hf + f"self_attn.out_proj.{suffix}"]
      out[wan + f"mlp.0.{suffix}"] = sd[hf + f"mlp.fc1.{suffix}"]
      out[wan + f"mlp.2.{suffix}"] = sd[hf + f"mlp.fc2.{suffix}"]
  return out


def _np(v):
  return v.detach().float().numpy() if hasattr(v, "detach") else v
