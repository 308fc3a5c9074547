"""Supervised fine-tuning of the Wan 2.1 I2V DiT on RoboTwin videos (EVA's SFT stage).

  python scripts/prepare_robotwin.py --root=$WORKSPACE/RoboTwin/data
  python scripts/cache_embeddings.py ...            # prompt_embed_path (+ optional latents / CLIP)
  python scripts/train_sft.py --config=configs/sft.py --workdir=outputs/sft \
      --config.data.data_root=$WORKSPACE/RoboTwin/data --config.init.path=<converted LVP-14B orbax dir>
  python scripts/train_sft.py --config=configs/sft.py:tiny --config.data.data_root=<toy data>

Defaults are EVA's recipe (spec eva.md A.5): AdamW lr 8e-6, betas (0.9, 0.95), wd 0.05, constant with
100 warm-up steps, clip by value 1.0, 4-step accumulation, full remat, bf16 compute over float32
master weights, FSDP over all devices, 'rand_history' timesteps (hist 1|2 w.p. 0.9|0.1, clean
history 0.7, shift 3), 49 frames 480x640 at 16 fps, initialised from LVP-14B.
'tiny' is the CPU smoke variant (tiny DiT and VAE, 5 frames of 32x32, synthetic conditioning).
"""

from __future__ import annotations

import ml_collections

from configs.common import mesh_config, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, variant="14b")
  c = ml_collections.ConfigDict()
  c.seed = 0

  # The DiT: a WanConfig preset plus how to run it. param_dtype float32 = master weights.
  c.model = ml_collections.ConfigDict(dict(
      preset="i2v-14b", dtype="bfloat16", param_dtype="float32", attention="auto", remat="full",
      scan_layers=True, num_layers=0))                        # num_layers 0 = the preset's
  # precision 'wan' (default): Wan's float32 time embedding, modulation and residual; 'eva': those in
  # model.dtype and the VAE's latent statistics in bf16, as EVA's fork runs (docs/models.md).
  c.model.precision = "wan"
  # Initial weights: 'random' | 'orbax' (a converted checkpoint or an SFT run dir) | 'torch' (a
  # Wan/LVP/EVA .safetensors/.ckpt file or directory, converted on the fly).
  c.init = ml_collections.ConfigDict(dict(kind="random", path="", use_ema=False))

  # Online encoders for what the CSV does not cache.
  c.vae = ml_collections.ConfigDict(dict(preset="wan2.1", checkpoint=""))
  # text: 'cached' (the CSV's umT5 embeddings) | 'synthetic' (smoke runs).
  # clip: 'online' = EVA's: the frozen CLIP ViT-H/14 (clip.checkpoint: the Wan release's
  # models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth or its converted orbax dir) on frame 0 of every
  # training clip after its random cut and crop; 'cached' (data.load_clip_embed); 'zeros' (smoke runs only).
  c.text = ml_collections.ConfigDict(dict(source="cached"))
  c.clip = ml_collections.ConfigDict(dict(source="online", preset="vit-h-14", checkpoint="", dtype="bfloat16"))

  c.data = ml_collections.ConfigDict(dict(
      data_root="", metadata_path="robotwin_videos.csv", test_percentage=0.01,
      height=480, width=640, n_frames=49, fps=16.0, trim_mode="random_cut", pad_mode="slowdown",
      augment=True, aug_scale=(0.8, 1.0), aug_ratio=(0.98, 1.02), random_flip=0.0,
      camera="head_camera", load_prompt_embed=True, max_text_tokens=512, load_video_latent=False,
      load_clip_embed=False, num_workers=4,
      filtering=dict(n_frames=(0, 2000), fps=(0, 100))))

  c.diffusion = ml_collections.ConfigDict(dict(
      mode="rand_history", hist_len_choices=(1, 2), hist_len_probs=(0.9, 0.1), clean_hist_prob=0.7,
      shift=3.0))

  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=8e-6, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05,
      schedule="constant_with_warmup", warmup_steps=100, total_steps=0, grad_clip_norm=0.0,
      grad_clip_value=1.0, accumulate_steps=4))

  c.train = ml_collections.ConfigDict(dict(
      # batch_size is GLOBAL (all devices and hosts together), per micro-step. EVA's is 2 per GPU
      # (exp_video.yaml) on 8 GPUs = 16, with accumulate_steps 4: an effective batch of 64.
      batch_size=16, num_steps=10000, ema_decay=0.0, log_every=10, checkpoint_every=500,
      keep_checkpoints=3, async_checkpoint=True, resume=True))
  # Validation: loss on the held-out split with fixed noise (the metric for best/), and sampled
  # mp4s from the first frames when the sampler is available (sample_every 0 = off).
  c.eval = ml_collections.ConfigDict(dict(
      every=500, num_batches=4, batch_size=8, sample_every=0, num_videos=2, sample_steps=40))

  c.mesh = mesh_config(data=1, fsdp=-1)

  # Resolution: '14b' = the inference repo's 480x640; '14b_832' = the training fork's 480x832
  # (RobbinW/large-video-planner video_base.yaml; its prepare_embeds requires that size).
  # 'lvp_history': the training fork's diffusion-forcing history (lengths 1..6 with p 0.5, 0.1 x 5;
  # clean history with p 0.5; LVP wan_t2v.py / wan_t2v.yaml) instead of the EVA repo's {1, 2}, 0.7.
  if arg.variant == "14b_832":
    c.data.update(dict(height=480, width=832))
  elif arg.variant == "lvp_history":
    c.diffusion.update(dict(hist_len_choices=(1, 2, 3, 4, 5, 6), hist_len_probs=(0.5, 0.1, 0.1, 0.1, 0.1, 0.1),
                            clean_hist_prob=0.5))
  elif arg.variant == "tiny":
    c.model.update(dict(preset="tiny-i2v", dtype="float32", attention="xla", remat="none"))
    c.vae.preset = "tiny"
    c.text.source = "synthetic"
    c.clip.source = "zeros"   # smoke runs and the toy-world demo: no CLIP weights (docs/demo.md)
    c.data.update(dict(height=32, width=32, n_frames=5, load_prompt_embed=False, max_text_tokens=16,
                       num_workers=0, test_percentage=0.2))
    c.optim.update(dict(learning_rate=1e-3, warmup_steps=2, accumulate_steps=1))
    c.train.update(dict(batch_size=8, num_steps=20, log_every=5, checkpoint_every=10,
                        async_checkpoint=False))
    c.eval.update(dict(every=10, num_batches=1, batch_size=8))
  elif arg.variant != "14b":
    raise ValueError(f"configs/sft.py: unknown variant {arg.variant!r}; choose '14b', '14b_832', "
                     "'lvp_history' or 'tiny'")
  return c
