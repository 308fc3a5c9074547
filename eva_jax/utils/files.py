"""Writing a file so that it appears complete or not at all (temporary name, then os.replace)."""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yields a temporary path next to `path`; renamed over `path` when the block ends without an error,
  removed when it raises (a killed process leaves only a `.<name>.*.tmp` file, never a partial `path`)."""
  path = pathlib.Path(path)
  if path.is_dir():
    raise IsADirectoryError(f"cannot write {path}: it is a directory")
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
  except (FileExistsError, NotADirectoryError):  # a component of the folder is a file
    raise NotADirectoryError(f"cannot write {path}: its folder {path.parent} cannot be made (a file is in the "
                             "way)") from None
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  os.close(fd)
  try:
    yield pathlib.Path(tmp)
    os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
