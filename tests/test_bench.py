"""Every bench subcommand runs at --size tiny on CPU and writes well-formed JSON with its correctness check."""

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


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_subcommand_tiny(tmp_path, name):
  proc = subprocess.run([sys.executable, str(ROOT / "scripts/bench.py"), name, "--size", "tiny", "--iters", "1",
                         "--quick", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  payload = json.loads((tmp_path / "results.json").read_text())
  assert payload["machine"]["platform"] == "cpu" and payload["machine"]["jax"]
  [r] = payload["results"]
  assert r["name"] == name and r["size"] == "tiny"
  assert "error" not in r, r.get("error")
  assert r["jax"]["median_s"] > 0
  if name in WITH_REFERENCE:
    assert r["reference"]["median_s"] > 0
    assert r["rel_err"] < WITH_REFERENCE[name], r["rel_err"]
  if name == "dit-block":  # the reference block's training step is timed too
    assert r["reference_fwd_bwd"]["median_s"] > 0 and r["jax_fwd_bwd"]["median_s"] > 0
  assert name in proc.stdout  # the table row
