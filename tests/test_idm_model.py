"""IDM parity: eva_jax.models.idm against a PyTorch reference built here from plain torch.nn modules.

The reference uses torchvision's ResNet-50 parameter names (torchvision is not a dependency) and the
authors' `Resnet_plus` / `IDM` wrapper layout (spec/eva.md B), so its state dict is shaped like the
released `IDM_singleview.pt`; weights go through convert.idm like the release would.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

from convert.idm import (IGNORABLE, convert_idm_state_dict, idm_param_mapping, infer_idm_config,
                         load_idm)
from eva_jax.models import idm as idm_lib
from tests.utils import rel_err, to_numpy

# MARK: torch reference


class TorchBottleneck(nn.Module):
  def __init__(self, cin, planes, stride, expansion=4):
    super().__init__()
    cout = planes * expansion
    self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(cout)
    self.relu = nn.ReLU()
    self.downsample = None
    if stride != 1 or cin != cout:
      self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

  def forward(self, x):
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchResNet(nn.Module):
  """torchvision.models.resnet50 layout (v1.5), 9-channel stem, fc kept but unused."""

  def __init__(self, blocks=(3, 4, 6, 3), width=64, in_ch=9):
    super().__init__()
    self.conv1 = nn.Conv2d(in_ch, width, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU()
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    cin = width
    for s, n in enumerate(blocks):
      layer = []
      for j in range(n):
        layer.append(TorchBottleneck(cin, width * 2 ** s, 2 if (j == 0 and s > 0) else 1))
        cin = width * 2 ** s * 4
      setattr(self, f"layer{s + 1}", nn.Sequential(*layer))
    self.fc = nn.Linear(cin, 1000)
    self.out_ch = cin

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class TorchSpatialSoftmax(nn.Module):
  def __init__(self):
    super().__init__()
    self.temperature = nn.Parameter(torch.ones(1))

  def forward(self, feats):
    b, c, h, w = feats.shape
    heat = torch.softmax(feats.reshape(b, c, h * w) / self.temperature, dim=-1)
    px, py = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    ex = (heat * px.reshape(1, 1, -1)).sum(-1)
    ey = (heat * py.reshape(1, 1, -1)).sum(-1)
    return torch.cat([ex, ey], dim=1)


class TorchResnetPlus(nn.Module):
  def __init__(self, blocks, width, mlp_dims, out_dim=14, num_frames=3):
    super().__init__()
    self.backbone = TorchResNet(blocks, width, 3 * num_frames)
    self.spatial_softmax = TorchSpatialSoftmax()
    h1, h2 = mlp_dims
    self.mlp_head = nn.Sequential(nn.Linear(2 * self.backbone.out_ch, h1), nn.LayerNorm(h1), nn.GELU(),
                                  nn.Dropout(0.1), nn.Linear(h1, h2), nn.GELU(), nn.Linear(h2, out_dim))

  def forward(self, x):  # [B, T, 3, H, W]
    b, t, c, h, w = x.shape
    return self.mlp_head(self.spatial_softmax(self.backbone(x.reshape(b, t * c, h, w))))


class TorchIDM(nn.Module):
  def __init__(self, blocks=(3, 4, 6, 3), width=64, mlp_dims=(1024, 512)):
    super().__init__()
    self.model = TorchResnetPlus(blocks, width, mlp_dims)
    self.register_buffer("train_mean", torch.tensor(idm_lib.ANYPOS_MEAN))
    self.register_buffer("train_std", torch.tensor(idm_lib.ANYPOS_STD))

  def forward(self, x):
    return self.model(x) * self.train_std + self.train_mean


def torch_preprocess(frames, size):
  """[B, T, 3, H, W] in [0, 1] -> Resize(size) (torchvision on tensors: bilinear, antialias) + Normalize."""
  b, t = frames.shape[:2]
  x = F.interpolate(frames.flatten(0, 1), size=size, mode="bilinear", align_corners=False, antialias=True)
  mean = torch.tensor(idm_lib.IMAGENET_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(idm_lib.IMAGENET_STD).view(1, 3, 1, 1)
  return ((x - mean) / std).unflatten(0, (b, t))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
  """Random weights, random BN affine and running statistics, temperature != 1."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for mod in model.modules():
      if isinstance(mod, nn.BatchNorm2d):
        mod.weight.copy_(1 + 0.2 * torch.randn(mod.weight.shape, generator=g))
        mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))
        mod.running_mean.copy_(0.1 * torch.randn(mod.running_mean.shape, generator=g))
        mod.running_var.copy_(0.5 + torch.rand(mod.running_var.shape, generator=g))
        mod.num_batches_tracked.fill_(7)
      elif isinstance(mod, nn.LayerNorm):
        mod.weight.copy_(1 + 0.2 * torch.randn(mod.weight.shape, generator=g))
        mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))
      elif isinstance(mod, nn.Linear):
        mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))
    for name, mod in model.named_modules():
      if isinstance(mod, TorchSpatialSoftmax):
        mod.temperature.fill_(0.7)
  return model


def release_checkpoint(model: TorchIDM) -> dict:
  """A dict laid out like IDM_singleview.pt: model + optimizer state + step."""
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
  return {"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(), "step": 1}


TINY = dict(blocks=(1, 1, 1, 1), width=8, mlp_dims=(32, 16))


@pytest.fixture(scope="module")
def tiny_pair():
  torch.manual_seed(0)
  ref = randomize(TorchIDM(**TINY)).eval()
  cfg = idm_lib.idm_config("tiny")
  ours = load_idm(release_checkpoint(ref), cfg)
  return ref, ours, cfg


@nnx.jit
def _fwd(model, frames, rngs=None):
  return model(frames, rngs=rngs)


def _frames(seed, shape):
  return np.random.default_rng(seed).uniform(0, 1, size=shape).astype(np.float32)


# MARK: tests


def test_preprocess_matches_torchvision_resize():
  # H upsampled (60 -> 64) and W downsampled (80 -> 64): both paths of the antialiased filter.
  frames = _frames(1, (2, 3, 60, 80, 3))
  ours = idm_lib.preprocess(jnp.asarray(frames), (64, 64))
  ref = torch_preprocess(torch.from_numpy(frames).permute(0, 1, 4, 2, 3), (64, 64)).permute(0, 1, 3, 4, 2)
  assert rel_err(ours, to_numpy(ref)) <= 1e-6


def test_eval_parity_with_torch(tiny_pair):
  ref, ours, cfg = tiny_pair
  frames = _frames(2, (2, 3, 48, 72, 3))
  out = _fwd(ours, jnp.asarray(frames))
  with torch.no_grad():
    want = ref(torch_preprocess(torch.from_numpy(frames).permute(0, 1, 4, 2, 3), cfg.image_size))
  assert out.shape == (2, 14)
  assert rel_err(out, to_numpy(want)) <= 1e-5


def test_train_mode_batchnorm_matches_torch():
  """Batch statistics normalise the batch; running mean/var update like torch (unbiased var, m=0.1)."""
  torch.manual_seed(1)
  ref = randomize(TorchIDM(**TINY), seed=1)
  cfg = idm_lib.idm_config("tiny", dropout=0.0)
  ours = load_idm(release_checkpoint(ref), cfg)
  ours.train()
  ref.train()
  ref.model.mlp_head[3].p = 0.0
  frames = _frames(3, (4, 3, 64, 64, 3))
  out = _fwd(ours, jnp.asarray(frames), nnx.Rngs(dropout=0))
  want = ref(torch_preprocess(torch.from_numpy(frames).permute(0, 1, 4, 2, 3), cfg.image_size))
  assert rel_err(out, to_numpy(want)) <= 1e-5
  bn = ours.backbone.layer2[0].bn2
  tbn = ref.model.backbone.layer2[0].bn2
  assert rel_err(bn.mean[...], to_numpy(tbn.running_mean)) <= 1e-5
  assert rel_err(bn.var[...], to_numpy(tbn.running_var)) <= 1e-5


def test_actions_from_video_uses_clamped_windows(tiny_pair):
  ref, ours, cfg = tiny_pair
  video = _frames(4, (2, 5, 40, 40, 3))
  out = idm_lib.actions_from_video(ours, jnp.asarray(video))
  chunked = idm_lib.actions_from_video(ours, jnp.asarray(video), batch_size=4)
  tv = torch.from_numpy(video).permute(0, 1, 4, 2, 3)  # [B, T, 3, H, W]
  with torch.no_grad():
    want = torch.stack([ref(torch_preprocess(tv[:, [max(i - 1, 0), i, min(i + 1, 4)]], cfg.image_size))
                        for i in range(5)], dim=1)
  assert out.shape == (2, 5, 14)
  assert rel_err(out, to_numpy(want)) <= 1e-5
  assert rel_err(chunked, out) <= 1e-6


def test_dropout_is_active_only_in_train_mode(tiny_pair):
  _, ours, _ = tiny_pair
  frames = jnp.asarray(_frames(5, (2, 3, 64, 64, 3)))
  a = _fwd(ours, frames)
  model = nnx.clone(ours)
  model.train()
  b = _fwd(model, frames, nnx.Rngs(dropout=0))
  c = _fwd(model, frames, nnx.Rngs(dropout=1))
  assert not np.allclose(b, c)
  # Eval mode is deterministic and never touched the running statistics of the original.
  np.testing.assert_array_equal(_fwd(ours, frames), a)


def test_converter_is_strict(tiny_pair):
  ref, _, cfg = tiny_pair
  good = release_checkpoint(ref)
  sd = dict(good["model_state_dict"])

  missing = {k: v for k, v in sd.items() if k != "model.backbone.layer3.0.conv2.weight"}
  with pytest.raises(KeyError, match=r"layer3\.0\.conv2\.weight"):
    convert_idm_state_dict(missing, cfg)

  extra = dict(sd, **{"model.backbone.layer1.0.extra.weight": torch.zeros(3)})
  with pytest.raises(KeyError, match="layer1.0.extra.weight"):
    convert_idm_state_dict(extra, cfg)

  bad = dict(sd, **{"model.mlp_head.4.weight": torch.zeros(16, 31)})
  with pytest.raises(ValueError, match=r"mlp_head\.4\.weight.*\(32, 16\).*\(31, 16\)"):
    convert_idm_state_dict(bad, cfg)

  with pytest.raises(KeyError, match="surprise"):
    convert_idm_state_dict(dict(good, surprise=1), cfg)

  # fc.* and num_batches_tracked are the only leftovers allowed; the config is inferred.
  assert "model.backbone.fc.weight" in sd and any(k.endswith("num_batches_tracked") for k in sd)
  inferred = infer_idm_config(good, image_size=cfg.image_size)
  assert dataclasses.replace(inferred, train_mean=cfg.train_mean, train_std=cfg.train_std) == cfg
  np.testing.assert_allclose(inferred.train_mean, cfg.train_mean, rtol=1e-6)
  np.testing.assert_allclose(convert_idm_state_dict(sd)["spatial_softmax"]["temperature"], [0.7])


def test_resnet50_keys_shapes_and_param_count():
  """The real config: every torch key of a torchvision-named ResNet-50 IDM is consumed, shapes agree."""
  ref = TorchIDM()
  sd = ref.state_dict()
  cfg = idm_lib.idm_config("resnet50")
  mapped = {key for _, key, _ in idm_param_mapping(cfg)}
  ignorable = {k for k in sd if k.startswith("model.backbone.fc.") or k.endswith("num_batches_tracked")}
  assert mapped == set(sd) - ignorable and ignorable
  abstract = jax.eval_shape(lambda: nnx.state(idm_lib.IDM(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  n_ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
  n_ref = sum(p.numel() for n, p in ref.named_parameters() if not n.startswith("model.backbone.fc."))
  assert n_ours == n_ref == 28_256_207  # 23.5M trunk (9-ch stem) + 4.7M head + temperature
  assert IGNORABLE  # documented ignorables exist


def test_imagenet_trunk_init_repeats_the_stem(tiny_pair):
  """A torchvision-named ImageNet ResNet (3-channel stem) initialises the trunk; stem repeated / 3."""
  from convert.idm import convert_resnet_backbone
  _, _, cfg = tiny_pair
  resnet = TorchResNet(cfg.blocks, cfg.width, in_ch=3)
  sd = resnet.state_dict()
  trunk = convert_resnet_backbone(sd, cfg)
  stem = to_numpy(sd["conv1.weight"]).transpose(2, 3, 1, 0)  # HWIO [7, 7, 3, 8]
  np.testing.assert_allclose(trunk["conv1"]["kernel"], np.concatenate([stem] * 3, axis=2) / 3, rtol=1e-6)
  np.testing.assert_array_equal(trunk["layer2"][0]["bn1"]["var"], to_numpy(sd["layer2.0.bn1.running_var"]))
  with pytest.raises(KeyError, match="layer9"):
    convert_resnet_backbone(dict(sd, **{"layer9.0.conv1.weight": torch.zeros(1)}), cfg)


def test_convert_cli_writes_the_converted_tree(tiny_pair, tmp_path):
  """`python -m convert --kind idm` (convert.cli.convert) on a release-layout .pt file."""
  from orbax.checkpoint.experimental import v1 as ocp
  from convert.cli import convert
  ref, _, _ = tiny_pair
  torch.save(release_checkpoint(ref), tmp_path / "IDM_tiny.pt")
  convert("idm", str(tmp_path / "IDM_tiny.pt"), str(tmp_path / "out"), config="tiny", progress=False)
  tree = ocp.load(str(tmp_path / "out"))
  want = convert_idm_state_dict(release_checkpoint(ref))
  np.testing.assert_array_equal(tree["mlp_head"]["fc3"]["kernel"], want["mlp_head"]["fc3"]["kernel"])
  np.testing.assert_array_equal(tree["backbone"]["layer3"]["0"]["bn2"]["mean"],
                                want["backbone"]["layer3"][0]["bn2"]["mean"])
  np.testing.assert_allclose(tree["train_std"], idm_lib.ANYPOS_STD, rtol=1e-6)


def test_sharded_video_batch_equals_single_device(tiny_pair):
  """actions_from_video with the videos split over 8 devices ('act_batch') equals the local run."""
  from eva_jax import parallel
  from eva_jax.parallel.sharding import named_sharding
  _, ours, _ = tiny_pair
  video = jnp.asarray(_frames(6, (8, 3, 40, 40, 3)))
  mesh = parallel.make_mesh({"data": -1})
  sharded = jax.device_put(video, named_sharding(mesh, ("act_batch", None, None, None, None)))
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_allclose(idm_lib.actions_from_video(ours, sharded),
                             idm_lib.actions_from_video(ours, video), rtol=1e-5, atol=1e-6)
