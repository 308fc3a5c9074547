"""One stochastic flow-matching step with its Gaussian log-probability (Flow-GRPO's policy).

Flow convention: x_σ = (1−σ)·x0 + σ·ε and the model predicts v = ε − x0, so σ runs from ~1 (noise)
down to 0 (data) and dt = σ' − σ < 0. The reverse-time SDE that keeps the marginals of the ODE
dx = v·dt has the Gaussian transition

  x' = μ + s·z,  μ = x·(1 + std_t²/(2σ)·dt) + v·(1 + std_t²·(1−σ)/(2σ))·dt,  s = std_t·sqrt(−dt)

whose log-density, averaged over all latent elements (not summed: the reference does this, which is
why Flow-GRPO's clip ranges are 1e-4..1e-5), is the per-sample policy log-prob. Variants of std_t:

  'eva': std_t = σ_min + (σ_max − σ_min)·σ              (EVA's Wan pipeline; σ_max = sigmas[1])
  'sd3': std_t = sqrt(σ / (1 − σ)) · noise_level        (Flow-GRPO SD3; σ = 1 uses σ_max)
  'cps': coefficients-preserving sampling: s = std_t = σ'·sin(noise_level·π/2),
         μ = (x − σv)(1 − σ') + (x + (1−σ)v)·sqrt(σ'² − s²), log p = −mean((x' − μ)²)

Everything here runs in float32 whatever the model's dtype ("bf16 can overflow here", the reference).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

VARIANTS = ("eva", "sd3", "cps")


def _per_sample(s, x: jax.Array) -> jax.Array:
  """Scalar or [B] -> float32 broadcastable against x [B, ...]."""
  s = jnp.asarray(s, jnp.float32)
  if s.ndim == 0:
    return s
  if s.shape != (x.shape[0],):
    raise ValueError(f"sde: sigma must be a scalar or [B]={x.shape[0]}, got shape {s.shape}")
  return s.reshape((-1,) + (1,) * (x.ndim - 1))


def sde_step_with_logprob(
    x: jax.Array,
    v: jax.Array,
    sigma,
    sigma_next,
    key: jax.Array | None,
    *,
    variant: str = "eva",
    noise_level: float = 0.7,
    sigma_max: float = 0.9914,
    sigma_min: float = 0.0,
    prev_sample: jax.Array | None = None,
    deterministic: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """One SDE step x_σ -> x_σ' and log p(x_σ' | x_σ).

  Args:
    x: [B, ...] current latents; v: [B, ...] predicted velocity (any float dtype).
    sigma, sigma_next: scalars or [B]; σ' < σ.
    key: PRNG key for the noise (unused when prev_sample is given or deterministic).
    variant: 'eva' | 'sd3' | 'cps' (module docstring).
    noise_level: `a` of the 'sd3' and 'cps' variants.
    sigma_max, sigma_min: the 'eva' noise schedule's ends (EVA: sigmas[1] = 0.9914 and 0); sigma_max
      also replaces σ = 1 in 'sd3'.
    prev_sample: if given, the log-prob of this sample is computed (training) instead of drawing one.
    deterministic: ODE (Euler) step x' = x + dt·v; the log-prob is still that of x' under the SDE.
  Returns:
    (prev_sample [B, ...] f32, log_prob [B] f32, mean [B, ...] f32, std): `std` is the standard
    deviation of the Gaussian transition (std_t·sqrt(−dt) for 'eva'/'sd3', std_t for 'cps'),
    broadcastable against x. The reference returns std_t alone; the KL term needs the full std.
  """
  if variant not in VARIANTS:
    raise ValueError(f"sde_step_with_logprob: variant {variant!r} is not one of {VARIANTS}")
  # Upcast: the step and its log-density must not be computed in bf16.
  x = jnp.asarray(x, jnp.float32)
  v = jnp.asarray(v, jnp.float32)
  sig = _per_sample(sigma, x)
  sig_next = _per_sample(sigma_next, x)
  dt = sig_next - sig                                                        # < 0

  if variant == "cps":
    std = sig_next * math.sin(noise_level * math.pi / 2)
    x0_hat = x - sig * v
    x1_hat = x + (1.0 - sig) * v
    mean = x0_hat * (1.0 - sig_next) + x1_hat * jnp.sqrt(jnp.maximum(sig_next**2 - std**2, 0.0))
  else:
    if variant == "eva":
      std_t = sigma_min + (sigma_max - sigma_min) * sig
    else:  # sd3
      std_t = jnp.sqrt(sig / (1.0 - jnp.where(sig == 1.0, sigma_max, sig))) * noise_level
    mean = (x * (1.0 + std_t**2 / (2.0 * sig) * dt)
            + v * (1.0 + std_t**2 * (1.0 - sig) / (2.0 * sig)) * dt)
    std = std_t * jnp.sqrt(-dt)

  if prev_sample is None:
    if deterministic:
      prev_sample = x + dt * v
    else:
      if key is None:
        raise ValueError("sde_step_with_logprob: a PRNG key is needed to sample (or pass prev_sample)")
      prev_sample = mean + std * jax.random.normal(key, x.shape, jnp.float32)
  prev_sample = jax.lax.stop_gradient(jnp.asarray(prev_sample, jnp.float32))

  axes = tuple(range(1, x.ndim))
  if variant == "cps":
    log_prob = -jnp.mean(jnp.square(prev_sample - mean), axis=axes)   # constants dropped, as upstream
  else:
    log_prob = jnp.mean(-jnp.square(prev_sample - mean) / (2.0 * std**2) - jnp.log(std)
                        - 0.5 * math.log(2.0 * math.pi), axis=axes)
  return prev_sample, log_prob, mean, std
