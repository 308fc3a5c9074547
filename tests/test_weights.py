"""eva_jax.weights: every source format, the one error format, configs from run directories, placement."""

import json
import logging

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from convert.cli import convert as cli_convert
from eva_jax import weights
from eva_jax.models.idm import IDM, idm_config
from eva_jax.models.vae import WanVAE, vae_config
from eva_jax.parallel import make_mesh
from eva_jax.training.checkpoints import Checkpointer


def _pure(module):
  return nnx.to_pure_dict(nnx.state(module))


def _equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def idm_files(tmp_path_factory):
  """A tiny IDM as a release-layout .pt (from a converted torch model) and as a train_idm-style run."""
  from tests.test_idm_model import TINY, TorchIDM, randomize, release_checkpoint
  root = tmp_path_factory.mktemp("idm")
  torch.manual_seed(0)
  ref = randomize(TorchIDM(**TINY)).eval()
  torch.save(release_checkpoint(ref), root / "IDM_singleview.pt")
  model = IDM(idm_config("tiny"), rngs=nnx.Rngs(5))
  run = root / "run"
  with Checkpointer(run / "checkpoints", async_save=False, best_metric="val_mae", best_mode="min") as ck:
    ck.save(1, {"model_state_dict": _pure(model), "step": np.int32(1)}, metrics={"val_mae": 0.5})
    model2 = IDM(idm_config("tiny"), rngs=nnx.Rngs(6))
    ck.save(2, {"model_state_dict": _pure(model2), "step": np.int32(2)}, metrics={"val_mae": 0.9})
  (run / "config.json").write_text(json.dumps({"model": dict(
      preset="tiny", image_size=[64, 64], dtype="float32", param_dtype="float32", blocks=[], width=0,
      mlp_dims=[])}))
  return root, ref, model, model2


def test_source_format_detection(tmp_path, idm_files):
  root = idm_files[0]
  assert weights.source_format("random") == "random"
  assert weights.source_format(root / "IDM_singleview.pt") == "torch"
  assert weights.source_format(root / "run") == "run"
  assert weights.source_format(root / "run" / "checkpoints") == "run"
  (tmp_path / "x.txt").write_text("")
  with pytest.raises(weights.WeightsError, match=r"x\.txt: unknown weights file type"):
    weights.source_format(tmp_path / "x.txt")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    weights.load("vae", tmp_path / "nowhere", vae_config("tiny"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(weights.WeightsError, match="empty: not a weights directory"):
    weights.source_format(tmp_path / "empty")


def test_idm_release_pt_and_run_dir(idm_files, caplog):
  root, ref, model, model2 = idm_files
  # The release .pt: architecture inferred from its tensors, the same weights as the converter gives.
  from convert.idm import load_idm
  got = weights.load_module("idm", root / "IDM_singleview.pt")
  _equal(_pure(got), _pure(load_idm(torch.load(root / "IDM_singleview.pt", weights_only=False))))
  assert got.cfg.blocks == (1, 1, 1, 1)
  # A run: best/ by val_mae (step 1, not the newer step 2), its config.json's image size.
  best = weights.load_module("idm", root / "run")
  _equal(_pure(best), _pure(model))
  assert best.cfg.image_size == (64, 64)
  _equal(_pure(weights.load_module("idm", root / "run", best=False)), _pure(model2))
  # orbax's "Metadata file does not exist" (the step's metadata lives one folder up) is not a warning here
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [r.getMessage() for r in caplog.records]


def test_errors_name_source_key_and_shapes(tmp_path):
  vae = WanVAE(vae_config("tiny"), rngs=nnx.Rngs(0))
  with Checkpointer(tmp_path / "run" / "checkpoints", async_save=False) as ck:
    ck.save(3, {"params": _pure(vae), "opt_state": {"mu": np.zeros(3)}})
  # Right model: loads exactly (only 'params' is read).
  _, state = weights.load("vae", tmp_path / "run", vae_config("tiny"))
  _equal(nnx.to_pure_dict(state), _pure(vae))
  # Wider model: the first mismatching parameter, expected vs found shape, and the step file.
  wider = vae_config("tiny", base_dim=vae_config("tiny").base_dim * 2)
  with pytest.raises(weights.WeightsError, match=r"vae weights .*run \(.*checkpoints/3/state\): parameter "
                     r"\S+: expected shape \(.*\), found \(.*\)"):
    weights.load("vae", tmp_path / "run", wider)
  # Missing / unexpected parameters are named.
  expected = {"a": jax.ShapeDtypeStruct((2,), np.float32), "b": {"c": jax.ShapeDtypeStruct((1,), np.float32)}}
  with pytest.raises(weights.WeightsError, match="src: missing parameter b/c"):
    weights.check_tree(expected, {"a": np.zeros(2), "b": {}}, "src")
  with pytest.raises(weights.WeightsError, match=r"src: unexpected parameter\(s\) \['b/d'\]"):
    weights.check_tree(expected, {"a": np.zeros(2), "b": {"c": np.zeros(1), "d": np.zeros(1)}}, "src")
  # A torch file of another model: the converter's complaint, with the file named.
  torch.save({"encoder.conv1.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
  with pytest.raises(weights.WeightsError, match=r"clip weights .*wrong\.pth: "):
    from eva_jax.models.clip import clip_config
    weights.load("clip", tmp_path / "wrong.pth", clip_config("tiny"))
  # A truncated PyTorch file: one line naming it, not torch's traceback.
  (tmp_path / "cut.pth").write_bytes((tmp_path / "wrong.pth").read_bytes()[:40])
  with pytest.raises(weights.WeightsError, match=r"cut\.pth: cannot read as PyTorch weights"):
    weights.load("vae", tmp_path / "cut.pth", vae_config("tiny"))
  # No config anywhere.
  with pytest.raises(weights.WeightsError, match="no model config given"):
    weights.load("vae", tmp_path / "run")


def test_converted_dir_sharded_and_dtype(tmp_path):
  """`python -m convert` output restores onto the mesh's shardings, cast to the requested dtype."""
  from tests.utils import diffusers_vae
  from safetensors.torch import save_file
  cfg = vae_config("tiny")
  ref = diffusers_vae(cfg)
  save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "vae.safetensors"))
  cli_convert("vae", str(tmp_path / "vae.safetensors"), str(tmp_path / "vae"), config="tiny", progress=False)
  mesh = make_mesh({"data": 2, "fsdp": 4})
  _, from_torch = weights.load("vae", tmp_path / "vae.safetensors", cfg)
  _, state = weights.load("vae", tmp_path / "vae", cfg, mesh=mesh, dtype="bfloat16")
  leaf = jax.tree.leaves(state)[0]
  assert leaf.dtype == jax.numpy.bfloat16 and isinstance(leaf.sharding, jax.sharding.NamedSharding)
  for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(state)), jax.tree.leaves(nnx.to_pure_dict(from_torch))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(jax.numpy.bfloat16))


def test_random_dit_is_sharded_and_lora_fresh(tmp_path):
  from eva_jax.models.lora import LoRAParam
  from eva_jax.models.wan import WanModel, wan_config
  mesh = make_mesh({"data": 2, "fsdp": 4})
  cfg = wan_config("tiny-i2v", lora_rank=4)
  gdef, state = weights.load("dit", "random", cfg, mesh=mesh, seed=3)
  kernel = state["blocks"]["ffn"]["fc1"]["kernel"][...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
  eager = _pure(WanModel(cfg, rngs=nnx.Rngs(3)))   # the same init as eager, to float32 rounding
  for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(state)), jax.tree.leaves(eager)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  # From an SFT-like run: base weights from the run, LoRA factors fresh (B = 0), source LoRA ignored.
  base_cfg = wan_config("tiny-i2v")
  trained = _pure(WanModel(base_cfg, rngs=nnx.Rngs(9)))
  with Checkpointer(tmp_path / "sft" / "checkpoints", async_save=False) as ck:
    ck.save(5, {"params": trained, "step": np.int32(5)})
  model = weights.load_module("dit", tmp_path / "sft", cfg, mesh=mesh)
  base, _ = nnx.split_state(nnx.state(model), nnx.Not(LoRAParam), ...)
  _equal(nnx.to_pure_dict(base), trained)
  assert np.all(np.asarray(model.blocks.self_attn.q.lora_b[...]) == 0)
  assert np.any(np.asarray(model.blocks.self_attn.q.lora_a[...]) != 0)
  with pytest.raises(weights.WeightsError, match="use_ema is set but the checkpoint has no 'ema'"):
    weights.load("dit", tmp_path / "sft", cfg, use_ema=True)
