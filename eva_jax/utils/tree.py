"""Small pytree helpers shared by the checkpoint loaders."""

from __future__ import annotations

from typing import Any, Mapping


def string_keys(tree: Any) -> Any:
  """Nested dict with every key turned into a string (orbax stores layer-list indices as strings)."""
  return {str(k): string_keys(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def keyed_like(tree: Any, template: Any) -> Any:
  """A string-keyed restored dict re-keyed like `template` (whose layer-list keys may be ints)."""
  if not isinstance(template, Mapping):
    return tree
  return {k: keyed_like(tree[str(k)], v) for k, v in template.items()}
