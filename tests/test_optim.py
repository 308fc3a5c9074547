"""make_optimizer / make_schedule against torch.optim.AdamW + Lightning-style clipping and accumulation."""

import ml_collections
import numpy as np
import optax
import pytest
import torch

import jax
import jax.numpy as jnp

from eva_jax.training.optim import make_optimizer, make_schedule
from tests.utils import rel_err


def _cfg(**kw):
  base = dict(name="adamw", learning_rate=1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05,
              schedule="constant_with_warmup", warmup_steps=3, total_steps=0,
              grad_clip_norm=0.0, grad_clip_value=0.5, accumulate_steps=1)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _torch_run(w0, grads, cfg):
  """Reference: torch AdamW, LambdaLR constant-with-warmup, clip after averaging micro-batches."""
  p = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))
  opt = torch.optim.AdamW([p], lr=cfg.learning_rate, betas=(cfg.b1, cfg.b2), eps=cfg.eps,
                          weight_decay=cfg.weight_decay)
  warm = cfg.warmup_steps if cfg.schedule == "constant_with_warmup" else 0
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / warm) if warm else 1.0)
  k = cfg.accumulate_steps
  for i, g in enumerate(grads):
    acc = torch.tensor(g, dtype=torch.float64) / k
    p.grad = acc if p.grad is None else p.grad + acc
    if (i + 1) % k == 0:
      if cfg.grad_clip_value:
        torch.nn.utils.clip_grad_value_([p], cfg.grad_clip_value)
      if cfg.grad_clip_norm:
        torch.nn.utils.clip_grad_norm_([p], cfg.grad_clip_norm)
      opt.step()
      sched.step()
      p.grad = None
  return p.detach().numpy()


def _jax_run(w0, grads, cfg):
  tx = make_optimizer(cfg)
  w = jnp.asarray(w0)
  state = tx.init(w)
  step = jax.jit(lambda g, s, w: tx.update(g, s, w))
  for g in grads:
    upd, state = step(jnp.asarray(g), state, w)
    w = optax.apply_updates(w, upd)
  return np.asarray(w)


@pytest.mark.parametrize("kw", [
    dict(),                                                  # EVA recipe: clip by value, warm-up
    dict(accumulate_steps=2),                                # gradient accumulation
    dict(grad_clip_value=0.0, grad_clip_norm=0.3),           # clip by global norm
    dict(schedule="constant", grad_clip_value=0.0),
])
def test_matches_torch_adamw(kw):
  cfg = _cfg(**kw)
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(5, 4)).astype(np.float32)
  grads = [rng.normal(size=(5, 4)).astype(np.float32) for _ in range(8)]
  ref = _torch_run(w0, grads, cfg)
  out = _jax_run(w0, grads, cfg)
  assert not np.allclose(ref, w0)
  assert rel_err(out, ref) <= 1e-5


def test_schedules():
  s = make_schedule(_cfg(learning_rate=2.0, warmup_steps=4))
  np.testing.assert_allclose([float(s(i)) for i in range(6)], [0, 0.5, 1.0, 1.5, 2.0, 2.0])
  s = make_schedule(_cfg(learning_rate=1.0, schedule="cosine", warmup_steps=2, total_steps=6))
  # warm-up to the peak, then a half cosine from 1 to 0 over the 4 remaining steps
  np.testing.assert_allclose([float(s(i)) for i in range(7)],
                             [0, 0.5, 1.0, 0.8535534, 0.5, 0.1464466, 0.0], atol=1e-6)
  assert float(make_schedule(_cfg(schedule="constant"))(0)) == pytest.approx(1e-2)


def test_dict_config_defaults_and_errors():
  tx = make_optimizer({"learning_rate": 1e-3})           # every other field from DEFAULTS
  assert tx.init(jnp.zeros(3)) is not None
  with pytest.raises(ValueError, match="schedule"):
    make_schedule(_cfg(schedule="linear"))
  with pytest.raises(ValueError, match="total_steps"):
    make_schedule(_cfg(schedule="cosine", total_steps=2, warmup_steps=3))
  with pytest.raises(ValueError, match="name"):
    make_optimizer(_cfg(name="lion"))
  with pytest.raises(ValueError, match="accumulate_steps"):
    make_optimizer(_cfg(accumulate_steps=0))
