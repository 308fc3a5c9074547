"""LoRA adapters and DiT weights leaving eva_jax: the 'peft' adapter layout loaded by the real `peft` library
(and PEFT's own files read back), the 'diffusers' layout loaded by diffusers' Wan LoRA loader, and the
orbax -> PyTorch safetensors exporter (`python -m convert --kind dit --to-torch`) read by the converter and by
diffusers' WanTransformer3DModel with strict key matching."""

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from convert.cli import main as cli_main
from convert.wan_dit import convert_dit_state_dict, iter_torch_tensors
from eva_jax.models import lora
from eva_jax.models.wan import WanModel, wan_config
from tests.test_wan_dit import diffusers_model, inputs, reference_forward, run, to_original_layout
from tests.utils import rel_err

RANK, ALPHA = 4, 6.0   # scale 1.5: a wrong or dropped alpha shows in every comparison


@pytest.fixture(scope="module")
def ref():
  m = diffusers_model("tiny-i2v", seed=21)
  return m, {k: v.detach().clone() for k, v in m.state_dict().items()}


def lora_model(sd, seed=0, **overrides):
  cfg = wan_config("tiny-i2v", lora_rank=RANK, lora_alpha=ALPHA, **overrides)
  model = WanModel(cfg, rngs=nnx.Rngs(seed))
  nnx.update(model, nnx.State(convert_dit_state_dict(sd, cfg)))
  key = jax.random.key(seed + 100)
  for _, m in lora.lora_modules(model):
    key, sub = jax.random.split(key)
    m.lora_b[...] = 0.05 * jax.random.normal(sub, m.lora_b[...].shape)
  return model


# MARK: peft

class _Attn(torch.nn.Module):
  def __init__(self, dim, names):
    super().__init__()
    for n in names:
      self.add_module(n, torch.nn.Linear(dim, dim))


class _Block(torch.nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.self_attn = _Attn(dim, ("q", "k", "v", "o"))
    self.cross_attn = _Attn(dim, ("q", "k", "v", "o", "k_img", "v_img"))


class WanNamed(torch.nn.Module):
  """The attention linears of a Wan DiT under Wan's module names (blocks.N.self_attn.q, ...)."""
  def __init__(self, dim, layers):
    super().__init__()
    self.blocks = torch.nn.ModuleList([_Block(dim) for _ in range(layers)])


def _targets(model):
  for i, blk in enumerate(model.blocks):
    for attn in ("self_attn", "cross_attn"):
      for n in ("q", "k", "v", "o") + (("k_img", "v_img") if attn == "cross_attn" else ()):
        yield f"blocks.{i}.{attn}.{n}", getattr(getattr(blk, attn), n)


def _torch_base(ours, cfg):
  """WanNamed with the base kernels and biases of our (unscanned) model."""
  tm = WanNamed(cfg.dim, cfg.num_layers)
  with torch.no_grad():
    for name, lin in _targets(ours):
      t = tm.get_submodule(name)
      t.weight.copy_(torch.from_numpy(np.asarray(lin.kernel[...]).T.copy()))
      t.bias.copy_(torch.from_numpy(np.asarray(lin.bias[...]).copy()))
  return tm


def _compare_layers(ours, peft_model, cfg):
  x = np.random.default_rng(0).standard_normal((5, cfg.dim)).astype(np.float32)
  inner = peft_model.base_model.model
  for name, lin in _targets(ours):
    with torch.no_grad():
      got = inner.get_submodule(name)(torch.from_numpy(x)).numpy()
    assert rel_err(got, np.asarray(lin(x))) <= 1e-6, name


def test_peft_library_loads_export(ref, tmp_path):
  from peft import PeftModel
  _, sd = ref
  ours = lora_model(sd, seed=1, scan_layers=False)
  cfg = ours.cfg
  lora.export_peft(ours, str(tmp_path / "adapter"))
  pm = PeftModel.from_pretrained(_torch_base(ours, cfg), str(tmp_path / "adapter"))
  q = pm.base_model.model.blocks[1].cross_attn.k_img
  assert q.scaling["default"] == ALPHA / RANK
  np.testing.assert_array_equal(q.lora_B["default"].weight.detach().numpy(),
                                np.asarray(ours.blocks[1].cross_attn.k_img.lora_b[...]).T)
  _compare_layers(ours, pm, cfg)


def test_peft_files_load_into_eva(ref, tmp_path):
  """An adapter trained and saved by peft (save_pretrained) loads with load_peft and merges with merge_peft."""
  from peft import LoraConfig, get_peft_model
  _, sd = ref
  ours = lora_model(sd, seed=2, scan_layers=False)
  cfg = ours.cfg
  pm = get_peft_model(_torch_base(ours, cfg), LoraConfig(r=RANK, lora_alpha=ALPHA,
                                                         target_modules=["q", "k", "v", "o", "k_img", "v_img"]))
  torch.manual_seed(3)
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if "lora_" in n:
        p.copy_(0.1 * torch.randn_like(p))
  pm.save_pretrained(str(tmp_path / "peft"))
  for scan in (False, True):
    model = lora_model(sd, seed=5, scan_layers=scan)
    lora.load_peft(model, str(tmp_path / "peft"))
    if not scan:
      _compare_layers(model, pm, cfg)
  args = inputs("tiny-i2v", seed=4)
  base = WanModel(wan_config("tiny-i2v"), rngs=nnx.Rngs(0))
  nnx.update(base, nnx.State(convert_dit_state_dict(sd, wan_config("tiny-i2v"))))
  assert lora.merge_peft(base, str(tmp_path / "peft")) == 10 * cfg.num_layers
  assert rel_err(run(base, *args), run(model, *args)) <= 1e-5


# MARK: diffusers

def test_diffusers_layout_loads_in_diffusers(ref, tmp_path):
  from diffusers import WanImageToVideoPipeline
  tm, sd = ref
  ours = lora_model(sd, seed=6)
  args = inputs("tiny-i2v", seed=7)
  base_out = reference_forward(tm, *args)
  file = lora.export_peft(ours, str(tmp_path / "adapter"), layout="diffusers")
  assert file.endswith("pytorch_lora_weights.safetensors")
  from safetensors.numpy import load_file
  keys = load_file(file)
  assert "diffusion_model.blocks.1.cross_attn.v_img.lora_A.weight" in keys
  assert float(keys["diffusion_model.blocks.0.self_attn.q.alpha"]) == ALPHA
  # What `pipe.load_lora_weights(path)` does, without building the VAE and encoders: the Wan loader's
  # conversion (diffusion_model. prefix, .alpha folded in), then the transformer's adapter.
  state = WanImageToVideoPipeline.lora_state_dict(str(tmp_path / "adapter"))
  assert all(k.startswith("transformer.") for k in state) and len(state) == 2 * 10 * 2
  tm_lora = diffusers_model("tiny-i2v", seed=21)
  tm_lora.load_lora_adapter(state, prefix="transformer", adapter_name="eva")
  assert sum(1 for _, m in tm_lora.named_modules() if hasattr(m, "lora_A") and "eva" in m.lora_A) == 20
  got = reference_forward(tm_lora, *args)
  want = run(ours, *args)
  assert rel_err(got, want) <= 1e-5
  assert rel_err(base_out, want) > 1e-3          # the adapter mattered

  # EVA reads its own diffusers-layout export back: load_peft and merge_peft.
  other = lora_model(sd, seed=9)
  lora.load_peft(other, str(tmp_path / "adapter"))
  assert rel_err(run(other, *args), want) <= 1e-6
  base = WanModel(wan_config("tiny-i2v"), rngs=nnx.Rngs(0))
  nnx.update(base, nnx.State(convert_dit_state_dict(sd, wan_config("tiny-i2v"))))
  lora.merge_peft(base, file)
  assert rel_err(run(base, *args), want) <= 1e-5


# MARK: orbax -> PyTorch safetensors

def test_iter_torch_tensors_inverts_converter(ref):
  _, sd = ref
  original = to_original_layout(sd)
  for scan in (True, False):
    cfg = wan_config("tiny-i2v", scan_layers=scan)
    params = convert_dit_state_dict(sd, cfg)
    wan = dict(iter_torch_tensors(params, cfg, layout="wan"))
    diff = dict(iter_torch_tensors(params, cfg, layout="diffusers"))
    assert sorted(wan) == sorted(original) and sorted(diff) == sorted(sd)
    for k, v in diff.items():
      np.testing.assert_array_equal(v, sd[k].numpy(), err_msg=k)
    back = convert_dit_state_dict(wan, cfg)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
      np.testing.assert_array_equal(a, b)


def test_cli_to_torch(ref, tmp_path):
  from diffusers import WanTransformer3DModel
  from safetensors.torch import load_file, save_file
  tm, sd = ref
  save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "src.safetensors"))
  assert cli_main(["--kind", "dit", "--src", str(tmp_path / "src.safetensors"), "--out", str(tmp_path / "ck"),
                   "--config", "tiny-i2v", "--quiet"]) == 0
  # orbax (config from its eva_convert.json) -> diffusers names: loads strictly and reproduces our output
  out = tmp_path / "dit.safetensors"
  assert cli_main(["--kind", "dit", "--to-torch", "--src", str(tmp_path / "ck"), "--out", str(out),
                   "--layout", "diffusers"]) == 0
  fresh = WanTransformer3DModel.from_config(tm.config).eval()
  fresh.load_state_dict(load_file(str(out)), strict=True)
  cfg = wan_config("tiny-i2v")
  ours = WanModel(cfg, rngs=nnx.Rngs(0))
  nnx.update(ours, nnx.State(convert_dit_state_dict(sd, cfg)))
  args = inputs("tiny-i2v", seed=8)
  assert rel_err(reference_forward(fresh, *args), run(ours, *args)) <= 1e-5
  # Wan names, bfloat16, back through the converter
  wan = tmp_path / "dit_wan.safetensors"
  assert cli_main(["--kind", "dit", "--to-torch", "--src", str(tmp_path / "ck"), "--out", str(wan),
                   "--dtype", "bfloat16"]) == 0
  back = load_file(str(wan))
  assert back["blocks.0.self_attn.q.weight"].dtype == torch.bfloat16
  np.testing.assert_array_equal(back["blocks.1.ffn.0.weight"].float().numpy(),
                                sd["blocks.1.ffn.net.0.proj.weight"].to(torch.bfloat16).float().numpy())
  # an existing output is kept unless --overwrite
  before = wan.read_bytes()
  assert cli_main(["--kind", "dit", "--to-torch", "--src", str(tmp_path / "ck"), "--out", str(wan)]) != 0
  assert wan.read_bytes() == before
  assert not list(tmp_path.glob("*.tmp-*"))


def test_to_torch_from_run_dir(ref, tmp_path):
  """An SFT-like run directory (checkpoints/<step>/state + config.json) exports without --config."""
  import json
  from safetensors.torch import load_file
  from eva_jax.training.checkpoints import Checkpointer
  _, sd = ref
  params = convert_dit_state_dict(sd, wan_config("tiny-i2v"))
  with Checkpointer(tmp_path / "run" / "checkpoints", async_save=False) as ck:
    ck.save(3, {"params": params, "step": np.int32(3)})
  (tmp_path / "run" / "config.json").write_text(json.dumps({"model": dict(
      preset="tiny-i2v", dtype="float32", param_dtype="float32", attention="xla")}))
  out = tmp_path / "dit.safetensors"
  assert cli_main(["--kind", "dit", "--to-torch", "--src", str(tmp_path / "run"), "--out", str(out),
                   "--layout", "diffusers"]) == 0
  got = load_file(str(out))
  assert sorted(got) == sorted(sd)
  for k, v in sd.items():
    torch.testing.assert_close(got[k], v, rtol=0, atol=0)
