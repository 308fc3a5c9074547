"""Test setup: 8 fake CPU devices, float32 matmuls, before jax is imported anywhere."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Parity tests compare against float32 PyTorch: use full-precision matmuls on every backend.
jax.config.update("jax_default_matmul_precision", "highest")
