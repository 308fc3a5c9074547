"""Test setup: 8 fake CPU devices, float32 matmuls, before jax is imported anywhere."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite's programs are tiny and most of its time is XLA compiling them: LLVM at -O0 compiles about
# twice as fast and runs them about half as fast, which nets out faster here (the suite without the
# shortened demo, 2 cores: 11.3 -> 8.4 min). Subprocesses inherit it; the shortened demo, which computes
# for minutes, strips it (tests/test_demo.py).
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
# XLA:CPU's MLIR fusion emitters take about twice as long to compile a small program as the older
# elemental emitters (a random-normal init: 190 -> 80 ms; the DiT/VAE/sampler test files: 212 -> 114 CPU-s),
# and the suite compiles some 3,000 programs. Same tolerances pass either way; the shortened demo strips it.
if "xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"

import jax  # noqa: E402

# Parity tests compare against float32 PyTorch: use full-precision matmuls on every backend.
jax.config.update("jax_default_matmul_precision", "highest")

# The longest files first, and in a file its `slow` tests first. `make test` runs `--dist loadfile
# --no-loadscope-reorder`, so xdist hands the files to its two workers in this order: the shortened demo
# (8-10 min, the suite's longest path) starts at once on one worker, which takes no other file until it is
# done (xdist queues more only when a worker has 2 tests left), while the other worker takes the rest,
# longest first.
SLOWEST_FILES = ("test_demo.py", "test_bench.py", "test_multihost.py", "test_train_vae.py")


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
  # a stable sort: everything else keeps pytest's order
  items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), item.get_closest_marker("slow") is None))
