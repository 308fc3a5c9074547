"""Solvers vs diffusers' flow-prediction schedulers, step by step on random model outputs."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from eva_jax.diffusion import schedules, solvers
from tests.utils import rel_err

SHAPE = (2, 3, 4, 4, 5)  # [B, F, h, w, C]


def _schedules():
  return {
      "eva40": schedules.wan_timesteps(40, 3.0)[1],
      "wan7_single": schedules.wan_timesteps(7, 5.0, double_shift=False)[1],
  }


def _reference(kind: str, sigmas: np.ndarray):
  common = dict(num_train_timesteps=1000, use_flow_sigmas=True, prediction_type="flow_prediction",
                flow_shift=1.0, solver_order=2, lower_order_final=True, final_sigmas_type="zero")
  if kind == "unipc":
    sched = diffusers.UniPCMultistepScheduler(solver_type="bh2", predict_x0=True, **common)
    sched.set_timesteps(sigmas=sigmas[:-1].astype(np.float64))
  elif kind == "dpm++":
    sched = diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_type="midpoint", **common)
    # This scheduler takes no custom sigmas: set its grid directly and start at index 0.
    sched.set_timesteps(len(sigmas) - 1)
    sched.sigmas = torch.from_numpy(sigmas.astype(np.float32))
    sched.timesteps = torch.from_numpy((sigmas[:-1].astype(np.float64) * 1000).astype(np.int64))
    sched.set_begin_index(0)
  else:
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.set_timesteps(sigmas=sigmas[:-1].astype(np.float64))
  np.testing.assert_allclose(sched.sigmas.numpy(), sigmas, rtol=0, atol=0)
  return sched


@pytest.mark.parametrize("kind", ["unipc", "dpm++", "euler"])
@pytest.mark.parametrize("sched_name", ["eva40", "wan7_single"])
def test_solver_matches_diffusers(kind, sched_name):
  sigmas = _schedules()[sched_name]
  n = len(sigmas) - 1
  ref = _reference(kind, sigmas)
  solver = solvers.get_solver(kind)
  step = jax.jit(solver.step)
  rng = np.random.default_rng(0)
  x_ref = torch.from_numpy(rng.standard_normal(SHAPE).astype(np.float32))
  x = jnp.asarray(x_ref.numpy())
  state = solver.init(x)
  coeffs = solver.prepare(sigmas)
  worst = 0.0
  for i in range(n):
    v = rng.standard_normal(SHAPE).astype(np.float32)
    x_ref = ref.step(torch.from_numpy(v), ref.timesteps[i], x_ref).prev_sample
    x, state = step(state, jnp.asarray(v), x, i, coeffs)
    worst = max(worst, rel_err(x, x_ref.numpy()))
  assert worst <= 1e-6, f"{kind}/{sched_name}: worst per-step relative error {worst:.2e}"


@pytest.mark.parametrize("kind", ["unipc", "dpm++", "euler"])
def test_solver_runs_under_scan(kind):
  """The whole loop as one lax.scan inside jit equals the python loop of jitted steps."""
  solver = solvers.get_solver(kind)
  coeffs = solver.prepare(schedules.wan_timesteps(6, 3.0)[1])
  key = jax.random.key(0)
  vs = jax.random.normal(key, (6,) + SHAPE)
  x0 = jax.random.normal(jax.random.fold_in(key, 1), SHAPE)

  @jax.jit
  def scanned(x):
    def body(carry, inp):
      x, st = carry
      i, v = inp
      x, st = solver.step(st, v, x, i, coeffs)
      return (x, st), None
    (x, _), _ = jax.lax.scan(body, (x, solver.init(x)), (jnp.arange(6), vs))
    return x

  x, st = x0, solver.init(x0)
  for i in range(6):
    x, st = solver.step(st, vs[i], x, i, coeffs)
  assert rel_err(scanned(x0), x) <= 1e-6
  assert np.all(np.isfinite(np.asarray(x)))


def test_unknown_solver():
  with pytest.raises(ValueError, match="unknown solver 'heun'"):
    solvers.get_solver("heun")
