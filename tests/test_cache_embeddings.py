"""The embedding cache (EVA's cache_prompt_embed): files, CSV column, atomic CSV, resume, loaders."""

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flax import nnx

from configs.cache_embeddings import get_config
from eva_jax.data import embeddings
from eva_jax.data.embeddings import cache_embeddings, load_prompt_embedding, save_array
from eva_jax.data.video import write_video
from eva_jax.models.clip import CLIPVisionEncoder, clip_config
from eva_jax.models.tokenizer import T5Tokenizer
from eva_jax.models.vae import WanVAE, vae_config
from eva_jax.models.umt5 import UMT5Encoder, encode_prompts, umt5_config
from tests.utils import rel_err

CAPTIONS = ["Pick up the red cup.", "Place the cup on the plate.", "Pick up the red cup.",
            "Click the bell with the right arm.", "Open the drawer, then close it.", ""]
VIDEOS = ["ep0.mp4", "task_a/ep1.mp4", "task_a/ep2.mp4", "task_b/ep3.mp4", "ep4.mp4", "ep5.mp4"]
COLUMNS = ["video_path", "caption", "height", "width", "fps", "n_frames"]


def _make_csv(root: Path, videos: bool = False) -> Path:
  path = root / "metadata.csv"
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(COLUMNS)
    for v, c in zip(VIDEOS, CAPTIONS):
      w.writerow([v, c, 24, 40, 16, 3])
  if videos:
    rng = np.random.default_rng(0)
    for v in VIDEOS:
      write_video(root / v, rng.integers(0, 256, size=(3, 24, 40, 3), dtype=np.uint8), fps=16)
  return path


def _config(csv_path: Path, **kw):
  c = get_config("tiny")
  c.metadata_path = str(csv_path)
  c.batch_size = 2
  c.umt5.text_len = 24
  for k, v in kw.items():
    c[k] = v
  return c


def _rows(csv_path):
  with open(csv_path, newline="") as f:
    return list(csv.DictReader(f))


def test_cache_writes_files_and_csv(tmp_path):
  csv_path = _make_csv(tmp_path)
  stats = cache_embeddings(_config(csv_path))
  assert stats["prompt_written"] == 6 and stats["captions_encoded"] == 5  # one duplicate caption
  rows = _rows(csv_path)
  assert list(rows[0]) == COLUMNS + ["prompt_embed_path"]
  assert [r["prompt_embed_path"] for r in rows] == [f"prompt_embeds/{v}.npy" for v in VIDEOS]
  assert [r["caption"] for r in rows] == CAPTIONS and rows[1]["height"] == "24"

  # The same numbers as encoding directly with the same tiny model and tokenizer.
  cfg = umt5_config("tiny", text_len=24)
  enc = UMT5Encoder(cfg, rngs=nnx.Rngs(0))  # config seed 0, random init
  tok = T5Tokenizer(tmp_path / "tiny_tokenizer", max_length=24)
  ref = np.asarray(encode_prompts(enc, tok, CAPTIONS))  # [6, 24, D]
  _, mask = tok(CAPTIONS)
  for i, r in enumerate(rows):
    stored = np.load(tmp_path / r["prompt_embed_path"])
    n = int(mask[i].sum())
    assert stored.shape == (n, cfg.d_model) and stored.dtype == np.float32
    assert rel_err(stored, ref[i, :n]) <= 1e-6
    padded = load_prompt_embedding(tmp_path / r["prompt_embed_path"], 24)
    assert padded.shape == (24, cfg.d_model) and not padded[n:].any()
  assert _rows(csv_path)[5]["prompt_embed_path"]  # the empty caption gets its EOS-only embedding


def test_interrupted_run_keeps_old_csv_and_resumes(tmp_path, monkeypatch):
  csv_path = _make_csv(tmp_path)
  before = csv_path.read_bytes()
  calls = {"n": 0}

  def flaky_save(path, array, dtype=np.float32):
    calls["n"] += 1
    if calls["n"] == 4:
      raise KeyboardInterrupt("simulated interruption")
    return save_array(path, array, dtype)

  monkeypatch.setattr(embeddings, "save_array", flaky_save)
  with pytest.raises(KeyboardInterrupt):
    cache_embeddings(_config(csv_path))
  assert csv_path.read_bytes() == before  # old CSV intact
  assert not list(tmp_path.glob("*.tmp")) and len(list(tmp_path.rglob("*.npy"))) == 3
  monkeypatch.undo()

  # A corrupt file (e.g. a copy cut short) is detected and re-encoded.
  first = tmp_path / "prompt_embeds" / "ep0.mp4.npy"
  first.write_bytes(first.read_bytes()[:40])
  stats = cache_embeddings(_config(csv_path))
  assert stats["prompt_skipped"] == 2 and stats["prompt_written"] == 4
  rows = _rows(csv_path)
  assert all((tmp_path / r["prompt_embed_path"]).is_file() for r in rows)
  # Nothing left to do on a third run.
  stats = cache_embeddings(_config(csv_path))
  assert stats["prompt_written"] == 0 and stats["prompt_skipped"] == 6 and stats["captions_encoded"] == 0


def test_clip_features_and_vae_latents_of_first_frames(tmp_path):
  csv_path = _make_csv(tmp_path, videos=True)
  out_csv = tmp_path / "out.csv"
  # The VAE is built here and handed in (its own numerics are tested in the VAE's tests).
  vae = WanVAE(vae_config("tiny"), rngs=nnx.Rngs(0))
  config = _config(csv_path, clip_features=True, vae_latents=True, output_csv=str(out_csv))
  stats = cache_embeddings(config, models={"vae": vae})
  assert stats["clip_written"] == 6 and stats["vae_written"] == 6
  rows = _rows(out_csv)
  assert rows[2]["clip_embed_path"] == "clip_embeds/task_a/ep2.mp4.npy"
  assert rows[2]["first_latent_path"] == "first_latents/task_a/ep2.mp4.npy"
  assert _rows(csv_path)[0].keys() == set(COLUMNS)  # output_csv leaves the input alone

  # Row 2's first frame: 24x40 -> centre crop 24x24 -> 32x32, in [-1, 1].
  frame = embeddings.first_frame(tmp_path / VIDEOS[2], 32, 32)
  assert frame.shape == (32, 32, 3) and -1 <= frame.min() and frame.max() <= 1
  cfg = clip_config("tiny")
  clip = CLIPVisionEncoder(cfg, rngs=nnx.Rngs(0))  # config seed 0, random init
  ref = np.asarray(clip.encode_image(frame[None]))[0]
  stored = np.load(tmp_path / rows[2]["clip_embed_path"])
  assert stored.shape == (cfg.num_tokens, cfg.width) and rel_err(stored, ref) <= 1e-5

  ref = np.asarray(embeddings.encode_vae_frames(vae, np.stack([frame, frame])))[0]  # batch 2: cached jit
  stored = np.load(tmp_path / rows[2]["first_latent_path"])
  assert stored.shape == ref.shape == (1, 4, 4, 16) and rel_err(stored, ref) <= 1e-6


def test_loader_formats(tmp_path, monkeypatch):
  emb = np.random.default_rng(0).normal(size=(7, 16)).astype(np.float32)
  torch.save(torch.from_numpy(emb).to(torch.bfloat16), tmp_path / "orig.pt")  # the original EVA cache
  out = load_prompt_embedding(tmp_path / "orig.pt", text_len=12)
  assert out.shape == (12, 16) and not out[7:].any()
  assert rel_err(out[:7], emb) < 4e-3  # bfloat16 storage: 8 mantissa bits
  np.testing.assert_array_equal(load_prompt_embedding(save_array(tmp_path / "a.npy", emb), 5), emb[:5])
  half = np.load(save_array(tmp_path / "h.npy", emb, "float16"))
  assert half.dtype == np.float16 and rel_err(half, emb) < 1e-3
  monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
  with pytest.raises(ImportError, match="orig.pt is a PyTorch file.*needs torch"):
    load_prompt_embedding(tmp_path / "orig.pt")


def test_script_entry_point_with_overrides(tmp_path):
  csv_path = _make_csv(tmp_path)
  root = Path(__file__).resolve().parents[1]
  cmd = [sys.executable, str(root / "scripts" / "cache_embeddings.py"),
         "--config", f"{root}/configs/cache_embeddings.py:tiny", f"--config.metadata_path={csv_path}",
         "--config.umt5.text_len=16", "--config.batch_size=3"]
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  assert res.returncode == 0, res.stderr[-2000:]
  assert "prompt_written=6" in res.stdout
  assert all(r["prompt_embed_path"] for r in _rows(csv_path))


def test_build_model_from_torch_and_orbax_checkpoints(tmp_path):
  """init='torch' converts a .pth on the fly; init='orbax' loads what `python -m convert` wrote."""
  import jax
  from transformers import UMT5Config, UMT5EncoderModel

  from convert.cli import convert as cli_convert
  from convert.umt5 import convert_umt5_state_dict
  cfg = umt5_config("tiny")
  torch.manual_seed(0)
  hf = UMT5EncoderModel(UMT5Config(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv,
                                   d_ff=cfg.d_ff, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                                   feed_forward_proj="gated-gelu"))
  torch.save(hf.state_dict(), tmp_path / "t5.pth")
  want = convert_umt5_state_dict(hf.state_dict(), cfg)
  cli_convert("umt5", str(tmp_path / "t5.pth"), str(tmp_path / "t5_orbax"), config="tiny")  # python -m convert
  for init, path in (("torch", tmp_path / "t5.pth"), ("orbax", tmp_path / "t5_orbax")):
    sub = get_config("tiny").umt5
    sub.update(init=init, path=str(path))
    model = embeddings.build_model("umt5", sub, cfg, seed=0)
    got = nnx.to_pure_dict(nnx.state(model))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))), init
  sub.update(path=str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="nowhere"):
    embeddings.build_model("umt5", sub, cfg, seed=0)


def test_first_frame_from_image_and_robotwin_episode(tmp_path):
  from PIL import Image

  from eva_jax.data.robotwin import write_episode
  yy, xx = np.meshgrid(np.arange(24), np.arange(32), indexing="ij")  # smooth: JPEG keeps it
  frame = np.stack([yy * 10, xx * 8, (yy + xx) * 4], axis=-1).astype(np.uint8)
  frames = np.stack([frame, 255 - frame])
  Image.fromarray(frames[0]).save(tmp_path / "f.png")
  write_episode(tmp_path / "ep.hdf5", frames, np.zeros((2, 14), np.float32))
  png = embeddings.first_frame(tmp_path / "f.png", 24, 32)  # same size: no resampling
  np.testing.assert_allclose(png, frames[0] / 127.5 - 1.0, atol=1e-6)
  ep = embeddings.first_frame(tmp_path / "ep.hdf5", 24, 32)  # JPEG-coded frame 0
  assert ep.shape == (24, 32, 3) and np.abs(ep - png).mean() < 0.03
  wide = embeddings.first_frame(tmp_path / "f.png", 12, 12)  # centre 24x24 crop, then 12x12
  assert wide.shape == (12, 12, 3)


def test_whole_clip_video_latents_for_sft(tmp_path):
  """video_latents: each clip read as SFT reads it (5 frames from 3 by slowdown, resized), VAE-encoded, and
  loadable through SFT's data path (data.load_video_latent) without decoding the video."""
  from eva_jax.data.video import read_video
  from eva_jax.data.video_dataset import ExampleLoader, resize_frames, to_unit_range
  from eva_jax.data.metadata import read_metadata
  csv_path = _make_csv(tmp_path, videos=True)
  vae = WanVAE(vae_config("tiny"), rngs=nnx.Rngs(0))
  config = _config(csv_path, prompts=False, video_latents=True)
  stats = cache_embeddings(config, models={"vae": vae})
  assert stats["video_latents_written"] == 6 and stats["prompt_written"] == 0
  rows = _rows(csv_path)
  assert "prompt_embed_path" not in rows[0]
  assert rows[1]["video_latent_path"] == "video_latents/task_a/ep1.mp4.npy"

  frames = read_video(tmp_path / VIDEOS[1])[0]                    # [3, 24, 40, 3] uint8
  clip = to_unit_range(resize_frames(frames[[0, 0, 1, 2, 2]], 32, 32))
  ref = np.asarray(vae.encode(clip[None]))[0]
  stored = np.load(tmp_path / rows[1]["video_latent_path"])
  assert stored.shape == ref.shape == (2, 4, 4, 16) and rel_err(stored, ref) <= 1e-5

  loader = ExampleLoader(tmp_path, dict(height=32, width=32, n_frames=5, load_prompt_embed=False,
                                        load_video_latent=True), train=True)
  example = loader(read_metadata(csv_path)[1], np.random.default_rng(0))
  assert "video" not in example and rel_err(example["latents"], ref) <= 1e-5
  assert cache_embeddings(config, models={"vae": vae})["video_latents_skipped"] == 6  # rerun resumes
