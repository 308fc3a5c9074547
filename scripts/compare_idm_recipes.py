"""Trains the IDM with each recipe of configs/idm.py on the same toy-world data and budget, and reports
the joint MAE on held-out episodes next to the constant (training-mean) predictor (docs/idm.md,
"Recipes on the toy world").

  python scripts/compare_idm_recipes.py --workdir=outputs/idm_recipes            # the demo's IDM budget
  python scripts/compare_idm_recipes.py --steps=1500 --episodes=992 --seed=1     # the shortened demo's

Data: `toyworld.generate_dataset` at the demo's size (64 px, 17 frames, 12.5 % held-out episodes).
Each run is configs/idm.py:tiny,recipe=<r> with the demo's toy overrides (32 px input, joint
statistics of the toy data, colour jitter off for 'eva_jax' as the demo runs it). Three MAEs per run:
'own' feeds the held-out episodes through the recipe's input (stride, channel order), 'reward' through
the reward's (windows [i-1, i, i+1] of the recorder's RGB frames), which is what GRPO would score with,
and 'stride1_own_colours' windows [i-1, i, i+1] in the recipe's channel order. Rerunning with the same
--workdir reuses the trained runs (they resume at their last step) and only re-evaluates.
Writes <workdir>/results.json.
"""

from __future__ import annotations

import json
import pathlib
import time

if __package__ in (None, ""):  # run as a file (python scripts/x.py): the checkout's root on sys.path
  import sys; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E702
from scripts._common import run  # noqa: E402
from absl import flags  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "outputs/idm_recipes", "output directory")
_STEPS = flags.DEFINE_integer("steps", 3000, "training steps per recipe (the demo: 3000)")
_BATCH = flags.DEFINE_integer("batch", 32, "batch size (the demo: 32)")
_EPISODES = flags.DEFINE_integer("episodes", 480, "toy episodes, 12.5 % held out (the demo: 96 + 384)")
_SEED = flags.DEFINE_integer("seed", 0, "data and training seed")
_RECIPES = flags.DEFINE_list("recipes", ["eva_jax", "authors"], "recipes of configs/idm.py")
_JITTER = flags.DEFINE_list("jitter", [], "recipes to run with colour jitter forced on (+jitter) "
                            "or off (-jitter) besides their default, e.g. 'authors'")


def _config(recipe: str, workdir: pathlib.Path, tfds_dir: pathlib.Path, jitter: bool | None):
  from configs.idm import get_config
  steps = _STEPS.value
  c = get_config(f"tiny,recipe={recipe}")
  every = max(steps // 4, 1)
  c.data.update(dict(root=str(workdir / "data"), tfds_dir=str(tfds_dir), norm_stats="dataset"))
  c.seed = _SEED.value
  c.model.image_size = (32, 32)
  c.augment.color_jitter = (recipe != "eva_jax") if jitter is None else jitter  # the demo: off
  c.train.update(dict(num_steps=steps, batch_size=_BATCH.value, checkpoint_every=every))
  c.eval.every = every
  c.optim.total_steps = steps
  if recipe == "eva_jax":
    c.optim.learning_rate = 3e-3  # the demo's (configs/demo.py idm.learning_rate)
  return c


def main(argv):
  del argv
  import numpy as np

  from eva_jax.data import idm_dataset, robotwin, toyworld
  from eva_jax.training import idm

  workdir = pathlib.Path(_WORKDIR.value)
  summary = toyworld.generate_dataset(workdir / "data", _EPISODES.value, seed=_SEED.value, size=64,
                                      n_frames=17, smooth_fraction=0.5, val_fraction=0.125, write_videos=False)
  splits = {"train": [], "val": []}
  for ep in summary["episodes"]:
    splits["val" if ep["split"] == "validation" else "train"].append(str(workdir / "data" / ep["hdf5"]))
  tfds_dir = workdir / "tfds"
  idm_dataset.build_idm_dataset(splits, tfds_dir, seed=_SEED.value)
  held_out = [robotwin.read_episode(p) for p in splits["val"]]
  true = np.concatenate([a for _, a in held_out])
  train_joints = np.concatenate([robotwin.read_jpeg_bytes(p)[1] for p in splits["train"]])
  const = float(np.abs(true - train_joints.mean(0)).mean())
  results = {"constant_predictor_mae": const, "train_episodes": len(splits["train"]),
             "held_out_episodes": len(splits["val"]), "steps": _STEPS.value, "batch": _BATCH.value,
             "seed": _SEED.value, "runs": {}}
  print(f"constant predictor: held-out MAE {const:.4f} ({len(splits['val'])} episodes)")
  runs = [(r, None) for r in _RECIPES.value]
  runs += [(r.lstrip("+-"), not r.startswith("-")) for r in _JITTER.value]
  for recipe, jitter in runs:
    name = recipe if jitter is None else f"{recipe}{'+' if jitter else '-'}jitter"
    cfg = _config(recipe, workdir, tfds_dir, jitter)
    reused = (workdir / name / "checkpoints" / str(_STEPS.value)).exists()
    t0 = time.time()
    idm.train_and_evaluate(cfg, workdir / name)
    seconds = time.time() - t0
    row = {"seconds": seconds, "reused_trained_run": reused, "color_jitter": bool(cfg.augment.color_jitter)}
    for which in ("final", "best"):
      model = idm.load_trained_idm(workdir / name, cfg, best=(which == "best"))
      transform, stride = idm.FrameTransform.from_config(cfg.data), int(cfg.data.stride)
      own = np.concatenate([idm.predict_episode(model, f, 0, transform, stride) for f, _ in held_out])
      rew = np.concatenate([idm.predict_episode(model, f, 0) for f, _ in held_out])
      # The reward's stride with the recipe's colours: separates the stride from the channel order.
      mid = np.concatenate([idm.predict_episode(model, f, 0, transform, 1) for f, _ in held_out])
      row[which] = {"own_mae": float(np.abs(own - true).mean()), "reward_mae": float(np.abs(rew - true).mean()),
                    "stride1_own_colours_mae": float(np.abs(mid - true).mean())}
    row["ratio_own_final"] = row["final"]["own_mae"] / const
    results["runs"][name] = row
    f, b = row["final"], row["best"]
    print(f"{name}: {seconds:.0f} s; final own {f['own_mae']:.4f} reward {f['reward_mae']:.4f} stride-1 own colours "
          f"{f['stride1_own_colours_mae']:.4f}; best own {b['own_mae']:.4f} reward {b['reward_mae']:.4f} "
          f"(constant {const:.4f})")
    (workdir / "results.json").write_text(json.dumps(results, indent=2))


def cli(argv=None):
  run(main, argv)


if __name__ == "__main__":
  cli()
