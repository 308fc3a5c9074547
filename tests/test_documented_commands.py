"""Every command the docs show parses: its flags exist, its --config resolves and loads, its overrides apply.

Commands are collected from README.md, docs/*.md and scripts/launch/README.md (fenced code blocks), the
module docstrings of scripts/*.py, scripts/launch/local_cpu.py and configs/*.py, and the comments of
scripts/launch/*.sh / *.sbatch. Nothing runs: absl's app.run and argparse's parse_args are replaced by
"parse, then stop". `<placeholder>` values and a bare `...` (more flags) are allowed.
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import re
import shlex
import sys

import pytest
from absl import app

from tests.cli_utils import load_entry_point

ROOT = pathlib.Path(__file__).resolve().parents[1]
_STARTS = ("python scripts/", "python -m convert", "scripts/launch/tpu_pod.sh", "python scripts/launch/")


def _join_continuations(lines):
  out, buf = [], ""
  for line in lines:
    line = line.rstrip()
    if line.endswith("\\"):
      buf += line[:-1] + " "
      continue
    out.append(buf + line)
    buf = ""
  if buf:
    out.append(buf)
  return out


def _commands_in(lines, source):
  for line in _join_continuations(lines):
    text = line.strip().lstrip("#").strip()
    if text.startswith("$ "):
      text = text[2:]
    if text.startswith(_STARTS):
      yield source, text


def _fenced(text):
  lines, inside = [], False
  for line in text.splitlines():
    if line.lstrip().startswith("```"):
      inside = not inside
      continue
    if inside:
      lines.append(line)
  return lines


def collect():
  found = []
  for md in [ROOT / "README.md", ROOT / "scripts/launch/README.md", *sorted((ROOT / "docs").glob("*.md"))]:
    found += _commands_in(_fenced(md.read_text()), md.relative_to(ROOT))
    # the launcher table shows its commands inline
    if md.name == "README.md" and md.parent.name == "launch":
      found += [(md.relative_to(ROOT), c) for c in re.findall(r"`((?:python )?scripts/launch/[^`]+)`", md.read_text())]
  for py in [*sorted((ROOT / "scripts").glob("*.py")), ROOT / "scripts/launch/local_cpu.py",
             *sorted((ROOT / "configs").glob("*.py")), ROOT / "convert/cli.py"]:
    doc = ast.get_docstring(ast.parse(py.read_text())) or ""
    found += _commands_in(doc.splitlines(), py.relative_to(ROOT))
  for sh in [*sorted((ROOT / "scripts/launch").glob("*.sh")), *sorted((ROOT / "scripts/launch").glob("*.sbatch"))]:
    comments = [l for l in sh.read_text().splitlines() if l.startswith("#")]
    found += _commands_in(comments, sh.relative_to(ROOT))
  return sorted(set(found))


COMMANDS = collect()


class _Parsed(Exception):
  pass


def _words(command: str) -> list[str]:
  command = re.sub(r"<[^>]*>", "PLACEHOLDER", command)
  words = [w.removeprefix("[").removesuffix("]") for w in shlex.split(command, comments=True)]  # [optional]
  return [w for w in words if w not in ("...", "")]


def check(words: list[str], monkeypatch) -> None:
  """Parses one command line (no program name prefix such as `python`); raises on any parse error."""
  if words[0] == "python":
    words = words[1:]
  if words[:2] == ["-m", "convert"]:
    from convert import cli
    return _expect_parsed(lambda: cli.main(words[2:]))
  script = words[0]
  if script == "scripts/launch/tpu_pod.sh":
    assert len(words) > 3, words
    return check(words[3:], monkeypatch)  # TPU name, zone, then the command every worker runs
  if script == "scripts/launch/local_cpu.py":
    from scripts.launch import local_cpu  # noqa: F401  (a plain module: scripts/launch has no flags)
    sys.argv = words
    inner = words[words.index("--") + 1:]
    _expect_parsed(lambda: __import__("scripts.launch.local_cpu", fromlist=["main"]).main())
    return check(inner, monkeypatch)
  assert script.startswith("scripts/") and script.endswith(".py"), script
  module = load_entry_point("scripts." + script[len("scripts/"):-3].replace("/", "."))
  if hasattr(module, "cli"):
    return _expect_parsed(lambda: module.cli(words))
  return _expect_parsed(lambda: module.main(words[1:]))


def _expect_parsed(fn):
  try:
    fn()
  except _Parsed:
    return
  except SystemExit as e:
    raise AssertionError(f"the command line does not parse (exit {e.code})") from None
  raise AssertionError("the entry point neither parsed its flags nor failed")


@pytest.fixture
def parse_only(monkeypatch):
  def app_run(main, argv=None, flags_parser=None):
    flags_parser(list(argv or sys.argv))
    raise _Parsed

  def parse_args(self, args=None, namespace=None):
    ns = _original_parse_args(self, args, namespace)
    raise _Parsed(ns)
  monkeypatch.setattr(app, "run", app_run)
  monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
  monkeypatch.setattr(sys, "argv", list(sys.argv))


_original_parse_args = argparse.ArgumentParser.parse_args


def test_commands_were_found():
  sources = {str(s) for s, _ in COMMANDS}
  assert len(COMMANDS) >= 40, COMMANDS
  for needed in ("scripts/show_config.py", "scripts/launch/local_cpu.py", "scripts/launch/tpu_pod.sh",
                 "README.md", "docs/models.md"):
    assert needed in sources, sorted(sources)


@pytest.mark.parametrize("source, command", COMMANDS, ids=[f"{s}:{c[:60]}" for s, c in COMMANDS])
def test_documented_command_parses(parse_only, monkeypatch, capsys, source, command):
  try:
    check(_words(command), monkeypatch)
  except AssertionError as e:
    raise AssertionError(f"{source}: {command}\n{e}\n{capsys.readouterr().err[-2000:]}") from None


def test_checker_catches_a_bad_override(parse_only, monkeypatch):
  with pytest.raises(AssertionError, match="does not parse"):
    check(_words("python scripts/train_sft.py --config=configs/sft.py:tiny --config.train.stepz=4"), monkeypatch)
  with pytest.raises(AssertionError, match="does not parse"):
    check(_words("python -m convert --kind dit --src x"), monkeypatch)


def test_relative_config_from_another_directory(parse_only, monkeypatch, tmp_path):
  from absl import flags
  monkeypatch.chdir(tmp_path)  # not the checkout: configs/idm.py resolves against the package
  check(_words("python scripts/train_idm.py --config=configs/idm.py:tiny --config.train.num_steps=3"), monkeypatch)
  assert flags.FLAGS.config.train.num_steps == 3 and flags.FLAGS.config.model.preset == "tiny"
  (tmp_path / "configs").mkdir()  # a file of that name in the working directory wins
  (tmp_path / "configs" / "idm.py").write_text(
      "import ml_collections\ndef get_config(arg=None):\n  return ml_collections.ConfigDict({'mine': arg})\n")
  check(_words("python scripts/train_idm.py --config=configs/idm.py:x"), monkeypatch)
  assert flags.FLAGS.config.to_dict() == {"mine": "x"}


def test_override_of_the_default_config_from_a_real_command_line():
  """`python scripts/x.py --config.a=1` (no --config): ml_collections defines the override flags at import
  from sys.argv, so the parser must not define them a second time (an absl 'defined twice' error)."""
  import subprocess
  script = str(ROOT / "scripts" / "demo.py")
  ok = subprocess.run([sys.executable, script, "--config.seed=7", "--help"], capture_output=True, text=True)
  assert ok.returncode == 0 and "--config.seed=7" in ok.stdout, ok.stderr[-2000:]
  bad = subprocess.run([sys.executable, script, "--config.short=True", "--config.seed=x"],
                       capture_output=True, text=True)
  assert bad.returncode == 2 and "config.seed=x" in bad.stderr and "defined twice" not in bad.stderr, bad.stderr
