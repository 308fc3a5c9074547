"""convert.wan_vae: both PyTorch layouts (original Wan2.1_VAE.pth and diffusers AutoencoderKLWan) give the
same parameters, every key is used exactly once (real config included), and errors are strict."""

import numpy as np
import pytest
import torch

from convert.wan_vae import convert_vae_state_dict
from eva_jax.models.vae import vae_config


def to_original_key(key: str, num_res_blocks: int) -> str:
  """diffusers -> original Wan VAE name, written from spec/wan.md B.6 independently of the converter."""
  parts = key.split(".")
  top, leaf = parts[0], parts[-1]
  if top in ("quant_conv", "post_quant_conv"):
    return {"quant_conv": "conv1", "post_quant_conv": "conv2"}[top] + "." + leaf
  sub = parts[1]
  if sub in ("conv_in", "norm_out", "conv_out"):
    return f"{top}.{ {'conv_in': 'conv1', 'norm_out': 'head.0', 'conv_out': 'head.2'}[sub] }.{leaf}"
  if sub == "mid_block":
    block = {"resnets.0": "middle.0", "attentions.0": "middle.1", "resnets.1": "middle.2"}[".".join(parts[2:4])]
    inner = parts[4:]
  elif sub == "down_blocks":
    block, inner = f"downsamples.{parts[2]}", parts[3:]
  else:  # up_blocks.{i}.resnets.{j} / up_blocks.{i}.upsamplers.0: one flat list, an upsampler after each group
    i = int(parts[2])
    j = int(parts[4]) if parts[3] == "resnets" else num_res_blocks + 1
    block, inner = f"upsamples.{i * (num_res_blocks + 2) + j}", parts[5:]
  renames = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
             "conv_shortcut": "shortcut"}
  inner = [renames.get(inner[0], inner[0])] + inner[1:]
  return f"{top}.{block}." + ".".join(inner)


def _flat(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flat(v, prefix + (k,))
    else:
      yield prefix + (k,), v


@pytest.fixture(scope="module")
def tiny_sd():
  from diffusers import AutoencoderKLWan
  cfg = vae_config("tiny")
  torch.manual_seed(0)
  ref = AutoencoderKLWan(base_dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
                         num_res_blocks=cfg.num_res_blocks, temperal_downsample=list(cfg.temporal_downsample))
  return cfg, ref.state_dict()


def test_original_and_diffusers_layouts_give_the_same_params(tiny_sd):
  cfg, sd = tiny_sd
  original = {to_original_key(k, cfg.num_res_blocks): v for k, v in sd.items()}
  assert len(original) == len(sd)
  a = dict(_flat(convert_vae_state_dict(sd, cfg)))
  b = dict(_flat(convert_vae_state_dict(original, cfg)))
  assert a.keys() == b.keys()
  for path in a:
    np.testing.assert_array_equal(a[path], b[path], err_msg=str(path))
  # Channels-last transforms: Conv3d [O, I, kt, kh, kw] -> [kt, kh, kw, I, O]; 1x1 Conv2d -> [I, O].
  np.testing.assert_array_equal(a[("encoder", "conv_in", "kernel")],
                                sd["encoder.conv_in.weight"].numpy().transpose(2, 3, 4, 1, 0))
  np.testing.assert_array_equal(a[("decoder", "mid_block", "attentions", 0, "to_qkv", "kernel")],
                                sd["decoder.mid_block.attentions.0.to_qkv.weight"].numpy()[:, :, 0, 0].T)
  # numpy values convert like torch tensors
  c = dict(_flat(convert_vae_state_dict({k: v.numpy() for k, v in sd.items()}, cfg)))
  np.testing.assert_array_equal(c[("encoder", "conv_in", "kernel")], a[("encoder", "conv_in", "kernel")])


def test_real_config_uses_every_key_of_both_layouts():
  from diffusers import AutoencoderKLWan
  with torch.device("meta"):
    ref = AutoencoderKLWan()  # the released config; shapes only
  # Zero-cost stand-ins of the right shapes (broadcast views), so no 500 MB is allocated.
  sd = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in ref.state_dict().items()}
  cfg = vae_config("wan2.1")
  original = {to_original_key(k, cfg.num_res_blocks): v for k, v in sd.items()}
  # Names and shapes quoted in spec/wan.md B.6.
  for key, shape in [("encoder.conv1.weight", (96, 3, 3, 3, 3)), ("conv1.weight", (32, 32, 1, 1, 1)),
                     ("encoder.downsamples.8.time_conv.weight", (384, 384, 3, 1, 1)),
                     ("encoder.middle.1.to_qkv.weight", (1152, 384, 1, 1)),
                     ("decoder.upsamples.7.time_conv.weight", (768, 384, 3, 1, 1)),
                     ("decoder.upsamples.11.resample.1.weight", (96, 192, 3, 3)),
                     ("decoder.upsamples.4.shortcut.weight", (384, 192, 1, 1, 1)),
                     ("decoder.head.0.gamma", (96, 1, 1, 1))]:
    assert original[key].shape == shape, key
  for layout in (sd, original):
    params = dict(_flat(convert_vae_state_dict(layout, cfg)))
    assert sum(v.size for v in params.values()) == 126_892_531
    assert params[("decoder", "up_blocks", 1, "upsamplers", 0, "time_conv", "kernel")].shape == (3, 1, 1, 384, 768)


def test_missing_unexpected_and_misshaped_keys_are_errors(tiny_sd):
  cfg, sd = tiny_sd
  missing = dict(sd)
  del missing["decoder.up_blocks.1.upsamplers.0.time_conv.bias"]
  with pytest.raises(KeyError, match=r"missing keys \['decoder.up_blocks.1.upsamplers.0.time_conv.bias'\]"):
    convert_vae_state_dict(missing, cfg)

  extra = dict(sd, **{"encoder.extra.weight": torch.zeros(3)})
  with pytest.raises(KeyError, match=r"unexpected keys \['encoder.extra.weight'\]"):
    convert_vae_state_dict(extra, cfg)
  convert_vae_state_dict(extra, cfg, ignore=[r"^encoder\.extra\."])  # named as ignorable: fine

  bad = dict(sd, **{"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3, 2)})
  with pytest.raises(ValueError, match=r"'encoder.conv_in.weight' has shape \(3, 3, 2, 3, 8\).*expected \(3, 3, 3, 3, 8\)"):
    convert_vae_state_dict(bad, cfg)

  with pytest.raises(KeyError, match="not a Wan VAE state dict"):
    convert_vae_state_dict({"blocks.0.weight": torch.zeros(1)}, cfg)

  # A config that does not fit the weights fails on the first differing shape.
  with pytest.raises(ValueError, match="expected"):
    convert_vae_state_dict(sd, vae_config("tiny", base_dim=16))


def test_convert_wan_reexports_the_vae_converter(tiny_sd):
  from convert import wan
  cfg, sd = tiny_sd
  a = dict(_flat(wan.convert_vae_state_dict(sd, cfg)))
  b = dict(_flat(convert_vae_state_dict(sd, cfg)))
  assert a.keys() == b.keys()


def test_cli_checkpoint_loads_into_the_model(tiny_sd, tmp_path):
  import jax
  from flax import nnx
  from convert.cli import convert
  from eva_jax.models.vae import load_vae
  cfg, sd = tiny_sd
  torch.save(sd, tmp_path / "vae.pth")
  convert("vae", str(tmp_path / "vae.pth"), str(tmp_path / "ckpt"), config="tiny", progress=False)
  vae = load_vae(str(tmp_path / "ckpt"), cfg)
  loaded = dict(_flat(nnx.to_pure_dict(nnx.state(vae))))
  direct = dict(_flat(convert_vae_state_dict(sd, cfg)))
  assert loaded.keys() == direct.keys()
  for path in direct:
    np.testing.assert_array_equal(np.asarray(jax.device_get(loaded[path])), direct[path], err_msg=str(path))


def test_convert_and_load_work_under_an_active_mesh(tiny_sd, tmp_path):
  # Abstract model creation must not resolve logical axis names against the caller's mesh.
  import jax
  from flax import nnx
  from convert.cli import convert
  from eva_jax import parallel
  from eva_jax.models.vae import load_vae
  cfg, sd = tiny_sd
  torch.save(sd, tmp_path / "vae.pth")
  convert("vae", str(tmp_path / "vae.pth"), str(tmp_path / "ckpt"), config="tiny", progress=False)
  mesh = parallel.make_mesh({"data": 2, "fsdp": -1})
  with jax.set_mesh(mesh):
    params = dict(_flat(convert_vae_state_dict(sd, cfg)))
    vae = load_vae(str(tmp_path / "ckpt"), cfg, mesh=mesh)
  kernel = nnx.state(vae)["encoder"]["conv_in"]["kernel"][...]
  np.testing.assert_array_equal(np.asarray(kernel), params[("encoder", "conv_in", "kernel")])
