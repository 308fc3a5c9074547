"""Training and fine-tuning of the Wan 2.1 VAE on the videos of a metadata CSV.

  python scripts/train_vae.py --config=configs/vae.py:tiny --config.data.data_root=<toy data>
  train_and_evaluate(config, workdir)   # configs/vae.py documents the fields

EVA uses the released Wan VAE frozen; this trainer exists for what has no released VAE (the
built-in demo fits the tiny preset to its toy frames, so that the world model's latents mean
something) and for fine-tuning the real one on new footage.

Loss: Wan's VAE is a KL autoencoder. Per clip, the encoder gives a diagonal Gaussian posterior in the
normalised latent space (`WanVAE.encode_posterior`); z is drawn from it (`loss.sample_posterior`) and
decoded without the output clamp, and

  loss = recon(decode(z), x) + kl_weight * mean KL(q(z|x) || N(0, 1))

with recon the mean L1 (or squared) error on [-1, 1] pixels and the KL averaged over latent
elements. The prior sits in the normalised space, so the latents the DiT sees ((mu - latents_mean) /
latents_std, what `encode` returns) are pulled towards unit scale. Training clips are short random
windows and random crops (configs/vae.py), run through the VAE as one chunk (`stream=False`, no
scans); validation reconstructs whole clips with the streaming encode/decode that SFT and GRPO run.

The train state is {'step', 'rng', 'params', 'opt_state'}, params the `nnx.to_pure_dict` of the
WanVAE parameters, so SFT (`vae.checkpoint`) and GRPO read a run directory directly. The data
iterator is saved with each checkpoint and every random key is fold_in(rng, step): a run resumed
from its latest checkpoint ends with the same parameters as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from eva_jax import parallel, weights
from eva_jax.models.vae import WanVAE, abstract_vae, vae_config
from eva_jax.training.optim import make_optimizer, make_schedule
from eva_jax.utils import checks, rundir


# MARK: loss
def random_crop(key: jax.Array, video: jax.Array, size: int) -> jax.Array:
  """A random size x size window of every clip (the same for all its frames). [B, T, H, W, C]."""
  b, t, h, w, c = video.shape
  if not size or (size, size) == (h, w):
    return video
  ky, kx = jax.random.split(key)
  ys = jax.random.randint(ky, (b,), 0, h - size + 1)
  xs = jax.random.randint(kx, (b,), 0, w - size + 1)
  return jax.vmap(lambda v, y, x: jax.lax.dynamic_slice(v, (0, y, x, 0), (t, size, size, c)))(video, ys, xs)


def kl_to_standard_normal(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """Elementwise KL(N(mean, exp(logvar)) || N(0, 1))."""
  return 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


def reconstruction_error(pred: jax.Array, target: jax.Array, kind: str) -> jax.Array:
  d = pred.astype(jnp.float32) - target.astype(jnp.float32)
  if kind == "l1":
    return jnp.abs(d).mean()
  if kind == "mse":
    return jnp.square(d).mean()
  raise ValueError(f"config.loss.recon: unknown {kind!r}; expected 'l1' or 'mse'")


def vae_loss(vae: WanVAE, video: jax.Array, key: jax.Array, loss_cfg: Mapping[str, Any]):
  """(loss, aux) of one batch of clips [B, 1 + 4k, H, W, 3] in [-1, 1]."""
  mean, logvar = vae.encode_posterior(video, stream=False)      # [B, F, h, w, z] each
  z = mean
  if loss_cfg["sample_posterior"]:
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, jnp.float32)
  recon = vae.decode(z, stream=False, clip=False)
  rec = reconstruction_error(recon, video, loss_cfg["recon"])
  kl = kl_to_standard_normal(mean, logvar).mean()
  mse = jnp.square(jnp.clip(recon, -1.0, 1.0) - video).mean()
  aux = {"recon": rec, "kl": kl, "train_mse": mse, "latent_std": jnp.std(mean),
         "posterior_std": jnp.exp(0.5 * logvar).mean()}
  return rec + loss_cfg["kl_weight"] * kl, aux


def psnr(mse: float) -> float:
  """PSNR in dB of [-1, 1] pixels (peak-to-peak 2): 10 log10(4 / mse)."""
  return float(10.0 * math.log10(4.0 / max(mse, 1e-12)))


# MARK: the train state and the jitted steps
class VAETrainer:
  """Owns the VAE graph, optimizer and shardings; the state is a plain pytree of arrays.

  Parameters are placed by their logical axis names (replicated on a data-parallel mesh); batches
  are split over ('data', 'fsdp').
  """

  def __init__(self, config, mesh):
    self.mesh = mesh
    self.vae_cfg = vae_config(config.vae.preset, dtype=jnp.dtype(config.vae.dtype),
                              param_dtype=jnp.dtype(config.vae.param_dtype))
    self.crop = int(config.data.crop_size)
    self.loss_cfg = dict(recon=config.loss.recon, kl_weight=float(config.loss.kl_weight),
                         sample_posterior=bool(config.loss.sample_posterior))
    self.tx = make_optimizer(optim_config(config))
    self.graphdef, self.abs_state = abstract_vae(self.vae_cfg)
    self.param_shardings = nnx.to_pure_dict(parallel.state_shardings(self.abs_state, mesh))
    self.replicated = NamedSharding(mesh, P())
    self.batch_sharding = parallel.named_sharding(mesh, ("act_batch", None, None, None, None))
    abs_opt = jax.eval_shape(self.tx.init, nnx.to_pure_dict(self.abs_state))
    opt_shardings = optax.tree_map_params(self.tx, lambda _, s: s, abs_opt, self.param_shardings,
                                          transform_non_params=lambda _: self.replicated)
    self.state_shardings = {"step": self.replicated, "rng": self.replicated,
                            "params": self.param_shardings, "opt_state": opt_shardings}
    self._seed = int(config.seed)
    self._fns: dict[str, Any] = {}

  def merge(self, params) -> WanVAE:
    """A WanVAE with the given pure-dict params (inside or outside jit)."""
    state = nnx.clone(self.abs_state)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self.graphdef, state)

  def _state(self, params, rng):
    return {"step": jnp.zeros((), jnp.int32), "rng": rng, "params": params, "opt_state": self.tx.init(params)}

  def init_state(self, params: Mapping | None = None):
    """A fresh state: random init from config.seed (made on the mesh), or the given pure-dict params."""
    rng = jax.random.key_data(jax.random.key(self._seed))
    if params is None:
      if "init" not in self._fns:
        cfg, seed = self.vae_cfg, self._seed
        def create(rng):
          # RngBitGenerator keys: XLA:CPU compiles the ~60 threefry draws of the init in ~25 s, these in ~8 s
          vae = WanVAE(cfg, rngs=nnx.Rngs(jax.random.key(seed, impl="rbg")))
          return self._state(nnx.to_pure_dict(nnx.state(vae, nnx.Param)), rng)
        self._fns["init"] = jax.jit(create, out_shardings=self.state_shardings)
      return self._fns["init"](rng)
    if "init_given" not in self._fns:
      self._fns["init_given"] = jax.jit(self._state, out_shardings=self.state_shardings)
    return self._fns["init_given"](jax.device_put(params, self.param_shardings), rng)

  def abstract_state(self):
    """ShapeDtypeStructs with shardings: the restore target for orbax."""
    shapes = jax.eval_shape(lambda: self._state(nnx.to_pure_dict(self.abs_state), jnp.zeros((2,), jnp.uint32)))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, self.state_shardings)

  def _train_step(self, state, video):
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    k_crop, k_z = jax.random.split(key)
    video = random_crop(k_crop, video, self.crop)
    loss_fn = lambda p: vae_loss(self.merge(p), video, k_z, self.loss_cfg)  # noqa: E731
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state)
    return new, dict(aux, loss=loss, grad_norm=optax.tree.norm(grads))

  def train_step(self, state, video: jax.Array):
    """(state, video [B, T, H, W, 3] in [-1, 1], a global array) -> (state, metrics). Donates state."""
    if "train" not in self._fns:
      self._fns["train"] = jax.jit(self._train_step, in_shardings=(self.state_shardings, self.batch_sharding),
                                   out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,))
    return self._fns["train"](state, video)

  def eval_sums(self, params, video: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Reconstruction errors summed over the clips where mask [B] is 1, with the streaming
    encode/decode that SFT and GRPO run: {'sq', 'abs' (per-clip means), 'z_sq', 'z_n', 'n'}."""
    if "eval" not in self._fns:
      def sums(p, v, m):
        vae = self.merge(p)
        z = vae.encode(v)                                     # [B, F, h, w, z]
        d = vae.decode(z) - v                                 # [B, T, H, W, 3]
        per_clip = lambda x: x.reshape(x.shape[0], -1).mean(1)  # noqa: E731
        return {"sq": jnp.sum(m * per_clip(jnp.square(d))), "abs": jnp.sum(m * per_clip(jnp.abs(d))),
                "z_sq": jnp.sum(m * jnp.square(z).reshape(z.shape[0], -1).sum(1)),
                "z_n": jnp.sum(m) * math.prod(z.shape[1:]), "n": jnp.sum(m)}
      mask_sharding = parallel.named_sharding(self.mesh, ("act_batch",))
      self._fns["eval"] = jax.jit(sums, in_shardings=(self.param_shardings, self.batch_sharding, mask_sharding),
                                  out_shardings=self.replicated)
    return self._fns["eval"](params, video, mask)

  def global_batch(self, local: np.ndarray) -> jax.Array:
    """This host's rows -> a global array split over the batch axes."""
    return jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(local))


def optim_config(config):
  """config.optim with total_steps 0 read as train.num_steps (the cosine schedule's length)."""
  o = config.optim.to_dict() if hasattr(config.optim, "to_dict") else dict(config.optim)
  if not o.get("total_steps"):
    o["total_steps"] = max(int(config.train.num_steps), int(o.get("warmup_steps", 0)) + 1)
  return o


# MARK: data
# The VAE trainer's own fields beyond the clip-size rules below (eva_jax/utils/checks.py: the shared ones).
CONFIG_RULES = {
    "data.n_frames": checks.FRAMES_1_4K,                  # the VAE's temporal stride is 4
    "data.train_frames": lambda v: None if v == 0 else checks.FRAMES_1_4K(v) and "0 (= n_frames) or 1 + 4k frames",
    "data.height": checks.multiple_of(8),                 # its spatial stride is 8
    "data.width": checks.multiple_of(8),
    "data.crop_size": checks.multiple_of(8),
    "data.fps": checks.number(0, lo_open=True),
    "data.trim_mode": checks.one_of("random_cut", "speedup"),
    "data.pad_mode": checks.one_of("slowdown", "pad_last"),
    "data.test_percentage": checks.fraction_below_one,
    "data.num_workers": checks.integer(0),
    "loss.kl_weight": checks.number(0),
}


def _check_config(config) -> None:
  checks.check(config, checks.COMMON, CONFIG_RULES)
  d = config.data
  size = int(d.crop_size)
  if size > min(d.height, d.width):
    raise checks.fail("data.crop_size", size, f"at most the frame size (data.height x data.width = "
                                              f"{d.height}x{d.width})")


def _check_inputs(config) -> None:
  """The data and initial weights exist (before anything is built)."""
  d = config.data
  if not d.data_root:
    raise ValueError("config.data.data_root is empty: set it to the folder that holds the metadata CSV "
                     f"({d.metadata_path}) and the videos")
  root = Path(d.data_root)
  if not root.is_dir():
    raise FileNotFoundError(f"config.data.data_root: {root} does not exist or is not a folder")
  if not (root / d.metadata_path).is_file():
    raise FileNotFoundError(f"config.data.metadata_path: no metadata CSV at {root / d.metadata_path}")
  weights.require_sources(config, ("init.path",), kinds={"init.path": "vae"})


def _dataset(config, split: str, batch_size: int):
  """Grain batches of {'video': [B, T, H, W, 3] in [-1, 1], 'row'} from the CSV's `split`."""
  from eva_jax.data import metadata, video_dataset
  d = config.data
  train = split == "training"
  records = metadata.load_records(d.data_root, d.metadata_path, split, d.test_percentage, dict(d.filtering))
  fields = d.to_dict()
  window = min(int(d.train_frames or d.n_frames), int(d.n_frames))  # never longer than the clips SFT sees
  fields.update(n_frames=window if train else int(d.n_frames),
                load_prompt_embed=False, load_video_latent=False, load_clip_embed=False, decode_video=True)
  loader = video_dataset.ExampleLoader(d.data_root, fields, train=train)
  return video_dataset.make_dataset(records, loader, batch_size, seed=config.seed, train=train,
                                    num_workers=d.num_workers if train else 0)


def evaluate(config, trainer: VAETrainer, params) -> dict[str, float]:
  """Reconstruction of eval.num_batches validation batches (whole clips, full size, streaming):
  val_mse / val_l1 on [-1, 1] pixels, val_psnr (dB), val_latent_std (of the normalised latents)."""
  e = config.eval
  per_host = e.batch_size // jax.process_count()
  totals: dict[str, float] = {}
  for i, batch in enumerate(_dataset(config, "validation", e.batch_size)):
    if i >= e.num_batches:
      break
    video = batch["video"]
    k = len(video)
    # the compiled shape: pad by repetition, count the real clips only
    video = np.concatenate([video, np.repeat(video[:1], per_host - k, axis=0)])
    mask = (np.arange(per_host) < k).astype(np.float32)
    sums = trainer.eval_sums(params, trainer.global_batch(video),
                             jax.make_array_from_process_local_data(
                                 parallel.named_sharding(trainer.mesh, ("act_batch",)), mask))
    for key, v in jax.device_get(sums).items():
      totals[key] = totals.get(key, 0.0) + float(v)
  if not totals.get("n"):
    raise ValueError(f"config.data: the validation split of {Path(config.data.data_root) / config.data.metadata_path} "
                     "gave no clips")
  mse = totals["sq"] / totals["n"]
  return {"val_mse": mse, "val_l1": totals["abs"] / totals["n"], "val_psnr": psnr(mse),
          "val_latent_std": math.sqrt(totals["z_sq"] / totals["z_n"])}


# MARK: initial weights
def initial_params(config, trainer: VAETrainer) -> dict | None:
  """config.init.path -> a pure dict of the VAE's params (None = random init): any VAE source of
  `eva_jax.weights.load` (Wan2.1_VAE.pth, the orbax directory of `python -m convert --kind vae`, a VAE run)."""
  path = config.init.path
  if not path:
    return None
  _, state = weights.load("vae", path, trainer.vae_cfg, mesh=trainer.mesh)
  return nnx.to_pure_dict(state)


# MARK: train_and_evaluate
_CACHE: dict[str, VAETrainer] = {}


def _trainer(config, mesh) -> VAETrainer:
  """One trainer (and its compiled steps) per setup in this process: a resumed or repeated run in the
  same process (tests, notebooks) does not compile again."""
  key = json.dumps([config.seed, config.vae.to_dict(), optim_config(config), config.loss.to_dict(),
                    config.data.crop_size, dict(mesh.shape), [d.id for d in mesh.devices.flat]],
                   sort_keys=True, default=str)
  if key not in _CACHE:
    _CACHE.clear()
    _CACHE[key] = VAETrainer(config, mesh)
  return _CACHE[key]


def train_and_evaluate(config, workdir: str | Path) -> dict[str, float]:
  """Trains for config.train.num_steps (resuming from workdir/checkpoints when it holds one).

  Writes config.json, metrics.jsonl + tensorboard/ and checkpoints/ (+ best/ by val_mse) under
  workdir. Returns the last logged metrics with the validation metrics at the end (val_*) and of the
  initial weights (init_val_*).
  """
  from eva_jax.training.checkpoints import Checkpointer
  from eva_jax.utils.metrics import MetricWriter, StepClock, fetch_finite
  from eva_jax.utils.progress import progress
  from eva_jax.utils.rundir import check_resume, save_config

  _check_config(config)
  workdir = Path(workdir)
  parallel.check_batch_split(config, "train.batch_size", *(["eval.batch_size"] if config.eval.every else []))
  check_resume(workdir, config, ("vae.preset",))  # the field that shapes the checkpoint
  _check_inputs(config)
  workdir.mkdir(parents=True, exist_ok=True)
  t = config.train
  mesh = parallel.make_mesh(dict(config.mesh))
  logging.info("VAE training on %d devices (%d hosts), process %d", jax.device_count(), jax.process_count(),
               jax.process_index())
  trainer = _trainer(config, mesh)
  data_iter = iter(_dataset(config, "training", t.batch_size))
  use_eval = config.eval.every > 0
  ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=t.keep_checkpoints,
                      best_metric="val_mse" if use_eval else None, best_mode="min", async_save=t.async_checkpoint)
  writer = MetricWriter(workdir)

  start, init_val = 0, {}
  if t.resume and ckpt.latest_step() is not None:
    state, meta = ckpt.restore(target=trainer.abstract_state())
    start = int(jax.device_get(state["step"]))
    data_iter.set_state(meta["data_iter"])
    init_val = dict(meta.get("init_val", {}))
    rundir.log_resume(ckpt.directory, start, t.num_steps)
  else:
    state = trainer.init_state(initial_params(config, trainer))
    if use_eval:  # the bar the training must clear
      init_val = {f"init_{k}": v for k, v in evaluate(config, trainer, state["params"]).items()}
      writer.write(0, init_val)
  if jax.process_index() == 0:  # once the run has started (or resumed): a failed start leaves the old one
    save_config(workdir, config)

  total = int(t.num_steps)
  stop = min(int(t.stop_at), total) if t.get("stop_at") else total  # schedules still span num_steps
  schedule = make_schedule(optim_config(config))
  last: dict[str, float] = dict(init_val)
  since, clock = start, StepClock()
  with jax.set_mesh(mesh):
    for step in progress(range(start, stop), total=total, initial=start, desc="vae"):
      with clock.data():
        video = trainer.global_batch(next(data_iter)["video"])
      state, metrics = trainer.train_step(state, video)
      done = step + 1
      clock.stepped(metrics)
      if done % t.log_every == 0 or done in (total, stop):
        values = fetch_finite(metrics, done, since, "VAE training")
        since = done
        values.update(clock.rates(t.batch_size, "clips"))
        values["learning_rate"] = float(schedule(done))
        last.update(writer.write(done, values))
      val: dict[str, float] = {}
      if use_eval and (done % config.eval.every == 0 or done == total):
        val = evaluate(config, trainer, state["params"])
        last.update(writer.write(done, val))
      if done % t.checkpoint_every == 0 or done in (total, stop):
        ckpt.save(done, state, metrics=val or None,
                  meta={"data_iter": data_iter.get_state(), "step": done, "init_val": init_val})
  ckpt.close()
  writer.close()
  return last
