"""Prints a resolved config (after the variant and --config.* overrides) as JSON, without running anything.

  python scripts/show_config.py --config=configs/grpo.py:tiny --config.train.learning_rate=1e-4
"""

import json

import _common  # noqa: F401  (repo root on sys.path)
from _common import config_flag, run

from eva_jax.utils.rundir import _jsonable

_CONFIG = config_flag(None)


def main(argv):
  del argv
  print(json.dumps(_jsonable(_CONFIG.value), indent=2, sort_keys=True))


if __name__ == "__main__":
  run(main)
