"""End-to-end Flow-GRPO on CPU: tiny DiT + LoRA, tiny VAE, tiny IDM, a mesh of 8 devices.

One run of two iterations, then a resume from the first checkpoint, in the same workdir. Checked:
  * outputs exist (checkpoints, LoRA PEFT adapter, idm_plots PNGs, rollout mp4s, metrics.jsonl);
  * with one inner epoch and one optimiser step per iteration, the update recomputes every stored
    transition's log-prob under the rollout's own parameters: ratio 1 to rounding, nothing clipped;
  * the LoRA adapters moved, no optimiser step was skipped;
  * the resumed iteration repeats the uninterrupted run's metrics exactly.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import grpo as grpo_config
from eva_jax.data import conditions
from eva_jax.models.idm import IDM, idm_config
from eva_jax.training import grpo
from eva_jax.training.checkpoints import Checkpointer


def _config(tmp_path):
  idm = IDM(idm_config("tiny"), rngs=nnx.Rngs(3))
  idm.eval()
  ck = Checkpointer(tmp_path / "idm", async_save=False)
  ck.save(1, {"model_state_dict": nnx.to_pure_dict(nnx.state(idm))})
  ck.close()
  c = grpo_config.get_config("tiny")
  c.reward.idm_checkpoint = str(tmp_path / "idm")
  c.num_iterations = 2
  c.train.num_inner_epochs = 1      # one optimiser step per iteration, taken at the rollout's params
  c.sample.eval_every = 0
  c.log.update(dict(checkpoint_every=1, plot_every=1, video_every=1, num_videos=1))
  return c


def _records(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_missing_idm_checkpoint_is_an_error(tmp_path):
  c = grpo_config.get_config("tiny")
  with pytest.raises(ValueError, match="idm_checkpoint"):
    grpo.train_and_evaluate(c, tmp_path / "run")


def test_tiny_grpo_end_to_end_ratio_one_and_resume(tmp_path):
  assert jax.device_count() == 8
  c = _config(tmp_path)
  wd = tmp_path / "run"
  grpo.train_and_evaluate(c, wd)
  recs = _records(wd)
  assert [r["step"] for r in recs] == [0, 1]
  for r in recs:
    # Log-probs recomputed in the sharded update under the rollout's parameters: ratio 1 to rounding.
    assert abs(r["ratio_mean"] - 1.0) < 1e-6 and r["approx_kl"] < 1e-10 and r["clipfrac"] == 0.0, r
    assert r["skipped"] == 0.0 and np.isfinite(r["loss"]) and 0 < r["reward_mean"] <= 10.0
    assert r["grad_norm"] > 0
  for sub in ("idm_plots", "videos", "lora_adapter", "best_reward"):
    assert any((wd / sub).iterdir()), sub
  assert (wd / "lora_adapter" / "adapter_model.safetensors").exists()
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ck:
    assert int(ck.restore((wd / "lora_adapter" / "orbax").absolute())["iteration"]) == 2
  assert sorted(p.name for p in (wd / "idm_plots").iterdir())[0].endswith(".png")

  # The LoRA adapters trained (B factors start at zero).
  from safetensors.numpy import load_file
  lora_b = [v for k, v in load_file(str(wd / "lora_adapter" / "adapter_model.safetensors")).items()
            if "lora_B" in k]
  assert lora_b and max(float(np.abs(v).max()) for v in lora_b) > 0

  # Resume: drop the last checkpoint, rerun; iteration 1 must repeat exactly.
  shutil.rmtree(wd / "checkpoints" / "2")
  grpo.train_and_evaluate(c, wd)
  again = _records(wd)[2:]
  assert [r["step"] for r in again] == [1]
  for k, v in recs[1].items():
    if k not in ("time", "time_rollout", "time_update"):
      assert again[0][k] == v, (k, again[0][k], v)


def test_script_requires_idm_checkpoint(tmp_path):
  import subprocess
  import sys
  r = subprocess.run([sys.executable, "scripts/train_grpo.py", "--config=configs/grpo.py:tiny",
                      f"--workdir={tmp_path}"], capture_output=True, text=True, timeout=300)
  assert r.returncode != 0 and "idm_checkpoint" in r.stderr + r.stdout


def test_csv_conditions_encode_first_frames(tmp_path):
  import zlib

  from eva_jax.data.metadata import write_metadata
  from eva_jax.data.video import write_video
  from eva_jax.models.wan import wan_config
  from eva_jax.parallel import make_mesh
  recs = []
  for i in range(2):
    write_video(tmp_path / f"v{i}.mp4", np.full((5, 40, 48, 3), 60 * i, np.uint8), fps=16)
    recs.append(dict(video_path=f"v{i}.mp4", caption=f"task {i}", height=40, width=48, fps=16.0, n_frames=5,
                     split="training"))
  write_metadata(tmp_path / "meta.csv", recs)
  c = grpo_config.get_config("tiny")
  c.data.update(dict(kind="csv", data_root=str(tmp_path), metadata_path="meta.csv", num_conditions=2))
  gdef, state = grpo.build_vae(c, make_mesh({"data": -1}))
  wan_cfg = wan_config("tiny-i2v")
  first, cond = conditions.csv_conditions(c, wan_cfg, gdef, state)
  assert first.shape == (2, 1, 4, 4, 16) and cond["clip_fea"].shape == (2, 1, wan_cfg.image_dim)  # clip.source zeros
  assert not cond["clip_fea"].any()
  assert not np.allclose(first[0], first[1])                       # different first frames
  # The text stand-in is SFT's: a fixed Gaussian per caption (crc32 seed).
  ref = np.random.default_rng(zlib.crc32(b"task 1")).standard_normal((16, wan_cfg.text_dim))
  np.testing.assert_array_equal(cond["context"][1], ref.astype(np.float32))


def test_csv_conditions_match_what_sft_trained_on(tmp_path):
  """The demo's GRPO conditioning: training rows only, frame 0 at the clip size encodes to the first
  latent of the whole-clip encoding (SFT's clean history), the caption's synthetic text of SFT."""
  import zlib

  from eva_jax.data import toyworld
  from eva_jax.data.metadata import load_records
  from eva_jax.data.video import read_video
  from eva_jax.models.wan import wan_config
  from eva_jax.parallel import make_mesh
  from eva_jax.training.sft import Conditioner
  from configs import sft as sft_config

  toyworld.generate_dataset(tmp_path, 4, seed=0, size=32, n_frames=5, val_fraction=0.25)
  c = grpo_config.get_config("tiny")
  c.data.update(dict(kind="csv", data_root=str(tmp_path), metadata_path=toyworld.CSV_NAME,
                     num_conditions=3))
  mesh = make_mesh({"data": -1})
  gdef, state = grpo.build_vae(c, mesh)
  wan_cfg = wan_config("tiny-i2v")
  first, cond = conditions.csv_conditions(c, wan_cfg, gdef, state)
  assert first.shape == (3, 1, 4, 4, 16)

  rows = load_records(tmp_path, toyworld.CSV_NAME, "training")
  assert len(rows) == 3 and all(r["split"] == "training" for r in rows)   # the validation row is left out
  clips = np.stack([read_video(tmp_path / r["video_path"])[0] for r in rows])   # [3, 5, 32, 32, 3]
  video = jnp.asarray(clips, jnp.float32) / 127.5 - 1.0
  latents = np.asarray(jax.jit(lambda st, v: nnx.merge(gdef, st).encode(v))(state, video))  # [3, 2, 4, 4, 16]
  np.testing.assert_allclose(first, latents[:, :1], rtol=1e-4, atol=1e-5)
  assert not np.allclose(first[0], first[1])

  # SFT's text stand-in for the same rows (configs/sft.py:tiny: 'synthetic', 16 tokens).
  s = sft_config.get_config("tiny")
  assert (s.text.source, s.data.max_text_tokens) == (c.data.text_source, c.data.text_tokens) == ("synthetic", 16)
  ids = np.array([zlib.crc32(r["caption"].encode()) for r in rows], np.int64)
  s.data.load_video_latent = True   # latents given: the conditioner builds no VAE
  want = Conditioner(s, wan_cfg, mesh)({"latents": latents, "caption_id": ids})["prompt_embeds"]
  np.testing.assert_array_equal(cond["context"], want)
  np.testing.assert_array_equal(cond["clip_fea"], 0.0)


def test_rollout_conditions_carry_clip_of_their_first_frame(tmp_path):
  """clip.source='online' (EVA): the CLIP features a rollout (and its ratio and KL passes, which reuse the
  batch's cond) sees are the CLIP encoder's output on that rollout's own first frame."""
  from eva_jax import weights
  from eva_jax.data.metadata import write_metadata
  from eva_jax.data.video import write_video
  from eva_jax.models.clip import clip_config
  from eva_jax.models.wan import wan_config
  from eva_jax.parallel import make_mesh
  rng = np.random.default_rng(0)
  recs = []
  for i in range(2):
    write_video(tmp_path / f"v{i}.mp4", rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8), fps=16)
    recs.append(dict(video_path=f"v{i}.mp4", caption=f"task {i}", height=32, width=32, fps=16.0, n_frames=5,
                     split="training"))
  write_metadata(tmp_path / "meta.csv", recs)
  c = grpo_config.get_config("tiny")
  assert grpo_config.get_config("14b").clip.source == "online"       # EVA's default at real size
  c.clip.update(dict(source="online", preset="tiny", dtype="float32"))
  c.data.update(dict(kind="csv", data_root=str(tmp_path), metadata_path="meta.csv", num_conditions=2))
  mesh = make_mesh({"data": -1})
  wan_cfg = wan_config("tiny-i2v", image_dim=32)
  gdef, state = grpo.build_vae(c, mesh)
  _, cond = conditions.csv_conditions(c, wan_cfg, gdef, state, grpo.build_clip_encoder(c, wan_cfg, mesh))
  clip = weights.load_module("clip", "random", clip_config("tiny"), seed=c.seed + 2)
  for i in range(2):
    frame = conditions.first_frame(tmp_path / f"v{i}.mp4", 32, 32)
    want = np.asarray(clip.encode_image(jnp.asarray(frame)))[0]
    np.testing.assert_allclose(cond["clip_fea"][i], want, rtol=1e-5, atol=1e-5)
  assert not np.allclose(cond["clip_fea"][0], cond["clip_fea"][1])
  with pytest.raises(ValueError, match="image_dim is 20"):
    grpo.build_clip_encoder(c, wan_config("tiny-i2v"), mesh)


def test_eva_rollout_starts_random_record_cut_and_crop(tmp_path):
  """data.start='random' (EVA): one random record per iteration, seeded by the iteration (a resumed run
  draws the same); every rollout of a group starts from frame 0 of its own random cut + crop of that
  record; the batch's first latents and CLIP features are those of the frames drawn."""
  import math

  from eva_jax import weights
  from eva_jax.data import toyworld
  from eva_jax.data.video_dataset import random_resized_crop_box, temporal_indices
  from eva_jax.models.clip import clip_config
  from eva_jax.models.wan import wan_config
  from eva_jax.parallel import make_mesh

  toyworld.generate_dataset(tmp_path, 4, seed=0, size=32, n_frames=17, val_fraction=0.25)
  c = grpo_config.get_config("tiny")
  c.clip.update(dict(source="online", preset="tiny", dtype="float32"))
  c.data.update(dict(kind="csv", start="random", data_root=str(tmp_path), metadata_path=toyworld.CSV_NAME))
  c.sample.update(dict(latent_frames=2, latent_height=4, latent_width=4, group_size=4, num_prompts=2))
  wan_cfg = wan_config("tiny-i2v", image_dim=32)
  starts = conditions.RolloutStarts(c, wan_cfg)
  assert len(starts.records) == 3                                   # the training split
  ids = [starts.record_ids(it).tolist() for it in range(6)]
  assert ids == [conditions.RolloutStarts(c, wan_cfg).record_ids(it).tolist() for it in range(6)]  # resume
  assert len({tuple(i) for i in ids}) > 1                            # the draw moves with the iteration
  rows = list(range(8))
  rec, frames, texts = starts(3, rows)
  assert rec.tolist() == np.repeat(ids[3], 4).tolist() and frames.shape == (8, 32, 32, 3)
  assert all(not np.array_equal(frames[0], frames[g]) for g in range(1, 4))   # own cut + crop each
  np.testing.assert_array_equal(texts[0], texts[3])                # one caption per group
  for r in rows:                                                    # frame 0 of the whole-clip load
    record = starts.records[rec[r]]
    full = starts.loader.video(record, starts.rollout_rng(3, r))
    np.testing.assert_array_equal(frames[r], full[0])
    rng = starts.rollout_rng(3, r)                                  # the same draws, one by one
    temporal_indices(record["n_frames"], record["fps"], 5, 16.0, "random_cut", "slowdown", rng)
    top, left, h, w = random_resized_crop_box(32, 32, (0.8, 1.0), (0.98, 1.02), rng)
    assert 0.8 * 32 * 32 - 64 <= h * w <= 32 * 32 and abs(math.log(w / h)) <= math.log(1.02) + 0.07

  mesh = make_mesh({"data": -1})
  gdef, state = grpo.build_vae(c, mesh)
  batches = grpo._StartBatches(c, wan_cfg, mesh, gdef, state, grpo.build_clip_encoder(c, wan_cfg, mesh))
  first, cond = batches(3)
  video = jnp.asarray(frames[:, None], jnp.float32)
  want = jax.jit(lambda st, v: nnx.merge(gdef, st).encode(v))(state, video)
  np.testing.assert_allclose(np.asarray(first), np.asarray(want), rtol=1e-5, atol=1e-5)
  clip = weights.load_module("clip", "random", clip_config("tiny"), seed=c.seed + 2)
  np.testing.assert_allclose(np.asarray(cond["clip_fea"]), np.asarray(clip.encode_image(video[:, 0])),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(cond["context"]), texts)


def test_cached_text_reads_the_npy_embeddings_cache_embeddings_writes(tmp_path):
  """data.text_source='cached' reads prompt_embed_path through the shared embedding loader (.npy from
  scripts/cache_embeddings.py), trimmed/zero-padded to data.text_tokens, for both start modes."""
  from eva_jax.data.embeddings import save_array
  from eva_jax.data.metadata import write_metadata
  from eva_jax.data.video import write_video
  from eva_jax.models.wan import wan_config
  from eva_jax.parallel import make_mesh
  rng = np.random.default_rng(1)
  embs, recs = [], []
  for i in range(2):
    write_video(tmp_path / f"v{i}.mp4", rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8), fps=16)
    embs.append(rng.standard_normal((3 + i, 24)).astype(np.float32))
    save_array(tmp_path / "prompt_embeds" / f"v{i}.npy", embs[-1])
    recs.append(dict(video_path=f"v{i}.mp4", caption=f"task {i}", height=32, width=32, fps=16.0, n_frames=5,
                     split="training", prompt_embed_path=f"prompt_embeds/v{i}.npy"))
  write_metadata(tmp_path / "meta.csv", recs)
  c = grpo_config.get_config("tiny")
  c.data.update(dict(kind="csv", start="cycle", text_source="cached", data_root=str(tmp_path),
                     metadata_path="meta.csv", num_conditions=2, text_tokens=8))
  c.sample.update(dict(latent_frames=2, latent_height=4, latent_width=4))
  gdef, state = grpo.build_vae(c, make_mesh({"data": -1}))
  _, cond = conditions.csv_conditions(c, wan_config("tiny-i2v"), gdef, state)
  for i in range(2):
    np.testing.assert_array_equal(cond["context"][i, :3 + i], embs[i])
    np.testing.assert_array_equal(cond["context"][i, 3 + i:], 0.0)
  _, _, texts = conditions.RolloutStarts(c, wan_config("tiny-i2v"))(0, [0])
  assert any(np.array_equal(texts[0, :3 + i], embs[i]) for i in range(2))
