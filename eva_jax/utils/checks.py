"""Config values checked before anything is built: one rule per field, one message.

  from eva_jax.utils import checks
  checks.check(config, checks.COMMON, {"data.n_frames": checks.FRAMES_1_4K})

A bad value raises ConfigError naming the field, the value and what was expected:

  config.train.batch_size=-1: expected an integer >= 1

A rule applies only where the config has that field, so COMMON (train.*, optim.*, mesh.*, eval.*, seed)
serves every entry point's config, and each trainer adds a table for its own fields. Without these checks a
bad value surfaces minutes later as a library's error that names no field ('integer modulo by zero',
'math domain error', a NaN loss after compiling). The entry points exit with status 2 on a ConfigError (a bad
command line or config file), as on a value ml_collections cannot parse.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

# A rule returns None for a good value, else what was expected ("an integer >= 1").
Rule = Callable[[Any], "str | None"]


class ConfigError(ValueError):
  """A config field holds a value the code cannot run with; the message names the field."""


def fail(field: str, value: Any, expected: str) -> ConfigError:
  return ConfigError(f"config.{field}={value!r}: expected {expected}")


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bounds(lo, hi, lo_open: bool = False) -> str:
  parts = []
  if lo is not None:
    parts.append(f"{'>' if lo_open else '>='} {lo}")
  if hi is not None:
    parts.append(f"<= {hi}")
  return " and ".join(parts)


def integer(lo: int | None = None, hi: int | None = None) -> Rule:
  def rule(v):
    ok = _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi)
    return None if ok else " ".join(["an integer", _bounds(lo, hi)]).strip()
  return rule


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Rule:
  """A finite number in [lo, hi] ((lo, hi] when lo_open)."""
  def rule(v):
    ok = (_is_number(v) and math.isfinite(v) and (lo is None or (v > lo if lo_open else v >= lo))
          and (hi is None or v <= hi))
    return None if ok else " ".join(["a finite number", _bounds(lo, hi, lo_open)]).strip()
  return rule


def fraction_below_one(v):
  return None if _is_number(v) and 0 <= v < 1 else "a number in [0, 1)"


def one_of(*choices) -> Rule:
  return lambda v: None if v in choices else f"one of {list(choices)}"


def multiple_of(n: int) -> Rule:
  return lambda v: None if _is_int(v) and v > 0 and v % n == 0 else f"a positive multiple of {n}"


def FRAMES_1_4K(v):  # noqa: N802  (a rule constant, used like the others)
  return None if _is_int(v) and v >= 1 and (v - 1) % 4 == 0 else "1 + 4k frames (1, 5, 9, 17, 33, 49, 81)"


def int_tuple(length: int | None = None, lo: int = 1, allow_empty: bool = False) -> Rule:
  """A tuple of integers >= lo (of `length` entries when given; () too when allow_empty)."""
  def rule(v):
    ok = (isinstance(v, (tuple, list)) and all(_is_int(x) and x >= lo for x in v)
          and (len(v) > 0 or allow_empty) and (length is None or len(v) == length or (allow_empty and not v)))
    what = f"{length} integers" if length else "a tuple of integers"
    return None if ok else (f"{what} >= {lo}{' (or () for the default)' if allow_empty else ''}, "
                            f"e.g. {tuple([max(lo, 1) * 32] * (length or 2))}")
  return rule


def MESH_SIZE(v):  # noqa: N802
  return None if _is_int(v) and (v == -1 or v >= 1) else "an integer >= 1, or -1 for the remaining devices"


DTYPE = one_of("float32", "bfloat16", "float16")
# Compute and parameter dtypes of every model section that has them.
DTYPES: dict[str, Rule] = {f"{section}.{name}": DTYPE for section in ("model", "vae", "clip", "umt5")
                           for name in ("dtype", "param_dtype")}

# Fields that mean the same in every config that has them.
COMMON: dict[str, Rule] = {
    **DTYPES,
    "seed": integer(),
    "train.batch_size": integer(1),
    "train.num_steps": integer(1),
    "train.log_every": integer(1),
    "train.checkpoint_every": integer(1),
    "train.keep_checkpoints": integer(1),
    "train.stop_at": integer(0),
    "train.ema_decay": fraction_below_one,
    "model.remat": one_of("none", "full", "dots", "offload"),
    "optim.name": one_of("adamw", "adam", "sgd"),
    "optim.schedule": one_of("constant", "constant_with_warmup", "cosine"),
    "optim.learning_rate": number(0),
    "optim.warmup_steps": integer(0),
    "optim.total_steps": integer(0),
    "optim.accumulate_steps": integer(1),
    "optim.weight_decay": number(0),
    "optim.b1": fraction_below_one,
    "optim.b2": fraction_below_one,
    "optim.eps": number(0, lo_open=True),
    "optim.grad_clip_norm": number(0),
    "optim.grad_clip_value": number(0),
    "eval.every": integer(0),
    "eval.batch_size": integer(1),
    "eval.num_batches": integer(1),
    "mesh.data": MESH_SIZE,
    "mesh.fsdp": MESH_SIZE,
    "mesh.context": MESH_SIZE,
    "mesh.tensor": MESH_SIZE,
}


def _get(config, field: str) -> tuple[bool, Any]:
  value = config
  for part in field.split("."):
    if not isinstance(value, Mapping) and not hasattr(value, "keys"):
      return False, None
    if part not in value:
      return False, None
    value = value[part]
  return True, value


def check(config, *tables: Mapping[str, Rule]) -> None:
  """Raises ConfigError for the first field of `tables` (present in `config`) whose rule fails."""
  for table in tables:
    for field, rule in table.items():
      present, value = _get(config, field)
      if present:
        expected = rule(value)
        if expected:
          raise fail(field, value, expected)
  mesh = _get(config, "mesh")[1]
  if mesh is not None and hasattr(mesh, "values") and sum(1 for v in mesh.values() if v == -1) > 1:
    raise ConfigError(f"config.mesh={dict(mesh)!r}: expected at most one axis of size -1 (the remaining devices)")


def probabilities(config, choices_field: str, probs_field: str) -> None:
  """`probs_field` is one probability per entry of `choices_field`, summing to 1."""
  choices, probs = _get(config, choices_field)[1], _get(config, probs_field)[1]
  if not isinstance(probs, (tuple, list)) or not all(_is_number(p) and 0 <= p <= 1 for p in probs):
    raise fail(probs_field, probs, "a tuple of probabilities in [0, 1]")
  if len(probs) != len(choices):
    raise fail(probs_field, probs, f"one probability per entry of config.{choices_field}={choices!r}")
  if abs(sum(probs) - 1) > 1e-6:
    raise fail(probs_field, probs, f"probabilities that sum to 1 (they sum to {sum(probs):g})")
