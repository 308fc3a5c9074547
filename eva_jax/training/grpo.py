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

from eva_jax.diffusion.schedules import wan_timesteps
from eva_jax.models.wan import WanModel, wan_config  # before lora: models.wan imports models.lora
from eva_jax.models.lora import LoRAParam, disable_lora, export_peft  # noqa: I001
from eva_jax.parallel import make_mesh, named_sharding, state_shardings
from eva_jax.rl import grpo as grpo_lib
from eva_jax.rl import reward as reward_lib
from eva_jax.rl.rollout import RolloutConfig, make_rollout_fn
from eva_jax.training.checkpoints import Checkpointer
from eva_jax.training.optim import make_optimizer
from eva_jax.utils.metrics import MetricWriter
from eva_jax.utils.progress import progress
from eva_jax.utils.rundir import save_config

PENALTY_TERMS = ("jerk", "acc", "vlim", "alim", "total")


# MARK: model construction


def _create_sharded(ctor, mesh, *filters, jit_init: bool = True):
  """Builds a module in its sharded layout: (graphdef, state per filter, their shardings).

  jit_init: initialise inside `jax.jit` with out_shardings, so no device ever holds the whole model
  (14B). Small models init eagerly and are then placed: compiling the init of every parameter costs
  more than running it op by op.
  """
  abstract = nnx.eval_shape(ctor)
  gdef, *abs_states = nnx.split(abstract, *filters)
  shardings = tuple(state_shardings(s, mesh) for s in abs_states)

  def make():
    _, *states = nnx.split(ctor(), *filters)
    return tuple(states)
  states = jax.jit(make, out_shardings=shardings)() if jit_init else jax.device_put(make(), shardings)
  return gdef, states, shardings


def _restore_any(path: str):
  """Raw pytree of an orbax checkpoint: a run dir, a Checkpointer root, or a StandardCheckpointer dir."""
  from eva_jax.training.sft import restore_tree
  return restore_tree(path)


def _pick(tree: Any, keys, what: str, path: str):
  for k in keys:
    if isinstance(tree, dict) and k in tree:
      return tree[k]
  if isinstance(tree, dict):
    return tree
  raise ValueError(f"{what} checkpoint {path}: expected a dict with one of {keys}, got {type(tree)}")


def _without_lora(tree):
  """A pure dict minus LoRA factors (an SFT checkpoint trained with adapters still loads as base)."""
  if isinstance(tree, dict):
    return {k: _without_lora(v) for k, v in tree.items() if k not in ("lora_a", "lora_b")}
  return tree


def load_pure_into(state, pure, what: str, path: str, shardings):
  """Loads a pure-dict checkpoint into `state` (keys must match), cast to the state's dtypes, placed."""
  ref = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  try:
    nnx.replace_by_pure_dict(state, pure)
  except (KeyError, ValueError, TypeError) as e:
    raise ValueError(f"{what} checkpoint {path} does not match the configured model: {e}") from e
  def cast(x, r):
    if tuple(np.shape(x)) != tuple(r.shape):
      raise ValueError(f"{what} checkpoint {path}: a parameter has shape {tuple(np.shape(x))}, the model "
                       f"expects {tuple(r.shape)}")
    return jnp.asarray(x, r.dtype)
  state = jax.tree.map(cast, state, ref)
  return jax.device_put(state, shardings)


def load_idm(config, mesh):
  """The reward IDM (eval mode) from `config.reward.idm_checkpoint`: a torch `.pt` (the released
  IDM_singleview.pt, converted by convert.idm) or an orbax directory written by train_idm."""
  from eva_jax.models.idm import IDM, idm_config
  path = config.reward.idm_checkpoint
  if not path:
    raise ValueError("GRPO needs the reward IDM: set --config.reward.idm_checkpoint=<IDM_singleview.pt "
                     "or an orbax IDM checkpoint directory> (the original's reward_model_path)")
  if not pathlib.Path(path).exists():
    raise FileNotFoundError(f"config.reward.idm_checkpoint: {path} does not exist")
  if path.endswith((".pt", ".pth", ".bin")):
    import torch
    from convert.idm import load_idm as load_torch_idm
    idm = load_torch_idm(torch.load(path, map_location="cpu", weights_only=False))
  elif (pathlib.Path(path) / "config.json").exists():  # a train_idm run directory: its own config
    import json

    import ml_collections

    from eva_jax.training.idm import load_trained_idm
    idm_run_cfg = ml_collections.ConfigDict(json.loads((pathlib.Path(path) / "config.json").read_text()))
    idm = load_trained_idm(path, idm_run_cfg)
  else:
    idm = IDM(idm_config(config.reward.idm_preset), rngs=nnx.Rngs(0))
    pure = _pick(_restore_any(path), ("model_state_dict", "model", "params"), "IDM", path)
    state = nnx.state(idm)
    state = load_pure_into(state, pure, f"IDM (idm_config({config.reward.idm_preset!r}))", path,
                           jax.tree.map(lambda x: x.sharding, state))
    nnx.update(idm, state)
    idm.eval()
  gdef, state = nnx.split(idm)
  return gdef, jax.device_put(state, state_shardings(state, mesh))


def build_policy(config, mesh):
  """Wan DiT with LoRA: (graphdef, lora state, base state, their shardings)."""
  m = config.model
  overrides = dict(dtype=m.dtype, param_dtype=m.param_dtype, attention=m.attention, remat=m.remat,
                   lora_rank=m.lora_rank, lora_alpha=m.lora_alpha)
  if m.num_layers:
    overrides["num_layers"] = m.num_layers
  cfg = wan_config(m.preset, **overrides)
  gdef, (lora, base), (lora_sh, base_sh) = _create_sharded(
      lambda: WanModel(cfg, rngs=nnx.Rngs(config.seed)), mesh, LoRAParam, ..., jit_init=m.sharded_init)
  if m.checkpoint:  # the SFT run (its train state's 'params'), or a converted DiT checkpoint
    pure = _without_lora(_pick(_restore_any(m.checkpoint), ("params", "model"), "DiT", m.checkpoint))
    base = load_pure_into(base, pure, f"DiT (wan_config({m.preset!r}))", m.checkpoint, base_sh)
  else:
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
  from eva_jax.models.vae import WanVAE, vae_config
  vcfg = vae_config(config.vae.preset)
  gdef, (state,), (sh,) = _create_sharded(lambda: WanVAE(vcfg, rngs=nnx.Rngs(config.seed + 1)), mesh, ...,
                                          jit_init=False)  # ≤ 0.13 B parameters
  if config.vae.checkpoint:  # a VAE training run or the convert CLI's orbax output
    pure = _pick(_restore_any(config.vae.checkpoint), ("params", "model"), "VAE", config.vae.checkpoint)
    state = load_pure_into(state, pure, f"VAE (vae_config({config.vae.preset!r}))", config.vae.checkpoint, sh)
  return gdef, state


# MARK: data


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


def _first_frame(path, height: int, width: int) -> np.ndarray:
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


def csv_conditions(config, wan_cfg, vae_gdef, vae_state) -> tuple[np.ndarray, dict]:
  """First frames and conditioning of the first `data.num_conditions` rows of an EVA metadata CSV.

  Frame 0 of each video is VAE-encoded to the clean history latent. Text: the cached umT5 embedding
  (`prompt_embed_path`, text_source 'cached') or, for smoke runs, the same fixed Gaussian embedding
  per caption that SFT's text.source='synthetic' uses. CLIP features: zeros (SFT's clip.source
  'zeros'; EVA feeds CLIP of frame 0, which needs the CLIP encoder).
  """
  import zlib

  from eva_jax.data.metadata import load_records
  d, s = config.data, config.sample
  root = pathlib.Path(d.data_root)
  records = load_records(root, d.metadata_path, d.split)[: d.num_conditions]
  if len(records) < d.num_conditions:
    raise ValueError(f"{root / d.metadata_path}: split {d.split!r} has {len(records)} rows, "
                     f"data.num_conditions={d.num_conditions}")
  encode = jax.jit(lambda st, v: nnx.merge(vae_gdef, st).encode(v))
  firsts, texts = [], []
  for rec in records:
    frame = _first_frame(root / rec["video_path"], 8 * s.latent_height, 8 * s.latent_width)
    firsts.append(np.asarray(encode(vae_state, jnp.asarray(frame[None]))[0]))   # [1, h, w, 16]
    if d.text_source == "cached":
      import torch
      emb = torch.load(root / rec["prompt_embed_path"], map_location="cpu").float().numpy()
    elif d.text_source == "synthetic":
      cid = zlib.crc32(str(rec.get("caption", "")).encode())
      emb = np.random.default_rng(cid).standard_normal((d.text_tokens, wan_cfg.text_dim)).astype(np.float32)
    else:
      raise ValueError(f"data.text_source must be 'cached' or 'synthetic', got {d.text_source!r}")
    emb = emb[: d.text_tokens]
    texts.append(np.pad(emb, ((0, d.text_tokens - emb.shape[0]), (0, 0))))
  n = len(records)
  return np.stack(firsts), dict(context=np.stack(texts).astype(np.float32),
                                clip_fea=np.zeros((n, 257, wan_cfg.image_dim), np.float32))


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
                         t_hist=float(timesteps[-1]), fps=config.reward.fps)
  up_cfg = grpo_lib.GRPOUpdateConfig(
      num_train_timesteps=n_train, num_inner_epochs=tr.num_inner_epochs,
      micro_batch=tr.micro_batch or batch_size, accum_micro=tr.accum_micro, clip_range=tr.clip_range,
      adv_clip=tr.adv_clip, beta=tr.beta, sde_variant=s.sde_variant, noise_level=s.noise_level,
      sigma_max=ro_cfg.sigma_max, sigma_min=ro_cfg.sigma_min, t_hist=ro_cfg.t_hist)

  # Each model is merged inside its own (inlined) jit, so its variables live at one trace level even
  # when called from a lax.scan body (nnx.scan over the DiT blocks checks this).
  @jax.jit
  def policy_fn(lora_s, base_s, x, t, cond):
    return nnx.merge(gdef, lora_s, base_s)(x, t, cond["context"], cond["clip_fea"])

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
  rollout_fn = make_rollout_fn(policy_fn, decode_fn, actions_fn, timesteps, sigmas, ro_cfg, reward_cfg)
  eval_fn = make_rollout_fn(policy_fn, decode_fn, actions_fn, timesteps, sigmas,
                            dataclasses.replace(ro_cfg, deterministic=True), reward_cfg)
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


def train_and_evaluate(config, workdir: str | pathlib.Path) -> dict[str, float]:
  """Runs (or resumes) GRPO in `workdir`; returns the last iteration's metrics."""
  if not config.reward.idm_checkpoint:  # fail before building anything
    load_idm(config, None)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  save_config(workdir, config)
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

  if config.data.kind == "csv":
    table = csv_conditions(config, wan_cfg, vae_gdef, vae_state)
  elif config.data.kind == "synthetic":
    table = None
  else:
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
    if table is None:
      first, cond = synthetic_conditions(config, wan_cfg, jnp.asarray(rows))
    else:
      first, cond = table[0][rows], {k: v[rows] for k, v in table[1].items()}
    batch = jax.device_put(dict(clean_first=first, cond=cond), prog.batch_shardings)
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

    reward = np.asarray(jax.device_get(ro["reward"]))
    metrics = dict(reward_mean=float(reward.mean()), reward_std=float(reward.std()),
                   **{f"penalty_{k}": float(np.mean(jax.device_get(ro[f"pen_{k}"]))) for k in PENALTY_TERMS},
                   **{k: float(v) for k, v in jax.device_get(upd).items()},
                   time_rollout=t1 - t0, time_update=t2 - t1)
    if metrics["skipped"] > 0:
      print(f"grpo iteration {it}: {int(metrics['skipped'])} optimiser step(s) skipped (non-finite loss or grads)")
    writer.write(it, metrics)

    log = config.log
    if log.plot_every and (it % log.plot_every == 0 or it == config.num_iterations - 1):
      _plots(workdir / "idm_plots", it, ro, config.reward.fps)
    if log.video_every and (it % log.video_every == 0 or it == config.num_iterations - 1):
      _videos(workdir / "videos", it, ro["video"], log.num_videos, config.reward.fps)
    if s.eval_every and it % s.eval_every == 0:
      ev = prog.evaluate(dict(lora=lora, base=base, vae=vae_state, idm=idm_state), batch, jax.random.fold_in(key, 2))
      writer.write(it, {"eval_reward_mean": float(np.mean(jax.device_get(ev["reward"])))})
    last = it == config.num_iterations - 1
    if (it + 1) % log.checkpoint_every == 0 or last:
      ckpt.save(it + 1, dict(lora=_flat(lora), opt=_flat(opt_state)), metrics={"reward_mean": metrics["reward_mean"]},
                meta={"iteration": it + 1}, force=True)
      _save_adapter(workdir / "lora_adapter" / "orbax", lora, it + 1)
      model = nnx.merge(gdef, lora, base)
      export_peft(model, str(workdir / "lora_adapter"))
      if best is None or metrics["reward_mean"] > best:
        best = metrics["reward_mean"]
        export_peft(model, str(workdir / "best_reward"))
  ckpt.close()
  writer.close()
  return metrics


def _save_adapter(path: pathlib.Path, lora, iteration: int):
  """The adapter alone (orbax StandardCheckpointer, overwritten), beside its PEFT export."""
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as c:
    c.save(path.absolute(), {"lora": nnx.to_pure_dict(lora), "iteration": iteration}, force=True)


def _plots(directory: pathlib.Path, it: int, ro, fps: float):
  from eva_jax.utils.plots import plot_bars, plot_joint_trajectories
  directory.mkdir(parents=True, exist_ok=True)
  terms = {k: float(np.mean(jax.device_get(ro[f"pen_{k}"]))) for k in PENALTY_TERMS}
  plot_bars(directory / f"penalties_{it:05d}.png", {f"iteration {it}": terms},
            title="smoothness penalty terms (batch mean)", log=True)
  actions = np.asarray(jax.device_get(ro["actions"]))
  reward = np.asarray(jax.device_get(ro["reward"]))
  order = np.argsort(reward)
  picks = {f"best r={reward[order[-1]]:.3f}": actions[order[-1]],
           f"worst r={reward[order[0]]:.3f}": actions[order[0]]}
  plot_joint_trajectories(directory / f"trajectories_{it:05d}.png", picks, fps=fps,
                          title=f"IDM joint trajectories, iteration {it}")


def _videos(directory: pathlib.Path, it: int, video, n: int, fps: float):
  from eva_jax.data.video import write_video
  directory.mkdir(parents=True, exist_ok=True)
  video = np.asarray(jax.device_get(video[:n]))
  for k in range(video.shape[0]):
    write_video(directory / f"iter{it:05d}_{k}.mp4", video[k], fps=fps)
