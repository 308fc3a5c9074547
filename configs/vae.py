"""Training or fine-tuning the Wan 2.1 VAE on the videos of a metadata CSV (eva_jax.training.vae).

  python -m convert --kind vae --src Wan2.1_VAE.pth --out ckpt/vae
  python scripts/train_vae.py --config=configs/vae.py --workdir=outputs/vae \
      --config.data.data_root=$WORKSPACE/RoboTwin/data --config.init.path=ckpt/vae
  python scripts/train_vae.py --config=configs/vae.py:tiny --config.data.data_root=<toy data>

Default ('wan2.1'): fine-tunes the released VAE (init.path: the converter's orbax directory, or an
earlier VAE run) on random 17-frame windows, 256 px crops of 480x640 frames; L1 reconstruction plus a
small KL to N(0, 1) in the normalised latent space; AdamW 1e-5. Validation reconstructs whole
n_frames clips at full size with the streaming encode/decode that SFT and GRPO use. The original
EVA does not train the VAE, so these values are a starting point, not a known recipe.
'tiny' fits the tiny VAE from scratch to small toy frames (the built-in demo's vae stage): 17-frame
windows, 32 px crops of 64 px frames, validation on 33-frame clips.

Training clips: `data.train_frames` consecutive frames (1 + 4k) of each video at `data.fps`, cut at
a random start, resized to height x width, then a random `data.crop_size` square crop on device (0 =
no crop). The VAE is causal and convolutional, so short windows and crops train the same weights
that encode full clips, at a fraction of the cost.
"""

from __future__ import annotations

import ml_collections

from configs.common import mesh_config, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, variant="wan2.1")
  c = ml_collections.ConfigDict()
  c.seed = 0

  # eva_jax.models.vae.vae_config(preset) and its numerics (the reference runs the VAE in float32).
  c.vae = ml_collections.ConfigDict(dict(preset="wan2.1", dtype="float32", param_dtype="float32"))
  # Initial weights: an orbax directory (`python -m convert --kind vae` output, or a VAE run / its
  # checkpoints dir, whose 'params' are taken); empty = random init (seeded).
  c.init = ml_collections.ConfigDict(dict(path=""))

  # The CSV's videos (eva_jax.data.metadata / video_dataset). The validation split is the CSV's
  # `split` column when present, else the last test_percentage of a seeded shuffle (as SFT).
  c.data = ml_collections.ConfigDict(dict(
      data_root="", metadata_path="robotwin_videos.csv", test_percentage=0.01,
      height=480, width=640, fps=16.0,
      n_frames=49,              # validation clip length (1 + 4k), what SFT / GRPO encode
      train_frames=17,          # training window (1 + 4k); 0 = n_frames
      crop_size=256,            # random square crop of the training clips, multiple of 8; 0 = off
      trim_mode="random_cut", pad_mode="slowdown",
      augment=False, aug_scale=(0.8, 1.0), aug_ratio=(0.98, 1.02), random_flip=0.0,
      camera="head_camera", num_workers=4,
      filtering=dict(n_frames=(0, 2000), fps=(0, 100))))

  # recon: 'l1' | 'mse' on [-1, 1] pixels; kl_weight times the mean KL per latent element;
  # sample_posterior: decode z ~ q(z|x) (False: its mean, a plain autoencoder).
  c.loss = ml_collections.ConfigDict(dict(recon="l1", kl_weight=1e-6, sample_posterior=True))

  # eva_jax.training.optim; total_steps 0 = train.num_steps (for 'cosine').
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
      schedule="constant_with_warmup", warmup_steps=100, total_steps=0, grad_clip_norm=1.0,
      grad_clip_value=0.0, accumulate_steps=1))

  c.train = ml_collections.ConfigDict(dict(
      batch_size=8, num_steps=10_000, log_every=10, checkpoint_every=500, keep_checkpoints=3,
      async_checkpoint=True, resume=True,
      stop_at=0))               # > 0: save and stop after this step (resume later with the same workdir)

  # Validation (val_mse selects best/): num_batches batches of whole clips, also before step 1.
  c.eval = ml_collections.ConfigDict(dict(every=500, num_batches=4, batch_size=8))

  c.mesh = mesh_config(data=-1)

  if arg.variant == "tiny":
    c.vae.preset = "tiny"
    # 17-frame windows: with 9 (the shortest in which a chunk follows a chunk) the causal context of
    # frames beyond the window drifts (toy val MSE 0.017 on frames 1-8 vs 0.050 on 17-32 after 1200
    # steps); 17 keeps all 33 frames alike. 32 px crops learn faster per step than longer windows of
    # smaller crops. MSE, a deterministic latent and a constant rate learn fastest in a few hundred
    # steps (300 steps, val MSE: 0.036 here; 0.048 with 9-frame windows; 0.055 with a cosine decay;
    # 0.08-0.10 with L1, a sampled posterior or 5-frame windows).
    c.data.update(dict(height=64, width=64, n_frames=33, train_frames=17, crop_size=32, num_workers=0,
                       test_percentage=0.2))
    c.loss.update(dict(recon="mse", kl_weight=1e-4, sample_posterior=False))
    c.optim.update(dict(learning_rate=1e-3, warmup_steps=10))
    c.train.update(dict(num_steps=300, log_every=25, checkpoint_every=100, async_checkpoint=False))
    c.eval.update(dict(every=100, num_batches=2))
  elif arg.variant != "wan2.1":
    raise ValueError(f"configs/vae.py: unknown variant {arg.variant!r}; choose 'wan2.1' or 'tiny'")
  return c
