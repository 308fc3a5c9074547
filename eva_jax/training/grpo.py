"""The Flow-GRPO trainer: `train_and_evaluate(config, workdir)` (config: configs/grpo.py).

Each iteration (spec/eva.md D): pick `num_prompts` first frames, repeat each `group_size` times,
run the jitted rollout (SDE sampling + VAE decode + IDM + smoothness reward in one program), turn
rewards into per-group advantages, and run the jitted update (inner epochs × trained timesteps,
gradient accumulation, AdamW on the LoRA adapters only, non-finite steps skipped). All randomness
is `fold_in(seed, iteration)`, so a run resumed from its last checkpoint repeats the metrics of an
uninterrupted one.

Outputs under `workdir`: config.json, metrics.jsonl + tensorboard/, checkpoints/ (LoRA + optimiser
state every `log.checkpoint_every` iterations, keep-N, `best/` by reward_mean), lora_adapter/ and
best_reward/ (PEFT safetensors of the adapters), idm_plots/ (per-term penalties, joint trajectories),
videos/ (rollout mp4s). The frozen base weights are the SFT checkpoint named in the config and are
not re-saved.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time
import types
from typing import Any

import ml_collections

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eva_jax import parallel, weights
from eva_jax.data import conditions
from eva_jax.diffusion.schedules import wan_timesteps
from eva_jax.models.lora import LoRAParam, disable_lora, export_peft
from eva_jax.models.wan import zero_clip_features
from eva_jax.parallel import make_mesh, named_sharding
from eva_jax.rl import grpo as grpo_lib
from eva_jax.rl import reward as reward_lib
from eva_jax.rl.rollout import RolloutConfig, make_rollout_fn
from eva_jax.training.checkpoints import Checkpointer
from eva_jax.models.wan.attention import backend_rule
from eva_jax.models.wan.config import PRESETS as WAN_PRESETS
from eva_jax.training.optim import make_optimizer
from eva_jax.utils import checks
from eva_jax.utils.metrics import MetricWriter
from eva_jax.utils.progress import progress
from eva_jax.utils.rundir import check_resume, log_resume, save_config

PENALTY_TERMS = ("jerk", "acc", "vlim", "alim", "total")


# MARK: models


def build_policy(config, mesh):
  """Wan DiT with LoRA: (wan config, graphdef, lora state, base state, their shardings).

  The frozen base is `config.model.checkpoint`, any DiT source of `eva_jax.weights.load` (the SFT run,
  a converted orbax directory, PyTorch files); the adapters start fresh (B = 0). Without a checkpoint the
  base is random, with its zero-initialised output head drawn (`randomize_zero_head`).
  """
  m = config.model
  cfg = weights.dit_config(m, remat=m.remat, lora_rank=m.lora_rank, lora_alpha=m.lora_alpha)
  source = m.checkpoint or "random"
  gdef, state = weights.load("dit", source, cfg, mesh=mesh, seed=config.seed, jit_init=m.sharded_init)
  lora, base = nnx.split_state(state, LoRAParam, ...)
  lora_sh, base_sh = (jax.tree.map(lambda x: x.sharding, st) for st in (lora, base))
  if source == "random":
    base = jax.device_put(randomize_zero_head(base, jax.random.key(config.seed + 7), cfg.dim), base_sh)
  return cfg, gdef, lora, base, lora_sh, base_sh


def randomize_zero_head(base, key, dim: int):
  """Random stand-in for SFT weights: Wan zero-initialises the output head, so a fresh model predicts
  v ≡ 0 and every LoRA gradient is exactly zero. Smoke runs without a checkpoint draw it instead."""
  def one(path, x):
    names = [getattr(p, "key", getattr(p, "name", None)) for p in path]
    if names[-3:] == ["head", "head", "kernel"] or names[-4:-1] == ["head", "head", "kernel"]:
      return (jax.random.normal(key, x.shape, jnp.float32) / dim ** 0.5).astype(x.dtype)
    return x
  return jax.tree_util.tree_map_with_path(one, base)


def build_vae(config, mesh):
  """(graphdef, state) of the VAE: `config.vae.checkpoint` (any VAE source of eva_jax.weights) or random."""
  from eva_jax.models.vae import stats_dtype, vae_config
  cfg = vae_config(config.vae.preset, stats_dtype=stats_dtype(config.model.get("precision", "wan")))
  return weights.load("vae", config.vae.checkpoint or "random", cfg, mesh=mesh, seed=config.seed + 1)


def build_clip_encoder(config, wan_cfg, mesh):
  """`frames [B, H, W, 3] -> CLIP features [B, 257, image_dim]` of config.clip (source 'online': EVA's
  CLIP of each rollout's first frame), or None for clip.source 'zeros' (smoke runs)."""
  c = config.get("clip")
  if c is None or c.source == "zeros":
    return None
  if c.source != "online":
    raise ValueError(f"clip.source must be 'online' or 'zeros', got {c.source!r}")
  from eva_jax.models.clip import clip_config
  cfg = clip_config(c.preset, dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.dtype))
  if cfg.width != wan_cfg.image_dim:
    raise ValueError(f"clip.preset={c.preset!r} gives {cfg.width}-d features, the DiT's image_dim is "
                     f"{wan_cfg.image_dim}")
  gdef, state = weights.load("clip", c.checkpoint or "random", cfg, mesh=mesh, seed=config.seed + 2)
  encode = jax.jit(lambda st, x: nnx.merge(gdef, st).encode_image(x).astype(jnp.float32))
  return lambda frames: encode(state, frames)


def load_idm(config, mesh):
  """The reward IDM in eval mode, (graphdef, state), from `config.reward.idm_checkpoint`: the released
  IDM_singleview.pt, a train_idm run (its config.json gives the architecture), or a converted orbax
  directory (architecture `reward.idm_preset`)."""
  from eva_jax.models.idm import idm_config
  path = config.reward.idm_checkpoint
  if not path:
    raise ValueError("GRPO needs the reward IDM: set --config.reward.idm_checkpoint=<IDM_singleview.pt "
                     "or an orbax IDM checkpoint directory> (the original's reward_model_path)")
  idm = weights.load_module("idm", path, mesh=mesh, default_cfg=idm_config(config.reward.idm_preset))
  run = weights.read_run_config(path) if weights.source_format(path) == "run" else None
  if run is not None and run.get("data", {}).get("channel_order") == "bgr_swapped":
    # The authors' quirk (docs/idm.md): their IDM trains on R<->B-swapped frames and is scored on unswapped
    # video, as this reward does. Say so: an IDM trained here with the quirk sees colours it never saw.
    print(f"warning: reward IDM {path} was trained with data.channel_order='bgr_swapped'; the reward feeds "
          "the decoded video unswapped, as EVA's reward does (docs/idm.md, 'Channel order')")
  return nnx.split(idm)


class _StartBatches:
  """EVA's rollout starts (data.start='random', eva_jax.data.conditions.RolloutStarts) as global arrays:
  each process loads and encodes only the rows its devices hold."""

  def __init__(self, config, wan_cfg, mesh, vae_gdef, vae_state, clip_encode):
    s = config.sample
    self.starts = conditions.RolloutStarts(config, wan_cfg)
    self.n = s.group_size * s.num_prompts
    self.mesh, self.vae_state, self.clip_encode = mesh, vae_state, clip_encode
    self.image_dim = wan_cfg.image_dim
    self.encode = jax.jit(lambda st, v: nnx.merge(vae_gdef, st).encode(v))
    rows_sh = named_sharding(mesh, ("act_batch",))
    self.rows = sorted({r for sl in rows_sh.addressable_devices_indices_map((self.n,)).values()
                        for r in range(*sl[0].indices(self.n))})

  def _global(self, local: np.ndarray) -> jax.Array:
    sh = named_sharding(self.mesh, ("act_batch",) + (None,) * (local.ndim - 1))
    return jax.make_array_from_process_local_data(sh, local, (self.n,) + local.shape[1:])

  def __call__(self, iteration: int):
    _, frames, texts = self.starts(iteration, self.rows)
    video = self._global(frames[:, None].astype(np.float32))                   # [B, 1, H, W, 3]
    first = self.encode(self.vae_state, video)                                 # [B, 1, h, w, 16]
    if self.clip_encode is not None:
      clip = self.clip_encode(video[:, 0])
    else:
      clip = self._global(zero_clip_features(len(self.rows), self.image_dim))
    return first, dict(context=self._global(texts.astype(np.float32)), clip_fea=clip)


# MARK: checkpoint helpers


def _flat(tree) -> dict[str, Any]:
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflat(flat: dict[str, Any], like):
  paths, treedef = jax.tree_util.tree_flatten_with_path(like)
  return jax.tree_util.tree_unflatten(treedef, [flat[jax.tree_util.keystr(p)] for p, _ in paths])


# MARK: the compiled programs


@functools.lru_cache(maxsize=2)
def _programs(config_json: str, gdef, vae_gdef, idm_gdef, mesh):
  """The jitted rollout, evaluation, advantage and update functions of a config.

  Cached on (config, graph definitions, mesh), so a second `train_and_evaluate` in the same process
  (a resume, the demo's stages) reuses the compiled executables instead of compiling again.
  Parameters are passed already placed on the mesh (their shardings are kept); batches are placed
  with `batch_shardings` before each call.
  """
  config = ml_collections.ConfigDict(json.loads(config_json))
  s, tr = config.sample, config.train
  batch_size = s.group_size * s.num_prompts
  reward_cfg = reward_lib.config_from_dict(dict(config.reward.smoothness))
  timesteps, sigmas = wan_timesteps(s.num_steps, s.shift)
  n_train = int(s.num_steps * tr.timestep_fraction)
  ro_cfg = RolloutConfig(sde_variant=s.sde_variant, noise_level=s.noise_level,
                         sigma_max=float(sigmas[1]), sigma_min=float(sigmas[-1]),
                         t_hist=float(timesteps[-1]), fps=config.reward.fps,
                         decode_clean_first=bool(s.get("decode_clean_first", True)))
  up_cfg = grpo_lib.GRPOUpdateConfig(
      num_train_timesteps=n_train, num_inner_epochs=tr.num_inner_epochs,
      micro_batch=tr.micro_batch or batch_size, accum_micro=tr.accum_micro, clip_range=tr.clip_range,
      adv_clip=tr.adv_clip, beta=tr.beta, sde_variant=s.sde_variant, noise_level=s.noise_level,
      sigma_max=ro_cfg.sigma_max, sigma_min=ro_cfg.sigma_min, t_hist=ro_cfg.t_hist)

  # Each model is merged inside its own (inlined) jit, so its variables live at one trace level even
  # when called from a lax.scan body (nnx.scan over the DiT blocks checks this).
  @jax.jit
  def policy_fn(lora_s, base_s, x, t, cond, context_kv=None):
    if context_kv is not None:
      return nnx.merge(gdef, lora_s, base_s)(x, t, None, None, context_kv=context_kv)
    return nnx.merge(gdef, lora_s, base_s)(x, t, cond["context"], cond["clip_fea"])

  @jax.jit
  def context_kv_fn(lora_s, base_s, cond):  # the rollouts' cross-attention K/V, once per rollout
    return nnx.merge(gdef, lora_s, base_s).context_kv(cond["context"], cond["clip_fea"])

  @jax.jit
  def ref_policy_fn(lora_s, base_s, x, t, cond):
    model = nnx.merge(gdef, lora_s, base_s)
    with disable_lora(model):  # the adapters are skipped: exactly the base (SFT) model
      return model(x, t, cond["context"], cond["clip_fea"])

  @jax.jit
  def decode_fn(vs, z):
    return nnx.merge(vae_gdef, vs).decode(z)

  def actions_fn(ids, video):
    from eva_jax.models.idm import actions_from_video
    return actions_from_video(nnx.merge(idm_gdef, ids), video, config.reward.idm_batch_size or None)

  tx = make_optimizer(config.optim)
  kv_fn = context_kv_fn if s.get("cache_context_kv", True) else None
  rollout_fn = make_rollout_fn(policy_fn, decode_fn, actions_fn, timesteps, sigmas, ro_cfg, reward_cfg, kv_fn)
  eval_fn = make_rollout_fn(policy_fn, decode_fn, actions_fn, timesteps, sigmas,
                            dataclasses.replace(ro_cfg, deterministic=True), reward_cfg, kv_fn)
  group_ids = jnp.repeat(jnp.arange(s.num_prompts), s.group_size)

  # Rollouts (batch axis) over ('data', 'fsdp').
  bsh = lambda nd: named_sharding(mesh, ("act_batch",) + (None,) * (nd - 1))  # noqa: E731
  cond_sh = dict(context=bsh(3), clip_fea=bsh(3))
  return types.SimpleNamespace(
      tx=tx,
      batch_shardings=dict(clean_first=bsh(5), cond=cond_sh),
      train_batch_shardings=dict(latents=bsh(6), log_probs=bsh(2), advantages=bsh(1), clean_first=bsh(5),
                                 cond=cond_sh),
      rollout=jax.jit(lambda p, b, k: rollout_fn(p, b, k, s.latent_frames)),
      evaluate=jax.jit(lambda p, b, k: eval_fn(p, b, k, s.latent_frames)),
      advantages=jax.jit(lambda r: grpo_lib.group_advantages(
          r, group_ids, s.num_prompts, per_group=tr.per_prompt_stat_tracking, global_std=tr.global_std,
          clip=tr.adv_clip)),
      update=jax.jit(grpo_lib.make_update_fn(policy_fn, tx, timesteps, sigmas, up_cfg, ref_policy_fn),
                     donate_argnums=(0, 1)),
  )


# MARK: the loop


# GRPO's own fields (eva_jax/utils/checks.py has the shared ones), checked before anything is built.
CONFIG_RULES = {
    "num_iterations": checks.integer(1),
    "model.preset": lambda v: None if v in WAN_PRESETS else f"a Wan preset, one of {sorted(WAN_PRESETS)}",
    "model.attention": backend_rule,
    "model.num_layers": checks.integer(0),
    "model.lora_rank": checks.integer(1),
    "model.lora_alpha": checks.number(0, lo_open=True),
    "sample.group_size": checks.integer(2),          # advantages are relative to the group
    "sample.num_prompts": checks.integer(1),
    "sample.num_steps": checks.integer(1),
    "sample.latent_frames": checks.integer(1),
    "sample.latent_height": checks.multiple_of(2),   # the DiT's patch is 2x2
    "sample.latent_width": checks.multiple_of(2),
    "sample.noise_level": checks.number(0),
    "sample.shift": checks.number(0, lo_open=True),
    "sample.eval_every": checks.integer(0),
    "data.kind": checks.one_of("synthetic", "csv"),
    "data.start": checks.one_of("random", "cycle"),
    "data.num_conditions": checks.integer(1),
    "data.text_tokens": checks.integer(1),
    "data.fps": checks.number(0, lo_open=True),
    "data.trim_mode": checks.one_of("random_cut", "speedup"),
    "data.pad_mode": checks.one_of("slowdown", "pad_last"),
    "log.checkpoint_every": checks.integer(1),
    "log.keep_checkpoints": checks.integer(1),
    "log.num_videos": checks.integer(0),
    "log.plot_every": checks.integer(0),
    "log.video_every": checks.integer(0),
    "train.num_inner_epochs": checks.integer(1),
    "train.timestep_fraction": checks.number(0, 1, lo_open=True),
    "train.clip_range": checks.number(0),
    "train.beta": checks.number(0),
    "train.adv_clip": checks.number(0),
    "train.micro_batch": checks.integer(0),
    "train.accum_micro": checks.integer(0),
    "reward.fps": checks.number(0, lo_open=True),
    "reward.idm_batch_size": checks.integer(0),
}


def check_config(config) -> None:
  checks.check(config, checks.COMMON, CONFIG_RULES)
  s, tr = config.sample, config.train
  rollouts = s.group_size * s.num_prompts
  if tr.micro_batch and rollouts % tr.micro_batch:
    raise checks.fail("train.micro_batch", tr.micro_batch, f"a divisor of the {rollouts} rollouts per iteration "
                                                           "(sample.group_size x sample.num_prompts), or 0 for all")


def train_and_evaluate(config, workdir: str | pathlib.Path) -> dict[str, float]:
  """Runs (or resumes) GRPO in `workdir`; returns the last iteration's metrics."""
  check_config(config)
  parallel.check_batch_split(config, "sample.group_size", total=config.sample.group_size * config.sample.num_prompts)
  if not config.reward.idm_checkpoint:  # fail before building anything
    load_idm(config, None)
  weights.require_sources(config, ("reward.idm_checkpoint", "model.checkpoint", "vae.checkpoint",
                                   "clip.checkpoint"),
                          kinds={"reward.idm_checkpoint": "idm", "model.checkpoint": "dit", "vae.checkpoint": "vae",
                                 "clip.checkpoint": "clip"})
  workdir = pathlib.Path(workdir)
  check_resume(workdir, config, ("model.preset", "model.num_layers", "model.lora_rank"))  # the checkpoint's shape
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = make_mesh(dict(config.mesh))
  s = config.sample

  wan_cfg, gdef, lora, base, _, _ = build_policy(config, mesh)
  vae_gdef, vae_state = build_vae(config, mesh)
  idm_gdef, idm_state = load_idm(config, mesh)

  prog = _programs(json.dumps(config.to_dict(), sort_keys=True), gdef, vae_gdef, idm_gdef, mesh)
  opt_state = jax.jit(prog.tx.init)(lora)
  # Moments follow their parameters; scalars (counts) created inside init are replicated.
  opt_state = jax.device_put(opt_state, jax.tree.map(
      lambda x: x.sharding if isinstance(x.sharding, jax.sharding.NamedSharding) else named_sharding(mesh, ()),
      opt_state))

  # Resume from the newest checkpoint in workdir.
  ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=config.log.keep_checkpoints,
                      best_metric="reward_mean", best_mode="max", async_save=False)
  start = 0
  if ckpt.latest_step() is not None:
    target = dict(lora=_flat(lora), opt=_flat(opt_state))
    restored, meta = ckpt.restore(target=target)
    lora, opt_state = _unflat(restored["lora"], lora), _unflat(restored["opt"], opt_state)
    start = int(meta.get("iteration", ckpt.latest_step()))
    log_resume(ckpt.directory, start, config.num_iterations, "num_iterations")
  save_config(workdir, config)  # once the run has started (or resumed): a failed start leaves the old one

  table = starts = None
  if config.data.kind == "csv":
    clip_encode = build_clip_encoder(config, wan_cfg, mesh)
    start_mode = config.data.get("start", "cycle")
    if start_mode == "random":   # EVA: a random record per iteration, a random cut and crop per rollout
      starts = _StartBatches(config, wan_cfg, mesh, vae_gdef, vae_state, clip_encode)
    elif start_mode == "cycle":  # the first data.num_conditions rows, in turn (evaluation, the demo)
      table = conditions.csv_conditions(config, wan_cfg, vae_gdef, vae_state, clip_encode)
    else:
      raise ValueError(f"config.data.start must be 'random' or 'cycle', got {start_mode!r}")
  elif config.data.kind != "synthetic":
    raise ValueError(f"config.data.kind must be 'synthetic' or 'csv', got {config.data.kind!r}")

  writer = MetricWriter(workdir)
  root = jax.random.key(config.seed)
  best = ckpt.best_value()
  metrics: dict[str, float] = {}
  for it in progress(range(start, config.num_iterations), total=config.num_iterations, initial=start,
                     desc="grpo"):
    key = jax.random.fold_in(root, it)
    cond_ids = (it * s.num_prompts + np.arange(s.num_prompts)) % config.data.num_conditions
    rows = np.repeat(cond_ids, s.group_size)                     # group_size rollouts per condition
    if starts is not None:
      first, cond = starts(it)
    elif table is None:
      first, cond = conditions.synthetic_conditions(config, wan_cfg, jnp.asarray(rows))
    else:
      first, cond = table[0][rows], {k: v[rows] for k, v in table[1].items()}
    batch = _put_global(dict(clean_first=first, cond=cond), prog.batch_shardings)
    params = dict(lora=lora, base=base, vae=vae_state, idm=idm_state)
    t0 = time.perf_counter()
    ro = prog.rollout(params, batch, jax.random.fold_in(key, 0))
    adv = prog.advantages(ro["reward"])
    jax.block_until_ready(adv)
    t1 = time.perf_counter()
    train_batch = jax.device_put(dict(latents=ro["latents"], log_probs=ro["log_probs"], advantages=adv,
                                      clean_first=batch["clean_first"], cond=batch["cond"]),
                                 prog.train_batch_shardings)
    lora, opt_state, upd = prog.update(lora, opt_state, base, train_batch, jax.random.fold_in(key, 1))
    jax.block_until_ready(lora)
    t2 = time.perf_counter()

    # Rollout outputs span every process's devices: gathered (a collective, on every process) before
    # they are read; files are written by process 0 only.
    log = config.log
    plot = bool(log.plot_every) and (it % log.plot_every == 0 or it == config.num_iterations - 1)
    video = bool(log.video_every) and (it % log.video_every == 0 or it == config.num_iterations - 1)
    host = _gather({k: v for k, v in ro.items()
                    if k in ("reward", "actions") or k.startswith("pen_") or (k == "video" and video)})
    if video:
      host["video"] = host["video"][:log.num_videos]
    reward = np.asarray(host["reward"])
    metrics = dict(reward_mean=float(reward.mean()), reward_std=float(reward.std()),
                   **{f"penalty_{k}": float(np.mean(host[f"pen_{k}"])) for k in PENALTY_TERMS},
                   **{k: float(v) for k, v in _gather(upd).items()},
                   time_rollout=t1 - t0, time_update=t2 - t1)
    if metrics["skipped"] > 0:
      print(f"grpo iteration {it}: {int(metrics['skipped'])} optimiser step(s) skipped (non-finite loss or grads)")
    writer.write(it, metrics)

    main = jax.process_index() == 0
    if plot and main:
      _plots(workdir / "idm_plots", it, host, config.reward.fps)
    if video and main:
      _videos(workdir / "videos", it, host["video"], config.reward.fps)
    if s.eval_every and it % s.eval_every == 0:
      ev = prog.evaluate(dict(lora=lora, base=base, vae=vae_state, idm=idm_state), batch, jax.random.fold_in(key, 2))
      writer.write(it, {"eval_reward_mean": float(np.mean(_gather(ev["reward"])))})
    last = it == config.num_iterations - 1
    if (it + 1) % log.checkpoint_every == 0 or last:
      ckpt.save(it + 1, dict(lora=_flat(lora), opt=_flat(opt_state)), metrics={"reward_mean": metrics["reward_mean"]},
                meta={"iteration": it + 1}, force=True)
      _save_adapter(workdir / "lora_adapter" / "orbax", lora, it + 1)
      model = nnx.merge(gdef, _gather(lora), base)   # the adapters on every host; the base is not read
      improved = best is None or metrics["reward_mean"] > best
      best = metrics["reward_mean"] if improved else best
      if main:
        export_peft(model, str(workdir / "lora_adapter"))
        if improved:
          export_peft(model, str(workdir / "best_reward"))
  ckpt.close()
  writer.close()
  return metrics


def _save_adapter(path: pathlib.Path, lora, iteration: int):
  """The adapter alone (orbax StandardCheckpointer, overwritten), beside its PEFT export."""
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as c:
    c.save(path.absolute(), {"lora": nnx.to_pure_dict(lora), "iteration": iteration}, force=True)


def _gather(tree):
  """Global arrays -> numpy on every process (a collective on multi-process runs: call it everywhere)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


def _put_global(tree, shardings):
  """Host values (the same on every process) or global arrays onto `shardings` (multi-process safe)."""
  def one(x, sh):
    if isinstance(x, jax.Array) and (not x.is_fully_addressable or len(x.sharding.device_set) > 1):
      return jax.device_put(x, sh)  # already global
    x = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])
  return jax.tree.map(one, tree, shardings)


def _plots(directory: pathlib.Path, it: int, ro, fps: float):
  from eva_jax.utils.plots import plot_bars, plot_joint_trajectories
  directory.mkdir(parents=True, exist_ok=True)
  terms = {k: float(np.mean(ro[f"pen_{k}"])) for k in PENALTY_TERMS}
  plot_bars(directory / f"penalties_{it:05d}.png", {f"iteration {it}": terms},
            title="smoothness penalty terms (batch mean)", log=True)
  actions = np.asarray(ro["actions"])
  reward = np.asarray(ro["reward"])
  order = np.argsort(reward)
  picks = {f"best r={reward[order[-1]]:.3f}": actions[order[-1]],
           f"worst r={reward[order[0]]:.3f}": actions[order[0]]}
  plot_joint_trajectories(directory / f"trajectories_{it:05d}.png", picks, fps=fps,
                          title=f"IDM joint trajectories, iteration {it}")


def _videos(directory: pathlib.Path, it: int, video, fps: float):
  from eva_jax.data.video import write_video
  directory.mkdir(parents=True, exist_ok=True)
  for k in range(video.shape[0]):
    write_video(directory / f"iter{it:05d}_{k}.mp4", video[k], fps=fps)
