"""Checkpointer: keep-N latest, best by metric, restore onto a sharding, meta round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eva_jax import parallel
from eva_jax.training.checkpoints import Checkpointer


def _state(v):
  return {"w": jnp.full((8, 4), float(v)), "step": jnp.asarray(v, jnp.int32)}


def test_keep_latest_and_best(tmp_path):
  with Checkpointer(tmp_path / "ckpt", max_to_keep=2, best_metric="reward") as ck:
    for step, reward in [(1, 0.5), (2, 2.0), (3, 1.0), (4, 0.1)]:
      ck.save(step, _state(step), metrics={"reward": reward}, meta={"epoch": step})
    ck.wait()
    assert ck.all_steps() == [3, 4]
    assert ck.latest_step() == 4
    assert ck.best_step() == 2
    assert ck.best_value() == pytest.approx(2.0)
    state, meta = ck.restore()
    np.testing.assert_array_equal(state["w"], np.full((8, 4), 4.0))
    assert meta == {"epoch": 4}
    best, _ = ck.restore(best=True)
    assert int(best["step"]) == 2


def test_restore_onto_a_different_sharding(tmp_path):
  mesh = parallel.make_mesh({"fsdp": 8})
  with Checkpointer(tmp_path / "c", async_save=False) as ck:
    ck.save(7, _state(7))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0))
    target["w"] = jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=parallel.named_sharding(mesh, ("embed", None)))
    state, meta = ck.restore(target=target)
  assert meta == {}
  assert state["w"].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
  np.testing.assert_array_equal(np.asarray(state["w"]), np.full((8, 4), 7.0))


def test_restore_without_checkpoints_raises(tmp_path):
  with Checkpointer(tmp_path / "empty") as ck:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
      ck.restore()


def test_a_state_with_nan_is_never_written(tmp_path):
  """A non-finite state (a NaN in the data reached the weights) is refused by name; the last good
  checkpoint stays the newest, and a resume starts from it."""
  ck = Checkpointer(tmp_path, async_save=False)
  good = {"params": {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}, "step": jnp.int32(1)}
  ck.save(1, good)
  bad = {"params": {"w": jnp.ones((3, 2)).at[1, 0].set(jnp.nan), "b": jnp.full(2, jnp.inf)}, "step": jnp.int32(2)}
  with pytest.raises(FloatingPointError, match=r"step 2 not written: non-finite values in .*'b'.*'w'.*\(2 leaves\)"):
    ck.save(2, bad)
  assert ck.all_steps() == [1] and ck.latest_step() == 1
  restored, _ = ck.restore()
  np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), 1.0)
  ck.close()
