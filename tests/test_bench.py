"""Every bench subcommand runs at --size tiny on CPU and writes well-formed JSON with its correctness check.

All subcommands run in one `scripts/bench.py all` process (one import of jax, torch and diffusers instead of
eleven: ~2.5 min instead of ~9 on the CI's two cores); each subcommand's result is then its own test. The
`--dist loadfile` (Makefile) keeps these tests on one worker, so the run happens once per session.
"""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from scripts.bench import SUBCOMMANDS  # noqa: E402

# subcommands with a PyTorch reference in the same run (float32 on CPU): their relative error must be tiny
WITH_REFERENCE = {"dit": 1e-5, "dit-block": 1e-5, "encoders": 1e-5, "idm": 1e-5, "vae": 1e-5}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bench_all(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  proc = subprocess.run([sys.executable, str(ROOT / "scripts/bench.py"), "all", "--size", "tiny", "--iters", "1",
                         "--quick", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=1500)
  payload = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else None
  return proc, payload


def test_all_ran_and_machine_is_recorded(bench_all):
  proc, payload = bench_all
  assert payload is not None, proc.stdout[-2000:] + proc.stderr[-4000:]
  assert payload["machine"]["platform"] == "cpu" and payload["machine"]["jax"]
  assert [r["name"] for r in payload["results"]] == sorted(SUBCOMMANDS)


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_subcommand_tiny(bench_all, name):
  proc, payload = bench_all
  assert payload is not None, proc.stdout[-2000:] + proc.stderr[-4000:]
  [r] = [r for r in payload["results"] if r["name"] == name]
  assert r["size"] == "tiny"
  assert "error" not in r, r.get("error")
  assert r["jax"]["median_s"] > 0 and r["bench_wall_s"] > 0  # the whole bench's wall time, for the suite's budget
  if name in WITH_REFERENCE:
    assert r["reference"]["median_s"] > 0
    assert r["rel_err"] < WITH_REFERENCE[name], r["rel_err"]
  if name == "dit-block":  # the reference block's training step is timed too
    assert r["reference_fwd_bwd"]["median_s"] > 0 and r["jax_fwd_bwd"]["median_s"] > 0
  assert any(line.startswith(name + " ") for line in proc.stdout.splitlines())  # the table row


def test_device_check_dry_run_on_cpu(tmp_path):
  """--device-check's GPU-only steps run at tiny sizes on CPU (the rehearsal before a GPU slot): the versions
  record, the cuDNN key-length probe on the xla kernel, the block at the probed multiple (with the looped
  timings), the cuDNN padding logic, bf16 vs float32. (dit-block-unfused / -fp8 are the dit-block bench with
  --no-fuse / --matmul-dtype fp8; left out here for the suite's time.)"""
  steps = "versions,cudnn-lengths,dit-block-kv,cudnn-attention,bf16-block"  # in the order they run
  proc = subprocess.run([sys.executable, str(ROOT / "scripts/bench.py"), "--device-check", "--only", steps,
                         "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  results = {r["name"]: r for r in json.loads((tmp_path / "results.json").read_text())["results"]}
  assert list(results) == steps.split(",")
  assert results["cudnn-attention"]["ok"] and results["bf16-block"]["ok"]
  probe = results["cudnn-lengths"]
  assert probe["ok"] and probe["kv_multiple"] == 1 and probe["used_kv_multiple"] == 1  # xla takes any length
  assert all(v["ok"] and v["grad_rel_err"] < 2e-2 for v in probe["lengths"].values())
  block = results["dit-block-kv"]
  assert "error" not in block and block["cudnn_kv_multiple"] == 1 and block["jax"]["median_s"] > 0
  assert block["jax"]["looped"]["median_s"] > 0 and block["jax_fwd_bwd"]["looped"]["median_s"] > 0
  assert results["versions"]["jax"] and results["versions"]["cudnn"] is None   # CPU: no cuDNN loaded
  payload = json.loads((tmp_path / "results.json").read_text())
  assert payload["machine"]["versions"]["jaxlib"]
