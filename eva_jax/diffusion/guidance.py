"""EVA's dual classifier-free guidance with diffusion-forcing history (spec/eva.md A.3-A.4).

Every sampling step of EVA:
  1. re-imposes the history: latent frames [0, hist_len) are overwritten with the clean latent of
     the observed first frame, and their per-frame timestep is the "clean" value t_hist (71 = the
     last inference timestep, not 0);
  2. runs up to three passes of the DiT,
       f_c  conditional            (x, t, prompt, clip)
       f_l  no language            (x, t, empty-prompt embedding, clip)
       f_h  no history             (history frames replaced by fresh noise with t = t_nohist = 999)
  3. combines them:  f = (1 + λ_l + λ_h)·f_c − λ_l·f_l − λ_h·f_h.

The passes run as one batched forward. They are stacked per sample (`[B, P, ...]` reshaped to
`[B·P, ...]`) rather than concatenated pass by pass, so a batch sharded over the mesh's data axes
keeps each sample's passes on the device that holds the sample: no resharding. A scale of 0 drops
its pass (scales are Python floats, static under jit, so the batch shrinks).

`model_fn(x [N,F,h,w,C], t [N,F], context [N,L,D], clip_fea [N,257,1280] | None, y | None) -> v`.

The cross-attention keys and values depend only on (prompt, CLIP) and are the same at every step:
`pass_context_kv` computes them once per video and per distinct context (the prompt with the CLIP tokens,
shared by the conditional and no-history passes; the empty prompt's text for the no-text pass) and lays
them out as `guided_velocity` stacks its passes; given as `context_kv=`, each step calls
`model_fn(x, t, None, None, y, context_kv=...)` instead of re-projecting the 769 context tokens.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

ModelFn = Callable[..., jax.Array]


def impose_history(x: jax.Array, clean: jax.Array, hist_len: int) -> jax.Array:
  """x[:, :hist_len] = clean[:, :hist_len] for latents [B, F, h, w, C]."""
  if hist_len <= 0:
    return x
  if clean.shape[1] < hist_len:
    raise ValueError(f"clean history has {clean.shape[1]} latent frames, hist_len={hist_len} needs more")
  return x.at[:, :hist_len].set(clean[:, :hist_len].astype(x.dtype))


def frame_timesteps(t, batch: int, num_frames: int, hist_len: int, t_hist) -> jax.Array:
  """Per-frame timesteps [B, F]: t for the frames being generated, t_hist for the history frames."""
  tt = jnp.full((batch, num_frames), t, jnp.float32)
  if hist_len > 0:
    tt = tt.at[:, :hist_len].set(jnp.asarray(t_hist, jnp.float32))
  return tt


def combine(f_c: jax.Array, f_l: Optional[jax.Array], f_h: Optional[jax.Array],
            lang_scale: float, hist_scale: float) -> jax.Array:
  """f = (1 + λ_l + λ_h)·f_c − λ_l·f_l − λ_h·f_h, with a missing pass allowed when its λ is 0."""
  out = (1.0 + lang_scale + hist_scale) * f_c
  if lang_scale:
    out = out - lang_scale * f_l
  if hist_scale:
    out = out - hist_scale * f_h
  return out


def pad_context(context: jax.Array, length: int) -> jax.Array:
  """Zero-pads text embeddings [B, L, D] to `length` tokens (the DiT pads to 512 with zeros anyway)."""
  if context.shape[1] > length:
    raise ValueError(f"context has {context.shape[1]} tokens, more than {length}")
  return jnp.pad(context, ((0, 0), (0, length - context.shape[1]), (0, 0)))


def _stack_passes(items: list) -> jax.Array:
  """[P] arrays [B, ...] -> [B·P, ...] ordered sample-major (sample b's passes are adjacent)."""
  stacked = jnp.stack(items, axis=1)  # [B, P, ...]
  return stacked.reshape((-1,) + stacked.shape[2:])


def pass_context_kv(kv_fn: Callable, context: jax.Array, neg_context: Optional[jax.Array],
                    clip_fea: Optional[jax.Array], *, lang_scale: float, hist_scale: float) -> dict:
  """The DiT's cross-attention K/V for every pass of `guided_velocity`, in its pass order and layout.

  `kv_fn(context | None, clip_fea | None) -> {name: [layers, B, L, N, d]}` (WanModel.context_kv). It runs
  once for the prompt with the CLIP features and, when lang_scale != 0, once for the empty prompt's text
  alone (that pass reuses the prompt's image K/V); the passes are then stacked sample-major as
  `_stack_passes` stacks the inputs: {name: [layers, B·P, L, N, d]}.
  """
  b = context.shape[0]
  cond = kv_fn(context, clip_fea)
  passes = [cond]
  if lang_scale:
    if neg_context is None:
      raise ValueError("lang_scale != 0 needs neg_context (the empty-prompt embedding)")
    neg = jnp.broadcast_to(neg_context, (b,) + neg_context.shape[1:]).astype(context.dtype)
    passes.append({**cond, **kv_fn(neg, None)})   # own text K/V, the prompt's image K/V
  if hist_scale:
    passes.append(cond)                           # no-history: same prompt and CLIP as the conditional pass
  if len(passes) == 1:
    return cond
  def stack(*per_pass):                           # [layers, B, ...] x P -> [layers, B·P, ...]
    s = jnp.stack(per_pass, axis=2)
    return s.reshape(s.shape[:1] + (-1,) + s.shape[3:])
  return jax.tree.map(stack, *passes)


def guided_velocity(model_fn: ModelFn, x: jax.Array, t, *, context: jax.Array, neg_context: Optional[jax.Array],
                    clip_fea: Optional[jax.Array], y: Optional[jax.Array], key: Optional[jax.Array],
                    lang_scale: float, hist_scale: float, hist_len: int = 1, t_hist: float = 71.0,
                    t_nohist: float = 999.0, context_kv: Optional[dict] = None) -> jax.Array:
  """EVA's guided velocity for latents x [B, F, h, w, C] at scalar timestep t (0..1000 scale).

  x must already hold the clean history (impose_history); `key` draws the no-history noise (needed
  only when hist_scale != 0), `neg_context` is the empty-prompt embedding [1 or B, L', D] (needed only
  when lang_scale != 0). `context_kv`: `pass_context_kv(...)` for the same contexts and scales; the
  model is then called with it instead of the contexts (same result).
  """
  b, f = x.shape[:2]
  t_vec = frame_timesteps(t, b, f, hist_len, t_hist)  # [B, F]
  xs, ts, ctxs = [x], [t_vec], [context]
  if lang_scale:
    if neg_context is None:
      raise ValueError("lang_scale != 0 needs neg_context (the empty-prompt embedding)")
    length = max(context.shape[1], neg_context.shape[1])
    neg = jnp.broadcast_to(neg_context, (b,) + neg_context.shape[1:]).astype(context.dtype)
    ctxs = [pad_context(context, length)]
    xs.append(x)
    ts.append(t_vec)
    ctxs.append(pad_context(neg, length))
  if hist_scale:
    if hist_len <= 0:
      raise ValueError("hist_scale != 0 needs hist_len >= 1 history frames")
    if key is None:
      raise ValueError("hist_scale != 0 needs a PRNG key for the no-history noise")
    noise = jax.random.normal(key, x[:, :hist_len].shape, jnp.float32).astype(x.dtype)
    xs.append(x.at[:, :hist_len].set(noise))
    ts.append(t_vec.at[:, :hist_len].set(jnp.asarray(t_nohist, jnp.float32)))
    ctxs.append(ctxs[0])
  p = len(xs)
  if p == 1:
    if context_kv is not None:
      return model_fn(x, t_vec, None, None, y, context_kv=context_kv)
    return model_fn(x, t_vec, context, clip_fea, y)
  rep = lambda a: None if a is None else _stack_passes([a] * p)
  if context_kv is not None:
    out = model_fn(_stack_passes(xs), _stack_passes(ts), None, None, rep(y), context_kv=context_kv)
  else:
    out = model_fn(_stack_passes(xs), _stack_passes(ts), _stack_passes(ctxs), rep(clip_fea), rep(y))
  out = out.reshape((b, p) + out.shape[1:])  # [B, P, F, h, w, C]
  f_c = out[:, 0]
  f_l = out[:, 1] if lang_scale else None
  f_h = out[:, p - 1] if hist_scale else None
  return combine(f_c, f_l, f_h, lang_scale, hist_scale)
