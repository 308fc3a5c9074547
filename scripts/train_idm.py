"""Trains EVA's inverse dynamics model (ResNet-50 IDM) on RoboTwin HDF5 episodes.

  python scripts/train_idm.py --config=configs/idm.py --config.data.root=$ROBOTWIN/data/<task>/demo_clean_vidar \
      --config.init.kind=imagenet --config.init.path=resnet50-11ad3fa6.pth
  python scripts/train_idm.py --config=configs/idm.py:tiny --config.data.root=<episodes> --workdir=outputs/idm_tiny

The first run prepares the array_record dataset under <workdir>/tfds (or --config.data.tfds_dir).
Results go to --workdir (default: a fresh outputs/<date>/<time>/): config.json, metrics.jsonl,
tensorboard/, checkpoints/ (+ best/ by val_mae). Rerun with the same --workdir to resume.
"""

from __future__ import annotations

import _common  # noqa: F401  (repo root on sys.path)
from _common import config_flag, run
from absl import flags

_CONFIG = config_flag("configs/idm.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (resumes if it holds checkpoints)")


def main(argv):
  del argv
  from eva_jax.training import idm
  from eva_jax.utils.rundir import make_run_dir
  workdir = _WORKDIR.value or make_run_dir("outputs")
  print(f"train_idm: writing to {workdir}")
  metrics = idm.train_and_evaluate(_CONFIG.value, workdir)
  print({k: round(v, 5) for k, v in metrics.items() if "/" not in k})


if __name__ == "__main__":
  run(main)
