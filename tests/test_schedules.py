"""Wan/EVA timestep schedules (spec/eva.md A.4, wan.md D and G)."""

import jax
import numpy as np
import pytest

from eva_jax.diffusion import schedules

# spec/eva.md A.4: EVA's 40-step, shift-3 UniPC timesteps (the scheduler shifts twice).
EVA_TIMESTEPS = [999, 991, 982, 973, 964, 954, 944, 933, 922, 911, 899, 887, 874, 861, 847, 833, 818, 802,
                 785, 768, 749, 730, 710, 689, 666, 642, 617, 590, 562, 532, 499, 465, 428, 388, 346, 299,
                 249, 195, 136, 71]


def test_eva_timesteps_exact():
  ts, sigmas = schedules.wan_timesteps()
  assert ts.dtype == np.int64 and sigmas.dtype == np.float32
  assert ts.tolist() == EVA_TIMESTEPS
  assert sigmas.shape == (41,) and sigmas[-1] == 0.0
  # The approximate sigmas quoted in the spec.
  np.testing.assert_allclose(sigmas[[0, 1, 38, 39]], [0.9999, 0.9914, 0.1363, 0.0714], atol=5e-5)
  # Timesteps are the truncated sigmas: what the model is fed.
  np.testing.assert_array_equal(ts, (sigmas[:-1].astype(np.float64) * 1000).astype(np.int64))


def test_single_shift_is_upstream_wan():
  ts, sigmas = schedules.wan_timesteps(double_shift=False)
  # Upstream builds the scheduler with shift=1: grid top 0.999, then one shift by 3.
  expected = schedules.shift_sigma(np.linspace(np.float32(0.999), 0.0, 41)[:-1], 3.0)
  np.testing.assert_allclose(sigmas[:-1], expected, rtol=1e-6)
  diff = ts != np.asarray(EVA_TIMESTEPS)
  assert diff.sum() == 8 and np.all(np.asarray(EVA_TIMESTEPS)[diff] - ts[diff] == 1)


def test_shift_formula():
  s = np.linspace(0, 1, 11)
  out = schedules.shift_sigma(s, 3.0)
  np.testing.assert_allclose(out, 3 * s / (1 + 2 * s))
  assert out[0] == 0 and out[-1] == 1
  np.testing.assert_allclose(schedules.shift_sigma(s, 1.0), s)
  assert schedules.train_sigma_max(3.0) == pytest.approx(0.99967, abs=1e-5)


def test_flow_sigmas_grid():
  sig = schedules.flow_sigmas(4, shift=1.0)
  np.testing.assert_allclose(sig, [1.0, 0.75, 0.5, 0.25, 0.0])


def test_invalid_arguments():
  with pytest.raises(ValueError, match="num_steps"):
    schedules.wan_timesteps(0)
  with pytest.raises(ValueError, match="shift"):
    schedules.wan_timesteps(10, shift=0.0)


def test_eva_dpm_list_applies_the_shift_twice():
  """EVA's dpm++ path: get_sampling_sigmas(40, 3) handed to a scheduler built with shift=3, which shifts
  again (spec/eva_fidelity_models.md, section 2): 1000 ... 187, history timestep 187."""
  from eva_jax.diffusion.sampler import SamplerConfig, make_schedule
  ts, sigmas = schedules.eva_dpm_timesteps(40, 3.0)
  assert ts[:3].tolist() == [1000, 997, 994] and ts[-3:].tolist() == [421, 321, 187] and len(ts) == 40
  grid = np.linspace(1.0, 0.0, 41)[:40]
  np.testing.assert_array_equal(ts, (9 * grid / (1 + 8 * grid) * 1000).astype(np.int64))  # shift 3 twice = 9
  assert sigmas[-1] == 0.0 and sigmas.dtype == np.float32
  sched = make_schedule(SamplerConfig(solver="dpm++", num_steps=40, shift=3.0))
  assert float(sched.t_hist) == 187.0 and float(sched.t_nohist) == 1000.0
  assert np.all(np.isfinite(np.asarray(jax.tree.leaves(sched.coeffs)[0])))
  assert float(make_schedule(SamplerConfig(solver="unipc")).t_hist) == 71.0   # UniPC keeps its list
