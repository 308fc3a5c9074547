"""pyproject.toml: the runtime dependencies cover requirements.txt, every console script imports and answers
--help the way `pip install` runs it (target() with sys.argv set), and torch is an extra with a clear hint."""

from __future__ import annotations

import pathlib
import re
import sys
import tomllib

import pytest

from tests.cli_utils import load_entry_point

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
SCRIPTS = PROJECT["scripts"]


def _name(requirement: str) -> str:
  return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_dependencies_cover_requirements_txt():
  pinned = {}
  for line in (ROOT / "requirements.txt").read_text().splitlines():
    line = line.split("#")[0].strip()
    if line:
      name, version = line.split("==")
      pinned[_name(name)] = version
  declared = {_name(d): d for d in PROJECT["dependencies"]}
  assert set(pinned) == set(declared)
  for name, version in pinned.items():  # each lower bound admits the pinned version
    bound = re.search(r">=([\w.]+)", declared[name]).group(1)
    assert tuple(map(int, bound.split("."))) <= tuple(map(int, version.split("."))), (name, bound, version)
  assert PROJECT["requires-python"] == ">=3.11"
  assert [_name(d) for d in PROJECT["optional-dependencies"]["torch"]] == ["torch"]
  assert "einops" not in pinned and "chex" not in pinned  # unused: nothing imports them


def test_the_entry_points_have_console_scripts():
  for name in ("eva-infer", "eva-train-sft", "eva-train-idm", "eva-train-grpo", "eva-train-vae", "eva-convert",
               "eva-serve-planner", "eva-cache-embeddings", "eva-prepare-robotwin", "eva-eval-idm", "eva-demo"):
    assert name in SCRIPTS, name


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_script_imports_and_shows_help(name, monkeypatch, capsys):
  module, attr = SCRIPTS[name].split(":")
  target = getattr(load_entry_point(module) if module.startswith("scripts") else __import__(module, fromlist=[attr]),
                   attr)
  monkeypatch.setattr(sys, "argv", [name, "--help"])
  with pytest.raises(SystemExit) as e:
    target()
  out = capsys.readouterr().out
  assert e.value.code in (0, None) and "usage" in out.lower() and "--" in out, out[-1000:]


def test_help_lists_config_fields(monkeypatch, capsys):
  target = load_entry_point("scripts.train_idm").cli
  monkeypatch.setattr(sys, "argv", ["eva-train-idm", "--config=configs/idm.py:tiny", "--help"])
  with pytest.raises(SystemExit):
    target()
  out = capsys.readouterr().out
  assert "Trains EVA's inverse dynamics model" in out  # the script's docstring, not the console wrapper's
  assert "--workdir" in out and "--verbosity" in out and "--config.data.root=''" in out and "--config.train.num_steps=40" in out


def test_torch_is_an_extra_with_a_clear_error(tmp_path, monkeypatch):
  from convert.io import open_state_dict
  (tmp_path / "w.pth").write_bytes(b"x")
  monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
  with pytest.raises(ImportError, match=r"w.pth needs torch: install the torch extra: pip install 'eva_jax\[torch\]'"):
    open_state_dict(str(tmp_path / "w.pth"))
