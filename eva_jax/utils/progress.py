"""Progress bars with rate and ETA (tqdm), silent on non-zero processes."""

from __future__ import annotations

import sys

import jax
from tqdm.auto import tqdm


def progress(iterable=None, total: int | None = None, desc: str = "", initial: int = 0, **kwargs):
  """A tqdm bar; `initial` lets a resumed run show its true position and ETA."""
  disable = jax.process_index() != 0 or kwargs.pop("disable", False)
  return tqdm(iterable, total=total, desc=desc, initial=initial, disable=disable, dynamic_ncols=True,
              file=sys.stderr, mininterval=0.5, **kwargs)
