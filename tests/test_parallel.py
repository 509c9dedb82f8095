"""ddpm_jax/parallel.py: replicas and batches on the local devices, the gathers, the stop agreement."""

import os
import signal
import textwrap

import jax
import numpy as np
import pytest

from ddpm_jax import parallel
from ddpm_jax.training import loop
from helpers import run_python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_prefetch_to_device_single_device():
  import jax

  devices = jax.local_devices()[:1]
  source = [(np.full((1, 4, 8, 8, 1), i, np.float32), np.ones((1, 4), bool)) for i in range(5)]
  out = list(parallel.prefetch_to_device(iter(source), 2, devices))
  assert len(out) == 5
  for i, (images, mask) in enumerate(out):
    assert isinstance(images, jax.Array) and isinstance(mask, jax.Array)
    assert images.shape == (1, 4, 8, 8, 1)
    assert {s.device for s in images.addressable_shards} == set(devices)
    np.testing.assert_array_equal(np.asarray(images), source[i][0])
  with pytest.raises(ValueError, match="number of devices"):
    list(parallel.prefetch_to_device(iter([np.zeros((3, 2))]), 2, devices))


def test_prefetch_to_device_four_cpu_devices_subprocess():
  script = textwrap.dedent("""
      import itertools, jax, numpy as np, ml_collections
      from ddpm_jax import parallel
      from ddpm_jax.data import pipeline
      devices = jax.local_devices()
      assert len(devices) == 4, devices
      cfg = ml_collections.ConfigDict(dict(
          dataset='digits', image_size=8, channels=1, random_flip=True,
          data_dir=None, folder='', train_split='train', eval_split='test',
          in_memory=True, shuffle_seed=1, shuffle_buffer_size=1))
      images = lambda: (b["image"] for b in pipeline.create_train_iterator(cfg, 32, 0, 0, 1, 4))
      host = list(itertools.islice(images(), 3))
      it = parallel.prefetch_to_device(images(), 2, devices)
      step = jax.pmap(lambda x: x.sum())
      for h, d in zip(host, itertools.islice(it, 3)):
        assert d.shape == (4, 8, 8, 8, 1)
        shards = sorted(d.addressable_shards, key=lambda s: s.index[0].start)
        assert [s.device for s in shards] == devices
        for i, s in enumerate(shards):
          assert s.data.shape == (1, 8, 8, 8, 1)
          np.testing.assert_array_equal(np.asarray(s.data), h[i:i + 1])
        np.testing.assert_allclose(np.asarray(step(d)), h.sum(axis=(1, 2, 3, 4)),
                                   rtol=1e-5)
      print('OK')
  """)
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
      env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
  ).strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  result = run_python(script, env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "OK" in result.stdout
