"""EVA's image-to-video sampler: first frame + prompt embedding -> video, jitted and mesh-shardable.

    sampler = I2VSampler(dit, vae, clip, SamplerConfig(num_frames=49, height=480, width=640), mesh=mesh)
    cond = sampler.condition(first_frame, context, neg_context)   # VAE latent + CLIP features, jitted
    latents = sampler.sample(cond, key)                            # 40 jitted steps, progress bar
    video = sampler.decode(latents)                                # [B, T, H, W, 3] in [-1, 1]

The denoising loop exists in two forms that share `denoise_step` and give identical results:
  * `I2VSampler.sample`: a Python loop over one compiled step (`jit` with the step index as a traced
    argument), which drives a real progress bar with rate and ETA and compiles once for all 40 steps;
  * `sample_latents`: the whole loop as one `lax.scan`, for callers that jit a larger graph.

Each step (spec/eva.md A.4): re-impose the clean history frame, run the guided velocity
(guidance.py: conditional, no-text and no-history passes as one batched DiT forward), then a
solver step (solvers.py) with the schedule of schedules.py. After the loop the history frame is
re-imposed once more, and the VAE decodes. With `SamplerConfig.cache_context_kv` (the default) the
DiT's cross-attention keys and values of the prompt, the empty prompt and the CLIP tokens are computed
once per video (guidance.pass_context_kv) and reused at every step and pass: same latents.
Sharding: the batch axis is laid out over the mesh's
('data', 'fsdp') axes by the logical name 'act_batch'; parameters follow their logical names.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from eva_jax.diffusion import guidance, schedules, solvers
from eva_jax.parallel.sharding import constrain, named_sharding, state_shardings

LATENT_CHANNELS = 16
TEMPORAL_STRIDE = 4   # VAE: 1 + 4k frames -> 1 + k latent frames
SPATIAL_STRIDE = 8    # VAE: H, W -> H/8, W/8
PATCH = 2             # DiT patch (1, 2, 2): latent H/W must be even
BATCH_NAMES = ("act_batch", None, None, None, None)


# MARK: config and sizes

@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """What one generation needs besides the models (EVA's README values as defaults)."""
  num_frames: int = 49
  height: int = 480
  width: int = 640
  num_steps: int = 40
  shift: float = 3.0
  double_shift: bool = True          # EVA's schedule (schedules.py); False = upstream Wan
  solver: str = "unipc"              # 'unipc' | 'euler' | 'dpm++'
  lang_guidance: float = 2.5         # λ_l (0 drops the no-text pass)
  hist_guidance: float = 1.5         # λ_h (0 drops the no-history pass)
  hist_len: int = 1                  # clean history latent frames (the observed first frame)
  cache_context_kv: bool = True      # cross-attention K/V once per video, not per step (same result)

  def __post_init__(self):
    validate_video_size(self.num_frames, self.height, self.width)
    if self.solver not in solvers.SOLVER_NAMES:
      raise ValueError(f"SamplerConfig.solver must be one of {solvers.SOLVER_NAMES}, got {self.solver!r}")
    if self.num_steps < 2:
      raise ValueError(f"SamplerConfig.num_steps must be >= 2, got {self.num_steps}")
    if not 1 <= self.hist_len < latent_frames(self.num_frames):
      raise ValueError(f"SamplerConfig.hist_len={self.hist_len} must be in [1, {latent_frames(self.num_frames)})")


def validate_video_size(num_frames: int, height: int, width: int) -> None:
  """Frames must be 1 + 4k (k >= 1); height and width multiples of 16 (VAE stride 8 x DiT patch 2)."""
  problems = []
  if num_frames < 1 + TEMPORAL_STRIDE or (num_frames - 1) % TEMPORAL_STRIDE:
    problems.append(f"num_frames={num_frames} is not 1 + 4k with k >= 1 (e.g. 17, 33, 49, 81)")
  step = SPATIAL_STRIDE * PATCH
  for name, v in (("height", height), ("width", width)):
    if v <= 0 or v % step:
      problems.append(f"{name}={v} is not a positive multiple of {step} (VAE stride 8 x DiT patch 2)")
  if problems:
    raise ValueError("invalid video size: " + "; ".join(problems))


def latent_frames(num_frames: int) -> int:
  return 1 + (num_frames - 1) // TEMPORAL_STRIDE


def latent_shape(cfg: SamplerConfig, batch: int) -> tuple[int, int, int, int, int]:
  """[B, 1 + (T-1)/4, H/8, W/8, 16]: 49x480x640 -> [B, 13, 60, 80, 16]."""
  return (batch, latent_frames(cfg.num_frames), cfg.height // SPATIAL_STRIDE, cfg.width // SPATIAL_STRIDE,
          LATENT_CHANNELS)


# MARK: the pure loop

class Schedule(NamedTuple):
  """Everything the loop needs from the schedule, as device arrays (a pytree)."""
  timesteps: jax.Array   # [N] float32: the model's t (integers on 0..1000)
  coeffs: dict           # solver coefficient tables, [N] each
  t_hist: jax.Array      # clean-history timestep = timesteps[-1] (71 for EVA)
  t_nohist: jax.Array    # no-history timestep = timesteps[0] (999 for EVA)


def make_schedule(cfg: SamplerConfig) -> Schedule:
  if cfg.solver == "dpm++":  # EVA gives its DPM++ path its own list (shift applied twice: 1000 ... 187)
    ts, sigmas = schedules.eva_dpm_timesteps(cfg.num_steps, cfg.shift)
  else:
    ts, sigmas = schedules.wan_timesteps(cfg.num_steps, cfg.shift, cfg.double_shift)
  coeffs = solvers.get_solver(cfg.solver).prepare(sigmas)
  ts = jnp.asarray(ts, jnp.float32)
  return Schedule(ts, coeffs, ts[-1], ts[0])


class Conditioning(NamedTuple):
  """Per-video conditioning (a pytree; batch first)."""
  clean: jax.Array                    # [B, hist_len, h, w, 16] clean latent of the history frame(s)
  context: jax.Array                  # [B, L, text_dim] prompt embedding
  neg_context: Optional[jax.Array]    # [1 or B, L', text_dim] empty-prompt embedding (no-text pass)
  clip_fea: Optional[jax.Array]       # [B, 257, image_dim] CLIP features of the first frame


class LoopState(NamedTuple):
  x: jax.Array          # [B, F, h, w, 16]
  solver_state: Any


def init_loop(cfg: SamplerConfig, noise: jax.Array) -> LoopState:
  return LoopState(noise.astype(jnp.float32), solvers.get_solver(cfg.solver).init(noise))


def pass_context_kv(kv_fn: Callable, cfg: SamplerConfig, cond: Conditioning) -> dict:
  """The DiT's cross-attention K/V for this video's guidance passes (`kv_fn` = WanModel.context_kv)."""
  return guidance.pass_context_kv(kv_fn, cond.context, cond.neg_context, cond.clip_fea,
                                  lang_scale=cfg.lang_guidance, hist_scale=cfg.hist_guidance)


def denoise_step(model_fn: Callable, cfg: SamplerConfig, sched: Schedule, cond: Conditioning, key: jax.Array,
                 state: LoopState, i, context_kv: Optional[dict] = None) -> LoopState:
  """One EVA step i: history re-imposed, guided velocity, solver update. context_kv: `pass_context_kv`'s
  cross-attention K/V for cond (then model_fn must accept `context_kv=`), or None to compute them."""
  x = guidance.impose_history(state.x, cond.clean, cfg.hist_len)
  v = guidance.guided_velocity(
      model_fn, x, sched.timesteps[i], context=cond.context, neg_context=cond.neg_context,
      clip_fea=cond.clip_fea, y=None, key=jax.random.fold_in(key, i), lang_scale=cfg.lang_guidance,
      hist_scale=cfg.hist_guidance, hist_len=cfg.hist_len, t_hist=sched.t_hist, t_nohist=sched.t_nohist,
      context_kv=context_kv)
  x_next, sstate = solvers.get_solver(cfg.solver).step(state.solver_state, v.astype(jnp.float32), x, i,
                                                       sched.coeffs)
  return LoopState(x_next, sstate)


def finish(cfg: SamplerConfig, cond: Conditioning, state: LoopState) -> jax.Array:
  """The final latents: the history frame set to its clean latent, as EVA does after the loop."""
  return guidance.impose_history(state.x, cond.clean, cfg.hist_len)


def sample_latents(apply_fn: Callable, params: Any, cfg: SamplerConfig, sched: Schedule, cond: Conditioning,
                   noise: jax.Array, key: jax.Array, kv_fn: Optional[Callable] = None) -> jax.Array:
  """The whole denoising loop as one `lax.scan` (jit it, or call it inside a jitted function).

  `apply_fn(params, x, t, context, clip_fea, y, **kw) -> v`. The parameters ride in the scan carry
  (unchanged, so XLA aliases them) rather than being closed over: an NNX module merged inside the
  loop body must see them at the body's trace level, or its own `nnx.scan` over layers refuses them.
  `kv_fn(params, context, clip_fea)` (with cfg.cache_context_kv): the cross-attention K/V, computed
  once before the loop and carried through it.
  """
  kv = None
  if kv_fn is not None and cfg.cache_context_kv:
    kv = pass_context_kv(lambda c, i: kv_fn(params, c, i), cfg, cond)

  def body(carry, i):
    state, p, kv = carry
    model_fn = lambda *args, **kw: apply_fn(p, *args, **kw)
    return (denoise_step(model_fn, cfg, sched, cond, key, state, i, kv), p, kv), None
  (state, _, _), _ = jax.lax.scan(body, (init_loop(cfg, noise), params, kv), jnp.arange(cfg.num_steps))
  return finish(cfg, cond, state)


# MARK: the sampler over NNX models

def _nnx_apply(graphdef) -> Callable:
  """apply_fn(params, x, t, context, clip_fea, y, **kw) for an NNX module split into (graphdef, params)."""
  def apply_fn(params, x, t, context, clip_fea, y, **kw):
    return nnx.merge(graphdef, params)(x, t, context, clip_fea, y, **kw)
  return apply_fn


def _nnx_context_kv(graphdef) -> Callable:
  """kv_fn(params, context, clip_fea) -> the module's `context_kv(context, clip_fea)`."""
  def kv_fn(params, context, clip_fea):
    return nnx.merge(graphdef, params).context_kv(context, clip_fea)
  return kv_fn


class I2VSampler:
  """Jitted EVA I2V generation over a DiT, a VAE and (for i2v) a CLIP image encoder.

  `clip` needs `encode_image(frames [B, H, W, 3] in [-1, 1]) -> [B, 257, image_dim]`; the DiT is
  called as `dit(x, t [B, F], context, clip_fea, y=None)`. With a `mesh`, parameters are placed by
  their logical axis names and the batch by 'act_batch' (the batch must divide the data axes).
  """

  def __init__(self, dit: nnx.Module, vae: nnx.Module, clip: Optional[nnx.Module], cfg: SamplerConfig,
               mesh: Optional[jax.sharding.Mesh] = None):
    self.cfg, self.mesh = cfg, mesh
    self.schedule = make_schedule(cfg)
    self._dit = self._split(dit)
    # the cross-attention K/V cache needs a DiT with `context_kv` (WanModel); others recompute per step
    self._cache_kv = cfg.cache_context_kv and callable(getattr(dit, "context_kv", None))
    self._vae = self._split(vae)
    self._clip = self._split(clip) if clip is not None else None
    self._step = jax.jit(self._step_impl)  # latents are a few MB: no donation needed
    self._scan = jax.jit(self._scan_impl)
    self._condition = jax.jit(self._condition_impl)
    self._kv = jax.jit(self._kv_impl)
    self._decode = jax.jit(self._decode_impl)

  # -- placement
  def _split(self, module):
    graphdef, params = nnx.split(module)
    if self.mesh is not None:
      params = jax.device_put(params, state_shardings(params, self.mesh))
    return graphdef, params

  def _batch(self, x: jax.Array) -> jax.Array:
    if self.mesh is None or x is None:
      return x
    names = ("act_batch",) + (None,) * (x.ndim - 1)
    return jax.device_put(x, named_sharding(self.mesh, names))

  def _constrain(self, x):
    if self.mesh is None:
      return x
    return constrain(x, ("act_batch",) + (None,) * (x.ndim - 1), mesh=self.mesh)

  # -- jitted pieces (pure functions of the parameters)
  def _condition_impl(self, vae_p, clip_p, first_frame, context, neg_context):
    vae = nnx.merge(self._vae[0], vae_p)
    clean = vae.encode(first_frame[:, None].astype(jnp.float32))             # [B, 1, h, w, 16]
    clip_fea = None
    if clip_p is not None:
      clip_fea = nnx.merge(self._clip[0], clip_p).encode_image(first_frame)  # [B, 257, image_dim]
    return Conditioning(self._constrain(clean), context, neg_context, clip_fea)

  def _kv_impl(self, dit_p, cond):
    return pass_context_kv(lambda c, i: _nnx_context_kv(self._dit[0])(dit_p, c, i), self.cfg, cond)

  def _step_impl(self, dit_p, sched, cond, key, state, i, kv):
    model_fn = lambda *args, **kw: _nnx_apply(self._dit[0])(dit_p, *args, **kw)
    state = denoise_step(model_fn, self.cfg, sched, cond, key, state, i, kv)
    return LoopState(self._constrain(state.x), state.solver_state)

  def _scan_impl(self, dit_p, sched, cond, noise, key):
    kv_fn = _nnx_context_kv(self._dit[0]) if self._cache_kv else None
    return sample_latents(_nnx_apply(self._dit[0]), dit_p, self.cfg, sched, cond, self._constrain(noise), key,
                          kv_fn=kv_fn)

  def _decode_impl(self, vae_p, latents):
    return jnp.clip(nnx.merge(self._vae[0], vae_p).decode(latents), -1.0, 1.0)

  # -- public API
  def condition(self, first_frame: jax.Array, context: jax.Array,
                neg_context: Optional[jax.Array] = None) -> Conditioning:
    """first_frame [B, H, W, 3] in [-1, 1], context [B, L, D] -> Conditioning (VAE latent, CLIP)."""
    cfg = self.cfg
    expect = (cfg.height, cfg.width, 3)
    if first_frame.ndim != 4 or tuple(first_frame.shape[1:]) != expect:
      raise ValueError(f"first_frame must be [B, {cfg.height}, {cfg.width}, 3] (SamplerConfig size), "
                       f"got {tuple(first_frame.shape)}")
    if context.ndim != 3 or context.shape[0] != first_frame.shape[0]:
      raise ValueError(f"context must be [B={first_frame.shape[0]}, L, D], got {tuple(context.shape)}")
    if cfg.lang_guidance and neg_context is None:
      raise ValueError("lang_guidance != 0 needs neg_context (the empty-prompt embedding)")
    if neg_context is not None and neg_context.ndim == 2:
      neg_context = neg_context[None]
    clip_p = self._clip[1] if self._clip is not None else None
    return self._condition(self._vae[1], clip_p, self._batch(jnp.asarray(first_frame)),
                           self._batch(jnp.asarray(context)), None if neg_context is None else jnp.asarray(neg_context))

  def context_kv(self, cond: Conditioning) -> Optional[dict]:
    """The DiT's cross-attention K/V for every guidance pass of this conditioning (one jitted call per
    video), or None when the cache is off (SamplerConfig.cache_context_kv) or the DiT has no `context_kv`."""
    return self._kv(self._dit[1], cond) if self._cache_kv else None

  def initial_noise(self, key: jax.Array, batch: int) -> jax.Array:
    """x_T ~ N(0, I) with the latent shape of the config; the key is split from the guidance key."""
    return jax.random.normal(key, latent_shape(self.cfg, batch), jnp.float32)

  def sample(self, cond: Conditioning, key: jax.Array, *, show_progress: bool = True,
             on_step: Optional[Callable[[int], None]] = None) -> jax.Array:
    """Latents [B, F, h, w, 16]: a Python loop over the compiled step (progress bar over steps)."""
    noise_key, guide_key = jax.random.split(key)
    noise = self._batch(self.initial_noise(noise_key, cond.context.shape[0]))
    state = init_loop(self.cfg, noise)
    kv = self.context_kv(cond)   # once per video: every step and pass reuses it
    steps = range(self.cfg.num_steps)
    if show_progress:
      from eva_jax.utils.progress import progress
      steps = progress(steps, total=self.cfg.num_steps, desc=f"sampling ({self.cfg.solver})", unit="step")
    for i in steps:
      state = self._step(self._dit[1], self.schedule, cond, guide_key, state, jnp.int32(i), kv)
      if on_step is not None:
        on_step(i)
    return finish(self.cfg, cond, state)

  def sample_scanned(self, cond: Conditioning, key: jax.Array) -> jax.Array:
    """Same latents as `sample`, from one compiled `lax.scan` over all steps (no progress bar)."""
    noise_key, guide_key = jax.random.split(key)
    noise = self._batch(self.initial_noise(noise_key, cond.context.shape[0]))
    return self._scan(self._dit[1], self.schedule, cond, noise, guide_key)

  def decode(self, latents: jax.Array) -> jax.Array:
    """[B, F, h, w, 16] -> video [B, T, H, W, 3] in [-1, 1]."""
    return self._decode(self._vae[1], latents)

  def generate(self, first_frame: jax.Array, context: jax.Array, neg_context: Optional[jax.Array], key: jax.Array,
               *, show_progress: bool = True) -> tuple[jax.Array, jax.Array]:
    """(video [B, T, H, W, 3] in [-1, 1], latents [B, F, h, w, 16]) for first frames and prompt embeddings."""
    cond = self.condition(first_frame, context, neg_context)
    latents = self.sample(cond, key, show_progress=show_progress)
    return self.decode(latents), latents
