"""LoRA (eva_jax.models.lora) on the Wan DiT: off == base exactly, merge == unmerged, PEFT round trip, and an
optimizer that trains only the adapters."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file

from convert.wan_dit import convert_dit_state_dict
from eva_jax.models.lora import (LoRALinear, LoRAParam, disable_lora, export_peft, load_peft, lora_state,
                                 merge_lora, zero_lora)
from eva_jax.models.wan import WanModel, wan_config
from tests.test_wan_dit import diffusers_model, inputs, run
from tests.utils import rel_err

RANK = 4


@pytest.fixture(scope="module")
def sd():
  m = diffusers_model("tiny-i2v", seed=21)
  return {k: v.detach().clone() for k, v in m.state_dict().items()}


def lora_model(sd, seed=0, **overrides):
  """tiny-i2v with rank-4 adapters on q,k,v,o,k_img,v_img and non-zero B (so the adapters matter)."""
  cfg = wan_config("tiny-i2v", lora_rank=RANK, lora_alpha=8.0, **overrides)
  model = WanModel(cfg, rngs=nnx.Rngs(seed))
  nnx.update(model, nnx.State(convert_dit_state_dict(sd, cfg)))
  key = jax.random.key(seed + 100)
  for path, m in nnx.iter_modules(model):
    if isinstance(m, LoRALinear):
      key, sub = jax.random.split(key)
      m.lora_b[...] = 0.05 * jax.random.normal(sub, m.lora_b[...].shape)
  return model


def base_model(sd):
  cfg = wan_config("tiny-i2v")
  model = WanModel(cfg, rngs=nnx.Rngs(0))
  nnx.update(model, nnx.State(convert_dit_state_dict(sd, cfg)))
  return model


def test_targets_and_variable_type(sd):
  model = lora_model(sd)
  blk = model.blocks
  for lin in (blk.self_attn.q, blk.self_attn.k, blk.self_attn.v, blk.self_attn.o, blk.cross_attn.q,
              blk.cross_attn.k_img, blk.cross_attn.v_img):
    assert isinstance(lin, LoRALinear)
    assert lin.lora_a[...].shape == (2, 32, RANK) and lin.lora_b[...].shape == (2, RANK, 32)
  assert not isinstance(blk.ffn.fc1, LoRALinear)
  assert issubclass(LoRAParam, nnx.Param)
  n_lora = len(jax.tree.leaves(lora_state(model)))
  assert n_lora == 2 * 10                      # self q,k,v,o + cross q,k,v,o,k_img,v_img


def test_disabled_equals_base_exactly(sd):
  args = inputs("tiny-i2v", seed=22)
  model = lora_model(sd)
  base = run(base_model(sd), *args)
  with_lora = run(model, *args)
  assert rel_err(with_lora, base) > 1e-3        # the adapters change the output
  with disable_lora(model):
    np.testing.assert_array_equal(run(model, *args), base)
  np.testing.assert_array_equal(run(model, *args), with_lora)   # switched back on

  # Inside one jitted function (the GRPO policy / reference pair).
  @nnx.jit
  def both(m, x, t, ctx, clip, y):
    pol = m(x, t, ctx, clip, y)
    with disable_lora(m):
      ref = m(x, t, ctx, clip, y)
    return pol, ref
  pol, ref = both(model, *[None if a is None else jnp.asarray(a) for a in args])
  np.testing.assert_array_equal(np.asarray(ref), base)
  np.testing.assert_array_equal(np.asarray(pol), with_lora)


def test_zero_lora_state_is_base(sd):
  args = inputs("tiny-i2v", seed=23)
  model = lora_model(sd)
  graphdef, state = nnx.split(model)
  zeroed = nnx.merge(graphdef, zero_lora(state))
  np.testing.assert_array_equal(run(zeroed, *args), run(base_model(sd), *args))


def test_merge_equals_unmerged(sd):
  args = inputs("tiny-i2v", seed=24)
  model = lora_model(sd)
  before = run(model, *args)
  merge_lora(model)
  assert rel_err(run(model, *args), before) <= 1e-6
  with disable_lora(model):     # the merged kernels alone carry the adapters now
    assert rel_err(run(model, *args), before) <= 1e-6


def test_merge_unscanned_kernels(sd):
  """Per-layer (python list) modules merge to kernel + alpha/r * A @ B as well."""
  model = lora_model(sd, scan_layers=False)
  lin = model.blocks[1].cross_attn.v_img
  k, a, b = (np.asarray(v[...], np.float64) for v in (lin.kernel, lin.lora_a, lin.lora_b))
  merge_lora(model)
  np.testing.assert_allclose(np.asarray(lin.kernel[...]), k + (8.0 / RANK) * a @ b, rtol=1e-6, atol=1e-7)
  assert not np.any(np.asarray(lin.lora_b[...]))


def test_peft_round_trip(sd, tmp_path):
  model = lora_model(sd, seed=1)
  export_peft(model, str(tmp_path / "adapter"))
  tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
  a = tensors["base_model.model.blocks.1.cross_attn.k_img.lora_A.weight"]
  b = tensors["base_model.model.blocks.1.cross_attn.k_img.lora_B.weight"]
  assert a.shape == (RANK, 32) and b.shape == (32, RANK)
  np.testing.assert_array_equal(b, np.asarray(model.blocks.cross_attn.k_img.lora_b[...][1]).T)
  assert len(tensors) == 2 * 10 * 2            # (A, B) x 10 targets x 2 layers
  config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert config["r"] == RANK and config["lora_alpha"] == 8.0
  assert set(config["target_modules"]) == {"q", "k", "v", "o", "k_img", "v_img"}

  # Into a fresh scanned model and into an unscanned one: identical adapters and outputs.
  args = inputs("tiny-i2v", seed=25)
  for scan in (True, False):
    other = lora_model(sd, seed=7, scan_layers=scan)
    load_peft(other, str(tmp_path / "adapter"))
    lb = other.blocks.self_attn.v.lora_b[...] if scan else other.blocks[1].self_attn.v.lora_b[...][None]
    np.testing.assert_array_equal(np.asarray(lb)[-1], np.asarray(model.blocks.self_attn.v.lora_b[...][1]))
    # The python-loop model is a different XLA program: equal up to float32 reassociation.
    assert rel_err(run(other, *args), run(model, *args)) <= (0 if scan else 1e-6)
  bad = {k: v for k, v in tensors.items() if "blocks.0.self_attn.q." not in k}
  from safetensors.numpy import save_file
  save_file(bad, str(tmp_path / "bad.safetensors"))
  with pytest.raises(KeyError, match=r"blocks\.0\.self_attn\.q\.lora_A"):
    load_peft(lora_model(sd), str(tmp_path / "bad.safetensors"))


def test_optimizer_trains_only_adapters(sd):
  model = lora_model(sd)
  x, t, ctx, clip, y = (None if a is None else jnp.asarray(a) for a in inputs("tiny-i2v", seed=26))
  before = nnx.to_pure_dict(nnx.state(model, nnx.All(nnx.Param, nnx.Not(LoRAParam))))
  lora_before = nnx.to_pure_dict(lora_state(model))
  opt = nnx.Optimizer(model, optax.sgd(1e-1), wrt=LoRAParam)

  @nnx.jit
  def step(model, opt):
    def loss(m):
      return jnp.mean(m(x, t, ctx, clip, y) ** 2)
    grads = nnx.grad(loss, argnums=nnx.DiffState(0, LoRAParam))(model)
    opt.update(model, grads)

  step(model, opt)
  after = nnx.to_pure_dict(nnx.state(model, nnx.All(nnx.Param, nnx.Not(LoRAParam))))
  for p, q in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(p, q)
  changed = [not np.array_equal(p, q) for p, q in zip(jax.tree.leaves(lora_before),
                                                     jax.tree.leaves(nnx.to_pure_dict(lora_state(model))))]
  assert all(changed)
