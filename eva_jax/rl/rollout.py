"""GRPO rollouts: 40-step SDE sampling with log-probs, then VAE decode → IDM → reward, one compiled graph.

Per step j (spec/eva.md D.2, A.3):

  x_in = x_j with latent frame 0 replaced by the clean first-frame latent
  t    = [B, F] filled with timesteps[j], frame 0 at t_hist (= timesteps[-1] = 71)
  v    = policy(x_in, t, cond)                      # conditional only: EVA trains without CFG
  x_{j+1}, log p_j = SDE step (σ_j → σ_{j+1})

The raw samples x_0..x_S are stored (`latents [B, S+1, F, h, w, C]`, `log_probs [B, S]`); the
training step re-imposes frame 0 exactly as here, so recomputed log-probs equal these ones. After
the loop frame 0 is re-imposed, the latents are decoded, mapped to [0, 1], and the IDM's joint
trajectories are scored by the smoothness reward (rl/reward.py), all in the same jitted function.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from eva_jax.diffusion.sde import sde_step_with_logprob
from eva_jax.rl import reward as reward_lib
from eva_jax.rl.grpo import frame_timesteps, impose_first_frame


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """Static knobs of the sampler (EVA's values as defaults)."""
  sde_variant: str = "eva"
  noise_level: float = 0.7
  sigma_max: float = 0.9914             # sigmas[1] of the 40-step schedule ('eva' variant)
  sigma_min: float = 0.0
  t_hist: float = 71.0
  fps: float = 16.0
  deterministic: bool = False           # evaluation: ODE (Euler) steps
  # Decode the final latents with the clean frame 0 put back (eva_jax's default: the IDM sees the true
  # first frame), or as sampled (EVA's exp_flow_grpo.py: frame 0 carries the last SDE step's noise).
  decode_clean_first: bool = True


def sample_latents(policy_fn: Callable, lora, base, clean_first: jax.Array, cond, noise: jax.Array,
                   key: jax.Array, timesteps, sigmas, cfg: RolloutConfig, kv_fn: Callable | None = None):
  """The SDE sampling loop (lax.scan over steps).

  Args:
    policy_fn: (lora, base, x [B,F,h,w,C], t [B,F], cond) -> v; with kv_fn it is also called as
      (lora, base, x, t, cond, context_kv=kv_fn(lora, base, cond)).
    clean_first: [B, 1, h, w, C] clean latent of the observed first frame.
    noise: [B, F, h, w, C] initial x_T.
    key: noise for the SDE steps (step j uses fold_in(key, j)).
    kv_fn: (lora, base, cond) -> the policy's cross-attention keys and values (WanModel.context_kv).
      They depend on the prompt and CLIP tokens and the weights, not on x or t: computed once per
      rollout instead of at every step (the same velocities).
  Returns (latents [B, S+1, F, h, w, C] f32, log_probs [B, S] f32).
  """
  timesteps = jnp.asarray(timesteps, jnp.float32)
  sigmas = jnp.asarray(sigmas, jnp.float32)
  b, f = noise.shape[:2]
  kv = kv_fn(lora, base, cond) if kv_fn is not None else None

  def body(x, j):
    x_in = impose_first_frame(x, clean_first)
    t = frame_timesteps(timesteps[j], b, f, cfg.t_hist)
    v = policy_fn(lora, base, x_in, t, cond) if kv is None else policy_fn(lora, base, x_in, t, cond, context_kv=kv)
    x_next, logp, _, _ = sde_step_with_logprob(
        x_in, v, sigmas[j], sigmas[j + 1], jax.random.fold_in(key, j), variant=cfg.sde_variant,
        noise_level=cfg.noise_level, sigma_max=cfg.sigma_max, sigma_min=cfg.sigma_min,
        deterministic=cfg.deterministic)
    return x_next, (x_next, logp)

  x0 = noise.astype(jnp.float32)
  _, (xs, lps) = jax.lax.scan(body, x0, jnp.arange(timesteps.shape[0]))
  latents = jnp.concatenate([x0[:, None], jnp.moveaxis(xs, 0, 1)], axis=1)  # [B, S+1, ...]
  return latents, lps.T


def make_rollout_fn(policy_fn: Callable, decode_fn: Callable, actions_fn: Callable, timesteps, sigmas,
                    cfg: RolloutConfig, reward_cfg: reward_lib.SmoothnessConfig | None = None,
                    kv_fn: Callable | None = None):
  """rollout(params, batch, key) -> dict, pure and jittable.

  Args:
    policy_fn: (lora, base, x, t, cond) -> v (and `context_kv=` with kv_fn: see sample_latents).
    decode_fn: (vae_params, z [B,F,h,w,C]) -> video [B,T,H,W,3] in [-1, 1].
    actions_fn: (idm_params, video [B,T,H,W,3] in [0, 1]) -> actions [B, T, D].
  `params` = dict(lora, base, vae, idm); `batch` = dict(clean_first [B,1,h,w,C], cond, and the
  latent shape through clean_first plus `num_latent_frames` fixed by the caller's closure).
  The result holds latents, log_probs, video [B,T,H,W,3] in [-1, 1], actions, reward [B] and the
  penalty terms `pen_<name>` [B].
  """
  reward_cfg = reward_cfg or reward_lib.piper_aloha()

  def rollout(params, batch, key, num_latent_frames: int):
    clean_first = batch["clean_first"]
    b, _, h, w, c = clean_first.shape
    k_noise, k_sde = jax.random.split(key)
    noise = jax.random.normal(k_noise, (b, num_latent_frames, h, w, c), jnp.float32)
    latents, log_probs = sample_latents(policy_fn, params["lora"], params["base"], clean_first,
                                        batch["cond"], noise, k_sde, timesteps, sigmas, cfg, kv_fn)
    z = impose_first_frame(latents[:, -1], clean_first) if cfg.decode_clean_first else latents[:, -1]
    video = jnp.clip(decode_fn(params["vae"], z).astype(jnp.float32), -1.0, 1.0)
    actions = actions_fn(params["idm"], jnp.clip((video + 1.0) / 2.0, 0.0, 1.0))
    reward, terms = reward_lib.smoothness_reward_and_terms(actions, cfg.fps, reward_cfg)
    out = dict(latents=latents, log_probs=log_probs, video=video, actions=actions, reward=reward)
    out.update({f"pen_{k}": v for k, v in terms.items()})
    return out

  return rollout
