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
def test_all_subcommands_tiny(tmp_path):
  proc = subprocess.run([sys.executable, str(ROOT / "scripts/bench.py"), "all", "--size", "tiny", "--iters", "1",
                         "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  payload = json.loads((tmp_path / "results.json").read_text())
  assert payload["machine"]["platform"] == "cpu" and payload["machine"]["jax"]
  results = {r["name"]: r for r in payload["results"]}
  assert set(results) == set(SUBCOMMANDS)
  for name, r in results.items():
    assert "error" not in r, (name, r.get("error"))
    assert r["jax"]["median_s"] > 0, name
  for name, tol in WITH_REFERENCE.items():
    r = results[name]
    assert r["reference"]["median_s"] > 0, name
    assert r["rel_err"] < tol, (name, r["rel_err"])
  # the table on stdout names every subcommand
  for name in SUBCOMMANDS:
    assert name in proc.stdout
