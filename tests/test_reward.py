"""EVA smoothness reward against a direct NumPy transcription of spec/eva.md section C."""

import jax
import numpy as np
import pytest

from eva_jax.rl import reward as rw
from tests.utils import rel_err


def _numpy_reward(a: np.ndarray, fps: float = 16.0):
  """One trajectory [T, 14] -> (terms, reward), written straight from the spec, in float64."""
  t = a.shape[0]
  if t < 4:
    return None, 0.0
  dt = 1.0 / fps
  v_max = np.array([3.1416, 3.4034, 3.1416, 3.9270, 3.9270, 3.9270]) * 0.85
  v_max = np.concatenate([v_max, [2.0], v_max, [2.0]])
  a_max = np.full(14, 5.0)
  a_max[[6, 13]] = 10.0
  w = np.ones(14)
  w[[6, 13]] = 0.2
  w = w / (w.mean() + 1e-8)
  v = np.diff(a, axis=0) / dt
  acc = np.diff(v, axis=0) / dt
  j = np.diff(acc, axis=0) / dt

  def hub(x, d):
    return np.where(np.abs(x) <= d, 0.5 * x**2, d * (np.abs(x) - 0.5 * d))

  terms = dict(
      acc=np.mean(w * hub(acc, 0.5 * a_max)),
      jerk=np.mean(w * hub(j, 0.5 * a_max / dt)),
      vlim=np.mean(w * np.maximum(np.abs(v) - v_max, 0) ** 2),
      alim=np.mean(w * np.maximum(np.abs(acc) - a_max, 0) ** 2),
  )
  p = 0.5 * terms["jerk"] + 0.25 * terms["acc"] + 2.0 * terms["vlim"] + 1.0 * terms["alim"]
  terms["total"] = p
  return terms, 10.0 * (1.0 + p / 2000.0) ** -0.5


def test_config_constants():
  cfg = rw.piper_aloha()
  np.testing.assert_allclose(cfg.v_max[:6], [2.67036, 2.89289, 2.67036, 3.33795, 3.33795, 3.33795], rtol=1e-6)
  assert cfg.v_max[6] == cfg.v_max[13] == 2.0
  assert cfg.a_max[6] == cfg.a_max[13] == 10.0 and cfg.a_max[0] == 5.0
  assert abs(cfg.normalized_weights().mean() - 1.0) < 1e-6


@pytest.mark.parametrize("scale", [0.002, 0.05, 0.5])  # small (Huber quadratic) to large (linear + limits)
def test_reward_matches_numpy(scale):
  rng = np.random.default_rng(0)
  a = np.cumsum(rng.normal(size=(3, 49, 14)) * scale, axis=1).astype(np.float32)
  terms = jax.jit(rw.smoothness_penalty)(a)
  r = jax.jit(rw.smoothness_reward)(a)
  for b in range(3):
    ref_terms, ref_r = _numpy_reward(a[b].astype(np.float64))
    for k in ("jerk", "acc", "vlim", "alim", "total"):
      if ref_terms[k] == 0:
        assert float(terms[k][b]) == 0.0, k
      else:
        # float32 finite differences divided by dt³ = 1/4096 amplify rounding of the positions.
        assert rel_err(terms[k][b], ref_terms[k]) < 1e-5, (k, float(terms[k][b]), ref_terms[k])
    assert rel_err(r[b], ref_r) < 1e-5


def test_constant_velocity_under_limits_has_no_acc_or_jerk_penalty():
  cfg = rw.piper_aloha()
  vel = 0.9 * np.asarray(cfg.v_max, np.float32)                 # just under every limit
  t = np.arange(20, dtype=np.float32)[:, None] / 16.0
  a = (0.3 + t * vel)[None]                                      # [1, 20, 14]
  terms = rw.smoothness_penalty(a)
  for k in ("jerk", "acc", "vlim", "alim"):
    assert float(terms[k][0]) < 1e-6, (k, float(terms[k][0]))    # float32 rounding of the positions
  assert float(rw.smoothness_reward(a)[0]) > 9.9999


def test_limit_terms_only_when_exceeded():
  cfg = rw.piper_aloha()
  t = np.arange(20, dtype=np.float32)[:, None] / 16.0
  # Velocity 1.5× the limit on joint 0 only, constant: vlim > 0, alim == 0.
  vel = np.zeros(14, np.float32)
  vel[0] = 1.5 * cfg.v_max[0]
  terms = rw.smoothness_penalty((t * vel)[None])
  assert float(terms["vlim"][0]) > 0 and float(terms["alim"][0]) == 0.0
  expected = np.mean(cfg.normalized_weights()[0] * (0.5 * cfg.v_max[0]) ** 2 * np.eye(14)[0])
  assert rel_err(terms["vlim"][0], expected) < 1e-4  # float32 positions at t·v
  # Constant acceleration under the limit: alim == 0; over the limit on a gripper: alim > 0.
  accel = np.zeros(14, np.float32)
  accel[1] = 4.0
  assert float(rw.smoothness_penalty((0.5 * t**2 * accel)[None])["alim"][0]) == 0.0
  accel[13] = 12.0
  assert float(rw.smoothness_penalty((0.5 * t**2 * accel)[None])["alim"][0]) > 0.0


def test_short_trajectories_give_zero_reward():
  a = np.random.default_rng(1).normal(size=(2, 3, 14)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(rw.smoothness_reward(a)), 0.0)
  assert rw.smoothness_reward(np.zeros((2, 4, 14), np.float32)).shape == (2,)


def test_other_embodiment_and_errors():
  cfg = rw.config_from_dict(dict(v_max=[1.0, 1.0], a_max=[2.0, 2.0], dim_weights=[1.0, 1.0]))
  a = np.cumsum(np.random.default_rng(2).normal(size=(2, 10, 2)), axis=1).astype(np.float32)
  assert rw.smoothness_reward(a, 10.0, cfg).shape == (2,)
  with pytest.raises(ValueError, match="14"):
    rw.smoothness_penalty(a)  # 2 dims vs the 14-dim default config
  with pytest.raises(ValueError, match="a_max"):
    rw.SmoothnessConfig(v_max=(1.0,), a_max=(1.0, 2.0), dim_weights=(1.0,))
