"""Training and evaluation of EVA's inverse dynamics model on RoboTwin episodes.

  train_and_evaluate(config, workdir)   # scripts/train_idm.py; configs/idm.py documents the fields
  evaluate(config, workdir)             # scripts/eval_idm.py: per-joint MAE, smoothness, PNG plots

Two recipes (configs/idm.py `RECIPES`; docs/idm.md "Recipes"): 'authors' reproduces the authors'
RoboTwin dataset and trainer, 'eva_jax' is this project's earlier choice (the demo's).

Input (on device, `FrameTransform`): optionally the authors' 832:480 centre crop + bicubic resize and
their R<->B channel swap, then the IDM's own 512x512 resize and ImageNet normalisation.

Loss: regression of the 14 joints normalised by (train_mean, train_std) with SmoothL1 (config.loss):
beta 1.0 in the authors' recipe (torch's default); beta 0.05 in eva_jax's, L1 almost everywhere like
the validation MAE that selects checkpoints. 'l1' and 'mse' are available.

Augmentation (on device, in JAX): colour jitter (brightness, contrast, saturation, hue; the four ops
in a random order like torchvision), drawn per frame at fixed ranges (authors: ColorJitter runs once
per frame at progress 0) or once per window with ranges that widen with training progress (eva_jax:
(0.8,1.2)->(0.4,1.6), (0.7,1.3)->(0.7,1.7), (0.5,1.5)->(0.5,2.0), hue 0.05->0.10), and an optional
left/right flip that mirrors the image, swaps the arm halves of the label and negates dims
[0, 4, 5, 7, 11, 12].

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
from eva_jax.data.idm_transforms import FrameTransform
from eva_jax.models import idm as idm_lib
from eva_jax.parallel.sharding import named_sharding, state_shardings
from eva_jax.utils import checks, rundir

FLIP_NEGATE_DIMS = (0, 4, 5, 7, 11, 12)


# MARK: augmentation

@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Colour-jitter ranges at progress 0 and 1 (interpolated linearly when `ramp`, else the progress-0
  ranges throughout), one draw per frame (`per_frame`) or per window, and the flip probability."""
  color_jitter: bool = True
  brightness: tuple[tuple[float, float], tuple[float, float]] = ((0.8, 1.2), (0.4, 1.6))
  contrast: tuple[tuple[float, float], tuple[float, float]] = ((0.7, 1.3), (0.7, 1.7))
  saturation: tuple[tuple[float, float], tuple[float, float]] = ((0.5, 1.5), (0.5, 2.0))
  hue: tuple[float, float] = (0.05, 0.10)
  flip_prob: float = 0.0
  ramp: bool = True
  per_frame: bool = False

  @classmethod
  def from_config(cls, c) -> "AugmentConfig":
    pair = lambda v: tuple(tuple(float(x) for x in r) for r in v)
    return cls(color_jitter=bool(c.color_jitter), brightness=pair(c.brightness), contrast=pair(c.contrast),
               saturation=pair(c.saturation), hue=tuple(float(x) for x in c.hue), flip_prob=float(c.flip_prob),
               ramp=bool(c.get("ramp", True)), per_frame=bool(c.get("per_frame", False)))


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
  if not cfg.ramp:
    progress = jnp.zeros_like(progress)
  if cfg.color_jitter and cfg.per_frame:
    # One draw (factors and op order) per frame, like torchvision's ColorJitter called once per frame.
    b, t = frames.shape[:2]
    keys = jax.random.split(kj, b * t)
    single = frames.reshape(b * t, 1, *frames.shape[2:])    # every frame a window of its own
    single = jax.vmap(color_jitter, in_axes=(0, 0, None, None))(keys, single, progress, cfg)
    frames = single.reshape(frames.shape)
  elif cfg.color_jitter:
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
  """Everything static about a train step: input transform, augmentation, loss."""
  augment: AugmentConfig
  loss: str = "smooth_l1"
  beta: float = 0.05
  transform: FrameTransform = FrameTransform()

  @classmethod
  def from_config(cls, config) -> "StepConfig":
    return cls(AugmentConfig.from_config(config.augment), str(config.loss.kind), float(config.loss.beta),
               FrameTransform.from_config(config.data))


@nnx.jit(static_argnames=("cfg",), donate_argnames=("model", "opt"))
def train_step(model: idm_lib.IDM, opt: nnx.Optimizer, frames: jax.Array, actions: jax.Array,
               key: jax.Array, progress: jax.Array, cfg: StepConfig) -> dict[str, jax.Array]:
  """One AdamW step. frames uint8 [B, T, H, W, 3], actions [B, 14] joint units."""
  k_aug, k_drop = jax.random.split(key)
  x = cfg.transform(frames.astype(jnp.float32) / 255.0)  # [B, T, H', W', 3]: crop, channel order
  x, a = augment(k_aug, x, actions, progress, cfg.augment)
  x = idm_lib.preprocess(x, model.cfg.image_size)
  target = model.normalize(a)

  def loss_fn(m):
    pred = m.normalized(x, rngs=nnx.Rngs(dropout=k_drop))
    return regression_loss(pred, target, cfg.loss, cfg.beta), pred

  (loss, pred), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  opt.update(model, grads)
  mae = jnp.abs(model.denormalize(pred) - a).mean()
  return {"loss": loss, "train_mae": mae, "grad_norm": optax.tree.norm(grads)}


@functools.partial(nnx.jit, static_argnames=("transform",))
def _abs_errors(model: idm_lib.IDM, frames: jax.Array, actions: jax.Array,
                transform: FrameTransform = FrameTransform()) -> jax.Array:
  """[B, 14] absolute errors in joint units (eval mode)."""
  return jnp.abs(model(transform(frames.astype(jnp.float32) / 255.0)) - actions)


def validate(model: idm_lib.IDM, windows, batch_size: int, max_batches: int = 0,
             sharding=None, transform: FrameTransform = FrameTransform()) -> dict[str, float]:
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
    err = np.asarray(_abs_errors(model, frames, actions, transform))[:n]  # fixed shapes: one compile
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
    from convert import idm as convert_idm
    sd = load_imagenet_state_dict(path, recipe=config.get("recipe", ""))
    pure = nnx.to_pure_dict(nnx.state(model))
    # The head stays randomly initialised (xavier-uniform, zero bias, as the authors').
    pure["backbone"] = convert_idm.convert_resnet_backbone(sd, cfg, source=str(path))
    _load_pure(model, pure)
  return model


IMAGENET_HELP = ("torchvision's ImageNet ResNet-50 weights (the authors' ResNet50_Weights.DEFAULT = "
                 "IMAGENET1K_V2, file resnet50-11ad3fa6.pth), saved on a machine with internet with "
                 "torch.save(torchvision.models.resnet50(weights='IMAGENET1K_V2').state_dict(), "
                 "'resnet50-11ad3fa6.pth'); see docs/idm.md, \"ImageNet start\"")


def load_imagenet_state_dict(path, recipe: str = "") -> Mapping[str, Any]:
  """The torchvision ResNet state dict in `path` (a .pth of `model.state_dict()`), with errors that say
  what is missing and how to get the file. Nothing is downloaded."""
  where = f" (recipe {recipe!r})" if recipe else ""
  if not path:
    raise ValueError(f"config.init.kind='imagenet'{where} needs --config.init.path: {IMAGENET_HELP}; "
                     "or train from scratch with --config.init.kind=random")
  if not pathlib.Path(path).is_file():
    raise FileNotFoundError(f"config.init.path={str(path)!r}: no such file; expected {IMAGENET_HELP}")
  from convert.io import import_torch
  torch = import_torch("the ImageNet start (init.kind='imagenet')")
  try:
    sd = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # a pickled nn.Module, or not a torch file at all
    raise ValueError(f"config.init.path={str(path)!r}: not loadable as a plain state dict ({type(e).__name__}: "
                     f"{str(e)[:200]}); save `model.state_dict()`, not the model: {IMAGENET_HELP}") from e
  if not isinstance(sd, Mapping):
    raise ValueError(f"config.init.path={str(path)!r}: holds a {type(sd).__name__}, not a state dict; "
                     f"expected {IMAGENET_HELP}")
  return sd


def _load_pure(model: nnx.Module, pure: Mapping) -> None:
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
  nnx.update(model, state)


def set_joint_stats(model: idm_lib.IDM, mean: np.ndarray, std: np.ndarray) -> None:
  model.train_mean[...] = jnp.asarray(mean, jnp.float32)
  model.train_std[...] = jnp.asarray(std, jnp.float32)


def _tfds_dir(config, workdir: pathlib.Path) -> pathlib.Path:
  return pathlib.Path(config.data.tfds_dir) if config.data.tfds_dir else workdir / "tfds"


# The IDM's own fields (eva_jax/utils/checks.py has the shared ones), checked before anything is built.
CONFIG_RULES = {
    "model.preset": lambda v: None if v in idm_lib.IDM_CONFIGS else f"one of {sorted(idm_lib.IDM_CONFIGS)}",
    "model.image_size": checks.int_tuple(2),
    "model.blocks": checks.int_tuple(lo=1, allow_empty=True),
    "model.width": checks.integer(0),
    "model.mlp_dims": checks.int_tuple(lo=1, allow_empty=True),
    "data.num_frames": checks.integer(1),
    "data.stride": checks.integer(1),
    "data.split": checks.one_of("episodes", "frames"),
    "data.val_fraction": checks.fraction_below_one,
    "data.val_max_frames": checks.integer(0),
    "data.num_workers": checks.integer(0),
    "data.norm_stats": checks.one_of("model", "dataset"),
    "eval.max_batches": checks.integer(0),
    "eval.idm_batch_size": checks.integer(0),
    "eval.max_episodes": checks.integer(0),
    "eval.max_plots": checks.integer(0),
    "eval.fps": checks.number(0, lo_open=True),
}


# The fields that shape the checkpoint: a run resumes only with the values it was started with.
RESUME_FIELDS = ("model.preset", "model.image_size", "model.blocks", "model.width", "model.mlp_dims")


def check_config(config) -> None:
  checks.check(config, checks.COMMON, CONFIG_RULES)


def prepare_data(config, workdir: pathlib.Path) -> dict[str, Any]:
  """{split: record source}: a prepared TFDS directory (config.data.tfds_dir) or built once from the
  HDF5 episodes under config.data.root into workdir/tfds."""
  d = config.data
  tfds_dir = _tfds_dir(config, workdir)
  try:
    return idm_dataset.load_idm_sources(tfds_dir)
  except FileNotFoundError:
    if not d.root:
      raise FileNotFoundError(f"no prepared IDM dataset at {tfds_dir}; set config.data.root to the RoboTwin "
                              "episode directory (episode*.hdf5) to build it")
  if jax.process_index() == 0:
    episodes = robotwin.list_episodes(d.root, d.pattern)
    logging.info("building the IDM dataset from %d episodes under %s", len(episodes), d.root)
    # A frame-level split is drawn from the 'train' split at training time: every episode goes there.
    val_fraction = d.val_fraction if d.get("split", "episodes") == "episodes" else 0.0
    idm_dataset.build_idm_dataset(episodes, tfds_dir, val_fraction=val_fraction, seed=config.seed,
                                  camera=d.camera, skip_corrupt=d.skip_corrupt_episodes)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("idm_dataset_built")
  return idm_dataset.load_idm_sources(tfds_dir)


def make_windows(config, sources) -> tuple[idm_dataset.WindowSource, idm_dataset.WindowSource | None]:
  """(train, validation) windows of config.data: the prepared 'train' / 'val' episode splits
  (split 'episodes'), or a seeded frame-level split of the 'train' split's frames (split 'frames',
  the authors' random_split: val_fraction of them, at most val_max_frames)."""
  d = config.data
  if d.split == "episodes":
    train = idm_dataset.WindowSource(sources["train"], d.num_frames, d.stride)
    val = idm_dataset.WindowSource(sources["val"], d.num_frames, d.stride) if "val" in sources else None
    return train, val
  if d.split == "frames":
    tr, va = idm_dataset.frame_split(len(sources["train"]), d.val_fraction, d.get("val_max_frames", 0),
                                     config.seed)
    train = idm_dataset.WindowSource(sources["train"], d.num_frames, d.stride, indices=tr)
    val = idm_dataset.WindowSource(sources["train"], d.num_frames, d.stride, indices=va) if len(va) else None
    return train, val
  raise ValueError(f"config.data.split: {d.split!r}; expected 'episodes' or 'frames'")


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
  from eva_jax.utils.rundir import check_resume, save_config

  workdir = pathlib.Path(workdir)
  # the inputs first: a bad config value, a missing weights file or episode folder fails before
  # config.json is (re)written
  check_config(config)
  parallel.check_batch_split(config, "train.batch_size")
  check_resume(workdir, config, RESUME_FIELDS)
  workdir.mkdir(parents=True, exist_ok=True)
  weights.require_sources(config, ("init.path",), kinds={"init.path": "idm"})
  sources = prepare_data(config, workdir)
  logging.info("IDM training on %d devices (%d hosts), process %d", jax.device_count(),
               jax.process_count(), jax.process_index())
  mesh = parallel.make_mesh(dict(config.mesh))
  t = config.train
  d = config.data
  skipped = idm_dataset.skipped_episodes(_tfds_dir(config, workdir))
  if skipped:
    logging.warning("the IDM dataset leaves out %d unreadable episode(s) (skip_corrupt_episodes), e.g. %s",
                    len(skipped), skipped[0]["path"])
  train_windows, val_windows = make_windows(config, sources)
  logging.info("IDM windows: %s train, %s validation (split %r)", len(train_windows),
               len(val_windows) if val_windows is not None else 0, d.split)

  model = build_model(config)
  if d.norm_stats == "dataset":
    centres = train_windows.indices if train_windows.indices is not None else range(len(train_windows))
    acts = np.stack([np.asarray(train_windows.records[int(i)]["action"]) for i in centres])
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
  step_cfg = StepConfig.from_config(config)

  ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=t.keep_checkpoints,
                      best_metric="val_mae" if val_windows is not None else None, best_mode="min",
                      async_save=t.async_checkpoint)
  start = 0
  if t.resume and ckpt.latest_step() is not None:
    tree, _ = ckpt.restore(target=_abstract(checkpoint_tree(model, opt, 0)))
    start = restore_into(tree, model, opt)
    rundir.log_resume(ckpt.directory, start, t.num_steps)
  if jax.process_index() == 0:  # once the run has started (or resumed): a failed start leaves the old one
    save_config(workdir, config)
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
      values["skipped_episodes"] = len(skipped)
      last.update(writer.write(done, values))
    val: dict[str, float] = {}
    if val_windows is not None and config.eval.every and (done % config.eval.every == 0 or done == total):
      val = validate(model, val_windows, config.eval.batch_size, config.eval.max_batches, batch_sharding,
                     step_cfg.transform)
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


# The authors' "correct" test (eval_idm.py / train_idm.py `is_close`): every joint within 0.05 rad and
# both grippers within 0.5.
CLOSE_LIMITS = tuple(0.5 if j in (6, 13) else 0.05 for j in range(14))


def episode_metrics(pred: np.ndarray, true: np.ndarray, fps: float,
                    mean: np.ndarray | None = None, std: np.ndarray | None = None) -> dict[str, float]:
  """The authors' evaluation numbers for one episode's predicted and true [T, 14] trajectories.

  mae, mae/00..13: absolute error in joint units (their `l1_error` and the per-joint view of it);
  correct_rate: the fraction of frames with every joint within `CLOSE_LIMITS` (their `is_close`);
  loss: SmoothL1 (beta 1) on joints normalised by (mean, std) when given (their eval loss under
  --use_normalization); {pred,true}/{jerk,acc,vlim,alim,total,reward}: the terms of their
  `compute_smoothness` (= the reward's; 0 reward below 4 frames) and {pred,true}/{max,mean}_abs_{v,a,j}
  its printed velocity / acceleration / jerk statistics.
  """
  from eva_jax.rl.reward import smoothness_reward_and_terms
  err = np.abs(pred - true)
  out = {"mae": float(err.mean())}
  out.update({f"mae/{j:02d}": float(v) for j, v in enumerate(err.mean(0))})
  out["correct_rate"] = float(np.all(err < np.asarray(CLOSE_LIMITS), axis=1).mean())
  if mean is not None and std is not None:
    out["loss"] = float(regression_loss(jnp.asarray((pred - mean) / std), jnp.asarray((true - mean) / std),
                                        "smooth_l1", 1.0))
  dt = 1.0 / fps
  for name, traj in (("pred", pred), ("true", true)):
    reward, terms = smoothness_reward_and_terms(jnp.asarray(traj[None], jnp.float32), fps)
    for k, v in terms.items():
      out[f"{name}/{k}"] = float(v[0])
    out[f"{name}/reward"] = float(reward[0])
    v = np.diff(traj, axis=0) / dt
    a = np.diff(v, axis=0) / dt
    j = np.diff(a, axis=0) / dt
    for sym, x in (("v", v), ("a", a), ("j", j)):
      out[f"{name}/max_abs_{sym}"] = float(np.abs(x).max()) if x.size else 0.0
      out[f"{name}/mean_abs_{sym}"] = float(np.abs(x).mean()) if x.size else 0.0
  return out


def _bucket(n: int, multiple: int = 16) -> int:
  return -(-n // multiple) * multiple


@functools.partial(nnx.jit, static_argnames=("stride", "transform", "batch_size"))
def _predict_windows(model: idm_lib.IDM, video_u8: jax.Array, stride: int, transform: FrameTransform,
                     batch_size: int | None) -> jax.Array:
  """uint8 [T, H, W, 3] -> [T, 14]: each frame transformed and resized once, then the clamped windows
  [i - stride, i, i + stride] gathered and run in chunks of `batch_size`."""
  x = idm_lib.preprocess(transform(video_u8.astype(jnp.float32) / 255.0), model.cfg.image_size)
  idx = jnp.asarray(robotwin.window_indices(x.shape[0], model.cfg.num_frames, stride))  # [T, 3]
  windows = x[idx]                                                                       # [T, 3, S, S, 3]
  t = windows.shape[0]
  if batch_size is None or batch_size >= t:
    out = model.normalized(windows)
  else:
    pad = -t % batch_size
    chunks = jnp.pad(windows, ((0, pad),) + ((0, 0),) * 4).reshape(-1, batch_size, *windows.shape[1:])
    out = jax.lax.map(model.normalized, chunks).reshape(-1, model.cfg.action_dim)[:t]
  return model.denormalize(out)


def predict_episode(model: idm_lib.IDM, frames_u8: np.ndarray, batch_size: int | None = 64,
                    transform: FrameTransform = FrameTransform(), stride: int = 1) -> np.ndarray:
  """[T, H, W, 3] uint8 -> [T, 14] joint units. The video is padded to a multiple of 16 frames by
  repeating its last frame, which leaves every clamped window unchanged (for any stride) and bounds
  recompiles. Stride 1 without a transform is the reward's own path (`actions_from_video`)."""
  n = len(frames_u8)
  padded = np.concatenate([frames_u8, np.repeat(frames_u8[-1:], _bucket(n) - n, axis=0)])
  if transform.is_identity and stride == 1:
    video = jnp.asarray(padded, jnp.float32)[None] / 255.0
    return np.asarray(idm_lib.actions_from_video(model, video, batch_size or None))[0, :n]
  return np.asarray(_predict_windows(model, jnp.asarray(padded), stride, transform, batch_size or None))[:n]


def evaluate(config, workdir: str | pathlib.Path) -> dict[str, float]:
  """Per-episode predictions of the IDM in config.eval.checkpoint on the episodes under
  config.eval.episodes (default: the held-out episodes of config.data.root with split 'episodes', every
  episode of it with split 'frames', where no episode is held out: point data.root at a test root as
  the authors do), with the input of config.data (stride, crop, channel order) and the authors'
  numbers (`episode_metrics`) in metrics.json (means over episodes) and per_episode.jsonl, and one PNG
  of predicted vs true joints per episode (plots/)."""
  import json
  from eva_jax.utils.plots import plot_joint_trajectories
  from eva_jax.utils.progress import progress

  check_config(config)
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
    if config.data.get("split", "episodes") == "frames":
      paths = [pathlib.Path(p) for p in episodes]
    else:
      paths = [pathlib.Path(p) for p in idm_dataset.split_episodes(
          episodes, config.data.val_fraction, config.seed)["val"] or episodes]
  if e.max_episodes:
    paths = paths[: e.max_episodes]
  transform, stride = FrameTransform.from_config(config.data), int(config.data.stride)
  mean, std = np.asarray(model.train_mean[...]), np.asarray(model.train_std[...])
  rows = []
  with open(workdir / "per_episode.jsonl", "w") as f:
    for i, path in enumerate(progress(paths, desc="eval idm")):
      frames, true = robotwin.read_episode(path, config.data.camera)
      pred = predict_episode(model, frames, e.idm_batch_size, transform, stride)
      row = episode_metrics(pred, true, e.fps, mean, std)
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
