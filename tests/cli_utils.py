"""Running an entry point's `cli(argv)` in the test process: what `python scripts/x.py ...` runs, without
a subprocess (and its jax import) per case.

absl keeps one global FLAGS: the flags an entry point defined (and the --config.* overrides of its last
parse) are removed first, and the module is imported afresh, so each call starts like a new process.
"""

from __future__ import annotations

import importlib
import sys

from absl import flags


def reset_flags() -> None:
  fl = flags.FLAGS
  for name in list(fl):
    module = fl.find_module_defining_flag(name) or ""
    if module.startswith(("scripts", "ml_collections", "__main__")) or "." in name:
      delattr(fl, name)
  fl.unparse_flags()


def load_entry_point(module: str):
  """The module, imported afresh with a clean FLAGS."""
  reset_flags()
  if module in sys.modules and module != "scripts._common":
    del sys.modules[module]
  return importlib.import_module(module)


def run_cli(module: str, argv: list[str], capsys=None) -> tuple[int, str]:
  """(exit status, stderr) of `module`'s cli with `argv` (no program name); 'convert' is `python -m convert`."""
  saved = list(sys.argv)
  try:
    if module == "convert":
      from convert.cli import main
      try:
        code = main(argv)
      except SystemExit as e:
        code = e.code
    else:
      mod = load_entry_point(module)
      try:
        mod.cli([f"{module.split('.')[-1]}.py", *argv])
        code = 0
      except SystemExit as e:
        code = e.code
  finally:
    sys.argv = saved
  err = capsys.readouterr().err if capsys is not None else ""
  return (0 if code is None else code if isinstance(code, int) else 1), err
