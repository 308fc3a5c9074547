"""Training and evaluation of EVA's inverse dynamics model on RoboTwin episodes.

  train_and_evaluate(config, workdir)   # scripts/train_idm.py; configs/idm.py documents the fields
  evaluate(config, workdir)             # scripts/eval_idm.py: per-joint MAE, smoothness, PNG plots

Loss: regression of the 14 joints normalised by (train_mean, train_std), with SmoothL1 (Huber) of a
small beta by default (config.loss). It is L1 almost everywhere, which matches the metric that
selects checkpoints (validation MAE) and does not let the bimodal gripper dims or label noise at
contacts dominate as squared error would; the quadratic band around 0 keeps the gradient continuous at
the optimum. The original's loss is not known (spec/eva.md B); 'l1' and 'mse' are available.

Augmentation (on device, in JAX): colour jitter whose ranges widen linearly with training progress
(brightness (0.8,1.2)->(0.4,1.6), contrast (0.7,1.3)->(0.7,1.7), saturation (0.5,1.5)->(0.5,2.0),
hue 0.05->0.10; the four ops in a random order, one draw per window so its 3 frames stay consistent),
and an optional left/right flip that mirrors the image, swaps the arm halves of the label and negates
dims [0, 4, 5, 7, 11, 12].

Checkpoints (orbax, under workdir/checkpoints, `best/` by val_mae) keep the original's layout:
{'model_state_dict': nnx state (params, BatchNorm statistics, train_mean/std),
 'optimizer_state_dict': optax state, 'step': int}. Restarting with the same workdir resumes: the
data pipeline is indexed by step and every random key is fold_in(seed, step), so an interrupted run
ends with the same parameters as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from eva_jax import parallel, weights
from eva_jax.data import idm_dataset, robotwin
from eva_jax.models import idm as idm_lib
from eva_jax.parallel.sharding import named_sharding, state_shardings

FLIP_NEGATE_DIMS = (0, 4, 5, 7, 11, 12)


# MARK: augmentation

@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Colour-jitter ranges at progress 0 and 1 (interpolated linearly), and the flip probability."""
  color_jitter: bool = True
  brightness: tuple[tuple[float, float], tuple[float, float]] = ((0.8, 1.2), (0.4, 1.6))
  contrast: tuple[tuple[float, float], tuple[float, float]] = ((0.7, 1.3), (0.7, 1.7))
  saturation: tuple[tuple[float, float], tuple[float, float]] = ((0.5, 1.5), (0.5, 2.0))
  hue: tuple[float, float] = (0.05, 0.10)
  flip_prob: float = 0.0

  @classmethod
  def from_config(cls, c) -> "AugmentConfig":
    pair = lambda v: tuple(tuple(float(x) for x in r) for r in v)
    return cls(color_jitter=bool(c.color_jitter), brightness=pair(c.brightness), contrast=pair(c.contrast),
               saturation=pair(c.saturation), hue=tuple(float(x) for x in c.hue), flip_prob=float(c.flip_prob))


def _lerp(r, p):
  (lo0, hi0), (lo1, hi1) = r
  return lo0 + p * (lo1 - lo0), hi0 + p * (hi1 - hi0)


def _gray(x):  # [..., 3] -> [..., 1], ITU-R 601 luma like torchvision
  return (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])[..., None]


def _rgb_to_hsv(x):
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  maxc, minc = x.max(-1), x.min(-1)
  cr = maxc - minc
  s = cr / jnp.where(maxc == 0, 1.0, maxc)
  crd = jnp.where(cr == 0, 1.0, cr)
  rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
  h = jnp.where(maxc == r, bc - gc, jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
  h = jnp.mod(h / 6.0 + 1.0, 1.0)
  return h, s, maxc


def _hsv_to_rgb(h, s, v):
  i = jnp.floor(h * 6.0)
  f = h * 6.0 - i
  i = i.astype(jnp.int32) % 6
  p = jnp.clip(v * (1 - s), 0, 1)
  q = jnp.clip(v * (1 - s * f), 0, 1)
  t = jnp.clip(v * (1 - s * (1 - f)), 0, 1)
  table = jnp.stack([jnp.stack(c, -1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
  return jnp.take_along_axis(jnp.moveaxis(table, 0, -2), i[..., None, None], axis=-2)[..., 0, :]


def color_jitter(key: jax.Array, frames: jax.Array, progress: jax.Array, cfg: AugmentConfig) -> jax.Array:
  """frames [T, H, W, 3] in [0, 1] (one window) -> jittered, the same draw for all T frames."""
  kb, kc, ks, kh, ko = jax.random.split(key, 5)
  b = jax.random.uniform(kb, (), minval=_lerp(cfg.brightness, progress)[0], maxval=_lerp(cfg.brightness, progress)[1])
  c = jax.random.uniform(kc, (), minval=_lerp(cfg.contrast, progress)[0], maxval=_lerp(cfg.contrast, progress)[1])
  s = jax.random.uniform(ks, (), minval=_lerp(cfg.saturation, progress)[0], maxval=_lerp(cfg.saturation, progress)[1])
  hue_max = cfg.hue[0] + progress * (cfg.hue[1] - cfg.hue[0])
  h = jax.random.uniform(kh, (), minval=-hue_max, maxval=hue_max)

  def brightness(x):
    return jnp.clip(x * b, 0, 1)

  def contrast(x):  # blend with each frame's mean grey level
    return jnp.clip(c * x + (1 - c) * _gray(x).mean(axis=(-3, -2, -1), keepdims=True), 0, 1)

  def saturation(x):
    return jnp.clip(s * x + (1 - s) * _gray(x), 0, 1)

  def hue(x):
    hh, ss, vv = _rgb_to_hsv(x)
    return _hsv_to_rgb(jnp.mod(hh + h, 1.0), ss, vv)

  ops = (brightness, contrast, saturation, hue)
  order = jax.random.permutation(ko, len(ops))  # torchvision applies the four in a random order
  for k in range(len(ops)):
    frames = jax.lax.switch(order[k], ops, frames)
  return frames


def flip_left_right(frames: jax.Array, actions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mirror [..., H, W, 3] frames; swap the arm halves of [..., 14] joints and negate the mirrored dims."""
  half = actions.shape[-1] // 2
  swapped = jnp.concatenate([actions[..., half:], actions[..., :half]], axis=-1)
  sign = jnp.ones((actions.shape[-1],)).at[jnp.asarray(FLIP_NEGATE_DIMS)].set(-1.0)
  return frames[..., ::-1, :], swapped * sign


def augment(key: jax.Array, frames: jax.Array, actions: jax.Array, progress: jax.Array,
            cfg: AugmentConfig) -> tuple[jax.Array, jax.Array]:
  """frames [B, T, H, W, 3] in [0, 1], actions [B, 14] joint units -> augmented pair."""
  kj, kf = jax.random.split(key)
  if cfg.color_jitter:
    keys = jax.random.split(kj, frames.shape[0])
    frames = jax.vmap(color_jitter, in_axes=(0, 0, None, None))(keys, frames, progress, cfg)
  if cfg.flip_prob > 0:
    do = jax.random.bernoulli(kf, cfg.flip_prob, (frames.shape[0],))
    ff, fa = flip_left_right(frames, actions)
    frames = jnp.where(do[:, None, None, None, None], ff, frames)
    actions = jnp.where(do[:, None], fa, actions)
  return frames, actions


# MARK: loss and steps

def regression_loss(pred: jax.Array, target: jax.Array, kind: str = "smooth_l1", beta: float = 0.05) -> jax.Array:
  """Mean over batch and joints of the elementwise loss on normalised joints."""
  d = pred - target
  if kind == "l1":
    return jnp.abs(d).mean()
  if kind == "mse":
    return jnp.square(d).mean()
  if kind == "smooth_l1":  # torch SmoothL1Loss(beta)
    ad = jnp.abs(d)
    return jnp.where(ad < beta, 0.5 * ad * ad / beta, ad - 0.5 * beta).mean()
  raise ValueError(f"config.loss.kind: unknown loss {kind!r}; expected 'smooth_l1', 'l1' or 'mse'")


@dataclasses.dataclass(frozen=True)
class StepConfig:
  augment: AugmentConfig
  loss: str = "smooth_l1"
  beta: float = 0.05


@nnx.jit(static_argnames=("cfg",), donate_argnames=("model", "opt"))
def train_step(model: idm_lib.IDM, opt: nnx.Optimizer, frames: jax.Array, actions: jax.Array,
               key: jax.Array, progress: jax.Array, cfg: StepConfig) -> dict[str, jax.Array]:
  """One AdamW step. frames uint8 [B, T, H, W, 3], actions [B, 14] joint units."""
  k_aug, k_drop = jax.random.split(key)
  x, a = augment(k_aug, frames.astype(jnp.float32) / 255.0, actions, progress, cfg.augment)
  x = idm_lib.preprocess(x, model.cfg.image_size)
  target = model.normalize(a)

  def loss_fn(m):
    pred = m.normalized(x, rngs=nnx.Rngs(dropout=k_drop))
    return regression_loss(pred, target, cfg.loss, cfg.beta), pred

  (loss, pred), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  opt.update(model, grads)
  mae = jnp.abs(model.denormalize(pred) - a).mean()
  return {"loss": loss, "train_mae": mae, "grad_norm": optax.tree.norm(grads)}


@nnx.jit
def _abs_errors(model: idm_lib.IDM, frames: jax.Array, actions: jax.Array) -> jax.Array:
  """[B, 14] absolute errors in joint units (eval mode)."""
  return jnp.abs(model(frames.astype(jnp.float32) / 255.0) - actions)


def validate(model: idm_lib.IDM, windows, batch_size: int, max_batches: int = 0,
             sharding=None) -> dict[str, float]:
  """Validation MAE over every window (or the first `max_batches` batches), overall and per joint."""
  model.eval()
  total, count = None, 0
  for b, batch in enumerate(idm_dataset.eval_batches(windows, batch_size=batch_size)):
    if max_batches and b >= max_batches:
      break
    n = len(batch["action"])
    frames, actions = _pad(batch["frames"], batch_size), _pad(batch["action"], batch_size)
    if sharding is not None:
      frames, actions = jax.device_put(frames, sharding[0]), jax.device_put(actions, sharding[1])
    err = np.asarray(_abs_errors(model, frames, actions))[:n]  # fixed shapes: one compile
    total = err.sum(0) if total is None else total + err.sum(0)
    count += n
  model.train()
  per_joint = total / max(count, 1)
  out = {"val_mae": float(per_joint.mean())}
  out.update({f"val_mae/{j:02d}": float(v) for j, v in enumerate(per_joint)})
  return out


def _pad(x: np.ndarray, n: int) -> np.ndarray:
  return x if len(x) == n else np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)])


# MARK: model, data and checkpoints

def model_config(config) -> idm_lib.IDMConfig:
  """config.model -> IDMConfig (see eva_jax.weights.idm_config)."""
  return weights.idm_config(config.model)


# One compiled initialiser per config (eager init would compile one program per parameter shape).
@functools.partial(nnx.jit, static_argnums=(0,))
def _init_model(cfg: idm_lib.IDMConfig, key: jax.Array) -> idm_lib.IDM:
  return idm_lib.IDM(cfg, rngs=nnx.Rngs(key))


_TX_CACHE: dict[str, optax.GradientTransformation] = {}


def _make_tx(optim_cfg) -> optax.GradientTransformation:
  """make_optimizer, memoised by config: the transformation is static in the optimizer's graph, so an
  equal config must give the same object for a later run (a resume) to reuse the compiled step."""
  from eva_jax.training.optim import make_optimizer
  key = repr(sorted(optim_cfg.to_dict().items()) if hasattr(optim_cfg, "to_dict") else optim_cfg)
  if key not in _TX_CACHE:
    _TX_CACHE[key] = make_optimizer(optim_cfg)
  return _TX_CACHE[key]


@functools.partial(nnx.jit, static_argnums=(1,))
def _init_optimizer(model: idm_lib.IDM, tx: optax.GradientTransformation) -> nnx.Optimizer:
  return nnx.Optimizer(model, tx, wrt=nnx.Param)


def build_model(config) -> idm_lib.IDM:
  """The IDM of config.model, initialised per config.init ('random', 'torch' = any IDM source of
  eva_jax.weights at init.path, e.g. a released-layout .pt or an IDM run; 'imagenet' = a torchvision
  ResNet-50 .pth for the trunk with its stem repeated over the 3 frames / 3)."""
  cfg = model_config(config)
  kind, path = config.init.kind, config.init.path
  if kind not in ("random", "torch", "imagenet"):
    raise ValueError(f"config.init.kind: unknown {kind!r}; expected 'random', 'torch' or 'imagenet'")
  if kind == "torch":
    return nnx.merge(*weights.load("idm", path, cfg))
  model = _init_model(cfg, jax.random.key(config.seed))
  if kind == "imagenet":
    import torch
    from convert import idm as convert_idm
    sd = torch.load(path, map_location="cpu", weights_only=False)
    pure = nnx.to_pure_dict(nnx.state(model))
    pure["backbone"] = convert_idm.convert_resnet_backbone(sd, cfg)  # head stays randomly initialised
    _load_pure(model, pure)
  return model


def set_joint_stats(model: idm_lib.IDM, mean: np.ndarray, std: np.ndarray) -> None:
  model.train_mean[...] = jnp.asarray(mean, jnp.float32)
  model.train_std[...] = jnp.asarray(std, jnp.float32)


def prepare_data(config, workdir: pathlib.Path) -> dict[str, Any]:
  """{split: record source}: a prepared TFDS directory (config.data.tfds_dir) or built once from the
  HDF5 episodes under config.data.root into workdir/tfds."""
  d = config.data
  tfds_dir = pathlib.Path(d.tfds_dir) if d.tfds_dir else workdir / "tfds"
  try:
    return idm_dataset.load_idm_sources(tfds_dir)
  except FileNotFoundError:
    if not d.root:
      raise FileNotFoundError(f"no prepared IDM dataset at {tfds_dir}; set config.data.root to the RoboTwin "
                              "episode directory (episode*.hdf5) to build it")
  if jax.process_index() == 0:
    episodes = robotwin.list_episodes(d.root, d.pattern)
    logging.info("building the IDM dataset from %d episodes under %s", len(episodes), d.root)
    idm_dataset.build_idm_dataset(episodes, tfds_dir, val_fraction=d.val_fraction, seed=config.seed,
                                  camera=d.camera)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("idm_dataset_built")
  return idm_dataset.load_idm_sources(tfds_dir)


def checkpoint_tree(model: nnx.Module, opt: nnx.Optimizer, step: int) -> dict:
  """The original's checkpoint layout, as a pytree of arrays."""
  return {"model_state_dict": nnx.to_pure_dict(nnx.state(model)),
          "optimizer_state_dict": nnx.to_pure_dict(nnx.state(opt)),
          "step": jnp.asarray(step, jnp.int32)}


def restore_into(tree: Mapping, model: nnx.Module, opt: nnx.Optimizer | None = None) -> int:
  """Loads a restored checkpoint tree into model (and optimizer); returns its step."""
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, tree["model_state_dict"])
  nnx.update(model, state)
  if opt is not None:
    ostate = nnx.state(opt)
    nnx.replace_by_pure_dict(ostate, tree["optimizer_state_dict"])
    nnx.update(opt, ostate)
  return int(np.asarray(tree["step"]))


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


# MARK: train_and_evaluate

def train_and_evaluate(config, workdir: str | pathlib.Path) -> dict[str, float]:
  """Trains for config.train.num_steps; resumes from workdir/checkpoints when it holds a checkpoint.

  Writes config.json, metrics.jsonl + tensorboard/, checkpoints/ (+ best/ by val_mae) under `workdir`.
  Returns the last logged metrics (train and validation).
  """
  from eva_jax.training.checkpoints import Checkpointer
  from eva_jax.utils.metrics import MetricWriter, StepClock, fetch_finite
  from eva_jax.utils.progress import progress
  from eva_jax.utils.rundir import save_config

  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    save_config(workdir, config)
  logging.info("IDM training on %d devices (%d hosts), process %d", jax.device_count(),
               jax.process_count(), jax.process_index())
  mesh = parallel.make_mesh(dict(config.mesh))
  t = config.train

  sources = prepare_data(config, workdir)
  d = config.data
  train_windows = idm_dataset.WindowSource(sources["train"], d.num_frames, d.stride)
  val_windows = idm_dataset.WindowSource(sources["val"], d.num_frames, d.stride) if "val" in sources else None

  model = build_model(config)
  if d.norm_stats == "dataset":
    acts = np.stack([np.asarray(r["action"]) for r in sources["train"]])
    set_joint_stats(model, acts.mean(0), np.maximum(acts.std(0), 1e-6))
  elif d.norm_stats != "model":
    raise ValueError(f"config.data.norm_stats: {d.norm_stats!r}; expected 'model' (keep the checkpoint's / "
                     "AnyPos mean and std) or 'dataset'")
  opt = _init_optimizer(model, _make_tx(config.optim))
  # Replicated weights, batch split over ('data', 'fsdp') (activation rule 'act_batch').
  for obj in (model, opt):
    st = nnx.state(obj)
    nnx.update(obj, jax.device_put(st, state_shardings(st, mesh)))
  batch_sharding = (named_sharding(mesh, ("act_batch", None, None, None, None)),
                    named_sharding(mesh, ("act_batch", None)))
  step_cfg = StepConfig(AugmentConfig.from_config(config.augment), config.loss.kind, float(config.loss.beta))

  ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=t.keep_checkpoints,
                      best_metric="val_mae" if val_windows is not None else None, best_mode="min",
                      async_save=t.async_checkpoint)
  start = 0
  if t.resume and ckpt.latest_step() is not None:
    tree, _ = ckpt.restore(target=_abstract(checkpoint_tree(model, opt, 0)))
    start = restore_into(tree, model, opt)
    logging.info("resumed from %s at step %d", ckpt.directory, start)
  writer = MetricWriter(workdir)
  total = int(t.num_steps)
  # stop_at splits a run into chunks (e.g. preemptible jobs); schedules still span num_steps.
  stop = min(int(t.stop_at), total) if t.get("stop_at") else total
  loader = idm_dataset.train_loader(train_windows, batch_size=t.batch_size // jax.process_count(),
                                    seed=config.seed, start_step=start, num_workers=d.num_workers)
  base_key = jax.random.key(config.seed)
  model.train()
  last: dict[str, float] = {}
  since, clock = start, StepClock()
  it = iter(loader)
  for step in progress(range(start, stop), total=total, initial=start, desc="idm"):
    with clock.data():
      batch = next(it)
    frames = _global(batch["frames"], batch_sharding[0])
    actions = _global(batch["action"], batch_sharding[1])
    metrics = train_step(model, opt, frames, actions, jax.random.fold_in(base_key, step),
                         jnp.float32(step / max(total - 1, 1)), step_cfg)
    done = step + 1
    clock.stepped(metrics)
    if done % t.log_every == 0 or done in (total, stop):
      values = fetch_finite(metrics, done, since, "IDM training")
      since = done
      values.update(clock.rates(t.batch_size, "windows"))
      values["learning_rate"] = float(_lr(config.optim, done))
      last.update(writer.write(done, values))
    val: dict[str, float] = {}
    if val_windows is not None and config.eval.every and (done % config.eval.every == 0 or done == total):
      val = validate(model, val_windows, config.eval.batch_size, config.eval.max_batches, batch_sharding)
      last.update(writer.write(done, val))
    if done % t.checkpoint_every == 0 or done in (total, stop):
      ckpt.save(done, checkpoint_tree(model, opt, done), metrics=val or None)
  ckpt.close()
  writer.close()
  return last


def _global(x: np.ndarray, sharding) -> jax.Array:
  """This host's batch slice -> a global array sharded over the batch axes."""
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  return jax.make_array_from_process_local_data(sharding, x)


def _lr(optim_cfg, step: int) -> float:
  from eva_jax.training.optim import make_schedule
  return float(make_schedule(optim_cfg)(step))


# MARK: evaluate (whole episodes)

def load_trained_idm(path: str | pathlib.Path, config=None, best: bool = True) -> idm_lib.IDM:
  """An IDM in eval mode from any IDM source of eva_jax.weights: a torch checkpoint (.pt/.pth: the release
  layout) or a train_idm run directory / checkpoints directory (its best/ checkpoint when `best` and one
  exists; the run's config.json gives the architecture, else `config`)."""
  cfg = model_config(config) if config is not None else None
  overrides = {"image_size": cfg.image_size} if cfg is not None else None
  return weights.load_module("idm", path, default_cfg=cfg, overrides=overrides, best=best)


def episode_metrics(pred: np.ndarray, true: np.ndarray, fps: float) -> dict[str, float]:
  """Per-joint MAE and the reward's smoothness terms of predicted and true [T, 14] trajectories."""
  from eva_jax.rl.reward import reward_from_penalty, smoothness_penalty
  out = {"mae": float(np.abs(pred - true).mean())}
  out.update({f"mae/{j:02d}": float(v) for j, v in enumerate(np.abs(pred - true).mean(0))})
  for name, traj in (("pred", pred), ("true", true)):
    terms = smoothness_penalty(jnp.asarray(traj[None], jnp.float32), fps)
    for k, v in terms.items():
      out[f"{name}/{k}"] = float(v[0])
    out[f"{name}/reward"] = float(reward_from_penalty(terms["total"])[0])
  return out


def _bucket(n: int, multiple: int = 16) -> int:
  return -(-n // multiple) * multiple


def predict_episode(model: idm_lib.IDM, frames_u8: np.ndarray, batch_size: int | None = 64) -> np.ndarray:
  """[T, H, W, 3] uint8 -> [T, 14] joint units. The video is padded to a multiple of 16 frames by
  repeating its last frame, which leaves every clamped window unchanged and bounds recompiles."""
  n = len(frames_u8)
  padded = np.concatenate([frames_u8, np.repeat(frames_u8[-1:], _bucket(n) - n, axis=0)])
  video = jnp.asarray(padded, jnp.float32)[None] / 255.0
  return np.asarray(idm_lib.actions_from_video(model, video, batch_size or None))[0, :n]


def evaluate(config, workdir: str | pathlib.Path) -> dict[str, float]:
  """Per-episode predictions of the IDM in config.eval.checkpoint on the episodes under
  config.eval.episodes (default: the validation split's episodes of config.data.root), with per-joint
  MAE, smoothness of predicted vs true trajectories (metrics.json, per_episode.jsonl) and one PNG of
  predicted vs true joints per episode (plots/)."""
  import json
  from eva_jax.utils.plots import plot_joint_trajectories
  from eva_jax.utils.progress import progress

  e = config.eval
  workdir = pathlib.Path(workdir)
  (workdir / "plots").mkdir(parents=True, exist_ok=True)
  model = load_trained_idm(e.checkpoint, config)
  if e.episodes:
    paths = [pathlib.Path(p) for p in e.episodes.split(",")]
  else:
    if not config.data.root:
      raise ValueError("evaluate: set config.eval.episodes (comma-separated HDF5 files) or config.data.root")
    episodes = robotwin.list_episodes(config.data.root, config.data.pattern)
    paths = [pathlib.Path(p) for p in idm_dataset.split_episodes(
        episodes, config.data.val_fraction, config.seed)["val"] or episodes]
  if e.max_episodes:
    paths = paths[: e.max_episodes]
  rows = []
  with open(workdir / "per_episode.jsonl", "w") as f:
    for i, path in enumerate(progress(paths, desc="eval idm")):
      frames, true = robotwin.read_episode(path, config.data.camera)
      pred = predict_episode(model, frames, e.idm_batch_size)
      row = episode_metrics(pred, true, e.fps)
      f.write(json.dumps({"episode": str(path), **row}) + "\n")
      rows.append(row)
      if i < e.max_plots or not e.max_plots:
        plot_joint_trajectories(workdir / "plots" / f"{i:03d}_{path.stem}.png",
                                {"true": true, "IDM": pred}, fps=e.fps,
                                title=f"{path.parent.parent.name}/{path.name}  MAE {row['mae']:.4f}")
  summary = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
  summary["num_episodes"] = len(rows)
  (workdir / "metrics.json").write_text(json.dumps(summary, indent=2))
  return summary
