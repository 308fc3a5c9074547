"""Planning with the world model: observation + instruction in, video and executable joint trajectory out.

  first frame ──► I2V sampler (dual guidance) ──► video [T, H, W, 3] ──► IDM ──► actions [T, 14]
                                                                          └─► smoothness terms (reject if unexecutable)

Long-horizon instructions are split on `<sep>`: segment i+1 is generated from the last frame of
segment i (one frame of sliding history, as EVA's test mode), and the segments are concatenated.
Segment 0 contributes all its T frames; each later one contributes its T−1 new frames.

`Planner` works on batches so that the service can group concurrent requests into one sampler call.
The two model functions are injected (`generate`, `actions`), which keeps this file independent of how
the models were built: `build_planner(config)` wires the real DiT/VAE/CLIP/umT5 sampler and the IDM.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import numpy as np

from eva_jax.rl import reward as reward_lib

SEGMENT_SEP = "<sep>"

# generate(first_frames uint8 [B, H, W, 3], prompts [B], options) -> videos uint8 [B, T, H, W, 3]
GenerateFn = Callable[[np.ndarray, Sequence[str], "PlanOptions"], np.ndarray]
# actions(videos uint8 [B, T, H, W, 3]) -> joint actions float [B, T, D]
ActionsFn = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class PlanOptions:
  """Per-request sampling options; requests are batched together only when these are equal."""
  steps: int = 40
  hist_guidance: float = 1.5
  lang_guidance: float = 2.5
  seed: int = 0


@dataclasses.dataclass
class Plan:
  video: np.ndarray                 # uint8 [T_total, H, W, 3]
  actions: np.ndarray               # float32 [T_total, D]
  reward: float                     # EVA smoothness reward of the whole trajectory
  terms: dict[str, float]           # jerk / acc / vlim / alim / total penalties
  segments: list[dict]              # per segment: instruction, frames contributed


def split_instruction(instruction: str, max_segments: int | None = None) -> list[str]:
  """'reach <sep> grasp' -> ['reach', 'grasp']; empty segments are an error."""
  if not isinstance(instruction, str) or not instruction.strip():
    raise ValueError("instruction is empty")
  parts = [p.strip() for p in instruction.split(SEGMENT_SEP)]
  if any(not p for p in parts):
    raise ValueError(f"instruction has an empty segment between '{SEGMENT_SEP}' separators")
  if max_segments is not None and len(parts) > max_segments:
    raise ValueError(f"instruction has {len(parts)} segments; at most {max_segments} are allowed")
  return parts


class Planner:
  """Batched planning over injected model functions (see module docstring)."""

  def __init__(self, generate: GenerateFn, actions: ActionsFn, *, fps: float = 16.0,
               smoothness: reward_lib.SmoothnessConfig | None = None, max_segments: int = 8):
    self.generate, self.actions = generate, actions
    self.fps, self.max_segments = fps, max_segments
    self.smoothness = smoothness or reward_lib.piper_aloha()

  def plan(self, observation: np.ndarray, instruction: str, options: PlanOptions = PlanOptions()) -> Plan:
    return self.plan_batch([observation], [instruction], options)[0]

  def plan_batch(self, observations: Sequence[np.ndarray], instructions: Sequence[str],
                 options: PlanOptions = PlanOptions()) -> list[Plan]:
    """Plans for several (observation, instruction) pairs with the same options, one sampler call per
    segment index. Requests with fewer segments simply drop out of later calls."""
    if len(observations) != len(instructions):
      raise ValueError(f"{len(observations)} observations but {len(instructions)} instructions")
    segments = [split_instruction(s, self.max_segments) for s in instructions]
    current = [np.asarray(o, np.uint8) for o in observations]
    videos: list[list[np.ndarray]] = [[] for _ in observations]
    for seg in range(max(len(s) for s in segments)):
      active = [i for i, s in enumerate(segments) if seg < len(s)]
      frames = np.stack([current[i] for i in active])
      # A different seed per segment, so a repeated instruction does not repeat its noise.
      opts = dataclasses.replace(options, seed=options.seed + seg)
      out = np.asarray(self.generate(frames, [segments[i][seg] for i in active], opts))
      for row, i in enumerate(active):
        new = out[row] if seg == 0 else out[row, 1:]  # later segments start with the history frame
        videos[i].append(new)
        current[i] = out[row, -1]
    full = [np.concatenate(v, axis=0) for v in videos]
    # IDM on equal-length videos in one call; group by length so the batch stays rectangular.
    plans: list[Plan | None] = [None] * len(full)
    for length in sorted({len(v) for v in full}):
      idx = [i for i, v in enumerate(full) if len(v) == length]
      acts = np.asarray(self.actions(np.stack([full[i] for i in idx])), np.float32)
      pen = reward_lib.smoothness_penalty(acts, fps=self.fps, cfg=self.smoothness)
      rew = np.asarray(reward_lib.smoothness_reward(acts, fps=self.fps, cfg=self.smoothness))
      pen = {k: np.asarray(v) for k, v in pen.items()}
      for row, i in enumerate(idx):
        seg_info = [{"instruction": s, "frames": int(len(v))} for s, v in zip(segments[i], videos[i])]
        plans[i] = Plan(video=full[i], actions=acts[row], reward=float(rew[row]),
                        terms={k: float(v[row]) for k, v in pen.items()}, segments=seg_info)
    return plans  # type: ignore[return-value]


def resize_observation(image: np.ndarray, height: int, width: int, *, mode: str = "stretch",
                       max_aspect_change: float = 2.0, min_side: int = 16) -> np.ndarray:
  """The observation at the model size by `mode` (eva_jax.data.images.fit_image; EVA's stretch by
  default), bicubic.

  Refuses images whose aspect ratio differs from the target's by more than `max_aspect_change`×
  (stretching or cropping would distort or drop most of the scene) or smaller than `min_side` pixels.
  """
  from eva_jax.data.images import fit_image

  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"observation must be an RGB image [H, W, 3], got shape {image.shape}")
  h, w = image.shape[:2]
  if min(h, w) < min_side:
    raise ValueError(f"observation is {h}x{w}; at least {min_side} pixels per side are needed")
  change = (w / h) / (width / height)
  if max(change, 1 / change) > max_aspect_change:
    raise ValueError(f"observation aspect {w}x{h} is too far from the model's {width}x{height} "
                     f"(more than {max_aspect_change}x); crop it before sending")
  return fit_image(image, height, width, mode)


# MARK: building from a config

def build_planner(config, workdir=None) -> Planner:
  """The real planner: DiT/VAE/CLIP (eva_jax.inference.build_models), umT5 + tokenizer, the sampler, the IDM.

  `config` is configs/planner.py's: `model`, `ckpt`, `sampler` as configs/infer.py, plus `idm` and `server`.
  One I2VSampler is kept per distinct (steps, guidance) option set; batches are padded to
  `server.batch_size` so each option set compiles once.
  """
  import functools
  import pathlib

  import jax.numpy as jnp

  from eva_jax import inference, weights
  from eva_jax.diffusion.sampler import I2VSampler, SamplerConfig
  from eva_jax.models import idm as idm_lib
  from eva_jax.models import tokenizer as tok_lib
  from eva_jax.models.umt5 import encode_prompts

  run_dir = pathlib.Path(workdir) if workdir else pathlib.Path(config.output_root)
  inference.fill_from_wan_dir(config)
  inference.require_checkpoints(config, ("idm.checkpoint",))
  if not config.ckpt.tokenizer:
    if not config.ckpt.random_init:
      raise ValueError("config.ckpt.tokenizer is empty: give the google/umt5-xxl tokenizer directory")
    config.ckpt.tokenizer = tok_lib.make_tiny_tokenizer(run_dir / "tokenizer", TINY_VOCABULARY)
  encoder, tokenizer = inference.build_text_encoder(config)
  neg = encode_prompts(encoder, tokenizer, [config.neg_prompt])
  models = inference.build_models(config, text_dim=neg.shape[-1])
  if not config.idm.checkpoint and not config.ckpt.random_init:
    raise ValueError("config.idm.checkpoint is empty: give an IDM checkpoint (IDM_singleview.pt or a train_idm run)")
  # A train_idm run gives its architecture in config.json; the release .pt states its own.
  idm = weights.load_module("idm", config.idm.checkpoint or "random",
                            default_cfg=idm_lib.idm_config(config.idm.preset), seed=4)
  batch = int(config.server.batch_size)
  base = dict(config.sampler)

  @functools.lru_cache(maxsize=8)
  def sampler_for(steps: int, hist: float, lang: float) -> I2VSampler:
    cfg = SamplerConfig(**dict(base, num_steps=steps, hist_guidance=hist, lang_guidance=lang))
    return I2VSampler(models.dit, models.vae, models.clip, cfg)

  def pad(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x, np.repeat(x[-1:], batch - len(x), axis=0)]) if len(x) < batch else x

  def generate(frames: np.ndarray, prompts, options: PlanOptions) -> np.ndarray:
    n = len(frames)
    if n > batch:
      raise ValueError(f"{n} observations exceed server.batch_size={batch}")
    sampler = sampler_for(int(options.steps), float(options.hist_guidance), float(options.lang_guidance))
    first = pad(frames.astype(np.float32) / 127.5 - 1.0)
    context = encode_prompts(encoder, tokenizer, list(prompts) + [prompts[-1]] * (batch - n))
    video, _ = sampler.generate(jnp.asarray(first), context, neg, jax.random.key(options.seed), show_progress=False)
    video = np.asarray(jax.device_get(video))[:n]
    return np.clip(np.round((video + 1.0) * 127.5), 0, 255).astype(np.uint8)

  def actions(videos: np.ndarray) -> np.ndarray:
    return np.asarray(idm_lib.actions_from_video(idm, jnp.asarray(videos, jnp.float32) / 255.0))

  return Planner(generate, actions, fps=float(config.fps), max_segments=int(config.server.max_segments))


# Words the tiny random text encoder knows (unknown words map to <unk>, which is fine for smoke runs).
TINY_VOCABULARY = tuple(
    "move raise lower wave reach grasp open close the left right both arm arms gripper grippers to of and "
    "a an up down forward back slowly quickly pick place click bell alarm clock container plate top".split())
