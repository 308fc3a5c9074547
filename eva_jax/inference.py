"""EVA inference from a config: image_csv -> first frames + prompts -> videos/*.mp4 (scripts/infer.py).

    from configs.infer import get_config
    videos = run_inference(get_config('tiny'), workdir=None)   # outputs/<date>/<time>/videos/*.mp4

Models are built from `config.model` (presets) and `config.ckpt` (weights), each any source that
`eva_jax.weights.load` takes (docs/models.md): PyTorch files or folders converted on the fly (a Lightning
.ckpt such as EVA's `tuned_ckpt_path` is unwrapped and its 'model.' prefix recognised), an orbax
directory from `python -m convert`, or '' for random weights (only with `ckpt.random_init=True`: tiny
smoke runs, benchmarks).
`ckpt.tuned` (EVA's fine-tuned DiT, e.g. eva_i2v_14B.ckpt) replaces the DiT weights of `ckpt.dit`.

The image_csv (spec/eva.md F.2) has columns `image_path,height,width,fps,n_frames,caption`; each
image is stretched to the target (height, width) with bicubic resampling, as EVA's image_csv
transform does (`Resize((H, W))`; `config.data.resize='crop'|'pad'` keep the aspect ratio instead),
and mapped to [-1, 1].
Prompts are encoded by umT5 once up front (the encoder is then released), unless the CSV gives a
cached embedding in a `prompt_embed_path` column.
"""

from __future__ import annotations

import csv
import dataclasses
import pathlib
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eva_jax import weights
from eva_jax.data.metadata import read_csv_rows
from eva_jax.models.wan.attention import backend_rule
from eva_jax.utils import checks

IMAGE_CSV_COLUMNS = ("image_path", "height", "width", "fps", "n_frames", "caption")


# MARK: image_csv

def read_image_csv(path: str | pathlib.Path) -> list[dict[str, Any]]:
  """Rows of an image_csv as dicts (height/width/n_frames int, fps float); paths stay as written."""
  path = pathlib.Path(path)
  columns, raw = read_csv_rows(path, "image_csv")
  missing = [c for c in IMAGE_CSV_COLUMNS if c not in columns]
  if missing:
    raise ValueError(f"{path}: missing column(s) {missing}; an image_csv needs {list(IMAGE_CSV_COLUMNS)}, "
                     f"found {columns}")
  rows = []
  for i, row in enumerate(raw):
    where = f"{path} row {i}"
    if None in row:
      raise ValueError(f"{where}: more cells than the {len(columns)} header columns")
    try:
      rec = dict(row, height=int(row["height"]), width=int(row["width"]), n_frames=int(row["n_frames"]),
                 fps=float(row["fps"]))
    except (TypeError, ValueError) as e:
      raise ValueError(f"{where}: height/width/n_frames must be integers and fps a number ({e})") from None
    if not rec["image_path"]:
      raise ValueError(f"{where}: empty image_path")
    rows.append(rec)
  if not rows:
    raise ValueError(f"{path}: no rows")
  return rows


def load_first_frame(path: str | pathlib.Path, height: int, width: int, mode: str = "stretch") -> np.ndarray:
  """Image -> float32 [height, width, 3] in [-1, 1], resized by `mode` (eva_jax.data.images.fit_image):
  'stretch' is EVA's image_csv transform (Resize((H, W)), bicubic); 'crop' and 'pad' keep the aspect."""
  from eva_jax.data.images import fit_image, read_image
  img = fit_image(read_image(path), height, width, mode)
  return img.astype(np.float32) / 127.5 - 1.0


# MARK: models

def _dtype(name: str):
  return jnp.dtype(name)  # raises on an unknown dtype name


def _source(config, name: str, path: str) -> str:
  """config.ckpt.<name> as an `eva_jax.weights` source: '' means random weights, only when allowed."""
  if path:
    return path
  if not config.ckpt.random_init:
    raise ValueError(f"config.ckpt.{name} is empty and config.ckpt.random_init is False: give a checkpoint "
                     "(a PyTorch file or folder, or an orbax directory from `python -m convert`)")
  return "random"


@dataclasses.dataclass
class Models:
  dit: Any
  vae: Any
  clip: Any


def build_text_encoder(config, mesh=None):
  """(umT5 encoder, tokenizer) from config.model.umt5 / config.ckpt.{umt5, tokenizer}."""
  from eva_jax.models import tokenizer as tok_lib
  from eva_jax.models.umt5 import umt5_config
  m, c = config.model, config.ckpt
  cfg = umt5_config(m.umt5, dtype=_dtype(m.dtype), param_dtype=_dtype(m.param_dtype))
  enc = weights.load_module("umt5", _source(config, "umt5", c.umt5), cfg, mesh=mesh, seed=3)
  return enc, tok_lib.T5Tokenizer(c.tokenizer, max_length=cfg.text_len)


def build_models(config, text_dim: int, mesh=None) -> Models:
  """DiT, VAE and CLIP from `config.model` / `config.ckpt` (see the module docstring)."""
  from eva_jax.models.clip import clip_config
  from eva_jax.models.vae import stats_dtype, vae_config
  from eva_jax.models.wan import wan_config
  m, c = config.model, config.ckpt
  clip_cfg = clip_config(m.clip, dtype=_dtype(m.dtype), param_dtype=_dtype(m.param_dtype))
  precision = m.get("precision", "wan")
  vae_cfg = vae_config(m.vae, stats_dtype=stats_dtype(precision))  # float32, as the reference runs the VAE
  overrides = dict(dtype=m.dtype, param_dtype=m.param_dtype, attention=m.attention, precision=precision,
                   **dict(m.dit_overrides))
  dit_cfg = wan_config(m.dit, **overrides)
  if dit_cfg.text_dim != text_dim:
    raise ValueError(f"the DiT ({m.dit}) takes text_dim={dit_cfg.text_dim}, the prompt embeddings have {text_dim} "
                     "channels (config.model.dit_overrides.text_dim / the text encoder preset)")
  if dit_cfg.is_i2v and dit_cfg.image_dim != clip_cfg.width:
    raise ValueError(f"the DiT ({m.dit}) takes image_dim={dit_cfg.image_dim}, CLIP ({m.clip}) gives "
                     f"{clip_cfg.width} (config.model.dit_overrides.image_dim)")
  clip = weights.load_module("clip", _source(config, "clip", c.clip), clip_cfg, mesh=mesh, seed=2)
  vae = weights.load_module("vae", _source(config, "vae", c.vae), vae_cfg, mesh=mesh, seed=1)
  # EVA's tuned checkpoint (eva_i2v_14B.ckpt, Lightning 'model.' keys) holds the whole DiT: it replaces
  # the base weights, as the original's from_config + load_state_dict does.
  dit_name = "tuned" if c.tuned else "dit"
  dit = weights.load_module("dit", _source(config, dit_name, c.tuned or c.dit), dit_cfg, mesh=mesh, seed=0)
  if c.get("lora"):  # a GRPO adapter (lora_adapter/ or best_reward/, PEFT layout) merged into the DiT
    from eva_jax.models.lora import merge_peft
    merged = merge_peft(dit, c.lora)
    print(f"merged LoRA adapter {c.lora} into {merged} DiT projections")
  return Models(dit, vae, clip)


# MARK: run

# File names inside the released Wan2.1-I2V-14B-480P directory (ckpt.wan_dir).
WAN_DIR_FILES = dict(dit=".", vae="Wan2.1_VAE.pth", clip="models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
                     umt5="models_t5_umt5-xxl-enc-bf16.pth", tokenizer="google/umt5-xxl")


def fill_from_wan_dir(config) -> None:
  """Sets the empty config.ckpt.{dit, vae, clip, umt5, tokenizer} from config.ckpt.wan_dir."""
  if not config.ckpt.wan_dir:
    return
  root = pathlib.Path(config.ckpt.wan_dir)
  if not root.is_dir():
    raise FileNotFoundError(f"config.ckpt.wan_dir={root} is not a directory")
  for name, rel in WAN_DIR_FILES.items():
    if not config.ckpt[name]:
      path = root / rel
      if not path.exists():
        raise FileNotFoundError(f"config.ckpt.wan_dir: expected {path} for ckpt.{name}")
      config.ckpt[name] = str(path)


CKPT_FIELDS = tuple(f"ckpt.{k}" for k in ("dit", "tuned", "vae", "clip", "umt5", "tokenizer", "lora"))


# Fields of configs/infer.py and configs/planner.py beyond the shared ones (the sampler checks its own sizes,
# steps and solver in SamplerConfig); eva_jax/serving.py adds the server's.
CONFIG_RULES = {
    "fps": checks.number(0, lo_open=True),
    "model.attention": backend_rule,
    "data.batch_size": checks.integer(1),
    "data.limit": checks.integer(0),
    "data.resize": checks.one_of("stretch", "crop", "pad"),
    "sampler.hist_len": checks.integer(1),
    "sampler.shift": checks.number(0, lo_open=True),
    "sampler.hist_guidance": checks.number(),
    "sampler.lang_guidance": checks.number(),
}


def check_config(config, *more) -> None:
  checks.check(config, checks.COMMON, CONFIG_RULES, *more)


def require_checkpoints(config, extra: tuple[str, ...] = ()) -> None:
  """Every configured checkpoint path exists, checked before any model is built (seconds, not minutes)."""
  weights.require_sources(config, CKPT_FIELDS + tuple(extra), kinds={"ckpt.dit": "dit", "ckpt.tuned": "dit",
                                                                     "ckpt.vae": "vae", "ckpt.clip": "clip",
                                                                     "ckpt.umt5": "umt5", "idm.checkpoint": "idm"})
  neg = config.get("neg_prompt_embed_path")
  if neg and not pathlib.Path(neg).is_file():
    raise FileNotFoundError(f"config.neg_prompt_embed_path: {neg} does not exist (the negative prompt's cached "
                            "umT5 embedding, a .npy from scripts/cache_embeddings.py)")


def _sampler_config(config):
  from eva_jax.diffusion.sampler import SamplerConfig
  return SamplerConfig(**dict(config.sampler))


def _demo_csv(directory: pathlib.Path) -> pathlib.Path:
  """A one-row image_csv with a rendered toy-world frame (for `configs/infer.py:tiny` without data)."""
  from PIL import Image
  from eva_jax.data import toyworld
  directory.mkdir(parents=True, exist_ok=True)
  frame = toyworld.render(np.zeros(14), size=96)[0]
  Image.fromarray(np.concatenate([frame, frame[:, :32]], axis=1)).save(directory / "toy.png")  # 96x128
  path = directory / "metadata.csv"
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(IMAGE_CSV_COLUMNS)
    w.writerow(["toy.png", 96, 128, 16, 1, "Lift both arms and close the right gripper."])
  return path


def _encode_texts(config, rows, data_root: pathlib.Path, run_dir: pathlib.Path, mesh=None):
  """Prompt embeddings [N, L, D] and the negative-prompt embedding [1, L, D] (numpy)."""
  from eva_jax.data.video_dataset import load_array
  from eva_jax.models import tokenizer as tok_lib
  from eva_jax.models.umt5 import encode_prompts
  cached = [r.get("prompt_embed_path") for r in rows]
  if all(cached):
    embs = [load_array(data_root / p) for p in cached]
    if not config.neg_prompt_embed_path and config.sampler.lang_guidance:
      raise ValueError("cached prompt embeddings need config.neg_prompt_embed_path for lang_guidance != 0")
    neg = load_array(config.neg_prompt_embed_path)[None] if config.neg_prompt_embed_path else None
    length = max(e.shape[0] for e in embs)
    return np.stack([np.pad(e, ((0, length - e.shape[0]), (0, 0))) for e in embs]), neg
  if not config.ckpt.tokenizer:
    if not config.ckpt.random_init:
      raise ValueError("config.ckpt.tokenizer is empty: give the google/umt5-xxl tokenizer directory")
    words = sorted({w for r in rows for w in r["caption"].lower().replace(".", " ").replace(",", " ").split()})
    config.ckpt.tokenizer = tok_lib.make_tiny_tokenizer(run_dir / "tokenizer", words)
  encoder, tokenizer = build_text_encoder(config, mesh)
  embs = np.asarray(encode_prompts(encoder, tokenizer, [r["caption"] for r in rows]))
  neg = np.asarray(encode_prompts(encoder, tokenizer, [config.neg_prompt]))
  del encoder  # release umT5 before the DiT is built
  return embs, neg


def run_inference(config, workdir: Optional[str] = None) -> list[pathlib.Path]:
  """Generates one video per image_csv row; returns the mp4 paths under <run dir>/videos/."""
  from eva_jax.data.video import write_video
  from eva_jax.diffusion.sampler import I2VSampler
  from eva_jax.parallel import make_mesh
  from eva_jax.utils.rundir import make_run_dir, save_config

  check_config(config)
  run_dir = pathlib.Path(workdir) if workdir else make_run_dir(config.output_root)
  run_dir.mkdir(parents=True, exist_ok=True)
  fill_from_wan_dir(config)
  require_checkpoints(config)
  scfg = _sampler_config(config)

  csv_path = pathlib.Path(config.data.data_root) / config.data.metadata_path if config.data.metadata_path else None
  if csv_path is None:
    if not config.ckpt.random_init:
      raise ValueError("config.data.metadata_path is empty: give an image_csv (image_path,height,width,fps,"
                       "n_frames,caption)")
    csv_path = _demo_csv(run_dir / "inputs")
  bs = config.data.batch_size
  mesh = None
  if config.use_mesh:
    mesh = make_mesh(dict(config.mesh))
    batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if bs % batch_ways:
      raise ValueError(f"config.data.batch_size={bs} must be a multiple of the mesh's data x fsdp = {batch_ways} "
                       "(the batch is sharded over both)")
  rows = read_image_csv(csv_path)
  if config.data.limit:
    rows = rows[:config.data.limit]
  data_root = csv_path.parent
  mode = config.data.get("resize", "stretch")
  frames = np.stack([load_first_frame(data_root / r["image_path"], scfg.height, scfg.width, mode) for r in rows])
  save_config(run_dir, config)  # once the inputs have been read: a bad image_csv leaves the run dir as it was
  contexts, neg = _encode_texts(config, rows, data_root, run_dir, mesh)

  models = build_models(config, text_dim=contexts.shape[-1], mesh=mesh)
  sampler = I2VSampler(models.dit, models.vae, models.clip, scfg, mesh=mesh)
  out_dir = run_dir / "videos"
  paths = []
  key = jax.random.key(config.seed)
  for start in range(0, len(rows), bs):
    idx = list(range(start, min(start + bs, len(rows))))
    pad = bs - len(idx)  # keep one compiled shape: pad the last batch by repeating its last row
    take = idx + [idx[-1]] * pad
    video, _ = sampler.generate(jnp.asarray(frames[take]), jnp.asarray(contexts[take]),
                                None if neg is None else jnp.asarray(neg), jax.random.fold_in(key, start))
    video = np.asarray(jax.device_get(video))
    for j, i in enumerate(idx):
      stem = pathlib.Path(rows[i]["image_path"]).stem
      paths.append(write_video(out_dir / f"{i:04d}_{stem}.mp4", video[j], fps=config.fps))
  print(f"wrote {len(paths)} video(s) to {out_dir}")
  return paths
