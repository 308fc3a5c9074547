"""WanModel (eva_jax.models.wan) against diffusers' WanTransformer3DModel in float32, plus scan/remat/attention
backend/bf16 consistency and the exact parameter counts of the released configs (spec wan.md A.1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from convert.wan_dit import convert_dit_state_dict
from eva_jax.models.wan import WanModel, wan_config, zero_clip_features
from eva_jax.models.wan.attention import attention, chunked_attention, cudnn_attention, pad_kv
from tests.utils import rel_err, to_numpy

B, F, H, W = 2, 3, 4, 6           # latent [B, F, H, W, 16] -> 3 x 2 x 3 = 18 tokens
N_TEXT = 7                        # true prompt length; padded with zeros to text_len = 512


# MARK: references

def diffusers_model(name: str, seed: int = 0, **overrides):
  """The diffusers model matching wan_config(name, **overrides), every parameter randomised (norm weights too)."""
  from diffusers import WanTransformer3DModel
  cfg = wan_config(name, **overrides)
  torch.manual_seed(seed)
  model = WanTransformer3DModel(
      patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
      in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
      ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
      eps=cfg.eps, image_dim=cfg.image_dim if cfg.is_i2v else None,
      added_kv_proj_dim=cfg.dim if cfg.is_i2v else None, rope_max_seq_len=cfg.rope_max_len).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


# Spec wan.md A.9, read right to left: diffusers name piece -> Wan name piece (independent of convert/).
_D2W_BLOCK = [("attn1.to_out.0.", "self_attn.o."), ("attn2.to_out.0.", "cross_attn.o."),
              ("attn1.to_", "self_attn."), ("attn2.to_", "cross_attn."),
              ("attn1.", "self_attn."), ("attn2.add_k_proj.", "cross_attn.k_img."),
              ("attn2.add_v_proj.", "cross_attn.v_img."), ("attn2.norm_added_k.", "cross_attn.norm_k_img."),
              ("attn2.", "cross_attn."), ("norm2.", "norm3."), ("ffn.net.0.proj.", "ffn.0."),
              ("ffn.net.2.", "ffn.2."), ("scale_shift_table", "modulation")]
_D2W_TOP = [("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
            ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
            ("condition_embedder.time_proj.", "time_projection.1."),
            ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
            ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
            ("condition_embedder.image_embedder.norm1.", "img_emb.proj.0."),
            ("condition_embedder.image_embedder.ff.net.0.proj.", "img_emb.proj.1."),
            ("condition_embedder.image_embedder.ff.net.2.", "img_emb.proj.3."),
            ("condition_embedder.image_embedder.norm2.", "img_emb.proj.4."),
            ("scale_shift_table", "head.modulation"), ("proj_out.", "head.head.")]


def to_original_layout(sd: dict) -> dict:
  out = {}
  for key, value in sd.items():
    new = key
    if key.startswith("blocks."):
      _, i, rest = key.split(".", 2)
      for d, w in _D2W_BLOCK:
        if rest.startswith(d):
          rest = w + rest[len(d):]
          break
      new = f"blocks.{i}.{rest}"
    else:
      for d, w in _D2W_TOP:
        if key.startswith(d):
          new = w + key[len(d):]
          break
    out[new] = value
  return out


def inputs(name: str, seed: int = 1, per_frame: bool = False):
  cfg = wan_config(name)
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((B, F, H, W, 16)).astype(np.float32)
  t = (rng.uniform(0, 1000, (B, F)) if per_frame else np.array([999.0, 421.0])).astype(np.float32)
  ctx = rng.standard_normal((B, N_TEXT, cfg.text_dim)).astype(np.float32)
  clip = rng.standard_normal((B, 257, cfg.image_dim)).astype(np.float32) if cfg.is_i2v else None
  y = rng.standard_normal((B, F, H, W, 20)).astype(np.float32) if cfg.is_i2v else None
  return x, t, ctx, clip, y


def reference_forward(model, x, t, ctx, clip, y, text_len=512):
  """diffusers forward on channels-first inputs, text zero-padded to 512; per-frame t as per-token [B, L]."""
  xt = np.concatenate([x, y], -1) if y is not None else x
  hidden = torch.from_numpy(xt).permute(0, 4, 1, 2, 3).contiguous()
  ctx_pad = np.zeros((ctx.shape[0], text_len, ctx.shape[2]), np.float32)
  ctx_pad[:, :ctx.shape[1]] = ctx
  if t.ndim == 2:   # per latent frame -> per token (tokens of a frame are contiguous)
    t = np.repeat(t, (H // 2) * (W // 2), axis=1)
  with torch.no_grad():
    out = model(hidden, torch.from_numpy(t), torch.from_numpy(ctx_pad),
                encoder_hidden_states_image=None if clip is None else torch.from_numpy(clip),
                return_dict=False)[0]
  return to_numpy(out).transpose(0, 2, 3, 4, 1)                              # [B, F, H, W, 16]


def build(name, sd, **overrides):
  cfg = wan_config(name, **overrides)
  model = WanModel(cfg, rngs=nnx.Rngs(0))
  nnx.update(model, nnx.State(convert_dit_state_dict(sd, cfg)))
  return model


@nnx.jit
def _forward(model, x, t, ctx, clip, y):
  return model(x, t, ctx, clip, y)


def run(model, x, t, ctx, clip, y):
  """Jitted forward (one compile per config and input shapes, shared across tests)."""
  return np.asarray(_forward(model, x, t, ctx, clip, y))


@pytest.fixture(scope="module")
def refs():
  """Tiny diffusers models and their state dicts, built once."""
  out = {}
  for name in ("tiny-t2v", "tiny-i2v"):
    m = diffusers_model(name)
    out[name] = (m, {k: v.detach().clone() for k, v in m.state_dict().items()})
  return out


# MARK: parity

@pytest.mark.parametrize("name", ["tiny-t2v", "tiny-i2v"])
def test_parity_diffusers_layout(refs, name):
  tm, sd = refs[name]
  args = inputs(name)
  out = run(build(name, sd), *args)
  err = rel_err(out, reference_forward(tm, *args))
  assert err <= 1e-5, err


@pytest.mark.parametrize("scan", [True, False])
def test_parity_original_layout(refs, scan):
  tm, sd = refs["tiny-i2v"]
  original = to_original_layout(sd)
  assert "blocks.0.cross_attn.k_img.weight" in original and "head.modulation" in original
  args = inputs("tiny-i2v", seed=2)
  out = run(build("tiny-i2v", original, scan_layers=scan), *args)
  err = rel_err(out, reference_forward(tm, *args))
  assert err <= 1e-5, err


@pytest.mark.parametrize("name", ["tiny-t2v", "tiny-i2v"])
def test_per_frame_timesteps(refs, name):
  tm, sd = refs[name]
  args = inputs(name, seed=3, per_frame=True)
  model = build(name, sd)
  out = run(model, *args)
  err = rel_err(out, reference_forward(tm, *args))
  assert err <= 1e-5, err
  # A [B, F] t with equal frames equals the [B] form.
  x, t, ctx, clip, y = args
  same = run(model, x, np.repeat(t[:, :1], F, axis=1), ctx, clip, y)
  np.testing.assert_allclose(same, run(model, x, t[:, 0], ctx, clip, y), rtol=0, atol=1e-6)


def test_i2v_without_y_means_zeros(refs):
  _, sd = refs["tiny-i2v"]
  x, t, ctx, clip, y = inputs("tiny-i2v")
  model = build("tiny-i2v", sd)
  np.testing.assert_array_equal(run(model, x, t, ctx, clip, None), run(model, x, t, ctx, clip, np.zeros_like(y)))


def test_one_zero_clip_token_equals_257(refs):
  """clip.source='zeros' feeds one zero CLIP token (zero_clip_features): Wan's 257 zero tokens all embed to the
  same key and value, so the output and the parameter gradients are those of the 257."""
  _, sd = refs["tiny-i2v"]
  x, t, ctx, _, y = inputs("tiny-i2v", seed=6)
  dim = wan_config("tiny-i2v").image_dim
  one = zero_clip_features(B, dim)
  assert one.shape == (B, 1, dim) and not one.any()
  many = np.zeros((B, 257, dim), np.float32)
  model = build("tiny-i2v", sd)

  @nnx.jit
  def output_and_grads(model, clip):  # one program per CLIP length: the forward comes with the backward
    def loss(m):
      out = m(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx), clip, jnp.asarray(y))
      return jnp.mean(out ** 2), out
    (_, out), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    return out, jnp.concatenate([g.ravel() for g in jax.tree.leaves(nnx.to_pure_dict(grads))])
  (o1, g1), (o257, g257) = output_and_grads(model, jnp.asarray(one)), output_and_grads(model, jnp.asarray(many))
  assert rel_err(o1, o257) <= 1e-5
  assert rel_err(g1, g257) <= 1e-5


# MARK: execution variants

def test_scan_loop_remat_equal(refs):
  _, sd = refs["tiny-i2v"]
  args = inputs("tiny-i2v", seed=4)
  base = run(build("tiny-i2v", sd, scan_layers=False), *args)
  for overrides in (dict(), dict(remat="full"), dict(remat="dots"), dict(scan_layers=False, remat="full")):
    out = run(build("tiny-i2v", sd, **overrides), *args)
    assert rel_err(out, base) <= 1e-6, overrides


def test_remat_gradients_equal(refs):
  _, sd = refs["tiny-t2v"]
  x, t, ctx, _, _ = inputs("tiny-t2v", seed=5)

  @nnx.jit
  def grads(model):
    def loss(m):
      return jnp.mean(m(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx)) ** 2)
    return nnx.to_pure_dict(nnx.grad(loss)(model))
  g0 = grads(build("tiny-t2v", sd))
  g1 = grads(build("tiny-t2v", sd, remat="full"))
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    # Recomputation reorders float32 sums; the smallest gradient leaves (norm ~1e-4) differ at ~2e-5.
    assert rel_err(b, a) <= 1e-4


def test_chunked_model_equals_xla(refs):
  _, sd = refs["tiny-i2v"]
  args = inputs("tiny-i2v", seed=6)
  ref = run(build("tiny-i2v", sd), *args)
  out = run(build("tiny-i2v", sd, attention="chunked", attn_chunk_size=5), *args)
  assert rel_err(out, ref) <= 1e-6


def test_bf16_close_to_fp32(refs):
  _, sd = refs["tiny-i2v"]
  args = inputs("tiny-i2v", seed=7)
  ref = run(build("tiny-i2v", sd), *args)
  out = run(build("tiny-i2v", sd, dtype="bfloat16", param_dtype="bfloat16"), *args)
  assert out.dtype == np.float32
  # bf16 weights and matmuls (8-bit mantissa, rounding 4e-3 relative): measured 4.3e-3 here; 1e-2 leaves margin.
  assert rel_err(out, ref) <= 1e-2


# MARK: attention backends

def _qkv(lq=37, lk=29, n=2, d=8, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (2, lq, n, d)), jax.random.normal(ks[1], (2, lk, n, d)),
          jax.random.normal(ks[2], (2, lk, n, d)))


@pytest.mark.parametrize("chunk", [4, 16, 64])
def test_chunked_attention_equals_xla(chunk):
  q, k, v = _qkv()
  lengths = jnp.array([29, 11])
  for kv_len in (None, lengths):
    ref = attention(q, k, v, backend="xla", kv_seq_lengths=kv_len)
    out = jax.jit(chunked_attention, static_argnames="chunk_size")(q, k, v, kv_len, chunk_size=chunk)
    assert rel_err(out, ref) <= 1e-6


def test_chunked_attention_gradient():
  q, k, v = _qkv(lq=20, lk=13)
  f = lambda fn: jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v))), argnums=(0, 1, 2)))(q, k, v)
  g_ref = f(lambda q, k, v: attention(q, k, v, backend="xla"))
  g_out = f(lambda q, k, v: chunked_attention(q, k, v, chunk_size=6))
  for a, b in zip(g_ref, g_out):
    assert rel_err(b, a) <= 1e-5


def test_cudnn_padding_logic_via_xla():
  """The cuDNN path pads 257 image keys to 320 and masks them; run its padding with the xla kernel."""
  q, k, v = _qkv(lq=12, lk=257)
  ref = attention(q, k, v, backend="xla")
  out = cudnn_attention(q, k, v, implementation="xla")
  assert rel_err(out, ref) <= 1e-6
  lengths = jnp.array([257, 100])
  ref = attention(q, k, v, backend="xla", kv_seq_lengths=lengths)
  assert rel_err(cudnn_attention(q, k, v, lengths, implementation="xla"), ref) <= 1e-6


def test_cudnn_needs_no_padding_or_mask_at_a_multiple():
  """Keys at a multiple of the cuDNN key multiple run unpadded and unmasked; other lengths are padded."""
  q, k, v = _qkv(lq=12, lk=128)
  k2, v2, lengths = pad_kv(k, v, None)
  assert lengths is None and k2.shape == k.shape
  assert rel_err(cudnn_attention(q, k, v, implementation="xla"), attention(q, k, v, backend="xla")) <= 1e-6
  k2, _, lengths = pad_kv(k[:, :120], v[:, :120], None)
  assert k2.shape[1] == 128 and lengths.tolist() == [120, 120]
  k2, _, lengths = pad_kv(k[:, :120], v[:, :120], None, multiple=8)
  assert k2.shape[1] == 120 and lengths is None


# MARK: configs

@pytest.mark.parametrize("name,count", [("t2v-1.3b", 1_418_996_800), ("t2v-14b", 14_288_491_584),
                                        ("i2v-14b", 16_394_878_784)])
def test_real_config_param_counts(name, count):
  abstract = nnx.eval_shape(lambda: WanModel(wan_config(name), rngs=nnx.Rngs(0)))
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert total == count


def test_config_overrides_and_errors():
  cfg = wan_config("i2v-14b", num_layers=2, dim=256, num_heads=2)
  assert (cfg.num_layers, cfg.dim, cfg.head_dim, cfg.in_dim) == (2, 256, 128, 36)
  with pytest.raises(TypeError, match="num_layer"):
    wan_config("t2v-1.3b", num_layer=3)
  with pytest.raises(KeyError, match="t2v-2b"):
    wan_config("t2v-2b")
  with pytest.raises(ValueError, match="attention"):
    wan_config("tiny-t2v", attention="flash")
