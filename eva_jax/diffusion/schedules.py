"""Flow-matching noise schedules: the shift formula and Wan/EVA's inference timestep lists.

Convention (spec/wan.md D.1): `x_σ = (1 − σ)·x0 + σ·ε`, the model predicts `v = ε − x0` and receives
the timestep `t = σ·1000` (truncated to an integer by Wan's samplers).

EVA's schedule (spec/eva.md A.4, wan.md G "Double shift at inference"): the UniPC scheduler is built
with `shift=3` *and* `set_timesteps(40, shift=3)` shifts again, so the sigmas are

  σ_max = shift(0.999)                    # the once-shifted top of the 1000-step training grid (float32)
  σ_i   = shift(linspace(σ_max, 0, 41)[i]), i < 40
  t_i   = int(1000·σ_i)                   # [999, 991, 982, ..., 136, 71]
  sigmas = [σ_0, ..., σ_39, 0]

The first shift only moves the top of the grid (σ_max = 0.99967 instead of 0.999); it is *not* a
shift by s² (that would end at t = 187, not 71). `double_shift=False` gives upstream Wan's schedule
(scheduler built with shift=1, σ_max = 0.999); its timesteps differ from EVA's at 8 of 40 places by
one unit (963 vs 964, 832 vs 833, ...). EVA's list is the default because EVA's checkpoints were
sampled and RL-trained with it (its last timestep, 71, is also the "clean history" timestep).

Run `python -m eva_jax.diffusion.schedules` to print both lists.
"""

from __future__ import annotations

import numpy as np

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigma(sigma, shift: float):
  """The resolution shift `σ' = s·σ / (1 + (s − 1)·σ)`; works on floats and numpy/jax arrays."""
  return shift * sigma / (1 + (shift - 1) * sigma)


def train_sigma_max(shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> float:
  """Top of the shifted training grid `shift(1 − 1/N)`, computed in float32 as the reference scheduler does.

  The reference builds `1 − linspace(1, 1/N, N)[::-1]` in float64, casts it to a float32 tensor and
  shifts it in float32; its `sigma_max` is the first entry, read back as a Python float.
  """
  alphas = np.linspace(1.0, 1.0 / num_train_timesteps, num_train_timesteps)[::-1]
  sigma_top = np.float32(1.0 - alphas[0])
  return float(shift_sigma(sigma_top, np.float32(shift)).astype(np.float32))


def wan_sigmas(num_steps: int = 40, shift: float = 3.0, double_shift: bool = True,
               num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
  """Float64 sigmas of the `num_steps` model evaluations (no final zero), as Wan's UniPC builds them."""
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  if shift <= 0:
    raise ValueError(f"shift must be > 0, got {shift}")
  sigma_max = train_sigma_max(shift if double_shift else 1.0, num_train_timesteps)
  grid = np.linspace(sigma_max, 0.0, num_steps + 1)[:-1]  # float64, as the reference
  return shift_sigma(grid, shift)


def wan_timesteps(num_steps: int = 40, shift: float = 3.0, double_shift: bool = True,
                  num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[np.ndarray, np.ndarray]:
  """EVA's inference schedule: (timesteps int64 [num_steps], sigmas float32 [num_steps + 1] ending in 0).

  With the defaults the timesteps are exactly EVA's `[999, 991, 982, ..., 136, 71]`. The model is fed
  these integer timesteps; the solver uses the float32 sigmas.
  """
  sigmas = wan_sigmas(num_steps, shift, double_shift, num_train_timesteps)
  timesteps = (sigmas * num_train_timesteps).astype(np.int64)  # truncation, as the reference
  sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
  return timesteps, sigmas


def eva_dpm_timesteps(num_steps: int = 40, shift: float = 3.0,
                      num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[np.ndarray, np.ndarray]:
  """EVA's schedule for `solver='dpm++'`: (timesteps int64 [num_steps], sigmas float32 [num_steps + 1]).

  EVA builds the grid `shift(linspace(1, 0, n + 1)[:n])` (get_sampling_sigmas) and hands it to a DPM++
  scheduler constructed with the same shift, whose set_timesteps shifts it again: the sigmas are
  shift(shift(σ)) = shift by s², in float64, truncated to integer timesteps. For 40 steps at shift 3 the
  list runs [1000, 997, 994, ..., 421, 321, 187]; its last entry, 187, is then the history timestep.
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  grid = np.linspace(1.0, 0.0, num_steps + 1)[:num_steps]
  sigmas = shift_sigma(shift_sigma(grid, shift), shift)
  timesteps = (sigmas * num_train_timesteps).astype(np.int64)
  return timesteps, np.concatenate([sigmas, [0.0]]).astype(np.float32)


def flow_sigmas(num_steps: int, shift: float = 1.0) -> np.ndarray:
  """Wan's `get_sampling_sigmas` grid: `shift(linspace(1, 0, n + 1)[:n])` plus a final 0 (float32)."""
  sigmas = shift_sigma(np.linspace(1.0, 0.0, num_steps + 1)[:num_steps], shift)
  return np.concatenate([sigmas, [0.0]]).astype(np.float32)


if __name__ == "__main__":
  for double in (True, False):
    ts, ss = wan_timesteps(double_shift=double)
    print(f"double_shift={double}: timesteps={ts.tolist()}\n  sigmas={[round(float(v), 4) for v in ss]}")
  print(f"dpm++ (EVA): timesteps={eva_dpm_timesteps()[0].tolist()}")
