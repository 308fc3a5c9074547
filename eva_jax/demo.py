"""The built-in end-to-end EVA demo on the procedural toy world: `run_demo(config, workdir)`.

Stages, each one the real library entry point with its tiny config (configs/demo.py sizes them):
  1. data    eva_jax.data.toyworld.generate_dataset: a RoboTwin data root + robotwin_videos.csv, and
             more episodes (HDF5 only) as the IDM's training corpus
  2. vae     eva_jax.training.vae.train_and_evaluate (configs/vae.py:tiny): the tiny Wan VAE fitted
             to the toy frames (no pretrained VAE ships), then used by sft and grpo
  3. idm     eva_jax.training.idm.train_and_evaluate (configs/idm.py:tiny); joint MAE vs a constant
  4. sft     eva_jax.training.sft.train_and_evaluate (configs/sft.py:tiny): the I2V world model
  5. grpo    eva_jax.training.grpo.train_and_evaluate (configs/grpo.py:tiny) with the IDM reward
  6. report  PNGs, videos, summary.md / summary.json under workdir (outputs/<date>/<time>/)

A stage whose module is not in this checkout yet is reported as `unavailable` (never faked), and the
stages that need it as `skipped`; a stage that raises is `failed`, its traceback is saved under
logs/, and `run_demo` raises after the report is written. Everything that couples the demo to the
stage trainers (which config fields it sets, where it reads their results) is in the section
"MARK: stage wiring", so a change of a trainer's config needs an edit there only.

  python scripts/demo.py                       # or: make demo
  python scripts/demo.py --config.short=True   # the shortened run the tests use
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import ml_collections
import numpy as np
from absl import logging

from eva_jax.data import toyworld
from eva_jax.utils import plots



class StageUnavailable(Exception):
  """The stage's trainer (or an API the demo needs from it) is not in this checkout yet."""


@dataclasses.dataclass
class StageResult:
  name: str
  status: str = "pending"       # done | unavailable | skipped | failed
  detail: str = ""
  seconds: float = 0.0
  cpu_seconds: float = 0.0      # this process's user + system CPU time in the stage (XLA's threads included)
  metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
  outputs: dict[str, Any] = dataclasses.field(default_factory=dict)   # arrays for the report

  def to_json(self) -> dict[str, Any]:
    return {"status": self.status, "detail": self.detail, "seconds": round(self.seconds, 2),
            "cpu_seconds": round(self.cpu_seconds, 1),
            "metrics": self.metrics}


@dataclasses.dataclass
class DemoContext:
  config: ml_collections.ConfigDict
  workdir: Path
  results: dict[str, StageResult]

  @property
  def data_root(self) -> Path:
    return self.workdir / "data"

  @property
  def idm_data_root(self) -> Path:
    """The IDM's extra episodes (HDF5 only): config.data.idm_episodes more of the same world."""
    return self.workdir / "data_idm"

  def stage_dir(self, name: str) -> Path:
    return self.workdir / name


# MARK: config


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of config with the `shortened` sizes merged in when `config.short` is set."""
  out = ml_collections.ConfigDict(config.to_dict())
  if out.get("short"):
    for section, values in out.shortened.items():
      for key, value in values.items():
        if key not in out[section]:
          raise KeyError(f"configs/demo.py: shortened.{section}.{key} has no counterpart "
                         f"{section}.{key}; known: {sorted(out[section])}")
        out[section][key] = value
  return out


def _stage_config(stage: str, variant: str = "tiny") -> ml_collections.ConfigDict:
  """configs/<stage>.py:<variant>, unlocked so the demo can size it."""
  module = _require(f"configs.{stage}", "get_config")
  cfg = module.get_config(variant)
  return ml_collections.ConfigDict(cfg.to_dict()) if hasattr(cfg, "to_dict") else cfg


def _override(cfg: ml_collections.ConfigDict, overrides: dict[str, Any], where: str):
  """Sets dotted fields that must already exist, so a renamed field is a clear error."""
  for key, value in overrides.items():
    node = cfg
    *parents, leaf = key.split(".")
    for i, part in enumerate(parents):
      if part not in node:
        raise KeyError(f"demo: {where} has no field {'.'.join(parents[:i + 1])!r} (setting {key!r})")
      node = node[part]
    if leaf not in node:
      raise KeyError(f"demo: {where} has no field {key!r}; fields there: {sorted(node)}")
    node[leaf] = value
  return cfg


def _require(module: str, attr: str):
  """Imports module and checks it has attr; missing pieces raise StageUnavailable."""
  try:
    mod = importlib.import_module(module)
  except ModuleNotFoundError as e:
    if e.name and (module == e.name or module.startswith(e.name + ".")):
      raise StageUnavailable(f"{module} is not in this checkout yet") from None
    raise
  if not hasattr(mod, attr):
    raise StageUnavailable(f"{module}.{attr} is not in this checkout yet")
  return mod


# MARK: stages


def stage_data(ctx: DemoContext) -> StageResult:
  """Writes the toy RoboTwin root and measures EVA's reward on the true joint trajectories."""
  from eva_jax.data import robotwin
  from eva_jax.rl.reward import smoothness_reward

  c = ctx.config.data
  summary = toyworld.generate_dataset(
      ctx.data_root, c.num_episodes, seed=ctx.config.seed, size=c.size, n_frames=c.n_frames,
      smooth_fraction=c.smooth_fraction, val_fraction=c.val_fraction)
  joints, frames = [], []
  for ep in summary["episodes"]:
    f, a = robotwin.read_episode(str(ctx.data_root / ep["hdf5"]), camera="head_camera")
    frames.append(f)
    joints.append(a)
  joints = np.stack(joints).astype(np.float32)  # [N, T, 14]
  rewards = np.asarray(smoothness_reward(joints, fps=summary["fps"]))  # [N]
  smooth = np.array([ep["smooth"] for ep in summary["episodes"]])
  kinds = np.array([ep["kind"] for ep in summary["episodes"]])
  metrics = {"num_episodes": len(smooth), "num_smooth": int(smooth.sum()),
             "num_validation": sum(ep["split"] == "validation" for ep in summary["episodes"]),
             "true_reward_smooth": float(rewards[smooth].mean()) if smooth.any() else None,
             "true_reward_non_smooth": float(rewards[~smooth].mean()) if (~smooth).any() else None}
  for k in toyworld.KINDS:
    if (kinds == k).any():
      metrics[f"true_reward_{k}"] = float(rewards[kinds == k].mean())
  outputs = {"summary": summary, "joints": joints, "frames": np.stack(frames), "smooth": smooth,
             "kinds": kinds, "rewards": rewards, "idm_summary": None}
  detail = f"{len(smooth)} episodes under {ctx.data_root}"
  if c.idm_episodes:
    # The IDM's corpus: more episodes of the same world (continuing the seed's stream, HDF5 only), as
    # EVA's IDM learns from many robot trajectories. The world model's few episodes alone leave the
    # IDM overfitting (held-out MAE near the constant predictor's); see docs/demo.md.
    outputs["idm_summary"] = toyworld.generate_dataset(
        ctx.idm_data_root, c.idm_episodes, seed=ctx.config.seed, size=c.size, n_frames=c.n_frames,
        smooth_fraction=c.smooth_fraction, val_fraction=c.val_fraction, write_videos=False,
        first_index=c.num_episodes)
    metrics["num_idm_episodes"] = c.idm_episodes
    detail += f", {c.idm_episodes} more for the IDM under {ctx.idm_data_root}"
  return StageResult("data", "done", detail, metrics=metrics, outputs=outputs)


def constant_predictor_mae(train_joints: np.ndarray, eval_joints: np.ndarray) -> np.ndarray:
  """Per-joint MAE of always predicting the training mean pose: the bar an IDM must clear. [14]"""
  mean = train_joints.reshape(-1, train_joints.shape[-1]).mean(0)
  return np.abs(eval_joints.reshape(-1, eval_joints.shape[-1]) - mean).mean(0)


# MARK: stage wiring  (the only place that knows the trainers' config fields and outputs)


def _vae_overrides(ctx: DemoContext) -> dict[str, Any]:
  c, d = ctx.config.vae, ctx.config.data
  return {"data.data_root": str(ctx.data_root), "data.metadata_path": toyworld.CSV_NAME,
          "data.height": d.size, "data.width": d.size, "data.n_frames": d.n_frames,
          "seed": ctx.config.seed, "train.num_steps": c.num_steps, "train.batch_size": c.batch_size,
          "optim.learning_rate": c.learning_rate, "eval.every": c.eval_every or c.num_steps}


def _vae_checkpoint(ctx: DemoContext) -> dict[str, Any]:
  """The fitted toy VAE for the world-model stages, when the vae stage ran."""
  return {"vae.checkpoint": str(ctx.stage_dir("vae"))} if _done(ctx.results, "vae") else {}


def _idm_overrides(ctx: DemoContext) -> dict[str, Any]:
  c = ctx.config.idm
  every = max(c.num_steps // 4, 1)  # validate (best/ by val MAE) and checkpoint 4 times
  return {"data.root": str(ctx.data_root), "data.tfds_dir": str(ctx.stage_dir("idm") / "tfds"),
          # Normalise by the toy joints' statistics, not the AnyPos constants of the release.
          "data.norm_stats": "dataset", "seed": ctx.config.seed,
          "model.image_size": (c.image_size, c.image_size),
          # The toy camera and colours never change; colour jitter would only slow learning.
          "augment.color_jitter": False,
          "train.num_steps": c.num_steps, "train.batch_size": c.batch_size,
          "train.checkpoint_every": every, "eval.every": every,
          "optim.learning_rate": c.learning_rate, "optim.total_steps": c.num_steps}


def _sft_overrides(ctx: DemoContext) -> dict[str, Any]:
  c, d = ctx.config.sft, ctx.config.data
  every = max(10, c.num_steps // 4)  # validation loss and checkpoints four times per run
  return {"data.data_root": str(ctx.data_root), "data.metadata_path": toyworld.CSV_NAME,
          "data.height": d.size, "data.width": d.size, "data.n_frames": d.n_frames,
          "data.fps": float(toyworld.FPS),
          # whole-clip latents cached by _cache_clip_latents: no JPEG decoding or VAE encoding per step
          "data.load_video_latent": True,
          "train.checkpoint_every": every, "eval.every": every,
          # Crops would move the arms' bases; the toy camera is fixed like RoboTwin's head camera.
          "data.augment": False,
          "seed": ctx.config.seed, "train.num_steps": c.num_steps, "train.batch_size": c.batch_size,
          "optim.learning_rate": c.learning_rate, "model.preset": c.model, **_vae_checkpoint(ctx)}


def _grpo_overrides(ctx: DemoContext) -> dict[str, Any]:
  c, d = ctx.config.grpo, ctx.config.data
  # Rollouts start from the toy CSV's own first frames (VAE-encoded at the demo's frame size) with the
  # text conditioning the SFT stage trained on, so the policy is the world model in its own setting.
  sft = _override(_stage_config("sft"), _sft_overrides(ctx), "configs/sft.py:tiny")
  if sft.clip.source != "zeros":  # grpo's csv conditions feed zero CLIP features, as SFT's 'zeros'
    raise ValueError(f"demo: configs/sft.py:tiny has clip.source={sft.clip.source!r}; GRPO's csv "
                     "conditions need 'zeros'")
  # Wan VAE: 8× spatial and 4× temporal compression (first frame kept), so 1 + 4k frames.
  return {"seed": ctx.config.seed, "num_iterations": c.num_iterations,
          "data.kind": "csv", "data.start": "cycle", "data.data_root": str(ctx.data_root),
          "data.metadata_path": toyworld.CSV_NAME, "data.split": "training",
          "data.num_conditions": c.num_conditions,
          "data.text_source": sft.text.source, "data.text_tokens": sft.data.max_text_tokens,
          "reward.idm_checkpoint": str(ctx.stage_dir("idm")),
          "model.checkpoint": str(ctx.stage_dir("sft")), "model.preset": sft.model.preset,
          "sample.group_size": c.group_size, "sample.num_prompts": c.num_prompts,
          "sample.num_steps": c.num_sampling_steps,
          "sample.latent_frames": 1 + (d.n_frames - 1) // 4,
          "sample.latent_height": d.size // 8, "sample.latent_width": d.size // 8,
          "optim.learning_rate": c.learning_rate, "train.clip_range": c.clip_range,
          "train.num_inner_epochs": c.num_inner_epochs, "train.timestep_fraction": c.timestep_fraction,
          "train.beta": c.beta, "sample.eval_every": c.eval_every, "log.checkpoint_every": c.checkpoint_every,
          # Rollout videos at the first iteration (the SFT model) and the last one (aligned).
          "log.video_every": c.num_iterations, "log.num_videos": ctx.config.report.num_samples,
          "log.plot_every": c.num_iterations, **_vae_checkpoint(ctx)}


# Keys of the trainers' metrics.jsonl that the report reads.
SFT_LOSS = "loss"
GRPO_REWARD_MEAN, GRPO_REWARD_STD = "reward_mean", "reward_std"
GRPO_PENALTIES = ("penalty_jerk", "penalty_acc", "penalty_vlim", "penalty_alim")  # per-iteration means


def stage_vae(ctx: DemoContext) -> StageResult:
  """Fits the tiny Wan VAE to the toy frames; a random-weight VAE would make the world model's
  latents (and so its decoded videos, and the IDM reward on them) meaningless."""
  trainer = _require("eva_jax.training.vae", "train_and_evaluate")
  cfg = _override(_stage_config("vae"), _vae_overrides(ctx), "configs/vae.py:tiny")
  metrics = trainer.train_and_evaluate(cfg, str(ctx.stage_dir("vae"))) or {}
  return StageResult("vae", "done", "tiny VAE fitted to the toy frames",
                     metrics={k: float(v) for k, v in dict(metrics).items() if np.isscalar(v)})


def stage_idm(ctx: DemoContext) -> StageResult:
  trainer = _require("eva_jax.training.idm", "train_and_evaluate")
  from eva_jax.data import idm_dataset, robotwin

  cfg = _override(_stage_config("idm"), _idm_overrides(ctx), "configs/idm.py:tiny")
  # The IDM trains and validates on the toy data's own splits (the world model's episodes and the
  # IDM corpus), so the MAE below is held out. The world model's validation episodes come first.
  data = ctx.results["data"].outputs
  splits = {"train": [], "val": []}
  for root, summary in ((ctx.data_root, data["summary"]), (ctx.idm_data_root, data["idm_summary"])):
    for ep in (summary or {}).get("episodes", []):
      splits["val" if ep["split"] == "validation" else "train"].append(str(root / ep["hdf5"]))
  idm_dataset.build_idm_dataset(splits, cfg.data.tfds_dir, seed=ctx.config.seed)
  trainer.train_and_evaluate(cfg, str(ctx.stage_dir("idm")))
  # Joint MAE on every held-out episode, against the constant (training-mean) predictor.
  held_out = [robotwin.read_episode(p) for p in splits["val"]]
  frames = np.stack([f for f, _ in held_out])  # [Nv, T, H, W, 3]
  true = np.stack([a for _, a in held_out])    # [Nv, T, 14]
  pred = _idm_predict(ctx, cfg, frames)
  mae = np.abs(pred - true).reshape(-1, 14).mean(0)
  train_joints = np.concatenate([robotwin.read_jpeg_bytes(p)[1] for p in splits["train"]])
  const = constant_predictor_mae(train_joints, true)
  metrics = {"val_joint_mae": float(mae.mean()), "constant_predictor_mae": float(const.mean()),
             "val_episodes": len(splits["val"]), "train_episodes": len(splits["train"]),
             "per_joint_mae": [float(x) for x in mae],
             "per_joint_constant_mae": [float(x) for x in const]}
  return StageResult("idm", "done", "IDM trained on the toy episodes", metrics=metrics,
                     outputs={"pred": pred, "true": true, "val_frames": frames})


def _idm_predict(ctx: DemoContext, cfg, frames: np.ndarray) -> np.ndarray:
  """IDM actions [B, T, 14] for uint8 videos [B, T, H, W, 3], from the trained checkpoint."""
  import jax.numpy as jnp

  from eva_jax.models.idm import actions_from_video

  trainer = _require("eva_jax.training.idm", "load_trained_idm")
  idm = trainer.load_trained_idm(ctx.stage_dir("idm"), cfg)  # best/ by validation MAE, eval mode
  return np.asarray(actions_from_video(idm, jnp.asarray(frames, jnp.float32) / 255.0))


def _cache_clip_latents(ctx: DemoContext) -> dict[str, Any]:
  """Whole-clip latents of the toy videos under the fitted VAE (scripts/cache_embeddings.py's job with
  configs/cache_embeddings.py:tiny), written next to the videos and added to the CSV as video_latent_path."""
  embeddings = _require("eva_jax.data.embeddings", "cache_embeddings")
  d = ctx.config.data
  cfg = _override(_stage_config("cache_embeddings"), {
      "data_root": str(ctx.data_root), "metadata_path": toyworld.CSV_NAME, "seed": ctx.config.seed,
      "prompts": False, "video_latents": True, "height": d.size, "width": d.size,
      "video.n_frames": d.n_frames, "video.fps": float(toyworld.FPS),
      "vae.init": "orbax", "vae.path": str(ctx.stage_dir("vae"))}, "configs/cache_embeddings.py:tiny")
  return embeddings.cache_embeddings(cfg)


def stage_sft(ctx: DemoContext) -> StageResult:
  trainer = _require("eva_jax.training.sft", "train_and_evaluate")
  from eva_jax.utils.metrics import read_metrics

  cfg = _override(_stage_config("sft"), _sft_overrides(ctx), "configs/sft.py:tiny")
  cached = _cache_clip_latents(ctx)
  _log(f"[sft] clip latents: {cached['video_latents_written']} written, "
       f"{cached['video_latents_skipped']} already there")
  trainer.train_and_evaluate(cfg, str(ctx.stage_dir("sft")))
  records = [r for r in read_metrics(ctx.stage_dir("sft")) if SFT_LOSS in r]
  steps = np.array([r["step"] for r in records])
  loss = np.array([float(r[SFT_LOSS]) for r in records])
  metrics = {"loss_first": float(loss[0]), "loss_last": float(loss[-1])} if len(loss) else {}
  return StageResult("sft", "done", "world model fine-tuned on the toy videos", metrics=metrics,
                     outputs={"steps": steps, "loss": loss})


def stage_grpo(ctx: DemoContext) -> StageResult:
  trainer = _require("eva_jax.training.grpo", "train_and_evaluate")
  from eva_jax.utils.metrics import read_metrics

  cfg = _override(_stage_config("grpo"), _grpo_overrides(ctx), "configs/grpo.py:tiny")
  trainer.train_and_evaluate(cfg, str(ctx.stage_dir("grpo")))
  records = [r for r in read_metrics(ctx.stage_dir("grpo")) if GRPO_REWARD_MEAN in r]
  if not records:
    raise ValueError(f"{ctx.stage_dir('grpo')}/metrics.jsonl has no {GRPO_REWARD_MEAN!r} records")
  steps = np.array([r["step"] for r in records])
  mean = np.array([float(r[GRPO_REWARD_MEAN]) for r in records])
  std = np.array([float(r.get(GRPO_REWARD_STD, 0.0)) for r in records])
  metrics = dict(reward_rise(mean, std, cfg.sample.group_size * cfg.sample.num_prompts),
                 iterations=len(mean))
  metrics.update(penalty_quarters(records))
  outputs = {"steps": steps, "reward_mean": mean, "reward_std": std}
  outputs.update(_before_after(ctx, cfg))
  for tag in ("before", "after"):
    if f"rewards_{tag}" in outputs:
      metrics[f"sample_reward_{tag}"] = float(outputs[f"rewards_{tag}"].mean())
  return StageResult("grpo", "done", "Flow-GRPO with the IDM smoothness reward", metrics=metrics,
                     outputs=outputs)


def _first_and_last_quarter(values) -> tuple[np.ndarray, np.ndarray]:
  """The first and the last quarter (at least one entry each) of a per-iteration series."""
  values = np.asarray(values, np.float64)
  k = max(1, len(values) // 4)
  return values[:k], values[-k:]


def reward_rise(mean: np.ndarray, std: np.ndarray, num_rollouts: int) -> dict[str, float]:
  """Mean reward of the last quarter of the iterations against the first, with its standard error.

  mean, std: [iterations] per-iteration mean and (population) std over num_rollouts rollouts. Quarters,
  not single iterations, are compared because one iteration's mean is noisy; the standard error is
  that of the two quarter means (each iteration's mean: std / sqrt(n − 1)), independent rollouts.
  """
  first, last = _first_and_last_quarter(mean)
  var = np.square(np.asarray(std, np.float64)) / max(num_rollouts - 1, 1)  # each iteration mean's s.e.²
  var_first, var_last = _first_and_last_quarter(var)
  se = np.sqrt(var_first.sum() + var_last.sum()) / len(first)
  return {"reward_first": float(first.mean()), "reward_last": float(last.mean()),
          "reward_rise": float(last.mean() - first.mean()), "reward_rise_se": float(se)}


def penalty_quarters(records: list[dict[str, Any]]) -> dict[str, float]:
  """The reward's penalty terms (jerk, acceleration, limits), mean of the first quarter of the GRPO
  iterations and of the last, as `reward_rise` splits the reward: what "smoother" means in numbers."""
  out = {}
  for key in GRPO_PENALTIES:
    values = [float(r[key]) for r in records if key in r]
    if values and len(values) == len(records):
      first, last = _first_and_last_quarter(values)
      out[f"{key}_first"], out[f"{key}_last"] = float(first.mean()), float(last.mean())
  return out


def _before_after(ctx: DemoContext, grpo_cfg) -> dict[str, np.ndarray]:
  """Rollout videos of the first GRPO iteration (the SFT model) and the last, with IDM actions.

  train_grpo writes them as videos/iter{it:05d}_{k}.mp4; an empty dict when there are none.
  """
  from eva_jax.data import video
  from eva_jax.rl.reward import smoothness_reward

  files = sorted((ctx.stage_dir("grpo") / "videos").glob("iter*_*.mp4"))
  iters = sorted({int(f.name[4:9]) for f in files})
  if len(iters) < 2:
    return {}
  out = {}
  idm_cfg = _override(_stage_config("idm"), _idm_overrides(ctx), "configs/idm.py:tiny")
  for tag, it in (("before", iters[0]), ("after", iters[-1])):
    clips = np.stack([video.read_video(f)[0] for f in files if int(f.name[4:9]) == it])
    actions = _idm_predict(ctx, idm_cfg, clips)  # [n, T, 14]
    out[f"videos_{tag}"] = clips
    out[f"actions_{tag}"] = actions
    out[f"rewards_{tag}"] = np.asarray(smoothness_reward(actions, fps=toyworld.FPS))
  return out


STAGES: tuple[tuple[str, Callable[[DemoContext], StageResult], tuple[str, ...]], ...] = (
    ("data", stage_data, ()),
    ("vae", stage_vae, ("data",)),
    ("idm", stage_idm, ("data",)),
    ("sft", stage_sft, ("data", "vae")),  # trains on clip latents of the fitted VAE
    ("grpo", stage_grpo, ("idm", "sft")),
)


# MARK: driver


def run_demo(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Runs every stage that exists in this checkout, writes the report, returns summary.json's dict.

  Raises RuntimeError (after writing the report) when a stage failed.
  """
  from eva_jax.utils.rundir import save_config

  config = resolve_config(config)
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  save_config(workdir, config)
  ctx = DemoContext(config, workdir, {})
  for name, fn, needs in STAGES:
    missing = [n for n in needs if ctx.results[n].status != "done"]
    if missing:
      ctx.results[name] = StageResult(name, "skipped", f"needs stage(s) {missing}")
      _log(f"[{name}] skipped: needs {missing}")
      continue
    _log(f"[{name}] running ...")
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    try:
      result = fn(ctx)
    except StageUnavailable as e:
      result = StageResult(name, "unavailable", str(e))
    except Exception as e:  # noqa: BLE001  the report must still be written
      log = workdir / "logs" / f"{name}.txt"
      log.parent.mkdir(parents=True, exist_ok=True)
      log.write_text(traceback.format_exc())
      result = StageResult(name, "failed", f"{type(e).__name__}: {e} (traceback in {log})")
    result.seconds, result.cpu_seconds = time.perf_counter() - t0, _cpu_seconds() - cpu0
    ctx.results[name] = result
    _log(f"[{name}] {result.status} in {result.seconds:.1f} s ({result.cpu_seconds:.0f} CPU-s): {result.detail}")
  summary = write_report(ctx)
  failed = [n for n, r in ctx.results.items() if r.status == "failed"]
  if failed:
    raise RuntimeError(f"demo stage(s) {failed} failed; see {workdir / 'summary.md'} and logs/")
  return summary


def _log(msg: str) -> None:
  print(f"demo: {msg}", flush=True)


# MARK: report


def write_report(ctx: DemoContext) -> dict[str, Any]:
  """Plots, videos and the summary table of whatever stages ran; returns the summary dict."""
  wd, cfg = ctx.workdir, ctx.config
  files: list[Path] = []
  res = ctx.results
  fps = toyworld.FPS

  if _done(res, "data"):
    out = res["data"].outputs
    eps = out["summary"]["episodes"]
    i_s = int(np.flatnonzero(out["smooth"])[0]) if out["smooth"].any() else None
    i_r = int(np.flatnonzero(~out["smooth"])[0]) if (~out["smooth"]).any() else None
    picks = [i for i in (i_s, i_r) if i is not None]
    label = {i: f"{eps[i]['kind']}: {eps[i]['caption']}  EVA reward {out['rewards'][i]:.2f}"
             for i in picks}
    files.append(plots.save_frame_strips(wd / "plots" / "toy_episodes.png",
                                         {label[i]: out["frames"][i] for i in picks},
                                         max_frames=cfg.report.max_frames, scale=3, fps=fps))
    files.append(plots.plot_joint_trajectories(
        wd / "plots" / "toy_joints.png", {eps[i]["kind"]: out["joints"][i] for i in picks}, fps=fps,
        title="True joint trajectories of two toy episodes"))
    kind_means = {k: v for k, v in res["data"].metrics.items()
                  if k.startswith("true_reward_") and k[12:] in toyworld.KINDS}
    files.append(plots.plot_bars(wd / "plots" / "toy_rewards.png",
                                 {"mean EVA reward of the true joints": {k[12:]: v for k, v in kind_means.items()}},
                                 title="EVA reward of the true toy trajectories",
                                 ylabel="reward (max 10)"))
    for i in picks:
      files += _write_clip(wd / "videos" / f"toy_{eps[i]['kind']}", out["frames"][i], cfg.report.gif_scale)

  if _done(res, "idm"):
    out, m = res["idm"].outputs, res["idm"].metrics
    files.append(plots.plot_joint_trajectories(
        wd / "plots" / "idm_val_joints.png", {"true": out["true"][0], "IDM": out["pred"][0]}, fps=fps,
        title=f"IDM on a validation episode (joint MAE {m['val_joint_mae']:.3f} rad, "
              f"constant predictor {m['constant_predictor_mae']:.3f})"))
    names = plots.JOINT_NAMES
    files.append(plots.plot_bars(
        wd / "plots" / "idm_mae.png",
        {"IDM": dict(zip(names, m["per_joint_mae"])),
         "constant predictor": dict(zip(names, m["per_joint_constant_mae"]))},
        title="Validation joint MAE per joint", ylabel="MAE"))

  if _done(res, "sft") and len(res["sft"].outputs["loss"]):
    out = res["sft"].outputs
    files.append(plots.plot_curves(wd / "plots" / "sft_loss.png", {"SFT": (out["steps"], out["loss"])},
                                   title="World-model SFT: flow-matching loss", ylabel="loss"))

  if _done(res, "grpo"):
    out, m = res["grpo"].outputs, res["grpo"].metrics
    files.append(plots.plot_curves(
        wd / "plots" / "reward_curve.png", {"GRPO rollouts": (out["steps"], out["reward_mean"])},
        bands={"GRPO rollouts": out["reward_std"]},
        hlines={"first-quarter mean": m["reward_first"], "last-quarter mean": m["reward_last"]},
        title=f"IDM smoothness reward during Flow-GRPO (rise {m['reward_rise']:+.2f} ± "
              f"{m['reward_rise_se']:.2f} s.e.)", xlabel="iteration", ylabel="reward"))
    if "videos_before" in out and "videos_after" in out:
      n = cfg.report.num_samples
      videos = {}
      for tag in ("before", "after"):
        for j, v in enumerate(out[f"videos_{tag}"][:n]):
          videos[f"{tag} alignment, sample {j}: IDM reward {out[f'rewards_{tag}'][j]:.2f}"] = v
          files += _write_clip(wd / "videos" / f"{tag}_{j}", v, cfg.report.gif_scale)
      files.append(plots.save_frame_strips(wd / "plots" / "before_after.png", videos,
                                           max_frames=cfg.report.max_frames, scale=3, fps=fps))
      files.append(plots.plot_joint_trajectories(
          wd / "plots" / "before_after_joints.png",
          {"before": out["actions_before"][0], "after": out["actions_after"][0]}, fps=fps,
          title="IDM-predicted joints of sample 0 before and after alignment"))

  summary = {"workdir": str(wd), "seed": cfg.seed, "short": bool(cfg.short), "machine": machine_record(),
             "stages": {n: r.to_json() for n, r in res.items()},
             "files": sorted(str(f.relative_to(wd)) for f in files)}
  (wd / "summary.json").write_text(json.dumps(summary, indent=2))
  (wd / "summary.md").write_text(_summary_markdown(summary))
  return summary


def machine_record() -> dict[str, Any]:
  """What decides the demo's floating-point results besides the code: the CPU, how many cores XLA's
  thread pool spans (the same code gives other bits on 1 and on 2 cores), XLA's flags, jax's version and
  the device count (docs/demo.md, "Determinism")."""
  import platform
  import jax
  cpu = platform.processor() or platform.machine()
  try:
    cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return {"cpu": cpu, "cores": _usable_cores(), "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__,
          "devices": jax.device_count()}


def pin_cpu_cores(n: int) -> int:
  """Restricts this process to the first `n` cores it may use (0: leave it), before jax starts its CPU
  backend, whose thread pool is sized by them; returns the cores in use. With the same n, XLA splits its
  work the same way on any machine with at least n cores (what the figures of docs/demo.md depend on)."""
  if n and hasattr(os, "sched_setaffinity"):
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < n:
      logging.warning("cpu_cores=%d: only %d core(s) available; the results may differ from a %d-core run",
                      n, len(allowed), n)
    os.sched_setaffinity(0, allowed[:n])
  return _usable_cores()


def _usable_cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _done(res: dict[str, StageResult], name: str) -> bool:
  return name in res and res[name].status == "done"


def _write_clip(stem: Path, frames: np.ndarray, gif_scale: int) -> list[Path]:
  from eva_jax.data import video
  return [video.write_video(stem.with_suffix(".mp4"), frames, fps=toyworld.FPS),
          plots.save_gif(stem.with_suffix(".gif"), frames, fps=toyworld.FPS, scale=gif_scale)]


def _cpu_seconds() -> float:
  """User + system CPU time of this process so far: a stage's cost independent of what else the machine runs."""
  t = os.times()
  return t.user + t.system


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  if isinstance(v, list):
    return "[" + ", ".join(_fmt(x) for x in v[:14]) + "]"
  return str(v)


def _summary_markdown(summary: dict[str, Any]) -> str:
  lines = [f"# EVA demo on the toy world (seed {summary['seed']}"
           + (", shortened run)" if summary["short"] else ")"), "",
           "| stage | status | time (s) | CPU (s) | result |", "|---|---|---|---|---|"]
  for name, r in summary["stages"].items():
    shown = {k: v for k, v in r["metrics"].items() if not isinstance(v, list)}
    result = ", ".join(f"{k} = {_fmt(v)}" for k, v in shown.items()) or r["detail"]
    lines.append(f"| {name} | {r['status']} | {r['seconds']:.1f} | {r.get('cpu_seconds', 0):.0f} | {result} |")
  if summary["stages"].get("vae", {}).get("status") != "done" and any(
      summary["stages"].get(n, {}).get("status") == "done" for n in ("sft", "grpo")):
    lines += ["", "Note: no fitted VAE, so the world model ran on a random-weight tiny VAE; its decoded "
              "videos, and the IDM rewards measured on them, do not show the toy world."]
  not_run = [n for n, r in summary["stages"].items() if r["status"] != "done"]
  if not_run:
    lines += ["", "Not run in this checkout (nothing is faked):"]
    lines += [f"- **{n}** ({summary['stages'][n]['status']}): {summary['stages'][n]['detail']}"
              for n in not_run]
  lines += ["", "## Files", ""] + [f"- [{f}]({f})" for f in summary["files"]]
  return "\n".join(lines) + "\n"
