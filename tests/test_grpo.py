"""GRPO pieces: advantages, PPO-clip loss, mean KL, and the update step on a toy LoRA policy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eva_jax.diffusion.schedules import wan_timesteps
from eva_jax.rl import grpo
from tests.utils import rel_err


def _np_adv(r, g, per_group=True, global_std=False):
  out = np.zeros_like(r, dtype=np.float64)
  for k in np.unique(g):
    m = g == k
    sd = np.std(r) if global_std else np.std(r[m])
    out[m] = (r[m] - r[m].mean()) / (sd + 1e-4)
  if not per_group:
    out = (r - r.mean()) / (r.std() + 1e-4)
  return np.clip(out, -5, 5)


@pytest.mark.parametrize("per_group,global_std", [(True, False), (True, True), (False, False)])
def test_group_advantages_match_numpy(per_group, global_std):
  rng = np.random.default_rng(0)
  r = rng.uniform(8, 10, size=24).astype(np.float32)
  g = np.repeat(np.arange(3), 8)
  rng.shuffle(g)
  a = grpo.group_advantages(r, g, 3, per_group=per_group, global_std=global_std)
  assert rel_err(a, _np_adv(r.astype(np.float64), g, per_group, global_std)) < 1e-5
  if per_group:
    for k in range(3):
      assert abs(float(np.mean(np.asarray(a)[g == k]))) < 1e-5  # zero mean per group


def test_advantages_are_clipped_and_equal_rewards_give_zero():
  # One outlier in a group of 30 has z-score sqrt(29) = 5.39: clipped to 5.
  r = np.concatenate([np.zeros(29), [1.0], [5.0, 5.0]]).astype(np.float32)
  g = np.array([0] * 30 + [1, 1])
  a = np.asarray(grpo.group_advantages(r, g, 2, eps=1e-12))
  assert a[29] == 5.0 and abs(a[0] + 1 / np.sqrt(29)) < 1e-6
  np.testing.assert_array_equal(a[30:], 0.0)


def test_ppo_loss_matches_formula_and_zero_gradient_at_ratio_one():
  rng = np.random.default_rng(1)
  old = rng.normal(size=8).astype(np.float32)
  new = old + rng.normal(size=8).astype(np.float32) * 1e-5
  adv = rng.normal(size=8).astype(np.float32)
  loss, aux = grpo.ppo_clip_loss(new, old, adv, 1e-5)
  ratio = np.exp(new.astype(np.float64) - old)
  ref = np.mean(np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - 1e-5, 1 + 1e-5)))
  assert rel_err(loss, ref) < 1e-5
  assert abs(float(aux["clipfrac"]) - np.mean(np.abs(ratio - 1) > 1e-5)) < 1e-6
  # Ratio 1 and zero advantages: the policy gradient is exactly zero.
  g = jax.grad(lambda lp: grpo.ppo_clip_loss(lp, old, np.zeros(8, np.float32), 1e-5)[0])(old)
  np.testing.assert_array_equal(np.asarray(g), 0.0)
  # Ratio 1 with advantages: gradient −A/B (the unclipped branch is active at ratio 1).
  g = jax.grad(lambda lp: grpo.ppo_clip_loss(lp, old, adv, 1e-5)[0])(jnp.asarray(old))
  assert rel_err(g, -adv / 8) < 1e-6


def test_mean_kl():
  rng = np.random.default_rng(2)
  m, r = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 3, 4))
  kl = grpo.mean_kl(m, r, 0.3)
  assert rel_err(kl, np.mean((m - r) ** 2) / (2 * 0.09 + 1e-12)) < 1e-6
  assert float(grpo.mean_kl(m, m, 0.3)) == 0.0


# MARK: the update on a toy policy v = x·(W + A·B) with LoRA (A, B)


def _toy_policy(lora, base, x, t, cond):
  w = base["w"] + lora["a"] @ lora["b"]                       # [C, C]
  return jnp.einsum("bfhwc,cd->bfhwd", x, w) * (t[:, :, None, None, None] / 1000.0) + cond["bias"]


def _toy_batch(key, b=4, s=5, f=2):
  k1, k2, k3 = jax.random.split(key, 3)
  lat = jax.random.normal(k1, (b, s + 1, f, 2, 2, 4))
  return dict(latents=lat, log_probs=jnp.zeros((b, s)), advantages=jax.random.normal(k2, (b,)),
              clean_first=jax.random.normal(k3, (b, 1, 2, 2, 4)),
              cond=dict(bias=jnp.zeros((b, 1, 1, 1, 4))))


def _toy_setup(s=5, **kw):
  ts, sig = wan_timesteps(s)
  cfg = grpo.GRPOUpdateConfig(num_train_timesteps=s - 1, num_inner_epochs=2, micro_batch=2,
                              clip_range=1e-2, **kw)
  key = jax.random.key(0)
  base = dict(w=jax.random.normal(key, (4, 4)) * 0.1)
  lora = dict(a=jax.random.normal(jax.random.key(1), (4, 2)) * 0.1, b=jnp.zeros((2, 4)))
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=1e-4))
  return ts, sig, cfg, base, lora, tx


def test_update_step_moves_lora_only_and_reports():
  ts, sig, cfg, base, lora, tx = _toy_setup(beta=0.004)
  batch = _toy_batch(jax.random.key(5))
  batch["log_probs"] = grpo.recompute_log_probs(_toy_policy, lora, base, batch, ts, sig, cfg)
  update = jax.jit(grpo.make_update_fn(_toy_policy, tx, ts, sig, cfg))
  new_lora, _, m = update(lora, tx.init(lora), base, batch, jax.random.key(9))
  assert float(m["skipped"]) == 0.0 and np.isfinite(float(m["loss"]))
  assert float(jnp.abs(new_lora["b"]).max()) > 0          # B started at zero and moved
  # First step: ratio 1 exactly, so nothing is clipped in the first optimiser step's statistics.
  assert float(m["ratio_mean"]) > 0.99


def test_ratio_one_and_zero_advantages_leave_lora_unchanged():
  ts, sig, cfg, base, lora, _ = _toy_setup(beta=0.0)
  batch = _toy_batch(jax.random.key(6))
  batch["advantages"] = jnp.zeros((4,))
  batch["log_probs"] = grpo.recompute_log_probs(_toy_policy, lora, base, batch, ts, sig, cfg)
  tx = optax.sgd(1.0)  # no weight decay / Adam epsilon: a zero gradient means no change at all
  update = jax.jit(grpo.make_update_fn(_toy_policy, tx, ts, sig, cfg))
  new_lora, _, m = update(lora, tx.init(lora), base, batch, jax.random.key(0))
  assert float(m["grad_norm"]) == 0.0
  assert float(m["approx_kl"]) < 1e-10  # log-probs recomputed inside jit: equal to rounding
  for k in lora:
    np.testing.assert_array_equal(np.asarray(new_lora[k]), np.asarray(lora[k]))


def test_non_finite_update_is_skipped():
  ts, sig, cfg, base, lora, tx = _toy_setup(beta=0.0)
  batch = _toy_batch(jax.random.key(7))
  batch["log_probs"] = batch["log_probs"].at[0, 0].set(jnp.nan)
  update = jax.jit(grpo.make_update_fn(_toy_policy, tx, ts, sig, cfg))
  opt_state = tx.init(lora)
  new_lora, new_opt, m = update(lora, opt_state, base, batch, jax.random.key(0))
  assert float(m["skipped"]) == 2.0   # 2 inner epochs × 1 optimiser step, every one non-finite
  for k in lora:
    np.testing.assert_array_equal(np.asarray(new_lora[k]), np.asarray(lora[k]))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(new_opt)
             if jnp.issubdtype(x.dtype, jnp.floating))


def test_lora_off_reference_is_exactly_the_base_model():
  _, _, _, base, lora, _ = _toy_setup()
  lora = dict(a=lora["a"], b=jnp.ones((2, 4)))
  x = jax.random.normal(jax.random.key(3), (2, 2, 2, 2, 4))
  t = jnp.full((2, 2), 500.0)
  cond = dict(bias=jnp.zeros((2, 1, 1, 1, 4)))
  ref = _toy_policy(grpo.zeros_like_tree(lora), base, x, t, cond)
  plain = jnp.einsum("bfhwc,cd->bfhwd", x, base["w"]) * 0.5
  np.testing.assert_array_equal(np.asarray(ref), np.asarray(plain))


def test_rollout_log_probs_are_recomputed_exactly_and_frame0_is_imposed():
  from eva_jax.rl.rollout import RolloutConfig, sample_latents
  ts, sig = wan_timesteps(5)
  _, _, cfg, base, lora, _ = _toy_setup()
  lora = dict(a=lora["a"], b=jnp.full((2, 4), 0.1))
  seen_t = []

  def policy(lo, ba, x, t, cond):
    seen_t.append(t)
    return _toy_policy(lo, ba, x, t, cond)

  batch = _toy_batch(jax.random.key(11), s=5)
  ro_cfg = RolloutConfig(sigma_max=float(sig[1]), t_hist=float(ts[-1]))
  noise = jax.random.normal(jax.random.key(12), (4, 2, 2, 2, 4))
  lat, lps = jax.jit(lambda k: sample_latents(policy, lora, base, batch["clean_first"], batch["cond"], noise,
                                              k, ts, sig, ro_cfg))(jax.random.key(13))
  assert lat.shape == (4, 6, 2, 2, 2, 4) and lps.shape == (4, 5)
  np.testing.assert_array_equal(np.asarray(lat[:, 0]), np.asarray(noise))
  batch.update(latents=lat, log_probs=lps)
  cfg = grpo.GRPOUpdateConfig(sigma_max=float(sig[1]), t_hist=float(ts[-1]))
  again = jax.jit(lambda: grpo.recompute_log_probs(_toy_policy, lora, base, batch, ts, sig, cfg))()
  assert float(jnp.max(jnp.abs(again - lps))) < 1e-6      # ratio exp(Δ) = 1 to float32 rounding
  assert seen_t and seen_t[0].shape == (4, 2)
  # What the policy sees: frame 0 clean at t_hist, the other frames at the step's timestep.
  np.testing.assert_array_equal(np.asarray(grpo.frame_timesteps(500.0, 2, 3, 71.0)), [[71, 500, 500]] * 2)
  x = grpo.impose_first_frame(lat[:, 3], batch["clean_first"])
  np.testing.assert_array_equal(np.asarray(x[:, :1]), np.asarray(batch["clean_first"]))
  np.testing.assert_array_equal(np.asarray(x[:, 1:]), np.asarray(lat[:, 3, 1:]))


def test_zeroed_lora_is_exactly_the_wan_base_model():
  """The zeroed-LoRA reference policy equals the DiT with its adapters disabled."""
  from flax import nnx

  from eva_jax.models.wan import WanModel, wan_config
  from eva_jax.models.lora import LoRAParam, disable_lora  # noqa: I001
  cfg = wan_config("tiny-i2v", lora_rank=4)
  model = WanModel(cfg, rngs=nnx.Rngs(0))
  gdef, lora, base = nnx.split(model, LoRAParam, ...)
  base = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(1), x.shape), base)  # non-zero head
  lora = jax.tree.map(lambda x: jax.random.normal(jax.random.key(2), x.shape) * 0.1, lora)       # active adapters
  k = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(k[0], (1, 2, 4, 4, 16))
  t = jnp.array([[71.0, 500.0]])
  ctx = jax.random.normal(k[1], (1, 8, cfg.text_dim))
  clip = jax.random.normal(k[2], (1, 257, cfg.image_dim))
  with_lora = nnx.merge(gdef, lora, base)(x, t, ctx, clip)
  ref = nnx.merge(gdef, grpo.zeros_like_tree(lora), base)(x, t, ctx, clip)
  m = nnx.merge(gdef, lora, base)
  with disable_lora(m):
    off = m(x, t, ctx, clip)
  # Zeroed adapters add exact zeros, but XLA may merge x·A into the base matmul (x·[K | A]), whose
  # wider blocking rounds differently: equal to float32 rounding. The trainer's reference policy runs
  # under disable_lora (the `off` path), which is the base model itself.
  assert rel_err(ref, off) < 1e-6
  assert rel_err(with_lora, off) > 1e-4                               # the adapters did matter


@pytest.mark.parametrize("clean_first", [True, False])
def test_decoded_frame0_is_clean_or_as_sampled(clean_first):
  """decode_clean_first=False decodes the final latents as sampled (EVA); True puts the clean frame back."""
  from eva_jax.rl.rollout import RolloutConfig, make_rollout_fn
  ts, sig = wan_timesteps(5)
  _, _, _, base, lora, _ = _toy_setup()
  batch = _toy_batch(jax.random.key(21), s=5)
  cfg = RolloutConfig(sigma_max=float(sig[1]), t_hist=float(ts[-1]), decode_clean_first=clean_first)
  decode = lambda _, z: z[..., :3] / 10.0                               # noqa: E731 (keeps values in [-1, 1])
  actions = lambda _, v: jnp.zeros(v.shape[:2] + (14,))                 # noqa: E731
  rollout = jax.jit(lambda b, k: make_rollout_fn(_toy_policy, decode, actions, ts, sig, cfg)(
      dict(lora=lora, base=base, vae=None, idm=None), b, k, 2))
  out = rollout(dict(clean_first=batch["clean_first"], cond=batch["cond"]), jax.random.key(5))
  first = out["latents"][:, -1, :1] if not clean_first else batch["clean_first"]
  np.testing.assert_allclose(np.asarray(out["video"][:, :1]), np.clip(np.asarray(first[..., :3]) / 10.0, -1, 1),
                             atol=1e-6)
  assert not np.allclose(np.asarray(out["latents"][:, -1, :1]), np.asarray(batch["clean_first"]))
