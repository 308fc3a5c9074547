"""Flow-GRPO post-training of the Wan I2V DiT with EVA's IDM smoothness reward.

  python scripts/train_grpo.py --config=configs/grpo.py --config.reward.idm_checkpoint=/path/IDM_singleview.pt \
      --config.model.checkpoint=outputs/<sft run>/checkpoints
  python scripts/train_grpo.py --config=configs/grpo.py:tiny --config.reward.idm_checkpoint=<tiny IDM ckpt>

Defaults are EVA's recipe (spec/eva.md D.1): LoRA r=32/α=32 on q,k,v,o,k_img,v_img; 8 rollouts per
first frame; 40 SDE steps ('eva' noise schedule), 39 trained; 4 inner epochs; clip range 1e-5;
β_KL 0.004; AdamW lr 2e-4, betas (0.9, 0.999), wd 1e-4, grad-norm clip 1.0; no CFG in RL.
`tiny` is the CPU smoke variant (tiny DiT/VAE/IDM, 3 latent frames of 4×4, 4 steps).
"""

from __future__ import annotations

import ml_collections

from configs.common import mesh_config, parse_arg
from eva_jax.rl.reward import piper_aloha


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, variant="14b")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_iterations = 100                  # EVA num_epochs (one rollout batch each)

  # The policy: Wan I2V DiT + LoRA; the frozen base comes from the SFT checkpoint (orbax dir).
  c.model = ml_collections.ConfigDict(dict(
      preset="i2v-14b", checkpoint="", dtype="bfloat16", param_dtype="bfloat16", attention="auto",
      remat="full", lora_rank=32, lora_alpha=32.0, num_layers=0,    # num_layers 0 = the preset's
      sharded_init=True,    # init inside jit with out_shardings (no device holds all 14B); False: eager
      precision="wan"))     # 'eva': EVA's bf16 time embedding / modulation / residual (configs/sft.py)
  c.vae = ml_collections.ConfigDict(dict(preset="wan2.1", checkpoint=""))
  # CLIP of each rollout's first frame, fed to the rollout, ratio and KL passes (EVA's exp_flow_grpo.py):
  # 'online' (checkpoint: the Wan release's CLIP .pth or its converted dir) | 'zeros' (smoke runs only).
  c.clip = ml_collections.ConfigDict(dict(source="online", preset="vit-h-14", checkpoint="", dtype="bfloat16"))

  # Reward: EVA's IDM and smoothness constants (spec/eva.md C). The IDM checkpoint is required.
  sm = piper_aloha()
  c.reward = ml_collections.ConfigDict(dict(
      idm_checkpoint="", idm_preset="resnet50", idm_batch_size=0, fps=16.0,
      smoothness=dict(v_max=list(sm.v_max), a_max=list(sm.a_max), dim_weights=list(sm.dim_weights),
                      huber_factor=sm.huber_factor, w_jerk=sm.w_jerk, w_acc=sm.w_acc, w_vlim=sm.w_vlim,
                      w_alim=sm.w_alim, p0=sm.p0, gamma=sm.gamma, r_max=sm.r_max)))

  # Rollouts: group_size rollouts for each of num_prompts first frames per iteration.
  c.sample = ml_collections.ConfigDict(dict(
      num_steps=40, shift=3.0, group_size=8, num_prompts=1, latent_frames=13, latent_height=60,
      latent_width=80, sde_variant="eva", noise_level=0.7, eval_every=10,
      # False = EVA: the final latents are decoded as sampled; True puts the clean frame 0 back first
      # (the IDM then sees the observed frame; the tiny/demo runs keep it).
      decode_clean_first=False,
      # The DiT's cross-attention K/V (512 text + 257 CLIP tokens) once per rollout instead of at each of
      # the num_steps steps: the same rollouts (tests/test_fusions.py). Measured on the demo's toy DiT
      # (2 cores): 1.89 s per rollout batch against 1.98 s; the update, whose K/V carry LoRA gradients,
      # recomputes them per timestep (hoisting them there with their VJP gave 7.65 s against 7.7 s).
      cache_context_kv=True))

  c.train = ml_collections.ConfigDict(dict(
      timestep_fraction=0.99, num_inner_epochs=4, micro_batch=0, accum_micro=0, clip_range=1e-5,
      adv_clip=5.0, beta=0.004, per_prompt_stat_tracking=True, global_std=False))
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=2e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4,
      schedule="constant", warmup_steps=0, total_steps=0, grad_clip_norm=1.0, grad_clip_value=0.0, accumulate_steps=1))

  # First frames and their conditioning. kind 'csv': an EVA metadata CSV, with
  #   start 'random' (EVA): each iteration a random training record, and each of its group_size rollouts
  #     starts from frame 0 of its own random temporal cut + RandomResizedCrop (aug_scale, aug_ratio),
  #     as an SFT clip is loaded (eva_jax/data/conditions.py RolloutStarts);
  #   start 'cycle': frame 0 of the first num_conditions rows in turn, centre-cropped (evaluation, demo).
  # Frames are VAE-encoded; text from prompt_embed_path (text_source 'cached') or SFT's per-caption
  # Gaussian stand-in ('synthetic'); CLIP per config.clip.
  # kind 'synthetic': seeded random latents / text / CLIP features (smoke runs and benchmarks).
  c.data = ml_collections.ConfigDict(dict(
      kind="csv", start="random", data_root="", metadata_path="robotwin_videos.csv", split="training",
      text_source="cached", num_conditions=8, text_tokens=512, fps=16.0, trim_mode="random_cut",
      pad_mode="slowdown", aug_scale=(0.8, 1.0), aug_ratio=(0.98, 1.02), camera="head_camera"))

  c.mesh = mesh_config(data=-1)
  c.log = ml_collections.ConfigDict(dict(
      checkpoint_every=10, keep_checkpoints=3, video_every=10, plot_every=10, num_videos=2))

  # Resolution: '14b' is the inference repo's 480x640 (RobbinW/EVA video_base.yaml); '14b_832' the
  # 480x832 of the training fork that ran SFT and GRPO (RobbinW/large-video-planner video_base.yaml),
  # at which the released IDM was also evaluated (832x480 crops). docs/grpo.md, "Resolution".
  if arg.variant == "14b_832":
    c.sample.update(dict(latent_height=60, latent_width=104))
  elif arg.variant == "tiny":
    c.num_iterations = 3
    c.clip.source = "zeros"
    c.sample.decode_clean_first = True
    c.model.update(dict(preset="tiny-i2v", dtype="float32", param_dtype="float32", attention="xla",
                        remat="none", lora_rank=4, lora_alpha=4.0, sharded_init=False))
    c.vae.preset = "tiny"
    c.reward.idm_preset = "tiny"
    c.sample.update(dict(num_steps=4, group_size=4, num_prompts=2, latent_frames=3, latent_height=4,
                         latent_width=4, eval_every=2))
    c.train.num_inner_epochs = 2
    c.optim.learning_rate = 1e-3
    c.data.update(dict(kind="synthetic", text_source="synthetic", num_conditions=4, text_tokens=16))
    c.log.update(dict(checkpoint_every=1, video_every=2, plot_every=2, num_videos=1))
  elif arg.variant != "14b":
    raise ValueError(f"configs/grpo.py: unknown variant {arg.variant!r}; choose '14b', '14b_832' or 'tiny'")
  return c
