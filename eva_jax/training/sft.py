"""Supervised fine-tuning of the Wan I2V DiT as EVA does it (spec eva.md A.5; wan.md D.6).

  python scripts/train_sft.py --config=configs/sft.py:tiny --workdir=outputs

Loss: rectified flow on `v = ε − x0` with diffusion-forcing timesteps ('rand_history'): per sample a
history of 1 (p=0.9) or 2 (p=0.1) latent frames shares one u, the future frames another; with
probability `clean_hist_prob` (0.7) the history is clean (u=0); σ = shift·u / (1 + (shift−1)·u)
(shift 3) per frame; x_t = (1−σ)·x0 + σ·ε; the model sees t = 1000·σ of shape [B, F] and y = 0
(A.3); loss = plain mean of (v̂ − (ε − x0))² over every element, history frames included.

The train state is a dict of arrays {'step', 'rng', 'params', 'opt_state'[, 'ema']} whose params
are the float32 master weights (`nnx.to_pure_dict` of the WanModel parameters); the model computes
in `model.dtype` (bf16 on accelerators). The jitted step has explicit in/out shardings from the
logical-axis rules (FSDP shards 'embed' over the 'fsdp' mesh axis) and donates the old state.
Gradient accumulation is optax.MultiSteps inside the optimizer: one step = one micro-batch.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from eva_jax import parallel, weights
from eva_jax.models.wan import zero_clip_features
from eva_jax.models.wan.attention import backend_rule
from eva_jax.models.wan.config import PRESETS as WAN_PRESETS
from eva_jax.training.optim import make_optimizer
from eva_jax.utils import checks, rundir

Batch = Mapping[str, jax.Array]


# MARK: timesteps and loss
def shift_sigma(u: jax.Array, shift: float) -> jax.Array:
  """Wan's time warp σ = s·u / (1 + (s−1)·u): maps U(0,1) towards the noisy end for s > 1."""
  return shift * u / (1.0 + (shift - 1.0) * u)


def sample_timesteps(key: jax.Array, batch_size: int, num_frames: int, *, mode: str = "rand_history",
                     hist_len_choices=(1, 2), hist_len_probs=(0.9, 0.1), clean_hist_prob: float = 0.7,
                     shift: float = 3.0) -> dict[str, jax.Array]:
  """Per-frame noise levels for one batch.

  Returns {'sigma': [B, F] in [0, 1), 'hist_len': [B] int32, 'clean': [B] bool}; the model's t is
  1000·sigma. mode 'rand_history' is EVA's; 'independent' draws u per frame and makes frame 0 clean
  with probability clean_hist_prob (one coin for the batch, as the original); 'uniform' is plain
  Wan (one u per sample, shared by all frames).
  """
  k_len, k_hist, k_fut, k_clean = jax.random.split(key, 4)
  frame = jnp.arange(num_frames)[None, :]                                      # [1, F]
  if mode == "rand_history":
    choices = jnp.asarray(hist_len_choices, jnp.int32)
    probs = jnp.asarray(hist_len_probs, jnp.float32)
    hist_len = choices[jax.random.choice(k_len, len(hist_len_choices), (batch_size,), p=probs)]  # [B]
    u_hist = jax.random.uniform(k_hist, (batch_size, 1))
    u_fut = jax.random.uniform(k_fut, (batch_size, 1))
    clean = jax.random.uniform(k_clean, (batch_size,)) < clean_hist_prob
    u_hist = jnp.where(clean[:, None], 0.0, u_hist)
    u = jnp.where(frame < hist_len[:, None], u_hist, u_fut)                  # [B, F]
  elif mode == "independent":
    u = jax.random.uniform(k_fut, (batch_size, num_frames))
    clean = jnp.broadcast_to(jax.random.uniform(k_clean, ()) < clean_hist_prob, (batch_size,))
    u = jnp.where((frame == 0) & clean[:, None], 0.0, u)
    hist_len = jnp.ones((batch_size,), jnp.int32)
  elif mode == "uniform":
    u = jnp.broadcast_to(jax.random.uniform(k_fut, (batch_size, 1)), (batch_size, num_frames))
    hist_len = jnp.zeros((batch_size,), jnp.int32)
    clean = jnp.zeros((batch_size,), bool)
  else:
    raise ValueError(f"diffusion.mode must be 'rand_history', 'independent' or 'uniform', got {mode!r}")
  return {"sigma": shift_sigma(u, shift), "hist_len": hist_len, "clean": clean}


def add_noise(x0: jax.Array, noise: jax.Array, sigma: jax.Array) -> jax.Array:
  """x_t = (1−σ)·x0 + σ·ε with σ [B, F] broadcast over [B, F, h, w, C]; float32."""
  s = sigma.astype(jnp.float32)[:, :, None, None, None]
  return (1.0 - s) * x0.astype(jnp.float32) + s * noise.astype(jnp.float32)


def flow_matching_loss(pred: jax.Array, x0: jax.Array, noise: jax.Array) -> jax.Array:
  """mean((v̂ − (ε − x0))²) over all elements, in float32 (EVA's F.mse_loss, no weighting or mask)."""
  target = noise.astype(jnp.float32) - x0.astype(jnp.float32)
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - target))


def sft_loss(model: Callable, batch: Batch, key: jax.Array, diffusion: Mapping[str, Any]):
  """Draws timesteps and noise from `key`, runs the model, returns (loss, aux)."""
  x0 = batch["latents"]                                                        # [B, F, h, w, 16]
  b, f = x0.shape[:2]
  k_t, k_n = jax.random.split(key)
  ts = sample_timesteps(k_t, b, f, **diffusion)
  noise = jax.random.normal(k_n, x0.shape, jnp.float32)
  x_t = add_noise(x0, noise, ts["sigma"])
  pred = model(x_t, ts["sigma"] * 1000.0, batch["prompt_embeds"], batch.get("clip_fea"), None)
  loss = flow_matching_loss(pred, x0, noise)
  return loss, {"sigma_mean": jnp.mean(ts["sigma"]), "clean_frac": jnp.mean(ts["clean"].astype(jnp.float32))}


def diffusion_kwargs(cfg) -> dict[str, Any]:
  """config.diffusion -> keyword arguments of sample_timesteps."""
  return dict(mode=cfg.mode, hist_len_choices=tuple(cfg.hist_len_choices),
              hist_len_probs=tuple(cfg.hist_len_probs), clean_hist_prob=float(cfg.clean_hist_prob),
              shift=float(cfg.shift))


# MARK: the train state and the jitted steps
class SFTTrainer:
  """Owns the model graph, optimizer and shardings; `state` is a plain pytree of arrays.

  model_fn: () -> nnx.Module (e.g. `lambda: WanModel(cfg, rngs=nnx.Rngs(0))`); its Param leaves
  carry logical axis names which decide their sharding on `mesh`.
  """

  def __init__(self, model_fn: Callable[[], nnx.Module], optim_cfg, diffusion: Mapping[str, Any], mesh,
               ema_decay: float = 0.0):
    self.mesh = mesh
    self.diffusion = dict(diffusion)
    self.ema_decay = float(ema_decay)
    self.tx = make_optimizer(optim_cfg)
    self.accumulate = int(getattr(optim_cfg, "accumulate_steps", 1) or 1)
    abstract = nnx.eval_shape(model_fn)
    self.graphdef, abs_params, self.rest = nnx.split(abstract, nnx.Param, ...)
    self._abs_params_state = abs_params
    self.param_shardings = nnx.to_pure_dict(parallel.state_shardings(abs_params, mesh))
    self.replicated = NamedSharding(mesh, P())
    abs_pure = nnx.to_pure_dict(abs_params)
    abs_opt = jax.eval_shape(self.tx.init, abs_pure)
    opt_shardings = optax.tree_map_params(self.tx, lambda _, s: s, abs_opt, self.param_shardings,
                                          transform_non_params=lambda _: self.replicated)
    self.state_shardings = {"step": self.replicated, "rng": self.replicated,
                            "params": self.param_shardings, "opt_state": opt_shardings}
    if self.ema_decay:
      self.state_shardings["ema"] = self.param_shardings
    self._model_fn = model_fn
    self._train_step = None
    self._eval_step = None
    self._init_random = None
    self._init_given = None

  # -- state --------------------------------------------------------------------------------------
  def _state_from_params(self, params, rng):
    state = {"step": jnp.zeros((), jnp.int32), "rng": rng, "params": params,
             "opt_state": self.tx.init(params)}
    if self.ema_decay:
      state["ema"] = jax.tree.map(jnp.copy, params)
    return state

  def init_state(self, seed: int, params: Mapping | None = None):
    """A fresh state on the mesh: random init (sharded at creation) or the given params (pure dict)."""
    rng = jax.random.key_data(jax.random.key(seed))
    if params is None:
      if self._init_random is None:
        def create(rng):
          model = self._model_fn()
          return self._state_from_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), rng)
        self._init_random = jax.jit(create, out_shardings=self.state_shardings)
      return self._init_random(rng)
    if self._init_given is None:
      self._init_given = jax.jit(self._state_from_params, out_shardings=self.state_shardings)
    return self._init_given(jax.device_put(params, self.param_shardings), rng)

  def abstract_state(self):
    """ShapeDtypeStructs with shardings: the restore target for orbax."""
    shapes = jax.eval_shape(lambda: self._state_from_params(
        nnx.to_pure_dict(self._abs_params_state), jnp.zeros((2,), jnp.uint32)))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, self.state_shardings)

  def merge(self, params) -> nnx.Module:
    """A model with the given pure-dict params (inside or outside jit)."""
    st = nnx.clone(self._abs_params_state)
    nnx.replace_by_pure_dict(st, params)
    return nnx.merge(self.graphdef, st, self.rest)

  # -- steps --------------------------------------------------------------------------------------
  def batch_shardings(self, batch: Mapping[str, Any]):
    return {k: parallel.named_sharding(self.mesh, ("act_batch",) + (None,) * (np.ndim(v) - 1))
            for k, v in batch.items()}

  def _loss(self, params, batch, key):
    return sft_loss(self.merge(params), batch, key, self.diffusion)

  def _train_step_impl(self, state, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    (loss, aux), grads = jax.value_and_grad(self._loss, has_aux=True)(state["params"], batch, key)
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state)
    if self.ema_decay:
      # params only move on the last micro-batch of an accumulation window
      applied = (state["step"] + 1) % self.accumulate == 0
      d = jnp.where(applied, self.ema_decay, 1.0)
      new["ema"] = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p.astype(e.dtype), state["ema"], params)
    metrics = dict(aux, loss=loss, grad_norm=optax.tree.norm(grads),
                   param_norm=optax.tree.norm(params))
    return new, metrics

  def _jitted_train_step(self, batch):
    if self._train_step is None:
      self._train_step = jax.jit(
          self._train_step_impl,
          in_shardings=(self.state_shardings, self.batch_shardings(batch)),
          out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,))
    return self._train_step

  def train_step(self, state, batch):
    """(state, batch) -> (state, metrics); batch arrays must already be global jax.Arrays."""
    return self._jitted_train_step(batch)(state, batch)

  def compile_train_step(self, state, batch):
    """train_step compiled ahead of time for these shapes: call it as train_step, or read its memory_analysis()."""
    return self._jitted_train_step(batch).lower(state, batch).compile()

  def eval_loss(self, params, batch, key):
    """Loss with the given key (deterministic validation)."""
    if self._eval_step is None:
      self._eval_step = jax.jit(
          lambda p, b, k: self._loss(p, b, jax.random.wrap_key_data(k))[0],
          in_shardings=(self.param_shardings, self.batch_shardings(batch), self.replicated),
          out_shardings=self.replicated)
    return self._eval_step(params, batch, jax.random.key_data(key))

  def global_batch(self, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """Host-local numpy batch -> global jax.Arrays sharded over ('data', 'fsdp')."""
    sh = self.batch_shardings(local)
    return {k: jax.make_array_from_process_local_data(sh[k], np.asarray(v)) for k, v in local.items()}


# MARK: initial weights
def initial_params(init_cfg, wan_cfg, trainer: SFTTrainer) -> dict | None:
  """config.init -> a pure dict of params for the trainer (None = random init).

  init.path is any DiT source of `eva_jax.weights.load` (PyTorch files, a converted orbax directory, an
  SFT run; init.use_ema takes a run's EMA weights). init.kind is 'random' or names the format the user
  expects ('torch' / 'orbax'); the format itself is detected from what is on disk.
  """
  kind = init_cfg.kind
  if kind == "random":
    return None
  if kind not in ("orbax", "torch"):
    raise ValueError(f"init.kind must be 'random', 'orbax' or 'torch', got {kind!r}")
  if not init_cfg.path:
    raise ValueError(f"init.kind={kind!r} needs init.path")
  _, state = weights.load("dit", init_cfg.path, wan_cfg, mesh=trainer.mesh, use_ema=bool(init_cfg.use_ema))
  return nnx.to_pure_dict(state)


# MARK: conditioning that the CSV does not cache
class Conditioner:
  """Fills 'latents', 'prompt_embeds', 'clip_fea' of a host batch that lacks them.

  latents: online VAE encoding of 'video' (config.vae); prompt_embeds: text.source 'synthetic' is a
  fixed Gaussian embedding per caption (smoke runs only: no umT5); clip_fea: clip.source 'online' is
  EVA's: the frozen CLIP encoder (config.clip) on frame 0 of each training clip, after its random cut
  and crop, every step (algorithms/wan/wan_i2v.py); 'cached' reads data.load_clip_embed files; 'zeros'
  is a smoke-run stand-in (the image branch then sees a constant).
  """

  def __init__(self, config, wan_cfg, mesh):
    self.config, self.wan_cfg, self.mesh = config, wan_cfg, mesh
    self._encode = None
    self._vae = None
    if not config.data.load_video_latent:
      gdef, _ = self.vae()
      self._encode = jax.jit(lambda st, v: nnx.merge(gdef, st).encode(v))
    if config.text.source not in ("cached", "synthetic"):
      raise ValueError(f"text.source must be 'cached' or 'synthetic', got {config.text.source!r}")
    if config.clip.source not in ("online", "cached", "zeros"):
      raise ValueError(f"clip.source must be 'online', 'cached' or 'zeros', got {config.clip.source!r}")
    self._clip = None
    if config.clip.source == "online" and wan_cfg is not None and wan_cfg.is_i2v:
      if config.data.load_video_latent:
        raise ValueError("clip.source='online' encodes each training clip's first frame, but "
                         "data.load_video_latent=True loads no pixels: set data.load_video_latent=False, "
                         "or use clip.source='cached'")
      self._clip = self._clip_encoder()

  def vae(self):
    """(graphdef, state) of the VAE: config.vae.checkpoint (any VAE source of eva_jax.weights) or random
    weights (smoke runs)."""
    if self._vae is None:
      from eva_jax.models.vae import stats_dtype, vae_config
      config = self.config
      source = config.vae.checkpoint or "random"
      if source == "random":
        logging.warning("vae.checkpoint is empty: a random-weight VAE (smoke runs only)")
      cfg = vae_config(config.vae.preset, stats_dtype=stats_dtype(config.model.get("precision", "wan")))
      self._vae = weights.load("vae", source, cfg, mesh=self.mesh, seed=config.seed + 1)
    return self._vae

  def _clip_encoder(self):
    """Jitted `video -> CLIP(video[:, 0])` of config.clip (any CLIP source of eva_jax.weights)."""
    from eva_jax.models.clip import clip_config
    c = self.config.clip
    cfg = clip_config(c.preset, dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.dtype))
    if cfg.width != self.wan_cfg.image_dim:
      raise ValueError(f"clip.preset={c.preset!r} gives {cfg.width}-d features, the DiT's image_dim is "
                       f"{self.wan_cfg.image_dim}")
    if not c.checkpoint:
      logging.warning("clip.checkpoint is empty: a random-weight CLIP (smoke runs only)")
    gdef, state = weights.load("clip", c.checkpoint or "random", cfg, mesh=self.mesh, seed=self.config.seed + 2)
    encode = jax.jit(lambda st, v: nnx.merge(gdef, st).encode_image(v[:, 0]).astype(jnp.float32))
    return lambda video: encode(state, video)

  def _to_host(self, x: jax.Array, sharding) -> np.ndarray:
    """This host's rows of a global array (on multi-host runs it spans other processes' devices)."""
    return np.asarray(multihost_utils.global_array_to_host_local_array(x, self.mesh, sharding.spec))

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    if "latents" in batch:
      out["latents"] = batch["latents"]
    else:
      if self._encode is None or "video" not in batch:
        raise ValueError("batch has neither cached 'latents' nor 'video' to encode")
      sh = parallel.named_sharding(self.mesh, ("act_batch", None, None, None, None))
      video = jax.make_array_from_process_local_data(sh, batch["video"])
      out["latents"] = self._to_host(self._encode(self._vae[1], video), sh)
    b = out["latents"].shape[0]
    if "prompt_embeds" in batch:
      out["prompt_embeds"] = batch["prompt_embeds"]
    elif self.config.text.source == "synthetic":
      ids = batch["caption_id"].astype(np.uint64)
      out["prompt_embeds"] = np.stack([
          np.random.default_rng(int(i)).standard_normal((self.config.data.max_text_tokens,
                                                         self.wan_cfg.text_dim)).astype(np.float32)
          for i in ids])
    else:
      raise ValueError("batch has no 'prompt_embeds': set data.load_prompt_embed=True (cached umT5) "
                       "or text.source='synthetic' for smoke runs")
    if self.wan_cfg.is_i2v:
      if "clip_fea" in batch:
        out["clip_fea"] = batch["clip_fea"]
      elif self._clip is not None:
        if "video" not in batch:
          raise ValueError("clip.source='online' needs the batch's 'video' pixels")
        sh = parallel.named_sharding(self.mesh, ("act_batch", None, None, None, None))
        feats = self._clip(jax.make_array_from_process_local_data(sh, batch["video"]))
        out["clip_fea"] = self._to_host(feats, parallel.named_sharding(self.mesh, ("act_batch", None, None)))
      elif self.config.clip.source == "zeros":
        out["clip_fea"] = zero_clip_features(b, self.wan_cfg.image_dim)
      else:
        raise ValueError("batch has no 'clip_fea': set clip.source='online' (EVA), data.load_clip_embed=True "
                         "with clip.source='cached', or clip.source='zeros' (smoke runs)")
    return out


# MARK: train_and_evaluate
build_wan_config = weights.dit_config  # config.model -> WanConfig

# SFT's own fields (eva_jax/utils/checks.py has the ones every trainer shares): checked before anything runs.
CONFIG_RULES = {
    "model.preset": lambda v: None if v in WAN_PRESETS else f"a Wan preset, one of {sorted(WAN_PRESETS)}",
    "model.attention": backend_rule,
    "model.num_layers": checks.integer(0),
    "data.n_frames": checks.FRAMES_1_4K,
    "data.height": checks.multiple_of(16),          # VAE stride 8 x DiT patch 2
    "data.width": checks.multiple_of(16),
    "data.fps": checks.number(0, lo_open=True),
    "data.test_percentage": checks.fraction_below_one,
    "data.max_text_tokens": checks.integer(1),
    "data.num_workers": checks.integer(0),
    "data.random_flip": checks.number(0, 1),
    "data.trim_mode": checks.one_of("random_cut", "speedup"),
    "data.pad_mode": checks.one_of("slowdown", "pad_last"),
    "init.kind": checks.one_of("random", "orbax", "torch"),
    "text.source": checks.one_of("cached", "synthetic"),
    "clip.source": checks.one_of("online", "cached", "zeros"),
    "diffusion.mode": checks.one_of("rand_history", "independent", "uniform"),
    "diffusion.hist_len_choices": checks.int_tuple(lo=1),
    "diffusion.clean_hist_prob": checks.number(0, 1),
    "diffusion.shift": checks.number(0, lo_open=True),
    "eval.sample_every": checks.integer(0),
    "eval.num_videos": checks.integer(1),
    "eval.sample_steps": checks.integer(2),
}


# The fields that shape the checkpoint: a run resumes only with the values it was started with.
RESUME_FIELDS = ("model.preset", "model.num_layers", "model.scan_layers")


def check_config(config) -> None:
  checks.check(config, checks.COMMON, CONFIG_RULES)
  checks.probabilities(config, "diffusion.hist_len_choices", "diffusion.hist_len_probs")


def _data(config, split: str, train: bool, batch_size: int, seed: int):
  from eva_jax.data import metadata, video_dataset
  d = config.data
  require = [c for c, on in (("prompt_embed_path", d.load_prompt_embed),
                             ("video_latent_path", d.load_video_latent),
                             ("clip_embed_path", d.load_clip_embed)) if on]
  records = metadata.load_records(d.data_root, d.metadata_path, split, d.test_percentage,
                                  dict(d.filtering), require=require)
  # cached prompt embeddings must have the DiT's width: a cache made with another umT5 fails here, naming the row
  text_dim = build_wan_config(config.model).text_dim if d.load_prompt_embed else None
  loader = video_dataset.ExampleLoader(d.data_root, d, train=train, prompt_dim=text_dim)
  ds = video_dataset.make_dataset(records, loader, batch_size, seed=seed, train=train,
                                  num_workers=d.num_workers if train else 0)
  return records, ds


def train_and_evaluate(config, workdir: str | Path) -> dict[str, float]:
  """Trains for config.train.num_steps micro-batches; resumes from workdir/checkpoints if present.

  Writes config.json, metrics.jsonl + tensorboard/, checkpoints/ (state {'step', 'rng', 'params',
  'opt_state'[, 'ema']} + meta {'data_iter'}; best/ by val_loss) and videos/ under `workdir`.
  Returns the last logged metrics.
  """
  from eva_jax.training.checkpoints import Checkpointer
  from eva_jax.utils.metrics import MetricWriter, fetch_finite
  from eva_jax.utils.progress import progress
  from eva_jax.utils.rundir import check_resume, save_config

  workdir = Path(workdir)
  # The inputs first: a bad config value, a missing weights file, a bad CSV or data root fails in a second,
  # before any model is built or compiled and before the run directory's config.json is (re)written.
  check_config(config)
  parallel.check_batch_split(config, "train.batch_size", *(["eval.batch_size"] if config.eval.every else []))
  check_resume(workdir, config, RESUME_FIELDS)
  weights.require_sources(config, ("init.path", "vae.checkpoint", "clip.checkpoint"),
                          kinds={"init.path": "dit", "vae.checkpoint": "vae", "clip.checkpoint": "clip"})
  _, train_ds = _data(config, "training", True, config.train.batch_size, config.seed)
  workdir.mkdir(parents=True, exist_ok=True)
  logging.info("SFT on %d devices (%d hosts), process %d", jax.device_count(), jax.process_count(),
               jax.process_index())
  mesh = parallel.make_mesh(dict(config.mesh))
  wan_cfg = build_wan_config(config.model)
  trainer, cond = _trainer_and_conditioner(config, wan_cfg, mesh)
  data_iter = iter(train_ds)
  use_eval = config.eval.every > 0
  ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=config.train.keep_checkpoints,
                      best_metric="val_loss" if use_eval else None, best_mode="min",
                      async_save=config.train.async_checkpoint)
  writer = MetricWriter(workdir)

  start = 0
  if config.train.resume and ckpt.latest_step() is not None:
    state, meta = ckpt.restore(target=trainer.abstract_state())
    start = int(jax.device_get(state["step"]))
    if "data_iter" in meta:
      data_iter.set_state(meta["data_iter"])
    rundir.log_resume(ckpt.directory, start, config.train.num_steps)
  else:
    state = trainer.init_state(config.seed, initial_params(config.init, wan_cfg, trainer))
  if jax.process_index() == 0:  # once the run has started (or resumed): a failed start leaves the old one
    save_config(workdir, config)

  total = config.train.num_steps
  last: dict[str, float] = {}
  since, t0, n_timed = start, None, 0
  data_s, since_data = 0.0, start
  with jax.set_mesh(mesh):
    for step in progress(range(start, total), total=total, initial=start, desc="sft"):
      t_data = time.perf_counter()
      batch = trainer.global_batch(cond(next(data_iter)))
      data_s += time.perf_counter() - t_data
      state, metrics = trainer.train_step(state, batch)
      done = step + 1
      if t0 is None:  # exclude the compiling first step from the throughput
        jax.block_until_ready(metrics)
        t0 = time.perf_counter()
      else:
        n_timed += 1
      if done % config.train.log_every == 0 or done == total:
        values = fetch_finite(metrics, done, since, "SFT")
        since = done
        if n_timed:
          dt = (time.perf_counter() - t0) / n_timed
          values.update(step_time_s=dt, examples_per_s=config.train.batch_size / dt)
        values["data_time_s"] = data_s / max(done - since_data, 1)  # loading + online encoding, per step
        data_s, since_data = 0.0, done
        values["learning_rate"] = float(_lr(config.optim, done))
        last = writer.write(done, values)
      val = {}
      if use_eval and (done % config.eval.every == 0 or done == total):
        val = {"val_loss": evaluate(config, trainer, state, cond)}
        last.update(writer.write(done, val))
      if config.eval.sample_every > 0 and (done % config.eval.sample_every == 0 or done == total):
        sample_videos(config, trainer, state, cond, workdir / "videos", done)
      if done % config.train.checkpoint_every == 0 or done == total:
        ckpt.save(done, state, metrics=val or None, meta={"data_iter": data_iter.get_state(), "step": done})
  ckpt.close()
  writer.close()
  return last


_CACHE: dict[str, tuple] = {}


def _trainer_and_conditioner(config, wan_cfg, mesh):
  """One trainer (and its compiled steps) per model/optimizer/mesh setup in this process, so a
  resumed or repeated run in the same process (notebooks, tests) does not compile again."""
  import json
  from eva_jax.models.wan import WanModel
  key = json.dumps([config.seed, config.model.to_dict(), config.optim.to_dict(), config.diffusion.to_dict(),
                    config.train.ema_decay, config.vae.to_dict(), config.text.to_dict(), config.clip.to_dict(),
                    config.data.load_video_latent, config.data.max_text_tokens, dict(mesh.shape),
                    [d.id for d in mesh.devices.flat]], sort_keys=True, default=str)
  if key not in _CACHE:
    trainer = SFTTrainer(lambda: WanModel(wan_cfg, rngs=nnx.Rngs(config.seed)), config.optim,
                         diffusion_kwargs(config.diffusion), mesh, ema_decay=config.train.ema_decay)
    _CACHE.clear()  # keep at most one (a 14B trainer holds compiled programs, not weights)
    _CACHE[key] = (trainer, Conditioner(config, wan_cfg, mesh))
  return _CACHE[key]


def _lr(optim_cfg, step: int) -> float:
  from eva_jax.training.optim import make_schedule
  k = int(getattr(optim_cfg, "accumulate_steps", 1) or 1)
  return make_schedule(optim_cfg)(step // k)


def evaluate(config, trainer: SFTTrainer, state, cond: Conditioner) -> float:
  """Mean flow-matching loss on the validation split with fixed keys (comparable across steps)."""
  _, ds = _data(config, "validation", False, config.eval.batch_size, config.seed)
  params = state["ema"] if "ema" in state else state["params"]
  losses = []
  for i, batch in enumerate(ds):
    if i >= config.eval.num_batches:
      break
    n = len(batch["row"])
    if n < config.eval.batch_size:  # pad the last batch to the compiled shape by repetition
      batch = {k: np.concatenate([v] + [v[:1]] * (config.eval.batch_size - n)) for k, v in batch.items()}
    key = jax.random.fold_in(jax.random.key(config.seed + 7), i)
    losses.append(float(trainer.eval_loss(params, trainer.global_batch(cond(batch)), key)))
  if not losses:
    raise ValueError("validation split produced no batches")
  return float(np.mean(losses))


def sample_videos(config, trainer: SFTTrainer, state, cond: Conditioner, out_dir: Path, step: int) -> list[Path]:
  """Samples `eval.num_videos` validation clips from their first frame and prompt with the inference
  sampler (no guidance, as EVA's SFT validation: lang_guidance = hist_guidance = 0) and writes
  `<out_dir>/step<step>_row<row>.mp4`, prediction above ground truth when the pixels are loaded."""
  from eva_jax.data.video import write_video
  from eva_jax.diffusion.sampler import Conditioning, I2VSampler, SamplerConfig

  n = config.eval.num_videos
  _, ds = _data(config, "validation", False, n, config.seed)
  batch = next(iter(ds))
  c = cond(batch)
  params = state["ema"] if "ema" in state else state["params"]
  gdef, vae_state = cond.vae()
  scfg = SamplerConfig(num_frames=config.data.n_frames, height=config.data.height, width=config.data.width,
                       num_steps=config.eval.sample_steps, lang_guidance=0.0, hist_guidance=0.0)
  sampler = I2VSampler(trainer.merge(params), nnx.merge(gdef, vae_state), None, scfg)
  sc = Conditioning(jnp.asarray(c["latents"][:, :1]), jnp.asarray(c["prompt_embeds"]), None,
                    None if "clip_fea" not in c else jnp.asarray(c["clip_fea"]))
  key = jax.random.fold_in(jax.random.key(config.seed + 11), step)
  video = np.asarray(jax.device_get(sampler.decode(sampler.sample(sc, key, show_progress=False))))
  paths = []
  if jax.process_index() == 0:
    for i in range(video.shape[0]):
      frames = video[i]
      if "video" in batch:  # prediction on top, ground truth below
        frames = np.concatenate([frames, batch["video"][i][:frames.shape[0]]], axis=1)
      paths.append(write_video(out_dir / f"step{step:07d}_row{int(batch['row'][i])}.mp4", frames,
                               fps=config.data.fps))
  return paths
