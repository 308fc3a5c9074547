"""ODE solvers for flow-prediction models: Euler, UniPC-2 (bh2) and DPM-Solver++ 2M.

Each solver is three pure functions:

  coeffs = prepare(sigmas)                          # host: per-step scalar coefficients, [N] arrays
  state = init(x)                                   # the solver's history pytree
  x_next, state = step(state, v, x, i, coeffs)      # v: velocity at (x, sigmas[i]); i may be traced

`sigmas` are the N + 1 noise levels ending in 0 (schedules.py). The scalar coefficients (log-SNR
differences, expm1, the UniC linear solve) are computed once on the host in float64 and stored as
float32 tables indexed by the step, so a whole sampling loop runs under `lax.scan`/`fori_loop` inside
`jit` with only multiply-adds per step. Float64 matters: the log-SNR step `h` is a small difference
of O(5) logs, and float32 logs that differ by one ulp (XLA's vs PyTorch's) change the second-order
weights by ~1e-6 relative.

Flow convention (spec/wan.md D.1): `x_σ = (1 − σ)·x0 + σ·ε`, `v = ε − x0`, so `x̂0 = x − σ·v`,
`α = 1 − σ` and the log-SNR is `λ = log α − log σ`.

The multistep solvers reproduce diffusers' `UniPCMultistepScheduler` and
`DPMSolverMultistepScheduler` with `use_flow_sigmas=True, prediction_type='flow_prediction'`
(order 2, lower-order final step, final sigma zero; UniPC: bh2, predict_x0, corrector on), step by
step, given the same sigmas (tests/test_solvers.py).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SOLVER_NAMES = ("unipc", "euler", "dpm++")


def velocity_to_x0(x: jax.Array, v: jax.Array, sigma) -> jax.Array:
  """`x̂0 = x − σ·v` (flow prediction)."""
  return x - sigma * v


def _check_sigmas(sigmas) -> np.ndarray:
  sigmas = np.asarray(sigmas)
  if sigmas.ndim != 1 or sigmas.shape[0] < 2:
    raise ValueError(f"sigmas must be 1-D with N + 1 >= 2 entries (final 0 included), got shape {sigmas.shape}")
  if not np.all(np.diff(sigmas) < 0):
    raise ValueError(f"sigmas must decrease strictly, got {sigmas.tolist()}")
  return sigmas


def _lambda64(sigmas: np.ndarray) -> np.ndarray:
  """Float64 log-SNR of float32 sigmas; +inf at σ = 0, −inf at σ = 1."""
  s = sigmas.astype(np.float32).astype(np.float64)
  with np.errstate(divide="ignore"):
    return np.log(1.0 - s) - np.log(s)


def _f32(table: dict) -> dict:
  return {k: jnp.asarray(np.asarray(v), jnp.float32) for k, v in table.items()}


# MARK: Euler

class EulerState(NamedTuple):
  """Euler keeps no history; the empty state keeps the solver interface uniform."""


def euler_prepare(sigmas) -> dict:
  s = _check_sigmas(sigmas).astype(np.float32)
  return _f32({"sigma": s[:-1], "dt": s[1:] - s[:-1]})  # float32 difference, as the reference


def euler_init(x: jax.Array) -> EulerState:
  del x
  return EulerState()


def euler_step(state: EulerState, v: jax.Array, x: jax.Array, i, coeffs: dict):
  """`x_{i+1} = x_i + (σ_{i+1} − σ_i)·v` (diffusers' FlowMatchEulerDiscreteScheduler.step)."""
  x_next = x.astype(jnp.float32) + coeffs["dt"][i] * v.astype(jnp.float32)
  return x_next.astype(x.dtype), state


# MARK: UniPC (bh2, predict-x0, order <= 2)

class UniPCState(NamedTuple):
  """x̂0 of the two previous steps and the sample the previous predictor started from."""
  x0_prev: jax.Array       # x̂0 at step i − 1
  x0_prev2: jax.Array      # x̂0 at step i − 2
  last_sample: jax.Array   # x_{i−1}, input of the previous predictor (the corrector restarts from it)


def _bh2(h: float):
  """h·φ1, B(h) = expm1(−h) and the order conditions b1, b2 of UniPC-bh2 in x0 form."""
  hh = -h
  h_phi_1 = np.expm1(hh)
  b_h = np.expm1(hh)
  k1 = h_phi_1 / hh - 1.0
  k2 = k1 / hh - 0.5
  return h_phi_1, b_h, k1 / b_h, 2.0 * k2 / b_h


def _unipc_update_coeffs(lam: np.ndarray, alpha_t: float, ratio: float, t: int, s0: int, s1: int | None,
                         corrector: bool):
  """Coefficients of one UniP (predictor) or UniC (corrector) update from σ_{s0} to σ_t.

  Predictor: x_t = cx·x + cm·m0 + cd·(m1 − m0)
  Corrector: x_t = cx·x + cm·m0 + cd·(m1 − m0) + ct·(m_t − m0)
  with m0 = x̂0 at s0, m1 = x̂0 at s1 (order 2 only), m_t = x̂0 at t.
  """
  h = lam[t] - lam[s0]
  h_phi_1, b_h, b1, b2 = _bh2(h)
  cx = ratio
  cm = -alpha_t * h_phi_1
  cd, ct = 0.0, 0.0
  if not corrector:
    if s1 is not None:
      r = (lam[s1] - lam[s0]) / h
      cd = -alpha_t * b_h * 0.5 / r          # order-2 predictor weight ρ = 1/2
  else:
    if s1 is None:
      ct = -alpha_t * b_h * 0.5               # order-1 corrector weight ρ = 1/2
    else:
      r = (lam[s1] - lam[s0]) / h
      rho0 = (b1 - b2) / (1.0 - r)            # solves [[1, 1], [r, 1]]·ρ = [b1, b2]
      rho1 = b1 - rho0
      cd = -alpha_t * b_h * rho0 / r
      ct = -alpha_t * b_h * rho1
  return cx, cm, cd, ct


def unipc_prepare(sigmas, use_corrector: bool = True, lower_order_final: bool = True) -> dict:
  """Per-step tables for UniPC-2: predictor p_* and corrector c_* coefficients, [N] each."""
  s = _check_sigmas(sigmas).astype(np.float32)
  n = len(s) - 1
  lam = _lambda64(s)
  s64 = s.astype(np.float64)
  alpha = 1.0 - s64
  tab = {k: np.zeros(n) for k in ("p_x", "p_m", "p_d", "c_x", "c_m", "c_d", "c_t", "c_on")}
  orders = []
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    for i in range(n):
      order = min(2, i + 1, n - i) if lower_order_final else min(2, i + 1)
      orders.append(order)
      if use_corrector and i > 0:  # UniC re-does σ_{i−1} → σ_i with the previous predictor's order
        prev = orders[i - 1]
        c = _unipc_update_coeffs(lam, alpha[i], s64[i] / s64[i - 1], i, i - 1, i - 2 if prev == 2 else None, True)
        tab["c_x"][i], tab["c_m"][i], tab["c_d"][i], tab["c_t"][i] = c
        tab["c_on"][i] = 1.0
      if s64[i + 1] == 0.0:  # σ = 0: the update reduces exactly to x̂0 (h = ∞, expm1(−∞) = −1)
        tab["p_x"][i], tab["p_m"][i], tab["p_d"][i] = 0.0, 1.0, 0.0
        if order == 2:
          raise ValueError("UniPC order 2 cannot step to sigma 0; use lower_order_final=True")
        continue
      p = _unipc_update_coeffs(lam, alpha[i + 1], s64[i + 1] / s64[i], i + 1, i, i - 1 if order == 2 else None, False)
      tab["p_x"][i], tab["p_m"][i], tab["p_d"][i], _ = p
  tab["sigma"] = s[:-1]
  out = _f32(tab)
  for k, v in out.items():
    if not np.all(np.isfinite(np.asarray(v))):
      raise ValueError(f"UniPC coefficient table {k!r} is not finite for sigmas {s.tolist()}")
  return out


def unipc_init(x: jax.Array) -> UniPCState:
  zeros = jnp.zeros(x.shape, jnp.float32)
  return UniPCState(zeros, zeros, zeros)


def unipc_step(state: UniPCState, v: jax.Array, x: jax.Array, i, coeffs: dict):
  """One UniPC step: UniC corrects x_i with the new x̂0 (for i > 0), then UniP predicts x_{i+1}."""
  dtype = x.dtype
  x = x.astype(jnp.float32)
  c = jax.tree.map(lambda a: a[i], coeffs)
  m_i = velocity_to_x0(x, v.astype(jnp.float32), c["sigma"])  # x̂0 at step i
  m0, m1 = state.x0_prev, state.x0_prev2
  corrected = (c["c_x"] * state.last_sample + c["c_m"] * m0 + c["c_d"] * (m1 - m0) + c["c_t"] * (m_i - m0))
  x = jnp.where(c["c_on"] > 0, corrected, x)
  x_next = c["p_x"] * x + c["p_m"] * m_i + c["p_d"] * (m0 - m_i)
  return x_next.astype(dtype), UniPCState(x0_prev=m_i, x0_prev2=m0, last_sample=x)


# MARK: DPM-Solver++ 2M (midpoint)

class DPMState(NamedTuple):
  x0_prev: jax.Array  # x̂0 at step i − 1


def dpm_prepare(sigmas) -> dict:
  """x_{i+1} = cx·x + cm·m0 + cd·(m0 − m1); first order at the first and the last (σ = 0) step."""
  s = _check_sigmas(sigmas).astype(np.float32)
  n = len(s) - 1
  lam = _lambda64(s)
  s64 = s.astype(np.float64)
  tab = {k: np.zeros(n) for k in ("cx", "cm", "cd")}
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    for i in range(n):
      h = lam[i + 1] - lam[i]
      phi = (1.0 - s64[i + 1]) * (np.exp(-h) - 1.0)
      tab["cx"][i] = s64[i + 1] / s64[i]
      tab["cm"][i] = -phi
      if 0 < i < n - 1:
        r0 = (lam[i] - lam[i - 1]) / h
        tab["cd"][i] = -0.5 * phi / r0
  tab["sigma"] = s[:-1]
  return _f32(tab)


def dpm_init(x: jax.Array) -> DPMState:
  return DPMState(jnp.zeros(x.shape, jnp.float32))


def dpm_step(state: DPMState, v: jax.Array, x: jax.Array, i, coeffs: dict):
  dtype = x.dtype
  x = x.astype(jnp.float32)
  c = jax.tree.map(lambda a: a[i], coeffs)
  m0 = velocity_to_x0(x, v.astype(jnp.float32), c["sigma"])
  x_next = c["cx"] * x + c["cm"] * m0 + c["cd"] * (m0 - state.x0_prev)
  return x_next.astype(dtype), DPMState(m0)


# MARK: registry

class Solver(NamedTuple):
  name: str
  prepare: Callable   # (sigmas) -> coefficient tables (host, once per schedule)
  init: Callable      # (x) -> state
  step: Callable      # (state, v, x, i, coeffs) -> (x_next, state)


_SOLVERS = {
    "euler": Solver("euler", euler_prepare, euler_init, euler_step),
    "unipc": Solver("unipc", unipc_prepare, unipc_init, unipc_step),
    "dpm++": Solver("dpm++", dpm_prepare, dpm_init, dpm_step),
}


def get_solver(name: str) -> Solver:
  """'unipc' (EVA's default), 'euler' or 'dpm++'."""
  if name not in _SOLVERS:
    raise ValueError(f"unknown solver {name!r}; choose one of {SOLVER_NAMES}")
  return _SOLVERS[name]
