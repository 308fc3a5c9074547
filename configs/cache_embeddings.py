"""Caching umT5 prompt embeddings (and optionally CLIP features / VAE latents of first frames).

  python scripts/cache_embeddings.py --config.data_root=$DATA/RoboTwin/data \
      --config.metadata_path=robotwin_videos.csv \
      --config.umt5.path=$CKPT/Wan2.1-I2V-14B-480P/models_t5_umt5-xxl-enc-bf16.pth \
      --config.umt5.tokenizer_path=$CKPT/Wan2.1-I2V-14B-480P/google/umt5-xxl
  # + --config.clip_features=True --config.clip.path=$CKPT/.../models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth
  # + --config.vae_latents=True --config.vae.path=$CKPT/.../Wan2.1_VAE.pth
  # + --config.video_latents=True (whole-clip latents for SFT's data.load_video_latent; config.video sets the window)
  python scripts/cache_embeddings.py --config=configs/cache_embeddings.py:tiny \
      --config.metadata_path=<toy data>/metadata.csv      # random tiny encoders, tokenizer from the captions

The EVA equivalent is `experiments/process_data.py:cache_prompt_embed`. Files go next to the videos as
`prompt_embeds/<video_path>.npy` (see eva_jax/data/embeddings.py); the CSV gains `prompt_embed_path`
(and `clip_embed_path`, `first_latent_path`) and is replaced atomically at the end; reruns resume.
Model weights: init 'torch' (Wan .pth / HF safetensors, converted on the fly), 'orbax' (the output of
`python -m convert --kind umt5|clip|vae`) or 'random' (smoke runs).
"""

from __future__ import annotations

import ml_collections

from configs.common import check_variant, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, variant="full")
  check_variant(arg.variant, ("full", "tiny"))
  c = ml_collections.ConfigDict()
  c.seed = 0                     # random init only
  c.data_root = ""               # CSV paths are relative to it; "" = the CSV's folder
  c.metadata_path = "robotwin_videos.csv"
  c.output_csv = ""              # "" = replace metadata_path in place (atomically)
  c.batch_size = 8
  c.overwrite = False            # re-encode rows whose files are already valid
  c.save_dtype = "float32"       # or float16 (half the disk)
  c.height, c.width = 480, 640   # first frames are centre-cropped/resized to this before CLIP / VAE
  c.camera = "head_camera"       # for RoboTwin .hdf5 rows

  c.prompts = True               # umT5 prompt embeddings (False: only the image / video caches below)
  c.umt5 = ml_collections.ConfigDict(dict(
      preset="umt5-xxl", init="torch", path="", tokenizer_path="", dtype="bfloat16",
      param_dtype="bfloat16", text_len=512))
  c.clip_features = False
  c.clip = ml_collections.ConfigDict(dict(
      preset="vit-h-14", init="torch", path="", dtype="bfloat16", param_dtype="bfloat16"))
  c.vae_latents = False          # first-frame latents (GRPO / inference conditioning)
  # Whole-clip latents, read as SFT reads clips (configs/sft.py data.*), without augmentation; a clip longer
  # than the window keeps one fixed window ('random_cut' seeded per row) or is resampled whole ('speedup').
  c.video_latents = False
  c.video = ml_collections.ConfigDict(dict(n_frames=49, fps=16.0, trim_mode="random_cut", pad_mode="slowdown"))
  c.vae = ml_collections.ConfigDict(dict(preset="wan2.1", init="torch", path="", dtype="float32",
                                         param_dtype="float32"))

  if arg.variant == "tiny":
    c.batch_size = 4
    c.height, c.width = 32, 32
    c.video.n_frames = 5
    c.umt5.update(preset="tiny", init="random", tokenizer_path="tiny", dtype="float32",
                  param_dtype="float32")
    c.clip.update(preset="tiny", init="random", dtype="float32", param_dtype="float32")
    c.vae.update(preset="tiny", init="random")
  return c
