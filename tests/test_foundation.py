"""Foundation smoke tests: fake devices, mesh, sharding rules."""

import jax
import pytest

from eva_jax import parallel


def test_eight_cpu_devices_and_mesh():
  assert jax.device_count() == 8
  mesh = parallel.make_mesh({"data": 2, "fsdp": -1})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "context": 1, "tensor": 1}


def test_mesh_rejects_bad_sizes():
  with pytest.raises(ValueError, match="do not divide"):
    parallel.make_mesh({"data": 3, "fsdp": -1})
  with pytest.raises(ValueError, match="unknown mesh axes"):
    parallel.make_mesh({"dat": 8})


def test_logical_rules_drop_axes_absent_from_mesh():
  mesh = parallel.make_mesh({"fsdp": 8})
  s = parallel.named_sharding(mesh, ("act_batch", "act_seq", None))
  assert s.spec == jax.sharding.PartitionSpec("fsdp", None, None)
