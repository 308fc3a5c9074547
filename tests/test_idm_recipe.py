"""The authors' IDM training recipe: stride-2 windows, the 832:480 crop, the R<->B swap, per-frame
jitter, the ImageNet start from a torchvision state dict, and the loss / optimiser settings."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from PIL import Image

from configs.idm import get_config
from eva_jax.data import idm_dataset, robotwin
from eva_jax.data import idm_transforms as T
from eva_jax.training import idm as train_idm
from eva_jax.training.optim import make_optimizer, make_schedule, warmup_steps


# MARK: windows and split


def _records(lengths, size=(4, 6)):
  """In-memory records of episodes whose frame k (global) is a flat grey of level 10 * k."""
  recs, start, k = [], 0, 0
  for e, n in enumerate(lengths):
    for i in range(n):
      frame = np.full((*size, 3), 10 * k, np.uint8)
      recs.append(dict(jpeg=robotwin.encode_frame(frame), action=np.full(14, k, np.float32), episode=e,
                       index=i, episode_start=start, episode_length=n))
      k += 1
    start += n
  return recs


def test_stride2_windows_clamp_at_episode_edges():
  recs = _records([6, 5])
  win = idm_dataset.WindowSource(recs, num_frames=3, stride=2)
  assert len(win) == 11  # every frame is a window centre, as in the authors' dataset
  want = {0: [0, 0, 2], 1: [0, 1, 3], 2: [0, 2, 4], 4: [2, 4, 5], 5: [3, 5, 5],   # episode 0 (6 frames)
          6: [0, 0, 2], 10: [2, 4, 4]}                                           # episode 1 (5 frames)
  for i, local in want.items():
    pos, idx = win.frame_indices(i)
    assert pos == i and idx.tolist() == local, (i, idx)
    item = win[i]
    start = recs[i]["episode_start"]
    levels = item["frames"].reshape(3, -1).mean(1) / 10  # the decoded frames are those frames
    np.testing.assert_allclose(levels, np.asarray(local) + start, atol=0.2)
    assert item["action"][0] == i
  # Same windows as the episode-level helper the evaluation uses.
  np.testing.assert_array_equal(robotwin.window_indices(6, 3, 2)[[0, 1, 4, 5]], [want[0], want[1], want[4], want[5]])
  # A subset of centres (frame-level split) still reads neighbours from every record.
  sub = idm_dataset.WindowSource(recs, 3, 2, indices=[5, 7])
  assert len(sub) == 2 and sub.frame_indices(0)[0] == 5
  assert sub.frame_indices(1)[1].tolist() == [0, 1, 3]


def test_frame_split_is_the_authors_random_split():
  tr, va = idm_dataset.frame_split(1000, 0.05, 10_000, seed=0)
  assert len(va) == 50 and len(tr) == 950 and not set(tr) & set(va) and len(set(tr) | set(va)) == 1000
  tr, va = idm_dataset.frame_split(300_000, 0.05, 10_000, seed=0)
  assert len(va) == 10_000                                  # capped
  assert len(idm_dataset.frame_split(30, 0.05, 10_000)[1]) == 1  # int(1.5)


# MARK: crop and channel order


def _cv2_cubic_reference(img: np.ndarray, out_h: int, out_w: int, a: float = -0.75) -> np.ndarray:
  """OpenCV INTER_CUBIC written pixel by pixel: 4x4 taps around floor(src), half-pixel centres,
  edge pixels replicated."""
  def kern(x):
    x = abs(x)
    return ((a + 2) * x - (a + 3)) * x * x + 1 if x <= 1 else (a * x * x * x - 5 * a * x * x + 8 * a * x - 4 * a if x < 2 else 0.0)
  h, w = img.shape[:2]
  out = np.zeros((out_h, out_w, img.shape[2]))
  for y in range(out_h):
    sy = (y + 0.5) * h / out_h - 0.5
    iy = math.floor(sy)
    for x in range(out_w):
      sx = (x + 0.5) * w / out_w - 0.5
      ix = math.floor(sx)
      acc = 0.0
      for m in range(-1, 3):
        for n in range(-1, 3):
          acc = acc + kern(sy - (iy + m)) * kern(sx - (ix + n)) * img[min(max(iy + m, 0), h - 1), min(max(ix + n, 0), w - 1)]
      out[y, x] = acc
  return out


def _smooth_image(h, w):
  yy, xx = np.mgrid[0:h, 0:w]
  return np.stack([128 + 100 * np.sin(xx / 5.0) * np.cos(yy / 4.0), 128 + 60 * np.cos(xx / 3.0 + yy / 7.0),
                   30 + 5 * xx + 0 * yy], -1).clip(0, 255).astype(np.uint8)


def test_crop_and_resize_equals_direct_numpy_and_pil():
  # The head camera's 640x480 frame keeps rows 55..423 (369 rows) for the 832:480 aspect.
  assert T.center_crop_box(480, 640, 480, 832) == (55, 0, 369, 640)
  assert T.center_crop_box(480, 1000, 480, 832) == (0, 84, 480, 832)  # wider: columns are cut
  img = (np.random.default_rng(0).random((12, 18, 3)) * 255).astype(np.uint8)
  top, left, ch, cw = T.center_crop_box(12, 18, 10, 20)
  assert (top, left, ch, cw) == (1, 0, 9, 18)
  ref = _cv2_cubic_reference(img[top:top + ch, left:left + cw].astype(np.float64), 10, 20)
  ours = np.asarray(T.crop_and_resize(jnp.asarray(img) / 255.0, (10, 20), quantize=False)) * 255
  np.testing.assert_allclose(ours, ref, atol=2e-3)
  q = np.asarray(T.crop_and_resize(jnp.asarray(img) / 255.0, (10, 20))) * 255  # cv2's uint8 output
  np.testing.assert_allclose(q, np.clip(np.round(ref), 0, 255), atol=1e-3)
  # With PIL's kernel (a = -0.5) the same code reproduces PIL's crop + BICUBIC resize to one grey level,
  # which pins the crop box and the half-pixel sampling grid.
  img = _smooth_image(30, 40)
  top, left, ch, cw = T.center_crop_box(30, 40, 50, 60)
  pil = np.asarray(Image.fromarray(img[top:top + ch, left:left + cw]).resize((60, 50), Image.BICUBIC), np.float64)
  ours = np.asarray(T.crop_and_resize(jnp.asarray(img) / 255.0, (50, 60), a=-0.5)) * 255
  assert np.abs(ours - pil).max() <= 1.0 + 1e-4
  # The default size is the authors' 832x480.
  assert T.FrameTransform(crop_and_resize=True)(jnp.zeros((1, 48, 64, 3))).shape == (1, 480, 832, 3)


def test_channel_swap_is_exactly_red_blue():
  x = jax.random.uniform(jax.random.key(0), (2, 3, 4, 5, 3))
  y = T.FrameTransform(channel_order="bgr_swapped")(x)
  np.testing.assert_array_equal(y[..., 0], x[..., 2])
  np.testing.assert_array_equal(y[..., 1], x[..., 1])
  np.testing.assert_array_equal(y[..., 2], x[..., 0])
  np.testing.assert_array_equal(T.FrameTransform()(x), x)
  with pytest.raises(ValueError, match="channel_order"):
    T.FrameTransform(channel_order="bgr")


# MARK: jitter


def test_per_frame_jitter_differs_between_frames_and_does_not_ramp():
  frame = jax.random.uniform(jax.random.key(0), (1, 1, 8, 8, 3), minval=0.2, maxval=0.8)
  window = jnp.repeat(frame, 3, axis=1)                      # [1, 3, 8, 8, 3]: three equal frames
  acts = jnp.zeros((1, 14))
  aug = jax.jit(train_idm.augment, static_argnums=(4,))
  authors = train_idm.AugmentConfig.from_config(get_config().augment)
  assert authors.per_frame and not authors.ramp
  out, _ = aug(jax.random.key(1), window, acts, jnp.float32(0.0), authors)
  d = jnp.abs(out[0, 0] - out[0, 1]).max(), jnp.abs(out[0, 1] - out[0, 2]).max()
  assert min(float(v) for v in d) > 1e-3                    # an independent draw per frame
  # No ramp: progress 1 gives the progress-0 result.
  np.testing.assert_array_equal(aug(jax.random.key(1), window, acts, jnp.float32(1.0), authors)[0], out)
  # eva_jax's recipe: one draw per window, so equal frames stay equal (its ramp: test_train_idm.py).
  ours = train_idm.AugmentConfig.from_config(get_config("tiny").augment)
  o, _ = aug(jax.random.key(1), window, acts, jnp.float32(0.0), ours)
  np.testing.assert_allclose(o[0, 0], o[0, 2], atol=1e-7)


# MARK: ImageNet start


def torchvision_resnet_shapes(blocks, width, expansion=4, num_classes=1000) -> dict[str, tuple]:
  """Key -> shape of torchvision's `resnet50().state_dict()` layout (Bottleneck v1.5), by hand."""
  shapes = {"conv1.weight": (width, 3, 7, 7)}

  def bn(prefix, c):
    shapes.update({f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                   f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()})
  bn("bn1", width)
  cin = width
  for s, n in enumerate(blocks):
    planes = width * 2 ** s
    for j in range(n):
      p = f"layer{s + 1}.{j}"
      shapes[f"{p}.conv1.weight"] = (planes, cin, 1, 1)
      bn(f"{p}.bn1", planes)
      shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
      bn(f"{p}.bn2", planes)
      shapes[f"{p}.conv3.weight"] = (planes * expansion, planes, 1, 1)
      bn(f"{p}.bn3", planes * expansion)
      if j == 0:
        shapes[f"{p}.downsample.0.weight"] = (planes * expansion, cin, 1, 1)
        bn(f"{p}.downsample.1", planes * expansion)
      cin = planes * expansion
  shapes["fc.weight"], shapes["fc.bias"] = (num_classes, cin), (num_classes,)
  return shapes


def _random_state_dict(shapes, seed=0):
  g = torch.Generator().manual_seed(seed)
  return {k: (torch.tensor(7) if k.endswith("num_batches_tracked") else torch.randn(s, generator=g))
          for k, s in shapes.items()}


def test_real_resnet50_layout_is_fully_consumed():
  from convert.idm import convert_resnet_backbone
  from eva_jax.models.idm import idm_config
  shapes = torchvision_resnet_shapes((3, 4, 6, 3), 64)
  assert len(shapes) == 320  # torchvision resnet50 state dict: 53 convs, 53 BNs x 5, fc x 2
  n_params = sum(int(np.prod(s)) for k, s in shapes.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
  assert n_params == 25_557_032  # torchvision's documented ResNet50_Weights num_params
  sd = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
  trunk = convert_resnet_backbone(sd, idm_config("resnet50"))
  assert trunk["conv1"]["kernel"].shape == (7, 7, 9, 64) and trunk["layer4"][2]["conv3"]["kernel"].shape == (1, 1, 512, 2048)


def _init_config(path, kind="imagenet"):
  c = get_config("tiny,recipe=authors")
  c.model.update(dict(preset="tiny", blocks=(1, 1), width=8, image_size=(32, 32), mlp_dims=(32, 16)))
  c.init.update(dict(kind=kind, path=str(path)))
  return c


def test_imagenet_init_maps_torchvision_layout_and_repeats_the_stem(tmp_path):
  sd = _random_state_dict(torchvision_resnet_shapes((1, 1), 8))
  path = tmp_path / "resnet.pth"
  torch.save(sd, path)
  model = train_idm.build_model(_init_config(path))
  bb = nnx_pure(model)["backbone"]
  stem = sd["conv1.weight"].numpy().transpose(2, 3, 1, 0)  # OIHW -> HWIO [7, 7, 3, 8]
  np.testing.assert_allclose(bb["conv1"]["kernel"], np.concatenate([stem] * 3, axis=2) / 3, rtol=1e-6)
  np.testing.assert_allclose(bb["layer2"][0]["conv2"]["kernel"], sd["layer2.0.conv2.weight"].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_allclose(bb["layer2"][0]["downsample_conv"]["kernel"],
                             sd["layer2.0.downsample.0.weight"].numpy().transpose(2, 3, 1, 0))
  for ours, theirs in (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"), ("var", "running_var")):
    np.testing.assert_allclose(bb["layer1"][0]["bn3"][ours], sd[f"layer1.0.bn3.{theirs}"].numpy())
  # The head is the random initialisation (the same as init.kind='random' with this seed).
  rand = nnx_pure(train_idm.build_model(_init_config("", kind="random")))
  np.testing.assert_array_equal(nnx_pure(model)["mlp_head"]["fc1"]["kernel"], rand["mlp_head"]["fc1"]["kernel"])

  # Errors name the file and the key, and say how to get the file.
  with pytest.raises(ValueError, match=r"init\.path.*IMAGENET1K_V2.*resnet50-11ad3fa6\.pth"):
    train_idm.build_model(_init_config(""))
  with pytest.raises(FileNotFoundError, match="nope.pth"):
    train_idm.build_model(_init_config(tmp_path / "nope.pth"))
  bad = dict(sd)
  del bad["layer2.0.bn1.running_var"]
  torch.save(bad, tmp_path / "bad.pth")
  with pytest.raises(KeyError, match=r"bad\.pth.*layer2\.0\.bn1\.running_var"):
    train_idm.build_model(_init_config(tmp_path / "bad.pth"))
  torch.save({"model_state_dict": {f"model.backbone.{k}": v for k, v in sd.items()}}, tmp_path / "idm.pt")
  with pytest.raises(ValueError, match=r"idm\.pt.*IDM checkpoint.*init\.kind='torch'"):
    train_idm.build_model(_init_config(tmp_path / "idm.pt"))
  torch.save({k: v for k, v in sd.items() if k != "layer2.0.conv1.weight"} | {"layer2.0.conv1.weight": torch.zeros(3, 3)},
             tmp_path / "shape.pth")
  with pytest.raises(ValueError, match=r"shape\.pth.*layer2\.0\.conv1\.weight.*expected shape"):
    train_idm.build_model(_init_config(tmp_path / "shape.pth"))


def nnx_pure(model):
  from flax import nnx
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))


# MARK: loss and optimiser


def test_recipe_loss_and_optimizer_are_the_configs():
  c = get_config()  # resnet50: recipe 'authors'
  assert c.recipe == "authors" and c.init.kind == "imagenet" and c.data.stride == 2
  step = train_idm.StepConfig.from_config(c)
  assert (step.loss, step.beta) == ("smooth_l1", 1.0)
  assert step.transform == T.FrameTransform(channel_order="bgr_swapped", crop_and_resize=True)
  o = c.optim
  assert (o.name, o.learning_rate, o.weight_decay, o.b1, o.b2, o.eps) == ("adamw", 1e-3, 1e-2, 0.9, 0.999, 1e-8)
  assert o.grad_clip_norm == 0 and o.grad_clip_value == 0 and o.schedule == "cosine"
  assert warmup_steps(o) == 20_000 and (c.data.split, c.data.val_fraction, c.data.val_max_frames) == ("frames", 0.05, 10_000)
  # SmoothL1 beta 1 is torch's SmoothL1Loss().
  p, t = torch.randn(4, 14) * 2, torch.randn(4, 14)
  np.testing.assert_allclose(train_idm.regression_loss(jnp.asarray(p.numpy()), jnp.asarray(t.numpy()), step.loss, step.beta),
                             torch.nn.SmoothL1Loss()(p, t).item(), rtol=1e-6)

  # The schedule is the authors' LambdaLR (10% linear warm-up, cosine to 0), at a short length.
  short = ml_collections.ConfigDict(dict(o.to_dict(), total_steps=100))
  sched = make_schedule(short)
  for s in (0, 5, 10, 37, 99):
    want = s / 10 if s < 10 else 0.5 * (1 + math.cos(math.pi * (s - 10) / 90))
    np.testing.assert_allclose(float(sched(s)), 1e-3 * want, rtol=1e-5, atol=1e-10)
  # The optimiser is torch's AdamW(params) with a schedule and no clipping: a huge gradient passes.
  w0, grads = np.array([0.5, -1.0, 2.0]), [np.array([100.0, -3.0, 0.1]), np.array([-50.0, 2.0, 0.3])]
  tx = make_optimizer(short)
  w, st = jnp.asarray(w0, jnp.float32), None
  st = tx.init(w)
  tp = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))
  topt = torch.optim.AdamW([tp])  # torch defaults: lr 1e-3, wd 1e-2
  tsched = torch.optim.lr_scheduler.LambdaLR(topt, lambda s: float(sched(s)) / 1e-3)
  for g in grads:
    upd, st = tx.update(jnp.asarray(g, jnp.float32), st, w)
    w = w + upd
    tp.grad = torch.tensor(g)
    topt.step()
    tsched.step()
  np.testing.assert_allclose(np.asarray(w), tp.detach().numpy(), rtol=1e-5)


def test_eva_jax_recipe_is_unchanged():
  c = get_config("recipe=eva_jax")
  step = train_idm.StepConfig.from_config(c)
  assert step.beta == 0.05 and step.transform.is_identity and not step.augment.per_frame and step.augment.ramp
  assert (c.data.stride, c.data.split, c.optim.learning_rate, c.optim.warmup_steps, c.optim.grad_clip_norm) == \
      (1, "episodes", 1e-4, 2000, 1.0)
  assert get_config("tiny").recipe == "eva_jax"
  with pytest.raises(ValueError, match="unknown recipe"):
    get_config("recipe=vidar")


def test_warmup_fraction_and_its_errors():
  base = dict(name="adamw", learning_rate=1.0, schedule="cosine", total_steps=50, warmup_steps=0)
  assert warmup_steps(dict(base, warmup_fraction=0.1)) == 5
  assert warmup_steps(dict(base, warmup_steps=7)) == 7
  with pytest.raises(ValueError, match="not both"):
    warmup_steps(dict(base, warmup_steps=7, warmup_fraction=0.1))
  np.testing.assert_allclose(float(make_schedule(dict(base, warmup_fraction=0.1))(5)), 1.0)


def test_episode_metrics_are_the_authors_numbers():
  true = np.zeros((6, 14), np.float32)
  pred = true.copy()
  pred[1, 0] = 0.06    # arm joint over 0.05: frame 1 is not "close"
  pred[2, 6] = 0.4     # gripper within 0.5: frame 2 still is
  m = train_idm.episode_metrics(pred, true, 16.0, mean=np.zeros(14), std=np.full(14, 0.5))
  assert m["correct_rate"] == pytest.approx(5 / 6)
  np.testing.assert_allclose(m["mae"], (0.06 + 0.4) / 84, rtol=1e-6)
  np.testing.assert_allclose(m["mae/06"], 0.4 / 6, rtol=1e-6)
  want = (0.5 * 0.12 ** 2 + 0.5 * 0.8 ** 2) / 84  # SmoothL1(beta 1) of the normalised errors 0.12, 0.8
  np.testing.assert_allclose(m["loss"], want, rtol=1e-5)
  np.testing.assert_allclose(m["pred/max_abs_v"], 0.4 * 16, rtol=1e-6)
  assert m["true/total"] == 0 and m["true/reward"] == pytest.approx(10.0)
  assert train_idm.episode_metrics(pred[:3], true[:3], 16.0)["pred/reward"] == 0.0  # < 4 frames, as compute_smoothness
