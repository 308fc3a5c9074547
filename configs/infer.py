"""EVA inference (the original README's `experiment=exp_inference dataset=image_csv` run).

  python scripts/infer.py --config=configs/infer.py \\
      --config.data.data_root=data/test_images --config.data.metadata_path=metadata.csv \\
      --config.ckpt.wan_dir=data/ckpts/Wan2.1-I2V-14B-480P \\
      --config.ckpt.tuned=data/ckpts/eva_i2v_14B.ckpt \\
      --config.sampler.hist_guidance=1.5 --config.sampler.lang_guidance=2.5
  python scripts/infer.py --config=configs/infer.py:tiny      # random tiny models, CPU, seconds

Variants: 'eva' (default: Wan2.1-I2V-14B at 49x480x640, bf16, attention "auto": cuDNN on GPU, splash on TPU) and 'tiny'.
`ckpt.wan_dir` fills the per-model paths it finds (diffusion model shards, VAE, CLIP, umT5, tokenizer)
unless they are given. Videos land in outputs/<date>/<time>/videos/*.mp4 at 16 fps. See docs/inference.md.
"""

from __future__ import annotations

import ml_collections

from configs.common import check_variant, mesh_config, parse_arg

VARIANTS = ("eva", "tiny")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, variant="eva")
  variant = check_variant(arg.variant, VARIANTS)
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.seed = 0
  c.output_root = "outputs"
  c.fps = 16

  # The image_csv (spec/eva.md F.2): image_path,height,width,fps,n_frames,caption.
  # resize: 'stretch' = EVA's image_csv transform (Resize((H, W)), bicubic); 'crop' / 'pad' keep the aspect.
  c.data = ml_collections.ConfigDict(dict(data_root="data/test_images", metadata_path="metadata.csv",
                                          batch_size=1, limit=0, resize="stretch"))  # limit 0 = every row

  # Sampling (EVA: UniPC, 40 steps, shift 3 applied twice, README guidance 1.5 / 2.5).
  c.sampler = ml_collections.ConfigDict(dict(
      num_frames=49, height=480, width=640, num_steps=40, shift=3.0, double_shift=True, solver="unipc",
      lang_guidance=2.5, hist_guidance=1.5, hist_len=1,
      cache_context_kv=True))        # cross-attention K/V once per video (same output; False recomputes per step)
  c.neg_prompt = ""                  # EVA's negative prompt is the empty string
  c.neg_prompt_embed_path = ""       # with cached prompt embeddings (CSV column prompt_embed_path)

  # Model presets and precision.
  c.model = ml_collections.ConfigDict(dict(dit="i2v-14b", vae="wan2.1", clip="vit-h-14", umt5="umt5-xxl",
                                           dtype="bfloat16", param_dtype="bfloat16", attention="auto"))
  # 'wan': Wan's float32 time embedding / modulation / residual; 'eva': EVA's bf16 regime (docs/models.md)
  c.model.precision = "wan"
  c.model.dit_overrides = ml_collections.ConfigDict()  # extra WanConfig fields (e.g. remat, attn_chunk_size)

  # Weights: '' = not given; orbax directories or PyTorch files (converted on the fly).
  c.ckpt = ml_collections.ConfigDict(dict(
      wan_dir="",        # Wan2.1-I2V-14B-480P directory: fills the empty entries below
      dit="",            # base DiT (diffusion_pytorch_model*.safetensors dir, or orbax)
      tuned="",          # EVA's tuned_ckpt_path (Lightning .ckpt, 'model.' prefix) -> replaces the DiT
      vae="", clip="", umt5="", tokenizer="",
      lora="",           # a GRPO LoRA adapter directory (PEFT layout: lora_adapter/ or best_reward/), merged in
      random_init=False))

  c.use_mesh = True
  c.mesh = mesh_config()             # batch over ('data', 'fsdp'); parameters by their logical names

  if variant == "tiny":
    c.data.data_root = ""
    c.data.metadata_path = ""        # empty: a rendered toy-world frame is used
    c.sampler.update(num_frames=9, height=32, width=48, num_steps=6)
    c.model.update(dit="tiny-i2v", vae="tiny", clip="tiny", umt5="tiny", dtype="float32",
                   param_dtype="float32", attention="xla")
    c.model.dit_overrides = ml_collections.ConfigDict(dict(text_dim=32, image_dim=32))  # tiny umT5 / CLIP widths
    c.ckpt.random_init = True
    c.use_mesh = False
  return c
