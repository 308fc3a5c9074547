"""Evaluates an IDM on RoboTwin episodes with the authors' numbers (eval_idm.py / train_idm.py `eval`):
MAE overall and per joint, the correct rate (every joint within 0.05 rad, grippers 0.5), the SmoothL1
loss on normalised joints, and `compute_smoothness` of the predicted (and true) trajectories: the
reward, its jerk / acc / vlim / alim / total penalty terms and the max / mean |v|, |a|, |j| it prints.
One PNG of predicted vs true joints per episode.

  python scripts/eval_idm.py --config=configs/idm.py --config.eval.checkpoint=IDM_singleview.pt \
      --config.data.root=$ROBOTWIN/data/<task>/demo_clean_vidar
  python scripts/eval_idm.py --config=configs/idm.py:tiny --config.eval.checkpoint=outputs/idm_tiny \
      --config.eval.episodes=a/episode0.hdf5,a/episode1.hdf5

--config.eval.checkpoint: the released .pt or a train_idm run directory (its best/ checkpoint); an orbax
run needs the config it was trained with (same variant / model fields). Without eval.episodes the
held-out episodes of data.root are used (the split train_idm makes with the same seed; with the authors'
frame-level split every episode of data.root: point it at a test root, as their eval script does). The
input follows config.data: the 'authors' recipe evaluates windows [t-2, t, t+2] of cropped, R<->B-swapped
frames, as their eval script (--num_frames 3 --crop_and_resize) does.
Writes metrics.json, per_episode.jsonl and plots/*.png under --workdir (default outputs/<date>/<time>/).
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file (python scripts/x.py): the checkout's root on sys.path
  import pathlib, sys; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702
from scripts._common import config_flag, run, workdir_flag  # noqa: E402

_CONFIG = config_flag("configs/idm.py")
_WORKDIR = workdir_flag("output directory")


def main(argv):
  del argv
  from eva_jax.training import idm
  from eva_jax.utils.rundir import make_run_dir
  config = _CONFIG.value
  if not config.eval.checkpoint:
    raise SystemExit("error: set --config.eval.checkpoint (IDM_singleview.pt or a train_idm run directory)")
  from eva_jax.utils import logs
  workdir = _WORKDIR.value or make_run_dir("outputs")
  logs.set_log_dir(workdir)  # eva_jax.log, with the traceback of an error, in the run directory
  print(f"eval_idm: writing to {workdir}", flush=True)
  summary = idm.evaluate(config, workdir)
  keys = ["num_episodes", "mae", "correct_rate", "loss"] + [f"mae/{j:02d}" for j in range(14)]
  keys += [f"{w}/{k}" for w in ("pred", "true") for k in ("reward", "total", "jerk", "acc", "vlim", "alim",
                                                          "max_abs_v", "mean_abs_v", "max_abs_a",
                                                          "mean_abs_a", "max_abs_j", "mean_abs_j")]
  for k in keys:
    if k in summary:
      print(f"  {k:16s} {summary[k]:.6g}")


def cli(argv=None):
  run(main, argv)


if __name__ == "__main__":
  cli()
