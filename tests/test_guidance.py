"""EVA's dual guidance vs a direct, pass-by-pass computation with a stand-in model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eva_jax.diffusion import guidance
from tests.utils import rel_err

B, F, H, W, C, L, D = 2, 4, 3, 5, 16, 7, 8


def _stand_in(calls=None):
  """A nonlinear function of every input, so any mix-up of passes, frames or timesteps shows."""
  w = jax.random.normal(jax.random.key(42), (C, C)) / 4

  def model_fn(x, t, context, clip_fea, y):
    if calls is not None:
      calls.append(x.shape[0])
    ctx = jnp.mean(context, axis=(1, 2))[:, None, None, None, None]
    img = jnp.mean(clip_fea, axis=(1, 2))[:, None, None, None, None]
    h = jnp.tanh(x @ w + t[:, :, None, None, None] / 1000.0 + ctx) + img * jnp.mean(y, axis=-1, keepdims=True)
    return h
  return model_fn


def _inputs():
  k = jax.random.split(jax.random.key(0), 6)
  x = jax.random.normal(k[0], (B, F, H, W, C))
  clean = jax.random.normal(k[1], (B, 1, H, W, C))
  context = jax.random.normal(k[2], (B, L, D))
  neg = jax.random.normal(k[3], (1, L - 2, D))  # shorter: exercises zero padding
  clip = jax.random.normal(k[4], (B, 257, 12))
  y = jax.random.normal(k[5], (B, F, H, W, 20))
  return x, clean, context, neg, clip, y


@pytest.mark.parametrize("lang,hist", [(2.5, 1.5), (3.0, 0.0), (0.0, 2.0), (0.0, 0.0)])
def test_guided_velocity_matches_direct(lang, hist):
  x, clean, context, neg, clip, y = _inputs()
  calls = []
  model_fn = _stand_in(calls)
  key = jax.random.key(7)
  x = guidance.impose_history(x, clean, 1)
  out = guidance.guided_velocity(model_fn, x, 642.0, context=context, neg_context=neg, clip_fea=clip, y=y,
                                 key=key, lang_scale=lang, hist_scale=hist, hist_len=1, t_hist=71, t_nohist=999)
  n_passes = 1 + (lang != 0) + (hist != 0)
  assert calls == [B * n_passes], "one batched forward with only the needed passes"

  # Direct computation, one pass at a time, as EVA's sample loop writes it.
  ref_model = _stand_in()
  t_vec = np.full((B, F), 642.0, np.float32)
  t_vec[:, 0] = 71
  x_np = np.asarray(x)
  np.testing.assert_array_equal(x_np[:, 0], np.asarray(clean[:, 0]))
  f_c = ref_model(x, jnp.asarray(t_vec), context, clip, y)
  neg_full = jnp.concatenate([jnp.broadcast_to(neg, (B,) + neg.shape[1:]), jnp.zeros((B, 2, D))], axis=1)
  f_l = ref_model(x, jnp.asarray(t_vec), neg_full, clip, y)
  x_nh = x_np.copy()
  x_nh[:, :1] = np.asarray(jax.random.normal(key, (B, 1, H, W, C)))
  t_nh = t_vec.copy()
  t_nh[:, 0] = 999
  f_h = ref_model(jnp.asarray(x_nh), jnp.asarray(t_nh), context, clip, y)
  ref = (1 + lang + hist) * f_c - lang * f_l - hist * f_h
  assert rel_err(out, ref) <= 1e-6


def test_combine_formula():
  f_c, f_l, f_h = (np.full((2,), v, np.float32) for v in (1.0, 2.0, 5.0))
  out = guidance.combine(jnp.asarray(f_c), jnp.asarray(f_l), jnp.asarray(f_h), 2.5, 1.5)
  np.testing.assert_allclose(out, (1 + 2.5 + 1.5) * 1.0 - 2.5 * 2.0 - 1.5 * 5.0)


def test_frame_timesteps_and_history():
  tt = guidance.frame_timesteps(500, 2, 4, 2, 71)
  np.testing.assert_array_equal(np.asarray(tt), [[71, 71, 500, 500]] * 2)
  x = jnp.zeros((1, 4, 2, 2, 3))
  clean = jnp.ones((1, 2, 2, 2, 3))
  out = np.asarray(guidance.impose_history(x, clean, 2))
  assert out[:, :2].min() == 1 and out[:, 2:].max() == 0


def test_missing_inputs_raise():
  x, clean, context, neg, clip, y = _inputs()
  with pytest.raises(ValueError, match="neg_context"):
    guidance.guided_velocity(_stand_in(), x, 500.0, context=context, neg_context=None, clip_fea=clip, y=y,
                             key=None, lang_scale=1.0, hist_scale=0.0)
  with pytest.raises(ValueError, match="PRNG key"):
    guidance.guided_velocity(_stand_in(), x, 500.0, context=context, neg_context=neg, clip_fea=clip, y=y,
                             key=None, lang_scale=0.0, hist_scale=1.0)


@pytest.mark.parametrize("lang,hist", [(2.5, 1.5), (3.0, 0.0), (0.0, 2.0), (0.0, 0.0)])
def test_cached_context_kv_equals_recomputing(lang, hist):
  """pass_context_kv + guided_velocity(context_kv=...) == guided_velocity from the contexts, for a stand-in
  whose 'K/V' is its context padded to a fixed length (as the DiT pads to text_len) and its CLIP input."""
  x, clean, context, neg, clip, y = _inputs()
  fit = lambda c: jnp.pad(c, ((0, 0), (0, 2 * L - c.shape[1]), (0, 0)))
  base = _stand_in()

  def model_fn(x, t, context, clip_fea, y, context_kv=None):
    if context_kv is not None:   # one layer: [1, N, ...]
      return base(x, t, context_kv["k"][0], context_kv["k_img"][0], y)
    return base(x, t, fit(context), clip_fea, y)

  def kv_fn(ctx, clip_fea):
    calls.append((ctx.shape[0], clip_fea is not None))
    kv = {"k": fit(ctx)[None], "v": fit(ctx)[None]}
    if clip_fea is not None:
      kv.update(k_img=clip_fea[None], v_img=clip_fea[None])
    return kv

  calls = []
  kw = dict(context=context, neg_context=neg, clip_fea=clip, lang_scale=lang, hist_scale=hist)
  kv = guidance.pass_context_kv(kv_fn, **kw)
  # once per distinct context: the prompt with CLIP, and the empty prompt's text alone
  assert calls == [(B, True)] + ([(B, False)] if lang else [])
  assert kv["k"].shape[1] == B * (1 + (lang != 0) + (hist != 0))
  x = guidance.impose_history(x, clean, 1)
  common = dict(y=y, key=jax.random.key(7), hist_len=1, t_hist=71, t_nohist=999, **kw)
  ref = guidance.guided_velocity(model_fn, x, 642.0, **common)
  out = guidance.guided_velocity(model_fn, x, 642.0, context_kv=kv, **common)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
