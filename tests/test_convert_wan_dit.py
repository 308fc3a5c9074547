"""The DiT converter (convert.wan_dit), the streaming readers (convert.io), the CLI, and loading its output
through eva_jax.weights."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file

from convert.cli import main as cli_main
from convert.io import open_state_dict
from convert.wan_dit import convert_dit_state_dict, detect_layout
from eva_jax.models.lora import LoRAParam
from eva_jax import weights
from eva_jax.models.wan import WanModel, wan_config
from eva_jax.parallel import make_mesh
from tests.test_wan_dit import diffusers_model, inputs, run, to_original_layout
from tests.utils import rel_err


@pytest.fixture(scope="module")
def sd():
  m = diffusers_model("tiny-i2v", seed=11)
  return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _paths(tree, prefix=()):
  if isinstance(tree, dict):
    out = []
    for k, v in tree.items():
      out += _paths(v, prefix + (k,))
    return out
  return [(prefix, tuple(np.shape(tree)))]


# MARK: converter

@pytest.mark.parametrize("scan", [True, False])
def test_output_matches_model_state(sd, scan):
  """Every model parameter is produced exactly once, with its shape (and nothing else)."""
  cfg = wan_config("tiny-i2v", scan_layers=scan, lora_rank=4)
  abstract = nnx.eval_shape(lambda: WanModel(cfg, rngs=nnx.Rngs(0)))
  want = sorted(_paths(nnx.to_pure_dict(nnx.state(abstract, nnx.All(nnx.Param, nnx.Not(LoRAParam))))), key=str)
  got = sorted(_paths(convert_dit_state_dict(sd, cfg)), key=str)
  assert got == want


def test_layouts_agree(sd):
  cfg = wan_config("tiny-i2v")
  ref = convert_dit_state_dict(sd, cfg)
  original = to_original_layout(sd)
  lightning = {"model." + k: v for k, v in original.items()}
  lightning["vae.encoder.conv1.weight"] = torch.zeros(3)          # other prefixes are ignored
  lightning["text_encoder.x"] = torch.zeros(2)
  lightning_diffusers = {"model." + k: v for k, v in sd.items()}
  assert detect_layout(sd) == "diffusers" and detect_layout(original) == "wan"
  assert detect_layout(lightning) == "lightning"
  for other in (original, lightning, lightning_diffusers):
    out = convert_dit_state_dict(other, cfg)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(out)):
      np.testing.assert_array_equal(a, b)


def test_error_wrong_key(sd):
  cfg = wan_config("tiny-i2v")
  bad = dict(sd)
  bad["blocks.0.attn1.to_qq.weight"] = bad.pop("blocks.0.attn1.to_q.weight")
  with pytest.raises(KeyError, match=r"blocks\.0\.self_attn\.q\.weight.*\(32, 32\)"):
    convert_dit_state_dict(bad, cfg)
  extra = dict(sd)
  extra["blocks.0.attn1.extra.weight"] = torch.zeros(5, 2)
  with pytest.raises(KeyError, match=r"unexpected.*blocks\.0\.attn1\.extra\.weight.*\(5, 2\)"):
    convert_dit_state_dict(extra, cfg)
  # A t2v config does not silently drop the image branch of an i2v checkpoint.
  with pytest.raises((KeyError, ValueError)):
    convert_dit_state_dict(sd, wan_config("tiny-t2v", text_dim=24))


def test_error_wrong_shape(sd):
  cfg = wan_config("tiny-i2v")
  bad = dict(sd)
  bad["blocks.1.ffn.net.0.proj.weight"] = torch.zeros(48, 32)
  with pytest.raises(ValueError, match=r"blocks\.1\.ffn\.net\.0\.proj\.weight.*\(48, 32\).*\(64, 32\)"):
    convert_dit_state_dict(bad, cfg)
  with pytest.raises(ValueError, match=r"patch_embedding\.weight.*\(32, 36, 1, 2, 2\).*\(32, 16, 1, 2, 2\)"):
    convert_dit_state_dict(sd, wan_config("tiny-i2v", in_dim=16))


# MARK: readers, CLI, loader

def _write_sharded(sd, folder, n_shards=2):
  os.makedirs(folder, exist_ok=True)
  keys = sorted(sd)
  weight_map = {}
  for s in range(n_shards):
    name = f"diffusion_pytorch_model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
    part = {k: sd[k].contiguous() for k in keys[s::n_shards]}
    save_file(part, os.path.join(folder, name))
    weight_map.update({k: name for k in part})
  with open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)


def test_readers(sd, tmp_path):
  _write_sharded(sd, tmp_path / "st")
  lazy = open_state_dict(str(tmp_path / "st"))
  assert sorted(lazy) == sorted(sd)
  assert lazy.shape_of("blocks.0.ffn.net.0.proj.weight") == (64, 32)
  torch.testing.assert_close(lazy["proj_out.weight"], sd["proj_out.weight"], rtol=0, atol=0)
  torch.save({"state_dict": {"model." + k: v for k, v in sd.items()}, "epoch": 3}, tmp_path / "x.ckpt")
  pth = open_state_dict(str(tmp_path / "x.ckpt"))
  assert len(pth) == len(sd) and pth.shape_of("model.proj_out.weight") == tuple(sd["proj_out.weight"].shape)


def test_cli_round_trip(sd, tmp_path):
  cfg = wan_config("tiny-i2v")
  ref_model = WanModel(cfg, rngs=nnx.Rngs(0))
  nnx.update(ref_model, nnx.State(convert_dit_state_dict(sd, cfg)))
  args = inputs("tiny-i2v", seed=12)
  ref = run(ref_model, *args)

  # (a) sharded safetensors + index json, diffusers names
  _write_sharded(sd, tmp_path / "st")
  assert cli_main(["--kind", "dit", "--src", str(tmp_path / "st"), "--out", str(tmp_path / "ck1"),
                   "--config", "tiny-i2v", "--quiet"]) == 0
  summary = json.loads((tmp_path / "ck1" / "eva_convert.json").read_text())
  assert summary["layout"] == "diffusers" and summary["params"] > 0
  out = run(weights.load_module("dit", tmp_path / "ck1", cfg), *args)
  np.testing.assert_array_equal(out, ref)

  # (b) Lightning .ckpt (original names under 'model.'), unscanned layout, stored as bfloat16
  torch.save({"state_dict": {"model." + k: v for k, v in to_original_layout(sd).items()}},
             tmp_path / "eva.ckpt")
  assert cli_main(["--kind", "dit", "--src", str(tmp_path / "eva.ckpt"), "--out", str(tmp_path / "ck2"),
                   "--config", "tiny-i2v", "--set", "scan_layers=False", "--dtype", "bfloat16", "--quiet"]) == 0
  cfg2 = wan_config("tiny-i2v", scan_layers=False)
  model2 = weights.load_module("dit", tmp_path / "ck2", cfg2)
  q = model2.blocks[1].self_attn.q.kernel[...]
  assert q.dtype == jnp.float32      # restored into cfg.param_dtype
  np.testing.assert_array_equal(
      np.asarray(q), sd["blocks.1.attn1.to_q.weight"].T.to(torch.bfloat16).float().numpy())
  assert rel_err(run(model2, *args), ref) <= 2e-2   # bf16-rounded weights


def test_converted_dit_loads_sharded_with_fresh_lora(sd, tmp_path):
  _write_sharded(sd, tmp_path / "st", n_shards=1)
  cli_main(["--kind", "dit", "--src", str(tmp_path / "st"), "--out", str(tmp_path / "ck"),
            "--config", "tiny-i2v", "--quiet"])
  mesh = make_mesh({"data": 2, "fsdp": 4})
  cfg = wan_config("tiny-i2v", lora_rank=4)
  model = weights.load_module("dit", tmp_path / "ck", cfg, mesh=mesh)
  kernel = model.blocks.ffn.fc1.kernel[...]                               # [layers, embed, mlp]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
  assert np.all(np.asarray(model.blocks.self_attn.q.lora_b[...]) == 0)
  assert np.any(np.asarray(model.blocks.self_attn.q.lora_a[...]) != 0)
  base = WanModel(wan_config("tiny-i2v"), rngs=nnx.Rngs(0))
  nnx.update(base, nnx.State(convert_dit_state_dict(sd, wan_config("tiny-i2v"))))
  args = inputs("tiny-i2v", seed=13)
  assert rel_err(run(model, *args), run(base, *args)) <= 1e-6
