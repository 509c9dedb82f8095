"""ddpm_jax/parallel.py: replicas over the local devices and the one-process gathers."""

import jax
import numpy as np

from ddpm_jax import parallel
from ddpm_jax.training import state as state_lib


def test_replicate_puts_one_copy_on_each_device_and_unreplicate_reads_one_back():
  devices = jax.local_devices()[:4]
  tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.int32(7)}
  rep = parallel.replicate(tree, devices)
  assert rep["w"].shape == (4, 2, 3) and rep["step"].shape == (4,)
  assert rep["w"].sharding == parallel.device_sharding(devices)
  assert rep["w"].sharding.spec == jax.sharding.PartitionSpec(parallel.AXIS)
  for shard in rep["w"].addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data)[0], tree["w"])
  assert [s.device for s in rep["w"].addressable_shards] == devices
  back = parallel.unreplicate(rep)
  np.testing.assert_array_equal(back["w"], tree["w"])
  assert int(back["step"]) == 7 and isinstance(back["w"], np.ndarray)


def test_one_process_gathers_add_the_process_axis():
  got = parallel.allgather({"a": np.arange(3), "b": np.float32(2.0)})
  assert got["a"].shape == (1, 3) and got["b"].shape == (1,)
  assert parallel.any_process(True) is True and parallel.any_process(False) is False


def test_the_old_names_are_the_same_objects():
  """training/state.py re-exports them: code that imports them from there still works."""
  for name in ("AXIS", "device_sharding", "replicate", "unreplicate"):
    assert getattr(state_lib, name) is getattr(parallel, name), name
