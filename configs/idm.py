"""Inverse dynamics model (IDM) training and evaluation on RoboTwin HDF5 episodes.

  python scripts/train_idm.py --config=configs/idm.py --config.data.root=$ROBOTWIN/data/click_bell/demo_clean_vidar \
      --config.init.kind=imagenet --config.init.path=resnet50-11ad3fa6.pth
  python scripts/train_idm.py --config=configs/idm.py:tiny --config.data.root=<toy episodes> --workdir=outputs/idm_tiny
  python scripts/eval_idm.py --config=configs/idm.py --config.eval.checkpoint=IDM_singleview.pt \
      --config.data.root=$ROBOTWIN/data/click_bell/demo_clean_vidar

Defaults ('resnet50'): the released architecture (ResNet-50, 9-channel stem, 512x512 input), windows
[i-1, i, i+1] of the head camera, AnyPos mean/std for the targets, progress-scheduled colour jitter
(spec/eva.md B), SmoothL1 on normalised joints, AdamW with warm-up and cosine decay over 200k steps
(the authors' run was 200k steps; their LR and batch size are not known). 'tiny' is the CPU smoke
variant: the tiny IDM (32 px, see below) on a handful of steps.
"""

from __future__ import annotations

import ml_collections

from configs.common import mesh_config, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, variant="resnet50")
  c = ml_collections.ConfigDict()
  c.seed = 0

  # eva_jax.models.idm.idm_config(preset) + numerics. bfloat16 compute on GPU/TPU.
  c.model = ml_collections.ConfigDict(dict(
      preset="resnet50", image_size=(512, 512), dtype="float32", param_dtype="float32",
      blocks=(), width=0,       # non-empty / non-zero: override the preset's depth / width
      mlp_dims=()))             # (h1, h2): override the preset's MLP head widths
  # 'random' | 'torch' (a .pt in the release layout, e.g. IDM_singleview.pt, to fine-tune) |
  # 'imagenet' (torchvision resnet50 .pth: trunk only, stem repeated over the 3 frames / 3, as the authors)
  c.init = ml_collections.ConfigDict(dict(kind="random", path=""))

  c.data = ml_collections.ConfigDict(dict(
      root="", pattern="**/episode*.hdf5", camera="head_camera",
      tfds_dir="",              # prepared array_record dataset; empty = <workdir>/tfds, built from root
      val_fraction=0.1, num_frames=3, stride=1, num_workers=8,
      norm_stats="model"))      # 'model' (AnyPos / checkpoint mean+std) | 'dataset' (train split)

  c.augment = ml_collections.ConfigDict(dict(
      color_jitter=True,
      brightness=((0.8, 1.2), (0.4, 1.6)), contrast=((0.7, 1.3), (0.7, 1.7)),
      saturation=((0.5, 1.5), (0.5, 2.0)), hue=(0.05, 0.10),
      flip_prob=0.0))           # left/right flip: swaps the arms, negates dims 0,4,5,7,11,12

  c.loss = ml_collections.ConfigDict(dict(kind="smooth_l1", beta=0.05))  # on normalised joints

  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4,
      schedule="cosine", warmup_steps=2000, total_steps=200_000, grad_clip_norm=1.0,
      grad_clip_value=0.0, accumulate_steps=1))

  c.train = ml_collections.ConfigDict(dict(
      batch_size=64, num_steps=200_000, log_every=50, checkpoint_every=5000, keep_checkpoints=3,
      async_checkpoint=True, resume=True,
      stop_at=0))               # > 0: save and stop after this step (resume later with the same workdir)

  # Validation during training (val_mae selects best/) and the episode evaluation of eval_idm.py.
  c.eval = ml_collections.ConfigDict(dict(
      every=5000, batch_size=64, max_batches=0,
      checkpoint="",            # eval_idm: a .pt (release layout) or a train_idm run / checkpoints dir
      episodes="",              # eval_idm: comma-separated HDF5 files; empty = validation episodes of root
      max_episodes=0, max_plots=20, fps=16.0, idm_batch_size=64))

  c.mesh = mesh_config(data=-1)

  if arg.variant == "tiny":
    # Sized on the toy world (eva_jax.data.toyworld, 32 px frames; docs/demo.md "IDM"): the input at
    # 32 px, two stages (a 4x4 map for the spatial softmax), width 16 and a wider MLP head learn the
    # joints faster per second on 2 CPU cores than the preset's four stages on frames upsampled to 128.
    c.model.update(dict(preset="tiny", image_size=(32, 32), blocks=(1, 1), width=16, mlp_dims=(256, 128)))
    c.data.update(dict(num_workers=0, val_fraction=0.25))
    c.optim.update(dict(learning_rate=3e-3, warmup_steps=2, total_steps=40, weight_decay=0.0))
    c.train.update(dict(batch_size=8, num_steps=40, log_every=5, checkpoint_every=10,
                        async_checkpoint=False))
    c.eval.update(dict(every=20, batch_size=8, max_plots=2, idm_batch_size=0))
  elif arg.variant != "resnet50":
    raise ValueError(f"configs/idm.py: unknown variant {arg.variant!r}; choose 'resnet50' or 'tiny'")
  return c
