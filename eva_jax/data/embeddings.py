"""Cached conditioning: one file per CSV row, and the job that fills them (EVA's `cache_prompt_embed`).

File format: `.npy`, float32 by default (`save_dtype='float16'` halves the size; bfloat16 model
outputs are widened, never rounded further). Prompt embeddings are stored trimmed to the prompt's true
length, [L, 4096], like the original `.pt` files; `load_prompt_embedding` zero-pads them to 512.
The loader also reads the original EVA `.pt` files (with torch installed) and `.safetensors`.

Layout next to the videos (paths in the CSV are relative to the data root), as the original:
  prompt_embeds/<video_path>.npy   -> column prompt_embed_path   [L, 4096]
  clip_embeds/<video_path>.npy     -> column clip_embed_path     [257, 1280] (first frame)
  first_latents/<video_path>.npy   -> column first_latent_path   [1, h, w, 16] (first frame, VAE)
  video_latents/<video_path>.npy   -> column video_latent_path   [F, h, w, 16] (whole clip, VAE; SFT's
                                      data.load_video_latent: no decoding or encoding per training step)

`cache_embeddings(config)` encodes every distinct caption once (batched, jitted, progress bar), writes
each row's file atomically, and rewrites the CSV atomically at the end (temporary file + os.replace):
an interrupted run leaves the old CSV untouched, and a rerun skips rows whose files exist and load
with the expected shape. Run it through `scripts/cache_embeddings.py`.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from eva_jax.data import metadata
from eva_jax.utils import checks
from eva_jax.utils.files import atomic_path

PROMPT_COLUMN, CLIP_COLUMN, LATENT_COLUMN = "prompt_embed_path", "clip_embed_path", "first_latent_path"
PROMPT_DIR, CLIP_DIR, LATENT_DIR = "prompt_embeds", "clip_embeds", "first_latents"
VIDEO_LATENT_COLUMN, VIDEO_LATENT_DIR = "video_latent_path", "video_latents"


# MARK: files


def save_array(path: str | os.PathLike, array, dtype: Any = np.float32) -> Path:
  """Writes `array` as .npy atomically (a partial file never appears under the final name)."""
  path = Path(path)
  with atomic_path(path) as tmp, open(tmp, "wb") as f:
    np.save(f, np.asarray(np.asarray(array, np.float32), dtype))
  return path


# np.load parses the .npy header with ast.literal_eval, and CPython 3.11's AST constructor is not
# thread-safe ("SystemError: AST constructor recursion depth mismatch", seen in the demo's SFT stage when
# Grain's worker threads loaded cached latents together). The files are small: load one at a time.
_NPY_LOCK = threading.Lock()


TORCH_EXTRA = "install the torch extra: pip install 'eva_jax[torch]'"


def load_array(path: str | os.PathLike) -> np.ndarray:
  """float32 array from .npy, .safetensors (its only / first tensor) or an original EVA `.pt` file.

  Every failure (missing, truncated, not the format its suffix says, not numeric, NaN / inf) raises
  naming the file."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"cached embedding {path} does not exist")
  if not path.is_file():
    raise IsADirectoryError(f"cached embedding {path} is not a file")
  if path.suffix not in (".npy", ".safetensors", ".pt", ".pth"):
    raise ValueError(f"cached embedding {path}: unknown format {path.suffix!r} (.npy, .safetensors, .pt)")
  try:
    array = _read_array(path)
  except (ImportError, FileNotFoundError):
    raise
  except Exception as e:  # numpy, safetensors and torch raise many types for a bad file
    raise ValueError(f"cached embedding {path} is not a readable {path.suffix} array: "
                     f"{' '.join(str(e).split()) or type(e).__name__}") from e
  if not np.isfinite(array).all():
    raise ValueError(f"cached embedding {path} holds {int((~np.isfinite(array)).sum())} NaN / inf value(s)")
  return array


def _read_array(path: Path) -> np.ndarray:
  if path.suffix == ".npy":
    with _NPY_LOCK:
      array = np.load(path)
    if array.dtype.kind not in "fiub":
      raise ValueError(f"dtype {array.dtype} is not numeric")
    return array.astype(np.float32)
  if path.suffix == ".safetensors":
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    tensors = load_file(str(path))
    if not tensors:
      raise ValueError("the file holds no tensors")
    return np.asarray(tensors[sorted(tensors)[0]], np.float32)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f"{path} is a PyTorch file (the original EVA cache); reading it needs torch "
                      f"({TORCH_EXTRA}) or re-cache it with scripts/cache_embeddings.py") from None
  t = torch.load(path, map_location="cpu", weights_only=True)
  if not hasattr(t, "detach"):
    raise ValueError(f"expected one tensor, found {type(t).__name__}")
  return t.detach().float().numpy()


def pad_prompt_embedding(emb: np.ndarray, text_len: int = 512) -> np.ndarray:
  """[L, D] -> [text_len, D]: truncated or zero-padded, as the DiT's text context expects."""
  if emb.ndim != 2:
    raise ValueError(f"prompt embedding must be [L, D], got shape {emb.shape}")
  emb = emb[:text_len]
  return np.pad(emb, ((0, text_len - emb.shape[0]), (0, 0)))


def load_prompt_embedding(path: str | os.PathLike, text_len: int = 512) -> np.ndarray:
  """A cached prompt embedding as float32 [text_len, D] (zero past the prompt's length)."""
  emb = load_array(path)  # its errors name the file already
  if emb.ndim != 2 or emb.shape[0] == 0:
    raise ValueError(f"cached prompt embedding {path}: must be [L, D] with L >= 1, found shape {emb.shape}")
  return pad_prompt_embedding(emb, text_len)


def is_valid_file(path: Path, check: Callable[[tuple[int, ...]], bool]) -> bool:
  """True when `path` is a readable .npy whose shape passes `check` (used to resume)."""
  try:
    arr = np.load(path, mmap_mode="r")
    return arr.dtype.kind in "fiu" and check(tuple(arr.shape)) and bool(np.isfinite(arr).all())
  except (OSError, ValueError, EOFError, TypeError):  # missing, truncated, not .npy, object dtype
    return False


def cache_path(media_path: str, subdir: str) -> str:
  """`prompt_embeds/<video_path>.npy`, relative to the data root like the media path itself."""
  return f"{subdir}/{media_path}.npy"


# MARK: CSV


def media_column(columns: Sequence[str], where: Path) -> str:
  for c in ("video_path", "image_path"):
    if c in columns:
      return c
  raise KeyError(f"{where}: needs a 'video_path' (or 'image_path') column; found {list(columns)}")


# MARK: encoders from the config


def build_model(kind: str, sub, cfg, seed: int):
  """The encoder of config.<kind> ({init, path}): init 'random' (seeded) or any source of
  `eva_jax.weights.load` at `path` (PyTorch files, a `python -m convert` orbax directory)."""
  from eva_jax import weights  # pylint: disable=g-import-not-at-top
  if sub.init not in ("random", "torch", "orbax"):
    raise ValueError(f"{kind}.init must be 'random', 'torch' or 'orbax', got {sub.init!r}")
  if sub.init != "random" and not sub.path:
    raise ValueError(f"{kind}.init={sub.init!r} needs {kind}.path")
  return weights.load_module(kind, "random" if sub.init == "random" else sub.path, cfg, seed=seed)


def _text_encoder(config, captions: Sequence[str], workdir: Path):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from eva_jax.models.tokenizer import T5Tokenizer, make_tiny_tokenizer  # pylint: disable=g-import-not-at-top
  from eva_jax.models.umt5 import umt5_config  # pylint: disable=g-import-not-at-top
  c = config.umt5
  cfg = umt5_config(c.preset, dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype),
                    text_len=c.text_len)
  if c.tokenizer_path == "tiny":  # smoke runs: a word-level tokenizer over the CSV's own captions
    words = sorted({w for cap in captions for w in _words(cap)})
    path = make_tiny_tokenizer(workdir / "tiny_tokenizer", words)
  else:
    path = c.tokenizer_path
  tokenizer = T5Tokenizer(path, max_length=c.text_len)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f"tokenizer {path} has {tokenizer.vocab_size} tokens but umT5 preset {c.preset!r} "
                     f"embeds only {cfg.vocab_size}")
  model = build_model("umt5", c, cfg, config.seed)
  return tokenizer, model


def _words(text: str) -> list[str]:
  import re  # pylint: disable=g-import-not-at-top
  return re.findall(r"\w+|[^\w\s]+", text.lower())  # the tiny tokenizer's Whitespace split


# MARK: the cache job


def _batches(items: Sequence, size: int):
  for i in range(0, len(items), size):
    yield items[i:i + size]


def _row_file(root: Path, row: Mapping[str, str], media: str, column: str, subdir: str) -> tuple[str, Path]:
  rel = row.get(column) or cache_path(row[media], subdir)
  return rel, root / rel


def _cache_prompts(config, rows, media, root: Path, workdir: Path, stats: dict) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from eva_jax.models.umt5 import encode_ids  # pylint: disable=g-import-not-at-top
  from eva_jax.utils.progress import progress  # pylint: disable=g-import-not-at-top
  from eva_jax.models.umt5 import umt5_config  # pylint: disable=g-import-not-at-top
  text_len = config.umt5.text_len
  dim = umt5_config(config.umt5.preset).d_model
  # Which rows still need a file, grouped by caption so each distinct caption is encoded once.
  todo: dict[str, list[int]] = {}
  for i, row in enumerate(rows):
    rel, path = _row_file(root, row, media, PROMPT_COLUMN, PROMPT_DIR)
    row[PROMPT_COLUMN] = rel
    ok = not config.overwrite and is_valid_file(
        path, lambda s: len(s) == 2 and 1 <= s[0] <= text_len and s[1] == dim)
    if ok:
      stats["prompt_skipped"] += 1
    else:
      todo.setdefault(row.get("caption", ""), []).append(i)
  if not todo:
    return
  captions = list(todo)
  tokenizer, model = _text_encoder(config, [r.get("caption", "") for r in rows], workdir)
  bs = config.batch_size
  bar = progress(total=len(captions), desc="umT5 captions")
  for batch in _batches(captions, bs):
    padded = list(batch) + [""] * (bs - len(batch))  # one static batch shape: one compilation
    ids, mask = tokenizer(padded)
    emb = jax.device_get(encode_ids(model, ids, mask))  # [B, text_len, D], zero past each length
    for j, caption in enumerate(batch):
      n = int(mask[j].sum())
      for i in todo[caption]:
        save_array(root / rows[i][PROMPT_COLUMN], emb[j, :n], config.save_dtype)
        stats["prompt_written"] += 1
    bar.update(len(batch))
  bar.close()
  stats["captions_encoded"] += len(captions)


def first_frame(path: Path, height: int, width: int, camera: str = "head_camera") -> np.ndarray:
  """The first frame of a video, image or RoboTwin episode (.hdf5, `camera`), centre-cropped to
  height:width and resized to it, in [-1, 1] float32 [height, width, 3]."""
  # pylint: disable=g-import-not-at-top
  from eva_jax.data.video_dataset import resize_frames, to_unit_range
  suffix = path.suffix.lower()
  if suffix in (".png", ".jpg", ".jpeg", ".bmp", ".webp"):
    from eva_jax.data.images import read_image
    frame = read_image(path)
  elif suffix in (".hdf5", ".h5"):
    from eva_jax.data.robotwin import decode_frame, read_jpeg_bytes
    frame = decode_frame(read_jpeg_bytes(path, camera)[0][0], path=path, index=0)
  else:
    from eva_jax.data.video import read_video
    frame = read_video(path, indices=[0])[0][0]
  h0, w0 = frame.shape[:2]
  if w0 * height > h0 * width:  # too wide: crop the sides
    cw = round(h0 * width / height)
    box = (0, (w0 - cw) // 2, h0, cw)
  else:
    ch = round(w0 * height / width)
    box = ((h0 - ch) // 2, 0, ch, w0)
  return to_unit_range(resize_frames(frame[None], height, width, box))[0]


def _jit(fn):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return nnx.jit(fn)


# Module-level so the compiled function is reused across calls (and by tests).
encode_clip_frames = _jit(lambda m, x: m.encode_image(x))        # [B, H, W, 3] -> [B, 257, 1280]
encode_vae_frames = _jit(lambda m, x: m.encode(x[:, None]))      # [B, H, W, 3] -> [B, 1, h, w, 16]
encode_vae_clips = _jit(lambda m, x: m.encode(x))                # [B, T, H, W, 3] -> [B, F, h, w, 16]


def _vae_model(config, model=None):
  """The VAE of config.vae (or `model` when given) and its config."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from eva_jax.models.vae import vae_config  # pylint: disable=g-import-not-at-top
  c = config.vae
  cfg = vae_config(c.preset, dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
  if model is None:
    model = build_model("vae", c, cfg, config.seed)
  return model, cfg


def _row_first_frame(config, rows, media: str, root: Path, i: int) -> np.ndarray:
  try:
    return first_frame(root / rows[i][media], config.height, config.width, config.camera)
  except (OSError, ValueError, KeyError) as e:  # the reader names the file; add the CSV row
    raise ValueError(f"metadata row {i} ({media}={rows[i][media]!r}): {e}") from None


def _cache_frames(config, rows, media, root: Path, kind: str, stats: dict, model=None) -> None:
  """CLIP features or VAE latents of each row's first frame."""
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  from eva_jax.utils.progress import progress
  column, subdir = (CLIP_COLUMN, CLIP_DIR) if kind == "clip" else (LATENT_COLUMN, LATENT_DIR)
  c = config.clip if kind == "clip" else config.vae
  if kind == "clip":
    from eva_jax.models.clip import clip_config
    cfg = clip_config(c.preset, dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
    want = lambda s: s == (cfg.num_tokens, cfg.width)
    encode = encode_clip_frames
  else:
    want = lambda s: len(s) == 4 and s[0] == 1
    encode = encode_vae_frames
  todo = []
  for i, row in enumerate(rows):
    rel, path = _row_file(root, row, media, column, subdir)
    row[column] = rel
    if not config.overwrite and is_valid_file(path, want):
      stats[f"{kind}_skipped"] += 1
    else:
      todo.append(i)
  if not todo:
    return
  if kind == "vae":
    model, _ = _vae_model(config, model)
  elif model is None:
    model = build_model("clip", c, cfg, config.seed)
  bs = config.batch_size
  bar = progress(total=len(todo), desc=f"{kind} first frames")
  for batch in _batches(todo, bs):
    frames = np.stack([_row_first_frame(config, rows, media, root, i) for i in batch])
    frames = np.pad(frames, ((0, bs - len(batch)),) + ((0, 0),) * 3)  # static batch shape
    out = jax.device_get(encode(model, jnp.asarray(frames)))
    for j, i in enumerate(batch):
      save_array(root / rows[i][column], out[j], config.save_dtype)
      stats[f"{kind}_written"] += 1
    bar.update(len(batch))
  bar.close()


def _cache_video_latents(config, rows, media, root: Path, csv_path: Path, stats: dict, model=None) -> None:
  """VAE latents of each row's whole clip, read as SFT reads it (config.video: frames, fps, trim), unaugmented.

  A clip longer than the window gets one fixed window (trim_mode 'random_cut' seeded by config.seed and the
  row, or 'speedup' for the whole clip resampled), so training on the cache sees that window only.
  """
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  from eva_jax.data.video_dataset import ExampleLoader
  from eva_jax.utils.progress import progress
  v = config.video
  if (v.n_frames - 1) % 4:
    raise ValueError(f"video.n_frames={v.n_frames}: the Wan VAE needs 1 + 4k frames")
  latent_frames = 1 + (v.n_frames - 1) // 4
  want = lambda s: len(s) == 4 and s[0] == latent_frames
  todo = []
  for i, row in enumerate(rows):
    rel, path = _row_file(root, row, media, VIDEO_LATENT_COLUMN, VIDEO_LATENT_DIR)
    row[VIDEO_LATENT_COLUMN] = rel
    if not config.overwrite and is_valid_file(path, want):
      stats["video_latents_skipped"] += 1
    else:
      todo.append(i)
  if not todo:
    return
  records = metadata.read_metadata(csv_path)  # typed rows (n_frames, fps, trims, crops) in the CSV's order
  loader = ExampleLoader(root, dict(height=config.height, width=config.width, n_frames=v.n_frames, fps=v.fps,
                                    trim_mode=v.trim_mode, pad_mode=v.pad_mode, augment=False,
                                    camera=config.camera), train=False)
  model, _ = _vae_model(config, model)
  bs = config.batch_size
  bar = progress(total=len(todo), desc="vae clips")
  for batch in _batches(todo, bs):
    clips = np.stack([loader.video(records[i], np.random.default_rng((config.seed, i))) for i in batch])
    clips = np.pad(clips, ((0, bs - len(batch)),) + ((0, 0),) * 4)  # static batch shape
    out = jax.device_get(encode_vae_clips(model, jnp.asarray(clips)))
    for j, i in enumerate(batch):
      save_array(root / rows[i][VIDEO_LATENT_COLUMN], out[j], config.save_dtype)
      stats["video_latents_written"] += 1
    bar.update(len(batch))
  bar.close()


# configs/cache_embeddings.py's fields, checked before any encoder is built.
CONFIG_RULES = {
    "seed": checks.integer(),
    "batch_size": checks.integer(1),
    "height": checks.multiple_of(8),        # the VAE's spatial stride
    "width": checks.multiple_of(8),
    "save_dtype": checks.one_of("float32", "float16", "bfloat16"),
    "umt5.text_len": checks.integer(1),
    "video.n_frames": checks.FRAMES_1_4K,   # the VAE's temporal stride is 4
    "video.fps": checks.number(0, lo_open=True),
    "video.trim_mode": checks.one_of("random_cut", "speedup"),
    "video.pad_mode": checks.one_of("slowdown", "pad_last"),
}


def cache_embeddings(config, workdir: str | os.PathLike | None = None,
                     models: Mapping[str, Any] | None = None) -> dict:
  """Fills prompt_embed_path (and optionally clip_embed_path / first_latent_path / video_latent_path) of a CSV.

  config: see configs/cache_embeddings.py. `models` may hold already built encoders ('clip', 'vae')
  to use instead of building them from the config. Returns counts of written / skipped files. The
  CSV (or `config.output_csv`) is replaced atomically once every file exists.
  """
  checks.check(config, checks.DTYPES, CONFIG_RULES)
  models = dict(models or {})
  root = Path(config.data_root) if config.data_root else Path(config.metadata_path).parent
  csv_path = Path(config.metadata_path)
  if not csv_path.is_absolute() and config.data_root:
    csv_path = root / csv_path
  out_csv = Path(config.output_csv) if config.output_csv else csv_path
  workdir = Path(workdir) if workdir else root
  columns, rows = metadata.read_csv_rows(csv_path)
  media = media_column(columns, csv_path)
  if media == "video_path":  # an EVA metadata CSV: every row valid before anything is encoded or rewritten
    metadata.read_metadata(csv_path)
  if not rows:
    raise ValueError(f"{csv_path}: no data rows under the header; nothing to cache")
  stats = {k: 0 for k in ("prompt_written", "prompt_skipped", "captions_encoded", "clip_written",
                          "clip_skipped", "vae_written", "vae_skipped", "video_latents_written",
                          "video_latents_skipped")}
  added = []
  if config.prompts:
    _cache_prompts(config, rows, media, root, workdir, stats)
    added.append(PROMPT_COLUMN)
  if config.clip_features:
    _cache_frames(config, rows, media, root, "clip", stats, models.get("clip"))
    added.append(CLIP_COLUMN)
  if config.vae_latents:
    _cache_frames(config, rows, media, root, "vae", stats, models.get("vae"))
    added.append(LATENT_COLUMN)
  if config.video_latents:
    _cache_video_latents(config, rows, media, root, csv_path, stats, models.get("vae"))
    added.append(VIDEO_LATENT_COLUMN)
  # raw strings in, raw strings out: a rewrite changes nothing but the added columns (atomically)
  metadata.write_metadata(out_csv, rows, columns + [c for c in added if c not in columns])
  stats.update(rows=len(rows), csv=str(out_csv))
  return stats
