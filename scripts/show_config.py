"""Prints a resolved config (after the variant and --config.* overrides) as JSON, without running anything.

  python scripts/show_config.py --config=configs/grpo.py:tiny --config.optim.learning_rate=1e-4
"""

import json

if __package__ in (None, ""):  # run as a file (python scripts/x.py): the checkout's root on sys.path
  import pathlib, sys; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702
from scripts._common import config_flag, run  # noqa: E402

from eva_jax.utils.rundir import _jsonable

_CONFIG = config_flag(None)


def main(argv):
  del argv
  print(json.dumps(_jsonable(_CONFIG.value), indent=2, sort_keys=True))


def cli(argv=None):
  run(main, argv)


if __name__ == "__main__":
  cli()
