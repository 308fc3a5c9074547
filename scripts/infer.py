"""EVA inference: image_csv -> videos (outputs/<date>/<time>/videos/*.mp4).

  python scripts/infer.py --config=configs/infer.py:tiny
  python scripts/infer.py --config=configs/infer.py --config.ckpt.wan_dir=data/ckpts/Wan2.1-I2V-14B-480P \\
      --config.ckpt.tuned=data/ckpts/eva_i2v_14B.ckpt --config.data.data_root=data/test_images

All logic lives in eva_jax.inference.run_inference; see docs/inference.md.
"""

if __package__ in (None, ""):  # run as a file (python scripts/x.py): the checkout's root on sys.path
  import pathlib, sys; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702
import pathlib  # noqa: E402

from scripts._common import config_flag, run, workdir_flag  # noqa: E402

_CONFIG = config_flag("configs/infer.py")
_WORKDIR = workdir_flag("output directory (default: outputs/<date>/<time>)")


def main(argv):
  del argv
  from eva_jax.inference import run_inference
  from eva_jax.utils import logs
  from eva_jax.utils.rundir import make_run_dir
  config = _CONFIG.value
  workdir = _WORKDIR.value or str(make_run_dir(config.output_root))
  logs.set_log_dir(workdir)  # eva_jax.log, with the traceback of an error, in the run directory
  print(f"infer: writing to {workdir}", flush=True)
  videos = run_inference(config, workdir)
  if videos:
    print(f"infer: {len(videos)} video(s) in {pathlib.Path(videos[0]).parent}")


def cli(argv=None):
  run(main, argv)


if __name__ == "__main__":
  cli()
