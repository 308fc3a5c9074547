"""Bad config values, --workdir and resumes: every entry point stops before building anything, with one line
naming the field (or flag) and what was expected, exit status 2, and an earlier run's files as they were.

The entry points run in this process through `cli(argv)` (tests/cli_utils.py); each case fails within a
fraction of a second, before a model is built. The suite runs on 8 CPU devices (conftest.py), which the
batch-split cases rely on.
"""

from __future__ import annotations

import hashlib
import json
import math

import pytest

from eva_jax.utils import checks
from tests.cli_utils import run_cli

SFT = ("scripts.train_sft", ["--config=configs/sft.py:tiny", "--config.data.data_root={t}/none"])
IDM = ("scripts.train_idm", ["--config=configs/idm.py:tiny", "--config.data.root={t}/none"])
VAE = ("scripts.train_vae", ["--config=configs/vae.py:tiny", "--config.data.data_root={t}/none"])
GRPO = ("scripts.train_grpo", ["--config=configs/grpo.py:tiny", "--config.reward.idm_checkpoint=random"])
INFER = ("scripts.infer", ["--config=configs/infer.py:tiny"])
EVAL = ("scripts.eval_idm", ["--config=configs/idm.py:tiny", "--config.eval.checkpoint={t}/idm"])

# (entry point, override, what the last line must say). Each would otherwise fail minutes later inside a
# library (integer modulo by zero, math domain error, a NaN loss, a sharding error) or not at all.
CASES = {
    "sft_batch_zero": (SFT, "--config.train.batch_size=0", "config.train.batch_size=0: expected an integer >= 1"),
    "sft_steps_zero": (SFT, "--config.train.num_steps=0", "config.train.num_steps=0: expected an integer >= 1"),
    "sft_lr_nan": (SFT, "--config.optim.learning_rate=nan", "config.optim.learning_rate=nan: expected a finite"),
    "sft_frames": (SFT, "--config.data.n_frames=6", "config.data.n_frames=6: expected 1 + 4k frames"),
    "sft_height": (SFT, "--config.data.height=30", "config.data.height=30: expected a positive multiple of 16"),
    "sft_tuple": (SFT, "--config.diffusion.hist_len_choices=abc", "config.diffusion.hist_len_choices=('abc',)"),
    "sft_probs": (SFT, "--config.diffusion.hist_len_probs=(0.5,0.2)",
                  "config.diffusion.hist_len_probs=(0.5, 0.2): expected probabilities that sum to 1"),
    "sft_mesh_zero": (SFT, "--config.mesh.data=0", "config.mesh.data=0: expected an integer >= 1, or -1"),
    "sft_log_every": (SFT, "--config.train.log_every=0", "config.train.log_every=0"),
    "sft_dtype": (SFT, "--config.model.dtype=float33", "config.model.dtype='float33': expected one of"),
    "sft_preset": (SFT, "--config.model.preset=nope", "config.model.preset='nope': expected a Wan preset"),
    "sft_fraction": (SFT, "--config.data.test_percentage=2.0", "config.data.test_percentage=2.0: expected a number in [0, 1)"),
    "sft_attention": (SFT, "--config.model.attention=flash", "config.model.attention='flash': expected one of"),
    "grpo_attention": (GRPO, "--config.model.attention=splash:1,2", "config.model.attention='splash:1,2': expected"),
    "sft_batch_split": (SFT, "--config.train.batch_size=3", "config.train.batch_size=3: expected a batch that splits over "
                                                           "the 8 devices"),
    "idm_image_size": (IDM, "--config.model.image_size=abc", "config.model.image_size=('abc',): expected 2 integers"),
    "idm_val_fraction": (IDM, "--config.data.val_fraction=1.5", "config.data.val_fraction=1.5"),
    "idm_batch_split": (IDM, "--config.train.batch_size=12", "config.train.batch_size=12: expected a batch that splits"),
    "vae_frames": (VAE, "--config.data.n_frames=6", "config.data.n_frames=6: expected 1 + 4k frames"),
    "vae_batch": (VAE, "--config.train.batch_size=-1", "config.train.batch_size=-1"),
    "grpo_group": (GRPO, "--config.sample.group_size=1", "config.sample.group_size=1: expected an integer >= 2"),
    "grpo_iterations": (GRPO, "--config.num_iterations=0", "config.num_iterations=0"),
    "grpo_split": (GRPO, "--config.sample.group_size=3", "config.sample.group_size=3: expected a batch (6 in all) "
                                                        "that splits over the 8 devices"),
    "infer_batch": (INFER, "--config.data.batch_size=0", "config.data.batch_size=0: expected an integer >= 1"),
    "infer_attention": (INFER, "--config.model.attention=flash", "config.model.attention='flash': expected one of"),
    "infer_fps": (INFER, "--config.fps=0", "config.fps=0: expected a finite number > 0"),
    "eval_idm_stride": (EVAL, "--config.data.stride=0", "config.data.stride=0: expected an integer >= 1"),
}


def _digest(folder):
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith("eva_jax")}


def _earlier_run(folder):
  folder.mkdir()
  (folder / "config.json").write_text("{}")
  (folder / "metrics.jsonl").write_text('{"step": 1}\n')
  return _digest(folder)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_value_names_the_field(tmp_path, capsys, case):
  (module, argv), override, expected = CASES[case]
  run = tmp_path / "run"
  before = _earlier_run(run)
  argv = [a.format(t=tmp_path) for a in argv] + [override, f"--workdir={run}"]
  code, err = run_cli(module, argv, capsys)
  last = err.strip().splitlines()[-1]
  assert code == 2 and last.startswith("error: config.") and expected in last, err
  assert "Traceback" not in err and _digest(run) == before


def test_planner_server_port(tmp_path, capsys):
  code, err = run_cli("scripts.serve_planner", ["--config=configs/planner.py:tiny", "--config.server.port=-5",
                                                f"--config.output_root={tmp_path}"], capsys)
  assert code == 2 and "config.server.port=-5: expected an integer >= 0 and <= 65535" in err.splitlines()[-1], err
  assert not list(tmp_path.iterdir())          # no run directory made for a config that cannot run


def test_cache_embeddings_config(tmp_path, capsys):
  code, err = run_cli("scripts.cache_embeddings", ["--config=configs/cache_embeddings.py:tiny",
                                                   "--config.video.n_frames=6", f"--config.data_root={tmp_path}"],
                      capsys)
  assert code == 2 and "config.video.n_frames=6: expected 1 + 4k frames" in err.splitlines()[-1], err


# MARK: --workdir


@pytest.mark.parametrize("module, argv", [SFT, EVAL, INFER], ids=["train_sft", "eval_idm", "infer"])
def test_workdir_that_is_a_file(tmp_path, capsys, module, argv):
  argv = [a.format(t=tmp_path) for a in argv]
  (tmp_path / "notes.txt").write_text("mine")
  code, err = run_cli(module, argv + [f"--workdir={tmp_path / 'notes.txt'}"], capsys)
  assert code == 2 and f"--workdir={tmp_path / 'notes.txt'}: is a file, not a directory" in err.splitlines()[-1], err
  code, err = run_cli(module, argv + [f"--workdir={tmp_path / 'notes.txt' / 'run'}"], capsys)
  assert code == 2 and f"cannot be created: {tmp_path / 'notes.txt'} is a file" in err.splitlines()[-1], err
  assert (tmp_path / "notes.txt").read_text() == "mine"


# MARK: resuming another run


def _run_dir(tmp_path, config_module: str, **changes):
  """A run directory as a trainer leaves it (config.json, a numbered checkpoint folder), without training."""
  import importlib
  from eva_jax.utils.rundir import save_config
  config = importlib.import_module(config_module).get_config("tiny")
  for key, value in changes.items():
    section, field = key.split(".")
    config[section][field] = value
  run = tmp_path / "run"
  (run / "checkpoints" / "40").mkdir(parents=True)
  save_config(run, config)
  return run


@pytest.mark.parametrize("module, argv, config_module, expected, code", [
    (*IDM, "configs.idm", "config.model.width=16: expected 8, the value the run in {run} was started with", 2),
    (*SFT, "configs.idm", "--workdir {run} holds a run of another trainer", 1),
    (*VAE, "configs.sft", "--workdir {run} holds a run of another trainer", 1),
    (*GRPO, "configs.grpo", "config.model.lora_rank=4: expected 8, the value the run in {run} was started with", 2),
], ids=["idm_width", "sft_given_idm_run", "vae_given_sft_run", "grpo_lora_rank"])
def test_resume_with_another_config_changes_nothing(tmp_path, capsys, module, argv, config_module, expected, code):
  run = _run_dir(tmp_path, config_module, **({"model.width": 8} if "width" in expected else
                                             {"model.lora_rank": 8} if "lora_rank" in expected else {}))
  before = _digest(run)
  got, err = run_cli(module, [a.format(t=tmp_path) for a in argv] + [f"--workdir={run}"], capsys)
  assert got == code and expected.format(run=run) in err.splitlines()[-1], err
  assert _digest(run) == before and sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.json",
                                                                             "eva_jax.log"]


def test_resume_tolerates_a_section_added_by_a_newer_eva_jax(tmp_path):
  import json
  from configs import sft as sft_config
  from eva_jax.utils.rundir import check_resume
  config = sft_config.get_config("tiny")
  run = _run_dir(tmp_path, "configs.sft")
  saved = json.loads((run / "config.json").read_text())
  saved["retired_section"] = {"x": 1}
  del saved["text"]                                   # one section gone, one new: still this trainer's run
  (run / "config.json").write_text(json.dumps(saved))
  check_resume(run, config, ("model.preset",))
  saved.pop("diffusion")                              # a third difference: another trainer
  (run / "config.json").write_text(json.dumps(saved))
  with pytest.raises(ValueError, match="holds a run of another trainer"):
    check_resume(run, config, ("model.preset",))


def test_restore_that_does_not_fit_is_one_line(tmp_path):
  import jax
  import numpy as np
  from eva_jax.training.checkpoints import Checkpointer
  ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False)
  ckpt.save(1, {"w": np.zeros(3, np.float32)})
  with pytest.raises(ValueError, match=r"cannot restore .*checkpoints/1 \(ValueError: .*\): the checkpoint is "
                                       r"damaged, or it was written by another trainer or model config") as e:
    ckpt.restore(target={"w": jax.ShapeDtypeStruct((4,), np.float32), "b": jax.ShapeDtypeStruct((2,), np.float32)})
  ckpt.close()
  assert "\n" not in str(e.value) and len(str(e.value)) < 600


# MARK: the rules themselves


def test_rules():
  assert checks.integer(1)(0) == "an integer >= 1" and checks.integer(1)(True) and checks.integer(1)(2) is None
  assert checks.number(0, lo_open=True)(math.inf) == "a finite number > 0" and checks.number(0)(0) is None
  assert checks.FRAMES_1_4K(49) is None and checks.FRAMES_1_4K(48) and checks.MESH_SIZE(-1) is None
  assert checks.int_tuple(lo=1, allow_empty=True)(()) is None and checks.int_tuple(2)((32,))
  with pytest.raises(checks.ConfigError, match=r"config.mesh=.*: expected at most one axis of size -1"):
    checks.check({"mesh": {"data": -1, "fsdp": -1}}, checks.COMMON)
  checks.check({"train": {"batch_size": 2}, "other": {"batch_size": -1}}, checks.COMMON)  # only listed fields
  assert json.dumps(sorted(checks.DTYPES))  # every model section's dtype fields


def test_missing_config_file_names_each_folder_once(capsys, monkeypatch):
  import pathlib
  root = pathlib.Path(__file__).resolve().parents[1]
  monkeypatch.chdir(root)
  code, err = run_cli("scripts.train_idm", ["--config=configs/nope.py"], capsys)
  assert code == 2 and err.strip().splitlines()[-1] == f"error: config file configs/nope.py not found in {root}", err
