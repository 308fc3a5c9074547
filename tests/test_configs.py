"""Every config script builds its variants; overrides apply; misspelled keys fail with a clear message."""

import importlib
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem not in ("__init__", "common"))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_tiny_variant(name):
  module = importlib.import_module(f"configs.{name}")
  cfg = module.get_config("tiny")
  assert cfg.to_dict()


def _show(*args):
  return subprocess.run([sys.executable, str(ROOT / "scripts" / "show_config.py"), *args],
                        capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_override_applies_and_typo_is_rejected(tmp_path):
  cfg = tmp_path / "toy.py"
  cfg.write_text("import ml_collections\n"
                 "def get_config(arg=None):\n"
                 "  return ml_collections.ConfigDict({'variant': arg, 'train': {'learning_rate': 1e-3}})\n")
  ok = _show(f"--config={cfg}:tiny", "--config.train.learning_rate=1e-4")
  assert ok.returncode == 0, ok.stderr
  out = json.loads(ok.stdout)
  assert out == {"variant": "tiny", "train": {"learning_rate": 1e-4}}
  bad = _show(f"--config={cfg}:tiny", "--config.train.learnin_rate=1e-4")
  assert bad.returncode == 2
  assert "bad config override --config.train.learnin_rate=1e-4" in bad.stderr
  assert "learning_rate" in bad.stderr  # the suggestion
  assert "Traceback" not in bad.stderr
