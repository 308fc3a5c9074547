"""Inverse dynamics model (IDM) training and evaluation on RoboTwin HDF5 episodes.

  python scripts/train_idm.py --config=configs/idm.py --config.data.root=$ROBOTWIN/data \
      --config.init.path=resnet50-11ad3fa6.pth            # recipe 'authors' (default): ImageNet start
  python scripts/train_idm.py --config=configs/idm.py:recipe=eva_jax --config.data.root=<episodes>
  python scripts/train_idm.py --config=configs/idm.py:tiny --config.data.root=<toy episodes> --workdir=outputs/idm_tiny
  python scripts/eval_idm.py --config=configs/idm.py --config.eval.checkpoint=IDM_singleview.pt \
      --config.data.root=$ROBOTWIN/data_test

Variants: 'resnet50' (the released architecture: ResNet-50, 9-channel stem, 512x512 input) and 'tiny'
(the CPU smoke variant: the tiny IDM at 32 px on a handful of steps, sized for the toy world).

Recipes (`RECIPES`, chosen with `:recipe=...`; the field `recipe` only records the choice):
- 'authors', the default of 'resnet50': the authors' RoboTwin dataset and trainer (spec/eva_fidelity_rl.md
  points 1c, 2 and mismatches 4-5): windows [t-2, t, t+2], centre crop to 832:480 + bicubic resize to
  832x480, R<->B-swapped frames, colour jitter drawn per frame at fixed ranges, ImageNet ResNet-50
  start (init.path required: docs/idm.md says how to get the file), SmoothL1 beta 1 on normalised
  joints, AdamW with torch's defaults (lr 1e-3, wd 1e-2), 10% warm-up then cosine, no clipping, and a
  5% frame-level validation split capped at 10,000 frames.
- 'eva_jax', the default of 'tiny' (so of the demo): windows [i-1, i, i+1] like the reward scores, no
  crop, the recorder's RGB, one jitter draw per window with ranges that widen with progress, random
  start, SmoothL1 beta 0.05, AdamW lr 1e-4 / wd 1e-4, 2k warm-up steps, clip 1.0, a 10% episode split.
200k steps for both (the authors' released run); their batch size is not known.
"""

from __future__ import annotations

import ml_collections

from configs.common import mesh_config, parse_arg


# Fields each recipe sets (dotted paths into the config below); command-line overrides come after.
RECIPES = {
    "authors": {
        "init.kind": "imagenet",                   # V-resnet: resnet50(ResNet50_Weights.DEFAULT), stem / 3
        "data.stride": 2,                          # V-ds: [t-2, t, t+2], clamped to the episode
        "data.crop_and_resize": True,              # V-ds _decode_image: 832:480 crop, INTER_CUBIC 832x480
        "data.channel_order": "bgr_swapped",       # V-ds: cvtColor(BGR2RGB) of an RGB-stored frame
        "data.split": "frames", "data.val_fraction": 0.05, "data.val_max_frames": 10_000,  # random_split
        "augment.per_frame": True, "augment.ramp": False,  # ColorJitter per process_image call, progress 0
        "loss.beta": 1.0,                          # nn.SmoothL1Loss()
        # AdamW(net.parameters()): torch defaults; LambdaLR 10% linear warm-up, cosine to 0; no clipping
        "optim.learning_rate": 1e-3, "optim.weight_decay": 1e-2, "optim.b1": 0.9, "optim.b2": 0.999,
        "optim.eps": 1e-8, "optim.warmup_steps": 0, "optim.warmup_fraction": 0.1,
        "optim.grad_clip_norm": 0.0,
    },
    "eva_jax": {
        "init.kind": "random",
        "data.stride": 1, "data.crop_and_resize": False, "data.channel_order": "rgb",
        "data.split": "episodes", "data.val_fraction": 0.1, "data.val_max_frames": 0,
        "augment.per_frame": False, "augment.ramp": True,
        "loss.beta": 0.05,
        "optim.learning_rate": 1e-4, "optim.weight_decay": 1e-4, "optim.b1": 0.9, "optim.b2": 0.999,
        "optim.eps": 1e-8, "optim.warmup_steps": 2000, "optim.warmup_fraction": 0.0,
        "optim.grad_clip_norm": 1.0,
    },
}


def apply_recipe(c: ml_collections.ConfigDict, name: str) -> None:
  if name not in RECIPES:
    raise ValueError(f"configs/idm.py: unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
  for path, value in RECIPES[name].items():
    node = c
    *parents, leaf = path.split(".")
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise KeyError(f"configs/idm.py: recipe {name!r} sets {path!r}, which the config does not have")
    node[leaf] = value
  c.recipe = name


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, variant="resnet50", recipe="")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.recipe = ""             # set by the config argument (configs/idm.py:recipe=...); informational

  # eva_jax.models.idm.idm_config(preset) + numerics. bfloat16 compute on GPU/TPU.
  c.model = ml_collections.ConfigDict(dict(
      preset="resnet50", image_size=(512, 512), dtype="float32", param_dtype="float32",
      blocks=(), width=0,       # non-empty / non-zero: override the preset's depth / width
      mlp_dims=()))             # (h1, h2): override the preset's MLP head widths
  # 'random' | 'torch' (a .pt in the release layout, e.g. IDM_singleview.pt, to fine-tune) |
  # 'imagenet' (a torchvision resnet50 state dict .pth: trunk only, stem repeated over the 3 frames / 3)
  c.init = ml_collections.ConfigDict(dict(kind="random", path=""))

  c.data = ml_collections.ConfigDict(dict(
      root="", pattern="**/episode*.hdf5", camera="head_camera",
      tfds_dir="",              # prepared array_record dataset; empty = <workdir>/tfds, built from root
      num_frames=3,
      stride=1,                 # window [i - stride, i, i + stride] (the reward always scores stride 1)
      crop_and_resize=False,    # centre crop to 832:480 + bicubic resize to 832x480 (on device)
      channel_order="rgb",      # 'rgb' (the recorder's colours) | 'bgr_swapped' (the authors' frames)
      split="episodes",         # 'episodes' (held-out episodes) | 'frames' (random frames of 'train')
      val_fraction=0.1,         # of the episodes ('episodes') or of the frames ('frames')
      val_max_frames=0,         # 'frames': at most this many validation frames (0 = no cap)
      num_workers=8,
      skip_corrupt_episodes=False,  # True: an unreadable episode is left out of the built dataset with a
                                    # warning (count: metric skipped_episodes); False: the build stops on it
      norm_stats="model"))      # 'model' (AnyPos / checkpoint mean+std) | 'dataset' (train split)

  # Colour jitter ranges at progress 0 and at progress 1. ramp: widen linearly with training progress
  # (False: the progress-0 ranges throughout). per_frame: an independent draw for every frame of a
  # window (False: one draw per window).
  c.augment = ml_collections.ConfigDict(dict(
      color_jitter=True,
      brightness=((0.8, 1.2), (0.4, 1.6)), contrast=((0.7, 1.3), (0.7, 1.7)),
      saturation=((0.5, 1.5), (0.5, 2.0)), hue=(0.05, 0.10),
      ramp=True, per_frame=False,
      flip_prob=0.0))           # left/right flip: swaps the arms, negates dims 0,4,5,7,11,12

  c.loss = ml_collections.ConfigDict(dict(kind="smooth_l1", beta=0.05))  # on normalised joints

  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4,
      schedule="cosine", warmup_steps=2000, warmup_fraction=0.0, total_steps=200_000,
      grad_clip_norm=1.0, grad_clip_value=0.0, accumulate_steps=1))

  c.train = ml_collections.ConfigDict(dict(
      batch_size=64, num_steps=200_000, log_every=50, checkpoint_every=5000, keep_checkpoints=3,
      async_checkpoint=True, resume=True,
      stop_at=0))               # > 0: save and stop after this step (resume later with the same workdir)

  # Validation during training (val_mae selects best/) and the episode evaluation of eval_idm.py.
  c.eval = ml_collections.ConfigDict(dict(
      every=5000, batch_size=64, max_batches=0,
      checkpoint="",            # eval_idm: a .pt (release layout) or a train_idm run / checkpoints dir
      episodes="",              # eval_idm: comma-separated HDF5 files; empty = held-out episodes of root
      max_episodes=0, max_plots=20, fps=16.0, idm_batch_size=64))

  c.mesh = mesh_config(data=-1)

  if arg.variant not in ("resnet50", "tiny"):
    raise ValueError(f"configs/idm.py: unknown variant {arg.variant!r}; choose 'resnet50' or 'tiny'")
  recipe = arg.recipe or ("eva_jax" if arg.variant == "tiny" else "authors")
  apply_recipe(c, recipe)

  if arg.variant == "tiny":
    # Sized on the toy world (eva_jax.data.toyworld, 32 px frames; docs/demo.md "IDM"): the input at
    # 32 px, two stages (a 4x4 map for the spatial softmax), width 16 and a wider MLP head learn the
    # joints faster per second on 2 CPU cores than the preset's four stages on frames upsampled to 128.
    c.model.update(dict(preset="tiny", image_size=(32, 32), blocks=(1, 1), width=16, mlp_dims=(256, 128)))
    c.data.update(dict(num_workers=0))
    c.optim.update(dict(total_steps=40))
    if recipe == "eva_jax":
      c.data.val_fraction = 0.25
      c.optim.update(dict(learning_rate=3e-3, warmup_steps=2, weight_decay=0.0))
    else:
      # No ImageNet weights exist for the tiny trunk, and the toy world's square frames would lose
      # their top and bottom (the arms' bases) to the 832:480 crop: both are left out here.
      c.init.kind = "random"
      c.data.crop_and_resize = False
    c.train.update(dict(batch_size=8, num_steps=40, log_every=5, checkpoint_every=10,
                        async_checkpoint=False))
    c.eval.update(dict(every=20, batch_size=8, max_plots=2, idm_batch_size=0))
  return c
