"""Trains EVA's inverse dynamics model (ResNet-50 IDM) on RoboTwin HDF5 episodes.

  python scripts/train_idm.py --config=configs/idm.py --config.data.root=$ROBOTWIN/data \
      --config.init.path=resnet50-11ad3fa6.pth      # the authors' recipe: ImageNet start (docs/idm.md)
  python scripts/train_idm.py --config=configs/idm.py:recipe=eva_jax --config.data.root=<episodes>
  python scripts/train_idm.py --config=configs/idm.py:tiny --config.data.root=<episodes> --workdir=outputs/idm_tiny

The first run prepares the array_record dataset under <workdir>/tfds (or --config.data.tfds_dir).
Results go to --workdir (default: a fresh outputs/<date>/<time>/): config.json, metrics.jsonl,
tensorboard/, checkpoints/ (+ best/ by val_mae). Rerun with the same --workdir to resume.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file (python scripts/x.py): the checkout's root on sys.path
  import pathlib, sys; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702
from scripts._common import trainer_cli  # noqa: E402

cli = trainer_cli("configs/idm.py", "idm", "train_idm")

if __name__ == "__main__":
  cli()
