"""EVA inference: image_csv -> videos (outputs/<date>/<time>/videos/*.mp4).

  python scripts/infer.py --config=configs/infer.py:tiny
  python scripts/infer.py --config=configs/infer.py --config.ckpt.wan_dir=data/ckpts/Wan2.1-I2V-14B-480P \\
      --config.ckpt.tuned=data/ckpts/eva_i2v_14B.ckpt --config.data.data_root=data/test_images

All logic lives in eva_jax.inference.run_inference; see docs/inference.md.
"""

from absl import flags

from _common import config_flag, run

_CONFIG = config_flag("configs/infer.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (default: outputs/<date>/<time>)")


def main(argv):
  del argv
  from eva_jax.inference import run_inference
  run_inference(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  run(main)
