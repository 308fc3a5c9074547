"""Supervised fine-tuning of the Wan 2.1 I2V DiT on RoboTwin videos (EVA's SFT stage).

  python scripts/prepare_robotwin.py --root=$WORKSPACE/RoboTwin/data
  python scripts/cache_embeddings.py --config=configs/cache_embeddings.py ...   # prompt_embed_path
  python scripts/train_sft.py --config=configs/sft.py --config.data.data_root=$WORKSPACE/RoboTwin/data \
      --config.init.kind=orbax --config.init.path=data/ckpts/lvp_14B_jax --config.vae.checkpoint=<vae dir>
  python scripts/train_sft.py --config=configs/sft.py:tiny --config.data.data_root=<toy data> --workdir=outputs/sft_tiny

Results go to --workdir (default: a fresh outputs/<date>/<time>/): config.json, metrics.jsonl,
tensorboard/, checkpoints/ (+ best/ by val_loss). Rerun with the same --workdir to resume exactly.
"""

from __future__ import annotations

import _common  # noqa: F401  (repo root on sys.path)
from _common import config_flag, run
from absl import flags

_CONFIG = config_flag("configs/sft.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (resumes if it holds checkpoints)")


def main(argv):
  del argv
  from eva_jax.training import sft
  from eva_jax.utils.rundir import make_run_dir
  workdir = _WORKDIR.value or make_run_dir("outputs")
  print(f"train_sft: writing to {workdir}")
  metrics = sft.train_and_evaluate(_CONFIG.value, workdir)
  print({k: round(v, 5) for k, v in metrics.items()})


if __name__ == "__main__":
  run(main)
