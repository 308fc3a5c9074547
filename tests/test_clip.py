"""CLIP image tower: float32 parity with transformers' CLIPVisionModel (hidden_states[-2]), converters,
Wan preprocessing (squash bicubic resize, CLIP mean/std)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from convert.clip import convert_clip_state_dict, hf_to_wan_keys
from eva_jax.models.clip import (CLIP_MEAN, CLIP_STD, CLIPVisionEncoder, clip_config, encode_image_jit,
                                 resize_bicubic)
from tests.utils import rel_err, to_numpy

TINY = dict(image_size=28, patch_size=7, width=32, num_layers=3, num_heads=4, mlp_dim=64)


@pytest.fixture(scope="module")
def hf_model():
  from transformers import CLIPVisionConfig, CLIPVisionModel
  torch.manual_seed(0)
  cfg = CLIPVisionConfig(hidden_size=TINY["width"], intermediate_size=TINY["mlp_dim"],
                         num_hidden_layers=TINY["num_layers"], num_attention_heads=TINY["num_heads"],
                         image_size=TINY["image_size"], patch_size=TINY["patch_size"], hidden_act="gelu",
                         layer_norm_eps=1e-5)
  model = CLIPVisionModel(cfg).eval()
  with torch.no_grad():  # norms start at 1/0 and biases at 0: make every weight matter
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
  return model


def _hf_penultimate(model, pixels_nchw):
  with torch.no_grad():
    out = model(pixel_values=torch.from_numpy(pixels_nchw), output_hidden_states=True)
  return to_numpy(out.hidden_states[-2])  # output of block L-1 (Wan's use_31_block)


def _ours(state_dict, **kw):
  cfg = clip_config("tiny", **{**TINY, **kw})
  enc = CLIPVisionEncoder(cfg, rngs=nnx.Rngs(1))
  nnx.update(enc, convert_clip_state_dict(state_dict, cfg))
  return enc


def _frames(h, w, b=2, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, size=(b, h, w, 3)).astype(np.float32)


def _normalise_like_wan(frames_nhwc):
  """Wan: x * 0.5 + 0.5, then torchvision Normalize(mean, std), in NCHW for the reference."""
  x = torch.from_numpy(frames_nhwc).permute(0, 3, 1, 2) * 0.5 + 0.5
  mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
  return ((x - mean) / std).numpy()


def test_parity_hf_layout(hf_model):
  frames = _frames(28, 28)
  ref = _hf_penultimate(hf_model, _normalise_like_wan(frames))
  enc = _ours(hf_model.state_dict())
  out = encode_image_jit(enc, jnp.asarray(frames))
  assert out.shape == (2, 17, TINY["width"])
  assert rel_err(out, ref) <= 1e-5


def test_parity_wan_layout_ignores_text_tower_and_head(hf_model):
  frames = _frames(28, 28, seed=1)
  ref = _hf_penultimate(hf_model, _normalise_like_wan(frames))
  wan_sd = hf_to_wan_keys(hf_model.state_dict(), TINY["num_layers"])
  assert wan_sd["visual.transformer.0.attn.to_qkv.weight"].shape == (96, 32)
  wan_sd.update({"visual.head": np.zeros((32, 16), np.float32), "log_scale": np.zeros(()),
                 "textual.token_embedding.weight": np.zeros((10, 8), np.float32)})
  enc = _ours(wan_sd)
  assert rel_err(enc.encode_image(jnp.asarray(frames)), ref) <= 1e-5


def test_hf_prefixed_full_clip_model_keys(hf_model):
  """Older HF checkpoints (`vision_model.` prefix, CLIPModel with text tower) convert the same."""
  sd = {f"vision_model.{k}": v for k, v in hf_model.state_dict().items()}
  sd.update({"text_model.embeddings.token_embedding.weight": torch.zeros(5, 4),
             "visual_projection.weight": torch.zeros(8, 32), "logit_scale": torch.zeros(())})
  a = jax.tree.leaves(convert_clip_state_dict(sd, clip_config("tiny", **TINY)))
  b = jax.tree.leaves(convert_clip_state_dict(hf_model.state_dict(), clip_config("tiny", **TINY)))
  assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_converter_is_strict(hf_model):
  cfg = clip_config("tiny", **TINY)
  sd = dict(hf_model.state_dict())
  with pytest.raises(KeyError, match="encoder.layers.1.mlp.fc2.bias"):
    convert_clip_state_dict({k: v for k, v in sd.items() if k != "encoder.layers.1.mlp.fc2.bias"}, cfg)
  with pytest.raises(KeyError, match="unexpected keys.*encoder.layers.3.mlp"):  # a 4th block: wrong model
    convert_clip_state_dict({**sd, "encoder.layers.3.mlp.fc1.bias": torch.zeros(64)}, cfg)
  with pytest.raises(ValueError, match=r"position_embedding.*\(17, 32\).*\(16, 32\)"):
    convert_clip_state_dict({**sd, "embeddings.position_embedding.weight": torch.zeros(16, 32)}, cfg)
  enc = CLIPVisionEncoder(cfg, rngs=nnx.Rngs(0))
  got = jax.tree.structure(convert_clip_state_dict(sd, cfg))
  assert got == jax.tree.structure(nnx.to_pure_dict(nnx.state(enc)))


@pytest.mark.parametrize("hw", [(40, 56), (480, 640), (12, 20)])
def test_resize_matches_torch_bicubic(hw):
  """Squash resize vs F.interpolate(bicubic, align_corners=False) on white noise (the hardest case)."""
  frames = _frames(*hw, b=1, seed=2)
  size = 224 if hw[0] > 100 else 28
  ref = torch.nn.functional.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2), size=(size, size),
                                        mode="bicubic", align_corners=False).permute(0, 2, 3, 1).numpy()
  assert rel_err(resize_bicubic(jnp.asarray(frames), size, "torch"), ref) <= 1e-5
  # jax.image.resize's Keys kernel (a=-0.5 vs torch's -0.75): measured 7-10% on noise; bound it.
  jax_err = rel_err(resize_bicubic(jnp.asarray(frames), size, "jax"), ref)
  assert 1e-3 < jax_err < 0.15


def test_encode_image_with_resize_matches_wan_pipeline(hf_model):
  """Full Wan preprocessing on a 40x56 frame: torch bicubic squash -> normalise -> tower."""
  frames = _frames(40, 56, seed=3)
  x = torch.from_numpy(frames).permute(0, 3, 1, 2)
  x = torch.nn.functional.interpolate(x, size=(28, 28), mode="bicubic", align_corners=False)
  ref = _hf_penultimate(hf_model, _normalise_like_wan(x.permute(0, 2, 3, 1).numpy()))
  enc = _ours(hf_model.state_dict())
  assert rel_err(encode_image_jit(enc, jnp.asarray(frames)), ref) <= 1e-5


def test_real_size_shapes_and_param_count():
  cfg = clip_config("vit-h-14")
  abstract = nnx.eval_shape(lambda: CLIPVisionEncoder(cfg, rngs=nnx.Rngs(0)))
  shapes = jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(nnx.state(abstract)))
  n = sum(int(np.prod(s)) for s in jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple)))
  d, f = 1280, 5120
  block = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 4 * d
  # spec/wan.md C.1: 632,076,800 visual params, minus the unused 32nd block, post_norm and head.
  assert n == 632_076_800 - block - 2 * d - d * 1024
  assert shapes["pos_embedding"] == (257, 1280) and shapes["blocks"]["fc1"]["kernel"] == (31, d, f)
  out = jax.eval_shape(lambda m, x: m.encode_image(x), abstract, jax.ShapeDtypeStruct((1, 480, 640, 3), jnp.float32))
  assert out.shape == (1, 257, 1280)
