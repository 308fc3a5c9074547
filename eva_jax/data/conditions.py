"""What GRPO rollouts are conditioned on: clean first-frame latents, text contexts and CLIP features.

  first, cond = synthetic_conditions(config, wan_cfg, ids)           # seeded stand-ins (smoke runs)
  first, cond = csv_conditions(config, wan_cfg, vae_gdef, vae_state)  # the first rows of a CSV, cycled
  starts = RolloutStarts(config, wan_cfg); recs, frames, texts = starts(it, rows)   # EVA's random starts

`first` is [N, 1, h, w, 16] (the VAE latent of frame 0), `cond` is {'context': [N, L, text_dim],
'clip_fea': [N, 257, image_dim]} ([N, 1, image_dim] for clip.source 'zeros': `zero_clip_features`).
`config` is configs/grpo.py's (`data`, `sample`, `seed`).
"""

from __future__ import annotations

import pathlib
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eva_jax.data.embeddings import load_prompt_embedding
from eva_jax.data.metadata import load_records
from eva_jax.models.wan import zero_clip_features


def synthetic_conditions(config, wan_cfg, index: jax.Array):
  """Seeded random conditioning for condition ids [N]: clean first latent, text, CLIP features."""
  s = config.sample
  key = jax.random.key(config.seed + 12345)

  def one(i):
    k1, k2, k3 = jax.random.split(jax.random.fold_in(key, i), 3)
    first = jax.random.normal(k1, (1, s.latent_height, s.latent_width, 16), jnp.float32)
    ctx = jax.random.normal(k2, (config.data.text_tokens, wan_cfg.text_dim), jnp.float32)
    clip = jax.random.normal(k3, (257, wan_cfg.image_dim), jnp.float32)
    return first, ctx, clip
  first, ctx, clip = jax.vmap(one)(index)
  return first, dict(context=ctx, clip_fea=clip)


def first_frame(path, height: int, width: int) -> np.ndarray:
  """Frame 0 of a video as [1, H, W, 3] in [-1, 1]: resize the short side, centre crop (as SFT)."""
  from PIL import Image

  from eva_jax.data.video import read_video
  frame = read_video(path, indices=[0])[0][0]                       # [H0, W0, 3] uint8
  h0, w0 = frame.shape[:2]
  scale = max(height / h0, width / w0)
  size = (max(width, round(w0 * scale)), max(height, round(h0 * scale)))
  img = np.asarray(Image.fromarray(frame).resize(size, Image.BICUBIC), np.float32)
  top, left = (img.shape[0] - height) // 2, (img.shape[1] - width) // 2
  img = img[top:top + height, left:left + width]
  return (img / 127.5 - 1.0)[None]


def caption_text(caption: str, text_tokens: int, text_dim: int) -> np.ndarray:
  """The fixed Gaussian text stand-in of a caption (seeded by its crc32), as SFT's text.source 'synthetic'."""
  rng = np.random.default_rng(zlib.crc32(str(caption).encode()))
  return rng.standard_normal((text_tokens, text_dim)).astype(np.float32)


def csv_conditions(config, wan_cfg, vae_gdef, vae_state, clip_encode=None) -> tuple[np.ndarray, dict]:
  """First frames and conditioning of the first `data.num_conditions` rows of an EVA metadata CSV.

  Frame 0 of each video is VAE-encoded to the clean history latent. Text: the cached umT5 embedding
  (`prompt_embed_path`, data.text_source 'cached'; .npy from scripts/cache_embeddings.py or EVA's .pt)
  or, for smoke runs, the fixed Gaussian embedding per caption that SFT's text.source='synthetic' uses.
  CLIP features: `clip_encode(frame [1, H, W, 3] in [-1, 1]) -> [1, 257, image_dim]` of the same first
  frame (EVA: the rollout, ratio and KL passes all see CLIP of frame 0), or one zero token without an
  encoder (clip.source 'zeros', smoke runs: `zero_clip_features`).
  """
  d, s = config.data, config.sample
  root = pathlib.Path(d.data_root)
  if d.text_source not in ("cached", "synthetic"):
    raise ValueError(f"data.text_source must be 'cached' or 'synthetic', got {d.text_source!r}")
  records = load_records(root, d.metadata_path, d.split)[: d.num_conditions]
  if len(records) < d.num_conditions:
    raise ValueError(f"{root / d.metadata_path}: split {d.split!r} has {len(records)} rows, "
                     f"data.num_conditions={d.num_conditions}")
  encode = jax.jit(lambda st, v: nnx.merge(vae_gdef, st).encode(v))
  firsts, texts, clips = [], [], []
  for rec in records:
    frame = first_frame(root / rec["video_path"], 8 * s.latent_height, 8 * s.latent_width)
    firsts.append(np.asarray(encode(vae_state, jnp.asarray(frame[None]))[0]))   # [1, h, w, 16]
    if clip_encode is not None:
      clips.append(np.asarray(clip_encode(jnp.asarray(frame)), np.float32)[0])
    if d.text_source == "cached":
      if not rec.get("prompt_embed_path"):
        raise ValueError(f"{root / d.metadata_path}: row {rec.get('video_path')!r} has no prompt_embed_path "
                         "(run scripts/cache_embeddings.py, or set data.text_source='synthetic')")
      texts.append(load_prompt_embedding(root / rec["prompt_embed_path"], d.text_tokens))
    else:
      texts.append(caption_text(rec.get("caption", ""), d.text_tokens, wan_cfg.text_dim))
  n = len(records)
  clip_fea = np.stack(clips) if clips else zero_clip_features(n, wan_cfg.image_dim)
  return np.stack(firsts), dict(context=np.stack(texts).astype(np.float32), clip_fea=clip_fea)


# MARK: EVA's rollout starts


class RolloutStarts:
  """Where EVA's GRPO rollouts start (RobbinW/large-video-planner experiments/exp_flow_grpo.py).

  Each iteration draws `sample.num_prompts` training records uniformly at random (EVA: 1 per epoch);
  every one of the `sample.group_size` rollouts of a record loads it on its own, with its own random
  temporal cut (trim_mode 'random_cut') and RandomResizedCrop (data.aug_scale 0.8–1.0, aspect within
  data.aug_ratio ±2 %, bicubic), exactly as an SFT training clip is loaded, and starts from frame 0 of
  that clip. So a group shares caption and episode, not the first frame. All draws are seeded by
  (seed, iteration[, rollout]), so a resumed run repeats an uninterrupted one; a host asks only for its
  own rows.
  """

  def __init__(self, config, wan_cfg):
    from eva_jax.data.video_dataset import ExampleLoader
    d, s = config.data, config.sample
    self.seed, self.group_size, self.num_prompts = int(config.seed), int(s.group_size), int(s.num_prompts)
    self.text_source, self.text_tokens, self.text_dim = d.text_source, int(d.text_tokens), wan_cfg.text_dim
    self.root = pathlib.Path(d.data_root)
    self.records = load_records(self.root, d.metadata_path, d.split)
    # the clip a rollout stands for: 4 (latent_frames - 1) + 1 frames at the reward's fps
    n_frames = 4 * (int(s.latent_frames) - 1) + 1
    self.loader = ExampleLoader(self.root, dict(
        height=8 * s.latent_height, width=8 * s.latent_width, n_frames=n_frames, fps=float(d.fps),
        trim_mode=d.trim_mode, pad_mode=d.pad_mode, augment=True, aug_scale=tuple(d.aug_scale),
        aug_ratio=tuple(d.aug_ratio), camera=d.camera, load_prompt_embed=False), train=True)

  def record_ids(self, iteration: int) -> np.ndarray:
    """[num_prompts] indices into the split's records drawn for this iteration."""
    rng = np.random.default_rng((self.seed, 7, iteration))
    return rng.integers(0, len(self.records), self.num_prompts)

  def rollout_rng(self, iteration: int, row: int) -> np.random.Generator:
    return np.random.default_rng((self.seed, 8, iteration, row))

  def __call__(self, iteration: int, rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(record index per row, first frames [len(rows), H, W, 3] in [-1, 1], text [len(rows), L, D])
    for batch rows `rows` (row r belongs to prompt r // group_size)."""
    ids = self.record_ids(iteration)
    rec_of = [int(ids[r // self.group_size]) for r in rows]
    frames = np.stack([self.loader.video(self.records[i], self.rollout_rng(iteration, r), first_frame_only=True)[0]
                       for r, i in zip(rows, rec_of)])
    texts = np.stack([self._text(self.records[i]) for i in rec_of])
    return np.asarray(rec_of), frames, texts

  def _text(self, rec) -> np.ndarray:
    if self.text_source == "cached":
      if not rec.get("prompt_embed_path"):
        raise ValueError(f"{self.root}: row {rec.get('row')} ({rec.get('video_path')!r}) has no prompt_embed_path "
                         "(run scripts/cache_embeddings.py, or set data.text_source='synthetic')")
      return load_prompt_embedding(self.root / rec["prompt_embed_path"], self.text_tokens)
    return caption_text(rec.get("caption", ""), self.text_tokens, self.text_dim)
