"""Inference end to end on the tiny config: image_csv -> resized first frames -> mp4 files."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from configs.infer import get_config
from eva_jax import inference
from eva_jax.data.video import read_video


def _write_csv(root, rows, columns=inference.IMAGE_CSV_COLUMNS):
  with open(root / "metadata.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(columns)
    w.writerows(rows)
  return root / "metadata.csv"


def test_read_image_csv(tmp_path):
  _write_csv(tmp_path, [["a.png", 480, 640, 16, 1, "Click the bell."]])
  rows = inference.read_image_csv(tmp_path / "metadata.csv")
  assert rows == [dict(image_path="a.png", height=480, width=640, fps=16.0, n_frames=1, caption="Click the bell.")]
  _write_csv(tmp_path, [["a.png", 480, 16, "x"]], columns=("image_path", "height", "fps", "caption"))
  with pytest.raises(ValueError, match=r"missing column\(s\) \['width', 'n_frames'\]"):
    inference.read_image_csv(tmp_path / "metadata.csv")


def test_first_frame_stretch_crop_and_pad(tmp_path):
  rng = np.random.default_rng(0)
  # Already the target size: unchanged apart from the [-1, 1] mapping, in every mode.
  img = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
  Image.fromarray(img).save(tmp_path / "same.png")
  for mode in ("stretch", "crop", "pad"):
    np.testing.assert_allclose(inference.load_first_frame(tmp_path / "same.png", 48, 64, mode),
                               img / 127.5 - 1.0, atol=1e-6)
  # EVA's default: a plain bicubic resize of the whole image (a 512x512 image is squeezed, not padded).
  square = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
  Image.fromarray(square).save(tmp_path / "square.png")
  out = inference.load_first_frame(tmp_path / "square.png", 48, 64)
  want = np.asarray(Image.fromarray(square).resize((64, 48), Image.BICUBIC), np.float32)
  np.testing.assert_allclose(out, want / 127.5 - 1.0, atol=1e-6)
  # 'crop': a wide image at twice the height, short side 96 -> 48, then the central 64 columns.
  wide = rng.integers(0, 256, (96, 200, 3), dtype=np.uint8)
  Image.fromarray(wide).save(tmp_path / "wide.png")
  out = inference.load_first_frame(tmp_path / "wide.png", 48, 64, "crop")
  resized = np.asarray(Image.fromarray(wide).resize((100, 48), Image.BICUBIC), np.float32)
  np.testing.assert_allclose(out, resized[:, 18:82] / 127.5 - 1.0, atol=1e-6)
  assert out.shape == (48, 64, 3) and out.min() >= -1 and out.max() <= 1
  # 'pad': the square fits as 48x48 in the middle, 8 black columns each side.
  out = inference.load_first_frame(tmp_path / "square.png", 48, 64, "pad")
  np.testing.assert_array_equal(out[:, :8], -1.0)
  np.testing.assert_array_equal(out[:, -8:], -1.0)
  fitted = np.asarray(Image.fromarray(square).resize((48, 48), Image.BICUBIC), np.float32)
  np.testing.assert_allclose(out[:, 8:56], fitted / 127.5 - 1.0, atol=1e-6)
  with pytest.raises(ValueError, match="resize mode must be one of"):
    inference.load_first_frame(tmp_path / "same.png", 48, 64, "squash")


def test_tiny_inference_writes_videos(tmp_path):
  data = tmp_path / "data"
  data.mkdir()
  rng = np.random.default_rng(1)
  Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(data / "bell.png")
  Image.fromarray(rng.integers(0, 256, (90, 70, 3), dtype=np.uint8)).save(data / "cup.png")
  _write_csv(data, [["bell.png", 60, 80, 16, 1, "Click the bell."],
                    ["cup.png", 90, 70, 16, 1, "Lift the cup, then place it down."]])
  config = get_config("tiny")
  config.data.data_root = str(data)
  config.data.metadata_path = "metadata.csv"
  paths = inference.run_inference(config, workdir=str(tmp_path / "run"))
  assert [p.name for p in paths] == ["0000_bell.mp4", "0001_cup.mp4"]
  assert all(p.parent == tmp_path / "run" / "videos" for p in paths)
  s = config.sampler
  for p in paths:
    frames, fps = read_video(p)
    assert frames.shape == (s.num_frames, s.height, s.width, 3)
    assert fps == pytest.approx(16)
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  assert saved["sampler"]["hist_guidance"] == 1.5 and saved["sampler"]["lang_guidance"] == 2.5


def test_missing_weights_are_an_error(tmp_path):
  config = get_config("tiny")
  config.ckpt.random_init = False
  with pytest.raises(ValueError, match="metadata_path is empty"):
    inference.run_inference(config, workdir=str(tmp_path / "run"))


def test_converted_orbax_checkpoints_load(tmp_path):
  """Models restored from `python -m convert`-style orbax checkpoints equal the saved parameters."""
  import jax
  from flax import nnx

  from convert.cli import stream_to_orbax
  from eva_jax.models.vae import WanVAE, vae_config
  from eva_jax.models.wan import WanModel, wan_config

  def save(module, out):
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(module)))[0]
    items = ((tuple(getattr(k, "key", k) for k in path), np.asarray(v)) for path, v in flat)
    stream_to_orbax(items, str(out), progress=False)
    (out / "eva_convert.json").write_text("{}")
    return nnx.to_pure_dict(nnx.state(module))

  config = get_config("tiny")
  vae_ref = save(WanVAE(vae_config("tiny"), rngs=nnx.Rngs(11)), tmp_path / "vae")
  dit_cfg = wan_config("tiny-i2v", text_dim=32, image_dim=32)
  dit_ref = save(WanModel(dit_cfg, rngs=nnx.Rngs(12)), tmp_path / "dit")
  config.ckpt.vae, config.ckpt.dit = str(tmp_path / "vae"), str(tmp_path / "dit")
  models = inference.build_models(config, text_dim=32)
  for ref, module in ((vae_ref, models.vae), (dit_ref, models.dit)):
    got = nnx.to_pure_dict(nnx.state(module))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, ref)


def test_pytorch_weights_convert_on_the_fly(tmp_path):
  """A PyTorch VAE file (diffusers layout, .safetensors) is converted while the models are built."""
  import jax
  from flax import nnx
  from safetensors.torch import save_file

  from convert.wan_vae import convert_vae_state_dict
  from eva_jax.models.vae import vae_config
  from tests.utils import diffusers_vae

  cfg = vae_config("tiny")
  ref = diffusers_vae(cfg)
  sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
  save_file(sd, str(tmp_path / "vae.safetensors"))
  config = get_config("tiny")
  config.ckpt.vae = str(tmp_path / "vae.safetensors")
  models = inference.build_models(config, text_dim=32)
  expected = convert_vae_state_dict(sd, cfg)
  got = nnx.to_pure_dict(nnx.state(models.vae))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, expected)
  # A file of the wrong model is refused with the offending key named.
  config.ckpt.clip = str(tmp_path / "vae.safetensors")
  with pytest.raises((KeyError, ValueError)):
    inference.build_models(config, text_dim=32)
