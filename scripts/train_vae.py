"""Trains (or fine-tunes) the Wan 2.1 VAE on the videos of a metadata CSV.

  python -m convert --kind vae --src Wan2.1_VAE.pth --out ckpt/vae
  python scripts/train_vae.py --config=configs/vae.py --config.data.data_root=$WORKSPACE/RoboTwin/data \
      --config.init.path=ckpt/vae
  python scripts/train_vae.py --config=configs/vae.py:tiny --config.data.data_root=<toy data> --workdir=outputs/vae_tiny

Results go to --workdir (default: a fresh outputs/<date>/<time>/): config.json, metrics.jsonl,
tensorboard/, checkpoints/ (+ best/ by val_mse). Rerun with the same --workdir to resume. SFT and
GRPO read the run directory as --config.vae.checkpoint=<workdir>.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file (python scripts/x.py): the checkout's root on sys.path
  import pathlib, sys; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702
from scripts._common import trainer_cli  # noqa: E402

cli = trainer_cli("configs/vae.py", "vae", "train_vae")

if __name__ == "__main__":
  cli()
