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

if __package__ in (None, ""):  # run as a file (python scripts/x.py): the checkout's root on sys.path
  import pathlib, sys; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702
from scripts._common import trainer_cli  # noqa: E402

cli = trainer_cli("configs/sft.py", "sft", "train_sft")

if __name__ == "__main__":
  cli()
