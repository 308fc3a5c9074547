"""The library's layers import only downwards (DESIGN.md, Layout), and PyTorch readers only through weights.py.

Every `import` of every module under eva_jax/ is read from the source (function-level imports too), so a
lazy import cannot hide an upward dependency.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "eva_jax"

# What each layer may import from eva_jax (its own layer included). Layers not listed are the top
# (training, inference, planner, serving, demo, diffusion, rl) and are free to import what is below them.
ALLOWED = {
    "utils": {"utils"},
    "parallel": {"parallel", "utils"},
    "models": {"models", "parallel", "utils"},
    "weights": {"weights", "models", "parallel", "utils"},
    "data": {"data", "weights", "models", "parallel", "utils"},
}
# The only library modules that read PyTorch files through convert/.
CONVERT_USERS = {"eva_jax/weights.py", "eva_jax/training/idm.py"}  # idm: the ImageNet trunk init


def _layer(path: pathlib.Path) -> str:
  rel = path.relative_to(PACKAGE)
  return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.stem != "__init__" else "eva_jax"


def _imports(source: str, package: str):
  """(line, dotted module) of every import in `source`, relative imports resolved from `package`."""
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      yield node.lineno, base
      for alias in node.names:  # `from eva_jax import weights` names a layer too
        if base == "eva_jax":
          yield node.lineno, f"eva_jax.{alias.name}"


def violations(source: str, rel: str) -> list[str]:
  """Upward imports of the module at `rel` (a path like 'eva_jax/data/x.py') whose text is `source`."""
  path = ROOT / rel
  layer = _layer(path)
  allowed = ALLOWED.get(layer)
  package = ".".join(pathlib.Path(rel).with_suffix("").parts[:-1])
  bad = []
  for line, module in _imports(source, package):
    parts = module.split(".")
    if parts[0] == "convert" and rel not in CONVERT_USERS:
      bad.append(f"line {line}: imports {module} (read PyTorch files through eva_jax.weights)")
    if allowed is None or parts[0] != "eva_jax" or len(parts) < 2:
      continue
    if parts[1] not in allowed:
      bad.append(f"line {line}: {layer}/ imports eva_jax.{parts[1]} (allowed: {sorted(allowed)})")
  return bad


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_upward_import(path):
  rel = str(path.relative_to(ROOT))
  bad = violations(path.read_text(), rel)
  assert not bad, f"{rel}:\n  " + "\n  ".join(bad)


def test_lazy_relative_and_convert_imports_are_caught():
  """The check flags what it exists for: function-level and relative upward imports, convert/ outside
  weights.py, a model importing data; and lets downward imports through."""
  src = ("def f():\n  from eva_jax.training import sft\n  from ..inference import run_inference\n"
         "  import convert.io\n  from eva_jax import weights\n  from eva_jax.models import vae\n")
  bad = violations(src, "eva_jax/data/probe.py")
  assert [b.split(":")[0] for b in bad] == ["line 2", "line 3", "line 4"], bad
  assert violations("from eva_jax.data import video\n", "eva_jax/models/probe.py")
  ok = src.replace("eva_jax.training", "eva_jax.utils").replace("  import convert.io\n", "")
  assert not violations(ok, "eva_jax/training/probe.py")
