"""One shape per array across a dataset's examples, checked as each example is made.

Batching stacks the examples of a batch; one of another shape (a cached embedding of another width, an
episode filmed at another size) makes grain fail with "Expected all input elements to have the same
structure", naming neither the array nor the file. A loader holds a SameShapes and checks every example
against the first one it made, so the error names both examples:

  guard = SameShapes("IDM window")
  guard.check(example, where="episode3.hdf5 frame 7")

The first example's shapes are per process (each grain worker batches its own examples, so a batch never
mixes two workers' references).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np


class SameShapes:

  def __init__(self, what: str = "example", skip: tuple[str, ...] = ()):
    self.what, self.skip = what, skip
    self._first: tuple[str, dict[str, tuple[int, ...]]] | None = None

  def check(self, example: Mapping[str, Any], where: str) -> None:
    shapes = {k: tuple(np.shape(v)) for k, v in example.items() if k not in self.skip}
    if self._first is None:
      self._first = (where, shapes)
      return
    first_where, first = self._first
    for key, shape in shapes.items():
      if key in first and first[key] != shape:
        raise ValueError(f"{where}: {self.what} {key!r} has shape {shape}, but {first_where} gave {first[key]}; "
                         "examples are batched together, so every one must have the same shape")

  def __getstate__(self):  # a fresh reference in each worker process
    return {"what": self.what, "skip": self.skip, "_first": None}
