"""What every entry point shares: the `--config` flag, clean errors for bad overrides, multi-host start.

  from _common import config_flag, run
  _CONFIG = config_flag("configs/sft.py:tiny")
  def main(argv): ...
  if __name__ == "__main__": run(main)
"""

from __future__ import annotations

import pathlib
import sys


ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so `configs.*` and `eva_jax` import from a plain checkout too
  sys.path.insert(0, str(ROOT))

from eva_jax.utils.xla_flags import apply_default_xla_flags  # noqa: E402

apply_default_xla_flags()  # before any computation starts the backend

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402


def config_flag(default: str, name: str = "config", help_string: str = "ml_collections config file[:variant]"):
  """`--config=configs/x.py:tiny --config.a.b=1`; the config is locked, so a misspelled key is an error."""
  if default and not pathlib.Path(default.split(":")[0]).is_absolute():
    path, _, arg = default.partition(":")
    default = str(ROOT / path) + (f":{arg}" if arg else "")
  return config_flags.DEFINE_config_file(name, default, help_string, lock_config=True)


def _parse(argv):
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    msg = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    sys.stderr.write(f"error: bad config override {' '.join(bad) or ''}: {msg}\n"
                     "       (config keys are fixed by the config file; run with --helpfull to list flags)\n")
    sys.exit(2)
  except flags.Error as e:
    sys.stderr.write(f"error: {e}\n")
    sys.exit(2)


def run(main) -> None:
  """absl app.run with clean override errors and `jax.distributed.initialize()` on multi-host launches."""
  def wrapped(argv):
    from eva_jax.parallel import distributed
    distributed.initialize()
    return main(argv)
  app.run(wrapped, flags_parser=_parse)


def trainer_main(config_default: str, module: str, name: str, check=None) -> None:
  """The whole of a `scripts/train_<x>.py`: `--config`, `--workdir` (default a fresh outputs/<date>/<time>/;
  an existing one resumes), then eva_jax.training.<module>.train_and_evaluate. `check(config)` may reject a
  config before anything is built (raise SystemExit with the message)."""
  config = config_flag(config_default)
  workdir = flags.DEFINE_string("workdir", None, "run directory (resumes if it holds checkpoints)")

  def main(argv):
    del argv
    import importlib
    from eva_jax.utils.rundir import make_run_dir
    if check is not None:
      check(config.value)
    trainer = importlib.import_module(f"eva_jax.training.{module}")
    out = workdir.value or make_run_dir("outputs")
    print(f"{name}: writing to {out}")
    metrics = trainer.train_and_evaluate(config.value, out) or {}
    print({k: round(v, 5) for k, v in metrics.items() if "/" not in k and isinstance(v, (int, float))})
  run(main)
