"""A PEFT adapter exported from a LoRA model, merged into the same base model without adapters, gives the
LoRA model's output (how inference applies a GRPO adapter)."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from eva_jax.models.wan import WanModel, wan_config
from eva_jax.models import lora
from tests.utils import rel_err


@pytest.mark.parametrize("scan", [True, False])
def test_merge_peft_equals_lora_model(tmp_path, scan):
  lcfg = wan_config("tiny-t2v", lora_rank=4, lora_alpha=8.0, scan_layers=scan)
  with_lora = WanModel(lcfg, rngs=nnx.Rngs(0))
  # Wan zero-initialises the output head: give it weights so outputs are not identically zero.
  k = with_lora.head.head.kernel
  k[...] = 0.2 * jax.random.normal(jax.random.key(4), k[...].shape)
  # non-zero B so the adapter changes the output
  for _, m in lora.lora_modules(with_lora):
    m.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(1), m.lora_b[...].shape)
  lora.export_peft(with_lora, str(tmp_path / "adapter"))

  base = WanModel(wan_config("tiny-t2v", scan_layers=scan), rngs=nnx.Rngs(0))
  base_params = nnx.state(with_lora, nnx.All(nnx.Param, nnx.Not(lora.LoRAParam)))
  nnx.update(base, base_params)
  x = jax.random.normal(jax.random.key(2), (1, 2, 4, 4, 16))
  args = (x, jnp.array([500.0]), jax.random.normal(jax.random.key(3), (1, 7, 24)))
  before = base(*args)
  n = lora.merge_peft(base, str(tmp_path / "adapter"))
  per_layer = sum(m.lora_a[...].shape[0] if m.lora_a[...].ndim == 3 else 1 for _, m in lora.lora_modules(with_lora))
  assert n == per_layer == 8 * lcfg.num_layers  # q, k, v, o of self- and cross-attention per layer
  assert rel_err(base(*args), with_lora(*args)) < 1e-5
  assert rel_err(before, with_lora(*args)) > 1e-3  # the adapter mattered


def test_merge_peft_rejects_unknown_module(tmp_path):
  import json
  import numpy as np
  from safetensors.numpy import save_file
  (tmp_path / "a").mkdir()
  save_file({"base_model.model.blocks.0.self_attn.nope.lora_A.weight": np.zeros((2, 32), np.float32),
             "base_model.model.blocks.0.self_attn.nope.lora_B.weight": np.zeros((32, 2), np.float32)},
            str(tmp_path / "a" / "adapter_model.safetensors"))
  (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 2}))
  base = WanModel(wan_config("tiny-t2v"), rngs=nnx.Rngs(0))
  with pytest.raises(KeyError, match="nope"):
    lora.merge_peft(base, str(tmp_path / "a"))
