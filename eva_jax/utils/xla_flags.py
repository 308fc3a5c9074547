"""XLA flags eva_jax's entry points start with, unless the user's $XLA_FLAGS sets the same flag.

XLA reads $XLA_FLAGS when the backend starts (the first computation), so `apply_default_xla_flags()` runs at the
top of scripts/_common.py and scripts/bench.py. EVA_JAX_DEFAULT_XLA_FLAGS=0 leaves $XLA_FLAGS untouched.
"""

from __future__ import annotations

import os

# cuBLAS instead of Triton GEMMs: in the nnx.scan'ed 40-layer i2v-14B forward XLA fuses each layer's weight
# slice into a Triton GEMM that runs ~12 % below cuBLAS (and leaves the GELU unfused); with Triton GEMMs off
# the forward took 0.953 s instead of 1.004 s on one H200 (docs/benchmarks.md). No effect on CPU or TPU.
DEFAULT_XLA_FLAGS = ("--xla_gpu_enable_triton_gemm=false",)


def apply_default_xla_flags() -> str:
  """Appends DEFAULT_XLA_FLAGS to $XLA_FLAGS where the user has not set the same flag; returns the result."""
  current = os.environ.get("XLA_FLAGS", "")
  if os.environ.get("EVA_JAX_DEFAULT_XLA_FLAGS", "1") != "0":
    extra = [f for f in DEFAULT_XLA_FLAGS if f.split("=")[0] not in current]
    if extra:
      os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
  return os.environ.get("XLA_FLAGS", "")
