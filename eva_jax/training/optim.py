"""Optimizer and learning-rate schedule factories shared by SFT, IDM and GRPO training.

`make_optimizer(cfg)` builds an optax GradientTransformation from an ml_collections ConfigDict:

  name            'adamw' (the only optimizer the original uses) | 'adam' | 'sgd'
  learning_rate   peak learning rate
  b1, b2, eps     Adam moments (EVA SFT: 0.9 / 0.95 / 1e-8)
  weight_decay    decoupled weight decay (EVA SFT: 0.05)
  schedule        'constant' | 'constant_with_warmup' | 'cosine'
  warmup_steps    linear warm-up from 0 (optimizer steps, i.e. after accumulation)
  warmup_fraction warm-up as a fraction of total_steps: int(fraction * total_steps) steps, as the EVA
                  IDM trainer's int(0.1 * num_iterations); 0 = use warmup_steps (setting both is an error)
  total_steps     length of the cosine decay (warm-up included)
  grad_clip_norm  clip by global norm; 0 = off
  grad_clip_value clip every gradient element to [-v, v]; 0 = off (Lightning's
                  gradient_clip_algorithm='value', which EVA uses with FSDP)
  accumulate_steps  micro-batches per optimizer step (optax.MultiSteps); 1 = off

Order of operations matches Lightning: gradients are averaged over the accumulation window,
clipped, then handed to AdamW once per window. Missing optional fields take the defaults below,
so small configs can name only what they change.
"""

from __future__ import annotations

from typing import Any, Mapping

import optax

# Defaults for every field; EVA's SFT recipe (spec eva.md A.5) except the learning rate.
DEFAULTS: dict[str, Any] = dict(
    name="adamw",
    learning_rate=8e-6,
    b1=0.9,
    b2=0.95,
    eps=1e-8,
    weight_decay=0.05,
    schedule="constant_with_warmup",
    warmup_steps=100,
    warmup_fraction=0.0,
    total_steps=0,
    grad_clip_norm=0.0,
    grad_clip_value=1.0,
    accumulate_steps=1,
)

_SCHEDULES = ("constant", "constant_with_warmup", "cosine")


def _get(cfg: Mapping[str, Any] | Any, field: str) -> Any:
  """cfg.field, or the default when the ConfigDict/dict does not define it."""
  if isinstance(cfg, Mapping):
    return cfg.get(field, DEFAULTS[field])
  return getattr(cfg, field, DEFAULTS[field])


def warmup_steps(cfg) -> int:
  """The warm-up length in optimizer steps: warmup_steps, or int(warmup_fraction * total_steps)."""
  fraction = float(_get(cfg, "warmup_fraction"))
  steps = int(_get(cfg, "warmup_steps"))
  if fraction == 0:
    return steps
  if steps > 0:
    raise ValueError(f"optimizer config: set warmup_steps ({steps}) or warmup_fraction ({fraction}), not both")
  if not 0 < fraction < 1:
    raise ValueError(f"optimizer config: warmup_fraction must be in [0, 1), got {fraction}")
  return int(fraction * int(_get(cfg, "total_steps")))


def make_schedule(cfg) -> optax.Schedule:
  """Learning rate as a function of the optimizer step (counted after gradient accumulation)."""
  lr = float(_get(cfg, "learning_rate"))
  kind = _get(cfg, "schedule")
  warmup = warmup_steps(cfg)
  if kind == "constant":
    return optax.constant_schedule(lr)
  if kind == "constant_with_warmup":
    if warmup <= 0:
      return optax.constant_schedule(lr)
    # Same as transformers' get_constant_schedule_with_warmup: lr * min(1, step / warmup).
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
  if kind == "cosine":
    total = int(_get(cfg, "total_steps"))
    if total <= warmup:
      raise ValueError(f"optimizer config: schedule='cosine' needs total_steps > warmup_steps, "
                       f"got total_steps={total}, warmup_steps={warmup}")
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total, end_value=0.0)
  raise ValueError(f"optimizer config: unknown schedule {kind!r}; expected one of {_SCHEDULES}")


def make_optimizer(cfg) -> optax.GradientTransformation:
  """clip (value and/or norm) -> optimizer with schedule, wrapped in MultiSteps when accumulating."""
  schedule = make_schedule(cfg)
  name = _get(cfg, "name")
  if name == "adamw":
    opt = optax.adamw(schedule, b1=float(_get(cfg, "b1")), b2=float(_get(cfg, "b2")),
                      eps=float(_get(cfg, "eps")), weight_decay=float(_get(cfg, "weight_decay")))
  elif name == "adam":
    opt = optax.adam(schedule, b1=float(_get(cfg, "b1")), b2=float(_get(cfg, "b2")),
                     eps=float(_get(cfg, "eps")))
  elif name == "sgd":
    opt = optax.sgd(schedule)
  else:
    raise ValueError(f"optimizer config: unknown name {name!r}; expected 'adamw', 'adam' or 'sgd'")

  parts = []
  clip_value = float(_get(cfg, "grad_clip_value"))
  clip_norm = float(_get(cfg, "grad_clip_norm"))
  if clip_value < 0 or clip_norm < 0:
    raise ValueError(f"optimizer config: grad_clip_value={clip_value} and grad_clip_norm={clip_norm} "
                     "must be >= 0 (0 = off)")
  if clip_value > 0:
    parts.append(optax.clip(clip_value))
  if clip_norm > 0:
    parts.append(optax.clip_by_global_norm(clip_norm))
  tx = optax.chain(*parts, opt) if parts else opt

  k = int(_get(cfg, "accumulate_steps"))
  if k < 1:
    raise ValueError(f"optimizer config: accumulate_steps must be >= 1, got {k}")
  if k > 1:
    # MultiSteps averages k micro-batch gradients and applies `tx` on every k-th call; the
    # schedule then counts optimizer steps, not micro-batches, as Lightning does.
    tx = optax.MultiSteps(tx, every_k_schedule=k)
  return tx
