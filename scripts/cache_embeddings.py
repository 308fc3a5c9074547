"""Caches umT5 prompt embeddings (optionally CLIP features and VAE latents of first frames) for a
metadata CSV and adds their paths to it. Usage and options: configs/cache_embeddings.py.

  python scripts/cache_embeddings.py --config.data_root=$DATA --config.metadata_path=robotwin_videos.csv \
      --config.umt5.path=<models_t5_umt5-xxl-enc-bf16.pth> --config.umt5.tokenizer_path=<google/umt5-xxl>
"""

if __package__ in (None, ""):  # run as a file (python scripts/x.py): the checkout's root on sys.path
  import pathlib, sys; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702
from scripts._common import config_flag, run, workdir_flag  # noqa: E402

from eva_jax.data.embeddings import cache_embeddings

_CONFIG = config_flag("configs/cache_embeddings.py")
_WORKDIR = workdir_flag("scratch folder (tiny tokenizer); default: the data root")


def main(argv):
  del argv
  stats = cache_embeddings(_CONFIG.value, _WORKDIR.value)
  print("cache_embeddings: " + ", ".join(f"{k}={v}" for k, v in stats.items()))


def cli(argv=None):
  run(main, argv)


if __name__ == "__main__":
  cli()
