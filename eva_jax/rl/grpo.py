"""Flow-GRPO as EVA uses it (spec/eva.md D.4): group advantages, the PPO-clipped loss, the KL on
transition means, and the jitted LoRA update over stored rollouts.

The policy is the DiT with LoRA adapters; the reference policy is the *same* model with the adapters
switched off (`ref_policy_fn`; by default the LoRA tree is zeroed, so every delta `scale·(x·A)·B`
is 0), so no second copy of the 14B base weights exists.

The update (`make_update_fn`) is a pure function of (lora, opt_state, base, batch, key):

  for each inner epoch:                       # EVA: 4
    shuffle the rollouts, split into micro-batches
    for each optimiser step:                  # accumulate `accum_micro` micro-batches
      for each micro-batch, for j in trained timesteps (39 of 40, lax.scan):
        x_j (frame 0 re-imposed) -> v = policy(x_j, t_j) -> log p(x_{j+1} | x_j), μ
        loss_j = PPO-clip(ratio, A) + β·KL(μ, μ_ref);  grads += ∇loss_j / (num_micro·T_train)
      clip by global norm -> AdamW -> applied only if loss and grads are finite

and is jitted by the trainer with mesh shardings (rollouts over ('data','fsdp'), parameters by
their logical names).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from eva_jax.diffusion.sde import sde_step_with_logprob

# MARK: advantages


def group_advantages(rewards: jax.Array, group_ids: jax.Array, num_groups: int, *,
                     per_group: bool = True, global_std: bool = False, eps: float = 1e-4,
                     clip: float = 5.0) -> jax.Array:
  """Flow-GRPO advantages A = (r − mean) / (std + eps), clipped to [−clip, clip].

  Args:
    rewards: [N] float rewards of all rollouts (gathered over the whole batch).
    group_ids: [N] int in [0, num_groups): which prompt / first frame each rollout belongs to.
    per_group: statistics per group (EVA's `per_prompt_stat_tracking`); False: global z-score.
    global_std: with per_group, divide by the std of *all* rewards (Flow-GRPO's `global_std`).
  Returns [N] float32. Standard deviations are population stds (numpy's ddof=0), as the reference.
  """
  r = jnp.asarray(rewards, jnp.float32)
  g_mean, g_std = jnp.mean(r), jnp.std(r)
  if per_group:
    ones = jnp.ones_like(r)
    count = jax.ops.segment_sum(ones, group_ids, num_groups)                 # [G]
    mean = jax.ops.segment_sum(r, group_ids, num_groups) / jnp.maximum(count, 1.0)
    dev2 = jnp.square(r - mean[group_ids])
    std = jnp.sqrt(jax.ops.segment_sum(dev2, group_ids, num_groups) / jnp.maximum(count, 1.0))
    mu = mean[group_ids]
    sd = g_std if global_std else std[group_ids]
  else:
    mu, sd = g_mean, g_std
  return jnp.clip((r - mu) / (sd + eps), -clip, clip)


# MARK: losses


def ppo_clip_loss(log_prob: jax.Array, old_log_prob: jax.Array, advantages: jax.Array,
                  clip_range: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """mean(max(−A·ratio, −A·clip(ratio, 1−ε, 1+ε))) with ratio = exp(logp − logp_old); all [B]."""
  ratio = jnp.exp(log_prob - old_log_prob)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
  loss = jnp.mean(jnp.maximum(unclipped, clipped))
  d = jax.lax.stop_gradient(log_prob - old_log_prob)
  aux = dict(
      clipfrac=jnp.mean((jnp.abs(jax.lax.stop_gradient(ratio) - 1.0) > clip_range).astype(jnp.float32)),
      approx_kl=0.5 * jnp.mean(jnp.square(d)),
      ratio_mean=jnp.mean(jax.lax.stop_gradient(ratio)),
  )
  return loss, aux


def mean_kl(mean: jax.Array, mean_ref: jax.Array, std: jax.Array) -> jax.Array:
  """KL between equal-variance Gaussians on the transition means, EVA's normalisation:
  mean((μ − μ_ref)²) / (mean(2·std²) + 1e-12), with std the transition std (std_t·sqrt(−dt))."""
  num = jnp.mean(jnp.square(mean - mean_ref))
  den = jnp.mean(jnp.broadcast_to(2.0 * jnp.square(std), jnp.broadcast_shapes(jnp.shape(std), (1,))))
  return num / (den + 1e-12)


# MARK: the update step


@dataclasses.dataclass(frozen=True)
class GRPOUpdateConfig:
  """Static knobs of the update (EVA's values as defaults, spec/eva.md D.1)."""
  num_train_timesteps: int = 39          # timesteps [:39] of 40 are trained, in order
  num_inner_epochs: int = 4
  micro_batch: int = 8                   # rollouts per forward/backward micro-batch (global)
  accum_micro: int = 0                   # micro-batches per optimiser step; 0 = all of an epoch
  clip_range: float = 1e-5
  adv_clip: float = 5.0
  beta: float = 0.004                    # KL weight; 0 skips the reference forward
  sde_variant: str = "eva"
  noise_level: float = 0.7
  sigma_max: float = 0.9914
  sigma_min: float = 0.0
  t_hist: float = 71.0                   # "clean" timestep of the re-imposed first latent frame
  shuffle: bool = True


def impose_first_frame(x: jax.Array, clean_first: jax.Array) -> jax.Array:
  """x [B, F, h, w, C] with latent frame 0 replaced by the clean first-frame latent [B, 1, h, w, C]."""
  return jnp.concatenate([clean_first.astype(x.dtype), x[:, 1:]], axis=1)


def frame_timesteps(t: jax.Array, batch: int, frames: int, t_hist: float) -> jax.Array:
  """[B, F] per-frame timesteps: t everywhere, t_hist on the history frame 0."""
  tv = jnp.full((batch, frames), t, jnp.float32)
  return tv.at[:, 0].set(t_hist)


def zeros_like_tree(tree):
  """The LoRA-off reference: every adapter variable zero, so each delta is exactly 0."""
  return jax.tree.map(jnp.zeros_like, tree)


def make_update_fn(policy_fn: Callable[..., jax.Array], tx: optax.GradientTransformation,
                   timesteps, sigmas, cfg: GRPOUpdateConfig,
                   ref_policy_fn: Callable[..., jax.Array] | None = None):
  """The GRPO update as a pure function, ready for `jax.jit`.

  Args:
    policy_fn: (lora, base, x [B,F,h,w,C], t [B,F], cond dict) -> v [B,F,h,w,C]; merges the LoRA and
      base states into the model and runs it.
    tx: the optimiser over the LoRA tree (AdamW + clip by global norm).
    ref_policy_fn: same signature, the reference (LoRA-off) policy; default: policy_fn with the
      LoRA tree zeroed. The trainer passes the DiT run under `lora.disable_lora`, which skips the
      adapter matmuls (zeroed adapters equal it to float rounding only: XLA may merge the adapter
      matmul with the base one).
    timesteps: [S] model timesteps (0..1000); sigmas: [S+1] with the final 0.
  Returns:
    update(lora, opt_state, base, batch, key) -> (lora, opt_state, metrics). `batch` holds
    latents [B, S+1, F, h, w, C], log_probs [B, S], advantages [B], clean_first [B, 1, h, w, C] and
    `cond` (a dict of [B, ...] arrays). Metrics are means over all trained steps, plus
    'skipped' (optimiser steps dropped because loss or gradients were not finite) and 'grad_norm'.
  """
  timesteps = jnp.asarray(timesteps, jnp.float32)
  sigmas = jnp.asarray(sigmas, jnp.float32)
  n_t = cfg.num_train_timesteps
  if ref_policy_fn is None:
    ref_policy_fn = lambda lora, base, x, t, cond: policy_fn(zeros_like_tree(lora), base, x, t, cond)  # noqa: E731

  def step_loss(lora, base, mb, j):
    lat = mb["latents"]
    b, f = lat.shape[0], lat.shape[2]
    x = impose_first_frame(lat[:, j], mb["clean_first"])
    tv = frame_timesteps(timesteps[j], b, f, cfg.t_hist)
    sde_kw = dict(variant=cfg.sde_variant, noise_level=cfg.noise_level,
                  sigma_max=cfg.sigma_max, sigma_min=cfg.sigma_min, prev_sample=lat[:, j + 1])
    v = policy_fn(lora, base, x, tv, mb["cond"])
    _, logp, mean, std = sde_step_with_logprob(x, v, sigmas[j], sigmas[j + 1], None, **sde_kw)
    adv = jnp.clip(mb["advantages"], -cfg.adv_clip, cfg.adv_clip)
    old = mb["log_probs"][:, j]
    pg, aux = ppo_clip_loss(logp, old, adv, cfg.clip_range)
    if cfg.beta > 0:
      v_ref = jax.lax.stop_gradient(ref_policy_fn(lora, base, x, tv, mb["cond"]))
      _, _, mean_ref, _ = sde_step_with_logprob(x, v_ref, sigmas[j], sigmas[j + 1], None, **sde_kw)
      kl = mean_kl(mean, mean_ref, std)
    else:
      kl = jnp.zeros((), jnp.float32)
    loss = pg + cfg.beta * kl
    aux.update(policy_loss=pg, kl=kl, loss=loss)
    return loss, aux

  grad_fn = jax.value_and_grad(step_loss, has_aux=True)

  def micro_grads(lora, base, mb):
    """Sum over trained timesteps of grads and metrics for one micro-batch."""
    def body(carry, j):
      g_acc, m_acc = carry
      (_, aux), g = grad_fn(lora, base, mb, j)
      return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, m_acc, aux)), None
    zeros_m = {k: jnp.zeros((), jnp.float32) for k in
               ("clipfrac", "approx_kl", "ratio_mean", "policy_loss", "kl", "loss")}
    (g, m), _ = jax.lax.scan(body, (zeros_like_tree(lora), zeros_m), jnp.arange(n_t))
    return g, m

  def update(lora, opt_state, base, batch, key):
    bsz = batch["advantages"].shape[0]
    if bsz % cfg.micro_batch:
      raise ValueError(f"GRPO update: batch {bsz} is not divisible by micro_batch {cfg.micro_batch}")
    num_micro = bsz // cfg.micro_batch
    accum = cfg.accum_micro or num_micro
    if num_micro % accum:
      raise ValueError(f"GRPO update: {num_micro} micro-batches per epoch not divisible by accum_micro {accum}")
    n_opt = num_micro // accum
    denom = float(accum * n_t)

    def split(tree, perm):  # [B, ...] -> [n_opt, accum, mb, ...]
      def one(a):
        a = a[perm] if perm is not None else a
        return a.reshape((n_opt, accum, cfg.micro_batch) + a.shape[1:])
      return jax.tree.map(one, tree)

    def opt_step(carry, mbs):
      lora, opt_state = carry
      def acc_body(c, mb):
        g_acc, m_acc = c
        g, m = micro_grads(lora, base, mb)
        return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, m_acc, m)), None
      zeros_m = {k: jnp.zeros((), jnp.float32) for k in
                 ("clipfrac", "approx_kl", "ratio_mean", "policy_loss", "kl", "loss")}
      (g, m), _ = jax.lax.scan(acc_body, (zeros_like_tree(lora), zeros_m), mbs)
      g = jax.tree.map(lambda x: x / denom, g)        # accelerate divides the loss by its accum count
      m = jax.tree.map(lambda x: x / denom, m)
      gnorm = optax.tree.norm(g)
      finite = jnp.isfinite(gnorm) & jnp.isfinite(m["loss"])
      # Never write a non-finite update: compute it on zeroed grads and select the old state.
      safe_g = jax.tree.map(lambda x: jnp.where(finite, x, 0.0), g)
      upd, new_opt = tx.update(safe_g, opt_state, lora)
      new_lora = optax.apply_updates(lora, upd)
      keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
      lora = jax.tree.map(keep, new_lora, lora)
      opt_state = jax.tree.map(keep, new_opt, opt_state)
      m = dict(m, grad_norm=gnorm, skipped=1.0 - finite.astype(jnp.float32))
      return (lora, opt_state), m

    data = {k: batch[k] for k in ("latents", "log_probs", "advantages", "clean_first", "cond")}
    ms = []
    for epoch in range(cfg.num_inner_epochs):
      perm = (jax.random.permutation(jax.random.fold_in(key, epoch), bsz)
              if cfg.shuffle and num_micro > 1 else None)
      (lora, opt_state), m = jax.lax.scan(opt_step, (lora, opt_state), split(data, perm))
      ms.append(m)
    ms = jax.tree.map(lambda *xs: jnp.concatenate(xs), *ms)    # [inner_epochs·n_opt]
    metrics = {k: (jnp.sum(v) if k == "skipped" else jnp.mean(v)) for k, v in ms.items()}
    return lora, opt_state, metrics

  return update


def recompute_log_probs(policy_fn, lora, base, batch, timesteps, sigmas, cfg: GRPOUpdateConfig):
  """Log-probs [B, S] of the stored transitions under (lora, base): equal to the rollout's log-probs
  when the parameters are unchanged (the GRPO ratio is then 1)."""
  timesteps = jnp.asarray(timesteps, jnp.float32)
  sigmas = jnp.asarray(sigmas, jnp.float32)
  lat = batch["latents"]
  b, f = lat.shape[0], lat.shape[2]

  def body(_, j):
    x = impose_first_frame(lat[:, j], batch["clean_first"])
    v = policy_fn(lora, base, x, frame_timesteps(timesteps[j], b, f, cfg.t_hist), batch["cond"])
    _, logp, _, _ = sde_step_with_logprob(
        x, v, sigmas[j], sigmas[j + 1], None, variant=cfg.sde_variant, noise_level=cfg.noise_level,
        sigma_max=cfg.sigma_max, sigma_min=cfg.sigma_min, prev_sample=lat[:, j + 1])
    return None, logp
  _, lps = jax.lax.scan(body, None, jnp.arange(lat.shape[1] - 1))
  return lps.T                                                  # [B, S]


Batch = dict[str, Any]
