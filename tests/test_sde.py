"""SDE step with log-prob: Gaussian density oracle (torch.distributions), Euler limits, variants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from eva_jax.diffusion import sde
from tests.utils import rel_err

SHAPE = (3, 2, 4, 4, 16)  # [B, F, h, w, C]


def _inputs(seed=0):
  r = np.random.default_rng(seed)
  return r.normal(size=SHAPE).astype(np.float32), r.normal(size=SHAPE).astype(np.float32)


def _std_t(variant, s, a=0.7, smax=0.9914, smin=0.0):
  if variant == "eva":
    return smin + (smax - smin) * s
  return np.sqrt(s / (1 - (smax if s == 1 else s))) * a


@pytest.mark.parametrize("variant", ["eva", "sd3"])
@pytest.mark.parametrize("sigmas", [(0.9914, 0.9827), (0.5, 0.45), (0.0714, 0.0)])
def test_logprob_is_gaussian_density(variant, sigmas):
  x, v = _inputs()
  s, s2 = sigmas
  prev, logp, mean, std = sde.sde_step_with_logprob(
      x, v, s, s2, jax.random.key(1), variant=variant)
  # Oracle in float64: mean from the spec formula, density from torch.distributions.Normal.
  xd, vd, dt = x.astype(np.float64), v.astype(np.float64), s2 - s
  st = _std_t(variant, s)
  mu = xd * (1 + st**2 / (2 * s) * dt) + vd * (1 + st**2 * (1 - s) / (2 * s)) * dt
  scale = st * np.sqrt(-dt)
  ref = torch.distributions.Normal(torch.tensor(mu), scale).log_prob(
      torch.tensor(np.asarray(prev, np.float64))).mean(dim=(1, 2, 3, 4)).numpy()
  assert rel_err(mean, mu) < 1e-6
  assert abs(float(np.asarray(std).squeeze()) - scale) / scale < 1e-6
  assert rel_err(logp, ref) < 1e-5
  assert logp.shape == (3,) and logp.dtype == jnp.float32
  # The sample is mean + std·z with z standard normal.
  z = (np.asarray(prev) - np.asarray(mean)) / scale
  assert abs(z.mean()) < 0.1 and abs(z.std() - 1) < 0.1


def test_prev_sample_given_reproduces_logprob_and_bf16_inputs_upcast():
  x, v = _inputs(2)
  prev, logp, _, _ = sde.sde_step_with_logprob(x, v, 0.8, 0.75, jax.random.key(3))
  _, logp2, _, _ = sde.sde_step_with_logprob(x, v, 0.8, 0.75, None, prev_sample=prev)
  np.testing.assert_array_equal(np.asarray(logp), np.asarray(logp2))
  # bf16 velocity: upcast before the step, so only the velocity's own rounding enters.
  _, logp3, mean3, _ = sde.sde_step_with_logprob(x, jnp.asarray(v, jnp.bfloat16), 0.8, 0.75, None,
                                                 prev_sample=prev)
  assert logp3.dtype == jnp.float32 and mean3.dtype == jnp.float32


def test_per_sample_sigmas_match_scalar():
  x, v = _inputs(4)
  s = np.array([0.9, 0.5, 0.2], np.float32)
  s2 = s - 0.05
  prev, logp, mean, _ = sde.sde_step_with_logprob(x, v, s, s2, jax.random.key(0))
  for b in range(3):
    _, lb, mb, _ = sde.sde_step_with_logprob(x[b:b + 1], v[b:b + 1], s[b], s2[b], None,
                                             prev_sample=prev[b:b + 1])
    assert rel_err(lb, logp[b:b + 1]) < 1e-6 and rel_err(mb, mean[b:b + 1]) < 1e-6


def test_zero_noise_mean_is_euler_step():
  x, v = _inputs(5)
  euler = x + (0.45 - 0.5) * v
  # 'eva' with a zero noise schedule, 'sd3' and 'cps' with noise_level 0: the mean is the Euler step.
  for kw in (dict(variant="eva", sigma_max=0.0, sigma_min=0.0), dict(variant="sd3", noise_level=0.0),
             dict(variant="cps", noise_level=0.0)):
    _, _, mean, _ = sde.sde_step_with_logprob(x, v, 0.5, 0.45, None, prev_sample=x, **kw)
    assert rel_err(mean, euler) < 1e-6, kw
  prev, logp, _, _ = sde.sde_step_with_logprob(x, v, 0.5, 0.45, None, deterministic=True)
  assert rel_err(prev, euler) < 1e-7 and np.all(np.isfinite(np.asarray(logp)))


def test_cps_variant():
  x, v = _inputs(6)
  s, s2, a = 0.6, 0.5, 0.8
  prev, logp, mean, std = sde.sde_step_with_logprob(x, v, s, s2, jax.random.key(7), variant="cps",
                                                    noise_level=a)
  st = s2 * np.sin(a * np.pi / 2)
  xd, vd = x.astype(np.float64), v.astype(np.float64)
  mu = (xd - s * vd) * (1 - s2) + (xd + (1 - s) * vd) * np.sqrt(s2**2 - st**2)
  assert rel_err(mean, mu) < 1e-6
  assert abs(float(np.asarray(std)) - st) < 1e-6
  ref = -np.mean((np.asarray(prev, np.float64) - mu) ** 2, axis=(1, 2, 3, 4))
  assert rel_err(logp, ref) < 1e-5


def test_bad_variant_and_shapes():
  x, v = _inputs()
  with pytest.raises(ValueError, match="variant"):
    sde.sde_step_with_logprob(x, v, 0.5, 0.4, jax.random.key(0), variant="ddim")
  with pytest.raises(ValueError, match=r"\[B\]=3"):
    sde.sde_step_with_logprob(x, v, np.ones(2), np.ones(2), jax.random.key(0))
