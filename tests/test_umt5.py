"""umT5 encoder: float32 parity with transformers' UMT5EncoderModel, converters, tokenizer, padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from convert.umt5 import convert_umt5_state_dict, hf_to_wan_keys
from eva_jax.models.tokenizer import T5Tokenizer, make_tiny_tokenizer
from eva_jax.models.umt5 import (UMT5Encoder, encode_prompts, relative_position_buckets, umt5_config)
from eva_jax.parallel import make_mesh
from eva_jax.parallel.sharding import state_shardings
from tests.utils import rel_err, to_numpy

# Small max_distance so that a 40-token sequence reaches the log-spaced and the capped buckets.
TINY = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, num_buckets=32,
            max_distance=16)
LENGTHS = (40, 25, 7)


@pytest.fixture(scope="module")
def hf_model():
  from transformers import UMT5Config, UMT5EncoderModel
  torch.manual_seed(0)
  hf_cfg = UMT5Config(vocab_size=TINY["vocab_size"], d_model=TINY["d_model"], d_kv=TINY["d_kv"],
                      d_ff=TINY["d_ff"], num_layers=TINY["num_layers"], num_heads=TINY["num_heads"],
                      relative_attention_num_buckets=TINY["num_buckets"],
                      relative_attention_max_distance=TINY["max_distance"],
                      feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6)
  model = UMT5EncoderModel(hf_cfg).eval()
  with torch.no_grad():  # norms start at 1 and the bias tables near 0: make every weight matter
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif "relative_attention_bias" in name:
        p.copy_(torch.randn_like(p))
  return model


def _batch():
  rng = np.random.default_rng(0)
  ids = rng.integers(3, TINY["vocab_size"], size=(len(LENGTHS), max(LENGTHS)))
  mask = (np.arange(max(LENGTHS))[None] < np.array(LENGTHS)[:, None]).astype(np.int64)
  return ids * mask, mask


def _hf_out(model, ids, mask):
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
  return to_numpy(out.last_hidden_state)


def _ours(state_dict, **cfg_kw):
  cfg = umt5_config("tiny", **{**TINY, **cfg_kw})
  enc = UMT5Encoder(cfg, rngs=nnx.Rngs(1))
  nnx.update(enc, convert_umt5_state_dict(state_dict, cfg))
  return enc


def test_relative_position_buckets_match_transformers(hf_model):
  attn = hf_model.encoder.block[0].layer[0].SelfAttention
  for max_distance in (16, 128):
    attn.relative_attention_max_distance = max_distance
    rel = torch.arange(300)[None, :] - torch.arange(300)[:, None]
    ref = attn._relative_position_bucket(rel).numpy()
    np.testing.assert_array_equal(relative_position_buckets(300, 300, 32, max_distance), ref)
  attn.relative_attention_max_distance = TINY["max_distance"]


def test_parity_hf_layout_padded_batch(hf_model):
  ids, mask = _batch()
  ref = _hf_out(hf_model, ids, mask)
  enc = _ours(hf_model.state_dict())
  out = np.asarray(nnx.jit(lambda m, i, k: m(i, k))(enc, jnp.asarray(ids), jnp.asarray(mask)))
  # All positions, padded queries included (their keys are masked identically).
  assert rel_err(out, ref) <= 1e-5
  for row, n in enumerate(LENGTHS):
    assert rel_err(out[row, :n], ref[row, :n]) <= 1e-5


def test_parity_wan_layout(hf_model):
  ids, mask = _batch()
  ref = _hf_out(hf_model, ids, mask)
  wan_sd = hf_to_wan_keys(hf_model.state_dict(), TINY["num_layers"])
  assert "blocks.1.ffn.gate.0.weight" in wan_sd and "blocks.0.pos_embedding.embedding.weight" in wan_sd
  enc = _ours(wan_sd)
  assert rel_err(enc(jnp.asarray(ids), jnp.asarray(mask)), ref) <= 1e-5


def test_converter_is_strict(hf_model):
  cfg = umt5_config("tiny", **TINY)
  sd = dict(hf_model.state_dict())
  missing = {k: v for k, v in sd.items() if k != "encoder.block.1.layer.1.DenseReluDense.wo.weight"}
  with pytest.raises(KeyError, match="block.1.layer.1.DenseReluDense.wo.weight"):
    convert_umt5_state_dict(missing, cfg)
  with pytest.raises(KeyError, match="unexpected keys.*encoder.extra"):
    convert_umt5_state_dict({**sd, "encoder.extra.weight": torch.zeros(3)}, cfg)
  bad = {**sd, "encoder.final_layer_norm.weight": torch.zeros(31)}
  with pytest.raises(ValueError, match=r"final_layer_norm.*\(32,\).*\(31,\)"):
    convert_umt5_state_dict(bad, cfg)
  # The structure equals nnx.state of the module exactly.
  enc = UMT5Encoder(cfg, rngs=nnx.Rngs(0))
  got = jax.tree.structure(convert_umt5_state_dict(sd, cfg))
  assert got == jax.tree.structure(nnx.to_pure_dict(nnx.state(enc)))


def test_encode_prompts_trims_and_zero_pads(hf_model, tmp_path):
  words = "pick up the red cup and place it on plate".split()
  tok = T5Tokenizer(make_tiny_tokenizer(tmp_path / "tok", words), max_length=16)
  prompts = ["Pick up the red cup", "place it on the plate and pick up the cup again now"]
  ids, mask = tok(prompts)
  assert ids.shape == (2, 16) and ids[0, 5] == 1 and mask[0].sum() == 6  # 5 words + </s>
  enc = _ours(hf_model.state_dict(), text_len=24)
  out = np.asarray(encode_prompts(enc, tok, prompts, bucket=None))
  assert out.shape == (2, 24, TINY["d_model"])
  # Encoding only up to the longest prompt (rounded to 4 tokens here) changes nothing beyond rounding.
  cut = np.asarray(encode_prompts(enc, tok, prompts, bucket=4))
  assert cut.shape == out.shape and rel_err(cut, out) <= 1e-6
  ref = _hf_out(hf_model, ids.astype(np.int64), mask.astype(np.int64))
  for row in range(2):
    n = int(mask[row].sum())
    assert rel_err(out[row, :n], ref[row, :n]) <= 1e-5
    assert not np.any(out[row, n:])


def test_sharded_equals_single_device(hf_model):
  ids, mask = _batch()
  enc = _ours(hf_model.state_dict())
  ref = np.asarray(enc(jnp.asarray(ids), jnp.asarray(mask)))
  mesh = make_mesh({"fsdp": 4, "tensor": 2})
  graphdef, state = nnx.split(enc)
  state = jax.device_put(state, state_shardings(state, mesh))
  assert len(state["blocks"]["ffn"]["wi_0"]["kernel"][...].sharding.device_set) == 8

  @jax.jit
  def run(state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)

  with jax.set_mesh(mesh):
    out = run(state, jnp.asarray(ids), jnp.asarray(mask))
  assert rel_err(out, ref) <= 1e-6


def test_real_size_shapes_and_param_count():
  cfg = umt5_config("umt5-xxl")
  abstract = nnx.eval_shape(lambda: UMT5Encoder(cfg, rngs=nnx.Rngs(0)))
  state = nnx.state(abstract)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
  assert n == 5_680_910_336  # spec/wan.md C.2
  assert nnx.to_pure_dict(state)["blocks"]["attn"]["rel_bias"].shape == (24, 32, 64)
  assert state["blocks"]["ffn"]["wi_0"]["kernel"].get_metadata()["out_sharding"] == ("layers", "embed", "mlp")


def test_captions_are_ftfy_cleaned_as_eva_does(tmp_path):
  """Curly quotes, a ligature and a full-width word tokenize as their ftfy-cleaned forms (EVA always
  runs ftfy before tokenizing); the raw characters would be <unk> for this tokenizer."""
  words = ["lift", "the", "first", "arm", "now", '"']
  tok = T5Tokenizer(make_tiny_tokenizer(tmp_path / "tok", words), max_length=12)
  fancy = "\u201cLift\u201d the \ufb01rst arm \uff4e\uff4f\uff57"        # “Lift” the ﬁrst arm ｎｏｗ
  plain = '"Lift" the first arm now'
  ids, _ = tok([fancy, plain])
  np.testing.assert_array_equal(ids[0], ids[1])
  assert 2 not in ids[0].tolist()                                      # no <unk>
  raw = T5Tokenizer(tmp_path / "tok", max_length=12, clean=False)([fancy])[0]
  assert 2 in raw[0].tolist()                                          # uncleaned: unknown tokens
