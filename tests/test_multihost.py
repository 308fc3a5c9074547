"""The multi-host path on one machine: 2 processes × 2 CPU devices train a few SFT steps through
jax.distributed (gloo collectives), save a sharded orbax checkpoint from both processes, and a second
launch restores it and continues."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _launch(workdir, data_root, steps, eval_every):
  cmd = [sys.executable, str(ROOT / "scripts/launch/local_cpu.py"), "--processes", "2", "--devices", "2",
         "--timeout", "600", "--", "scripts/train_sft.py", "--config=configs/sft.py:tiny",
         f"--config.data.data_root={data_root}", f"--config.train.num_steps={steps}",
         "--config.train.checkpoint_every=2", "--config.train.log_every=1", f"--config.eval.every={eval_every}",
         "--config.train.batch_size=8", f"--workdir={workdir}"]
  # No compilation cache shared by the launches: only process 0 writes that cache, so on the second launch
  # process 0 starts training minutes before process 1 (which compiles again) and gloo's 30 s connection
  # timeout fails the run on a loaded machine (seen in CI: "Gloo context initialization failed").
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)


def test_two_processes_train_save_and_resume(tmp_path):
  from eva_jax.data import toyworld
  data = tmp_path / "toy"
  toyworld.generate_dataset(data, num_episodes=10, seed=0, size=32, n_frames=5, val_fraction=0.2)
  run = tmp_path / "run"

  first = _launch(run, data, steps=2, eval_every=0)   # no validation: its compile is paid once, below
  assert first.returncode == 0, first.stdout[-3000:]
  assert "[0]" in first.stdout and "[1]" in first.stdout        # both processes ran
  steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [2]

  second = _launch(run, data, steps=4, eval_every=1000)  # validation at the last step, on both processes
  assert second.returncode == 0, second.stdout[-3000:]
  assert "resumed" in second.stdout.lower()
  steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == 4
  logged = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
  assert logged[-1] == 4 and len(set(logged)) == len(logged)      # steps 3-4 continue, none repeated


def test_two_process_grpo(tmp_path):
  """GRPO on 2 processes × 2 devices: rewards and videos gathered across hosts before they are read,
  one metrics line per iteration (process 0 writes), the adapter exported once."""
  from flax import nnx

  from eva_jax.models.idm import IDM, idm_config
  from eva_jax.training.checkpoints import Checkpointer
  idm = IDM(idm_config("tiny"), rngs=nnx.Rngs(3))
  with Checkpointer(tmp_path / "idm", async_save=False) as ck:
    ck.save(1, {"model_state_dict": nnx.to_pure_dict(nnx.state(idm))})
  run = tmp_path / "run"
  cmd = [sys.executable, str(ROOT / "scripts/launch/local_cpu.py"), "--processes", "2", "--devices", "2",
         "--timeout", "600", "--", "scripts/train_grpo.py", "--config=configs/grpo.py:tiny",
         f"--config.reward.idm_checkpoint={tmp_path / 'idm'}", "--config.num_iterations=2",
         "--config.sample.eval_every=0", "--config.log.video_every=1", f"--workdir={run}"]
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # see _launch
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
  assert out.returncode == 0, out.stdout[-3000:]
  steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines() if "reward_mean" in l]
  assert steps == [0, 1]
  assert (run / "lora_adapter" / "adapter_model.safetensors").is_file()
  assert sorted(p.name for p in (run / "videos").iterdir()) == ["iter00000_0.mp4", "iter00001_0.mp4"]


def test_run_dir_is_one_for_all_processes(tmp_path, monkeypatch):
  """Without --workdir, a multi-process run writes to the directory process 0 made (broadcast), not one
  directory per process."""
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  from eva_jax.utils import rundir
  made = tmp_path / "outputs" / "2026-12-03" / "10-00-00"
  sent = np.zeros(4096, np.uint8)
  sent[:len(str(made))] = np.frombuffer(str(made).encode(), np.uint8)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda buf: sent)
  got = rundir.make_run_dir(tmp_path / "outputs")
  assert got == made and got.is_dir()
  assert [p for p in (tmp_path / "outputs").rglob("*") if p.is_dir()] == [made.parent, made]  # nothing else
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda buf: buf)
  own = rundir.make_run_dir(tmp_path / "other")
  assert own.parent.parent == tmp_path / "other" and own.is_dir()   # process 0 makes a fresh one


def test_launcher_keeps_the_callers_xla_flags():
  """The launched processes get the caller's XLA flags (the suite's -O0 among them) with only the device count
  replaced: the two-process tests compile at the suite's level (about 40% less CPU per launch)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("local_cpu", ROOT / "scripts/launch/local_cpu.py")
  launcher = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(launcher)
  flags = launcher.xla_flags_with_devices("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0", 2)
  assert flags == "--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=2"
  assert launcher.xla_flags_with_devices("", 4) == "--xla_force_host_platform_device_count=4"
