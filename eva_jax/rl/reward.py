"""EVA's executability reward: kinematic smoothness of IDM-predicted joint trajectories.

The IDM turns a generated video into joint positions `A [B, T, D]` (D = 14 for the dual-arm
aloha-agilex: left arm 6, left gripper, right arm 6, right gripper). Finite differences with
dt = 1/fps give velocity, acceleration and jerk; the penalty is

  P = w_jerk·mean(w ⊙ huber(j, δ_j)) + w_acc·mean(w ⊙ huber(a, δ_a))
    + w_vlim·mean(w ⊙ relu(|v| − v_max)²) + w_alim·mean(w ⊙ relu(|a| − a_max)²)

with δ_a = f·a_max and δ_j = f·a_max/dt (f = 0.5), and the reward is R = R_max·(1 + P/P0)^(−γ)
(spec/eva.md section C). Every limit and weight lives in `SmoothnessConfig`, so other embodiments
are described by a new config, not new code. `piper_aloha()` is EVA's.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# PiPER joint speed limits in rad/s (180, 195, 180, 225, 225, 225 deg/s), as in the reference.
PIPER_JOINT_VMAX = (3.1416, 3.4034, 3.1416, 3.9270, 3.9270, 3.9270)


@dataclasses.dataclass(frozen=True)
class SmoothnessConfig:
  """Per-dimension limits and weights of the smoothness penalty (all per action dimension)."""
  v_max: tuple[float, ...]          # velocity limits [D]
  a_max: tuple[float, ...]          # acceleration limits [D]
  dim_weights: tuple[float, ...]    # raw per-dim weights [D]; renormalised to mean 1
  huber_factor: float = 0.5         # δ_a = f·a_max, δ_j = f·a_max/dt
  w_jerk: float = 0.5
  w_acc: float = 0.25
  w_vlim: float = 2.0
  w_alim: float = 1.0
  p0: float = 2000.0
  gamma: float = 0.5
  r_max: float = 10.0
  min_frames: int = 4               # fewer frames than this -> reward 0 (jerk needs 4)

  def __post_init__(self):
    d = len(self.v_max)
    if len(self.a_max) != d or len(self.dim_weights) != d:
      raise ValueError(
          f"SmoothnessConfig: v_max has {d} dims but a_max has {len(self.a_max)} and "
          f"dim_weights has {len(self.dim_weights)}")

  @property
  def num_dims(self) -> int:
    return len(self.v_max)

  def normalized_weights(self) -> np.ndarray:
    """w / (mean(w) + 1e-8), as the reference does."""
    w = np.asarray(self.dim_weights, np.float32)
    return w / (w.mean() + np.float32(1e-8))


def piper_aloha(vel_scale: float = 0.85, gripper_dims: Sequence[int] = (6, 13),
                gripper_vmax: float = 2.0, arm_amax: float = 5.0, gripper_amax: float = 10.0,
                gripper_weight: float = 0.2) -> SmoothnessConfig:
  """EVA's config: two 6-joint PiPER arms at 0.85× their speed limits, plus two grippers."""
  v_max = [vel_scale * v for v in PIPER_JOINT_VMAX] * 2
  v_max.insert(6, 0.0)
  v_max.append(0.0)  # [arm(6), grip, arm(6), grip]
  a_max = [arm_amax] * 14
  w = [1.0] * 14
  for g in gripper_dims:
    v_max[g], a_max[g], w[g] = gripper_vmax, gripper_amax, gripper_weight
  return SmoothnessConfig(v_max=tuple(v_max), a_max=tuple(a_max), dim_weights=tuple(w))


def config_from_dict(d) -> SmoothnessConfig:
  """SmoothnessConfig from a mapping (e.g. a ConfigDict); None values take the defaults."""
  fields = {f.name for f in dataclasses.fields(SmoothnessConfig)}
  unknown = set(d) - fields
  if unknown:
    raise KeyError(f"unknown SmoothnessConfig fields {sorted(unknown)}; known: {sorted(fields)}")
  kw = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in d.items() if v is not None}
  return SmoothnessConfig(**kw)


def huber(x: jax.Array, delta: jax.Array) -> jax.Array:
  """0.5x² for |x| ≤ δ, δ(|x| − 0.5δ) beyond; δ broadcasts over the last (dimension) axis."""
  ax = jnp.abs(x)
  return jnp.where(ax <= delta, 0.5 * x * x, delta * (ax - 0.5 * delta))


def smoothness_penalty(actions: jax.Array, fps: float = 16.0,
                       cfg: SmoothnessConfig | None = None) -> dict[str, jax.Array]:
  """Penalty terms of a batch of trajectories.

  Args:
    actions: [B, T, D] joint positions (T ≥ 4 for jerk; shorter gives zeros).
    fps: frame rate of the video the actions were predicted from (dt = 1/fps).
    cfg: limits and weights; defaults to `piper_aloha()`.
  Returns:
    dict with 'jerk', 'acc', 'vlim', 'alim' (unweighted term means) and 'total' (the weighted P),
    each [B] float32.
  """
  cfg = cfg or piper_aloha()
  actions = jnp.asarray(actions, jnp.float32)  # kinematics in float32 whatever the IDM dtype
  b, t, d = actions.shape
  if d != cfg.num_dims:
    raise ValueError(f"smoothness_penalty: actions have {d} dims [B, T, D]={actions.shape}, "
                     f"but the SmoothnessConfig describes {cfg.num_dims}")
  if t < cfg.min_frames:
    z = jnp.zeros((b,), jnp.float32)
    return dict(jerk=z, acc=z, vlim=z, alim=z, total=z)
  dt = 1.0 / float(fps)
  w = jnp.asarray(cfg.normalized_weights())               # [D]
  v_max = jnp.asarray(cfg.v_max, jnp.float32)              # [D]
  a_max = jnp.asarray(cfg.a_max, jnp.float32)              # [D]
  vel = (actions[:, 1:] - actions[:, :-1]) / dt            # [B, T-1, D]
  acc = (vel[:, 1:] - vel[:, :-1]) / dt                    # [B, T-2, D]
  jerk = (acc[:, 1:] - acc[:, :-1]) / dt                   # [B, T-3, D]

  def wmean(x):  # mean over time and dims of w ⊙ x
    return jnp.mean(x * w, axis=(1, 2))

  terms = dict(
      jerk=wmean(huber(jerk, cfg.huber_factor * a_max / dt)),
      acc=wmean(huber(acc, cfg.huber_factor * a_max)),
      vlim=wmean(jnp.square(jax.nn.relu(jnp.abs(vel) - v_max))),
      alim=wmean(jnp.square(jax.nn.relu(jnp.abs(acc) - a_max))),
  )
  terms["total"] = (cfg.w_jerk * terms["jerk"] + cfg.w_acc * terms["acc"]
                    + cfg.w_vlim * terms["vlim"] + cfg.w_alim * terms["alim"])
  return terms


def reward_from_penalty(total: jax.Array, cfg: SmoothnessConfig | None = None) -> jax.Array:
  """R = r_max·(1 + P/P0)^(−γ), in (0, r_max]."""
  cfg = cfg or piper_aloha()
  return cfg.r_max * jnp.power(1.0 + total / cfg.p0, -cfg.gamma)


def smoothness_reward(actions: jax.Array, fps: float = 16.0,
                      cfg: SmoothnessConfig | None = None) -> jax.Array:
  """[B, T, D] joint trajectories -> [B] rewards; 0 when T < cfg.min_frames (as the reference)."""
  cfg = cfg or piper_aloha()
  if actions.shape[1] < cfg.min_frames:
    return jnp.zeros((actions.shape[0],), jnp.float32)
  return reward_from_penalty(smoothness_penalty(actions, fps, cfg)["total"], cfg)


def smoothness_reward_and_terms(actions: jax.Array, fps: float = 16.0,
                                cfg: SmoothnessConfig | None = None) -> tuple[jax.Array, dict]:
  """Both the [B] reward and the per-term penalties (what the trainer logs)."""
  cfg = cfg or piper_aloha()
  terms = smoothness_penalty(actions, fps, cfg)
  if actions.shape[1] < cfg.min_frames:
    return jnp.zeros((actions.shape[0],), jnp.float32), terms
  return reward_from_penalty(terms["total"], cfg), terms
