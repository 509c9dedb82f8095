"""ddpm_jax/parallel.py: replicas over the local devices, the gathers, the stop agreement."""

import signal

import jax
import numpy as np

from ddpm_jax import parallel
from ddpm_jax.training import loop
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


def test_processes_compare_stop_flags_only_where_asked(monkeypatch):
  """With several processes, the training loop's stop flag gathers only at its log points."""
  from jax.experimental import multihost_utils

  gathered = []

  def fake_allgather(x, others=0):
    gathered.append(int(x))
    return np.array([int(x), others])

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather", fake_allgather)
  flag = loop._StopFlag()
  assert not flag.should_stop(agree=False) and not flag.should_stop(agree=True)
  assert gathered == [0]
  flag.signum = signal.SIGTERM
  assert not flag.should_stop(agree=False)  # a signal waits for the next log point
  assert gathered == [0]
  assert flag.should_stop(agree=True) and gathered == [0, 1]
  # Signalled elsewhere: the other process's flag stops this one too.
  monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: fake_allgather(x, 1))
  assert loop._StopFlag().should_stop(agree=True) and gathered == [0, 1, 0]
  # One process stops at once, at any step.
  monkeypatch.setattr(jax, "process_count", lambda: 1)
  assert flag.should_stop(agree=False) and gathered == [0, 1, 0]
