"""Eight CPU devices for every test process, set before JAX creates its backend.

Tests that need one device pass ``devices=jax.local_devices()[:1]``.
"""

import atexit
import os
import shutil
import tempfile

# libtpu (requirements-tpu.txt) is loaded by every JAX process and takes a lock
# that only one process may hold; none of them runs on a TPU here, and the
# compile tests need it in the test process and in main.py's.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  jax.config.update("jax_num_cpu_devices", 8)
# The tests' XLA:CPU programs are built at LLVM's optimisation level 1 instead of
# XLA's default: the suite is compile-bound, and level 1 compiles about a quarter
# faster with the same step times for the test models (docs/testing.md). The
# programs compute the same functions; the last bits of some float32 results
# differ, which the tests allow for: they compare against independent references
# with tolerances, or two runs of one program bit for bit. Set in XLA_FLAGS
# (before JAX creates its backend) so that every main.py a test starts inherits
# it; an explicit level in XLA_FLAGS is kept.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=1"
  ).strip()
# One persistent XLA compilation cache for the test process and every main.py it
# starts (they inherit the variable): programs that several tests build, such as
# the test config's train step and sampler, are compiled once. Entries are keyed
# by the program, the compiler flags and the jax version. Every compile is
# stored, not only those of over a second (jax's default): a main.py of the test
# config then starts in 22 s instead of 30 s once another test has run it.
# Unless JAX_COMPILATION_CACHE_DIR names a directory to keep, the cache (about
# 0.6 GB for the suite) is a fresh temporary directory, deleted when the session
# ends.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ddpm_jax_test_xla_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)
# Subprocesses started by tests find the package without an install.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)


@pytest.fixture(scope="session")
def cifar_metadata_dir(tmp_path_factory):
  """A data_dir holding only the metadata of cifar10 (train: 40, test: 20)."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core import naming
  from tensorflow_datasets.core import splits as splits_lib

  data_dir = str(tmp_path_factory.mktemp("tfds_meta"))
  builder = tfds.builder("cifar10", data_dir=data_dir)
  template = naming.ShardedFileTemplate(
      data_dir=builder.data_path, dataset_name="cifar10", filetype_suffix="tfrecord"
  )
  builder.info.set_splits(
      splits_lib.SplitDict(
          [
              splits_lib.SplitInfo(
                  name="train", shard_lengths=[40], num_bytes=0, filename_template=template
              ),
              splits_lib.SplitInfo(
                  name="test", shard_lengths=[20], num_bytes=0, filename_template=template
              ),
          ]
      )
  )
  os.makedirs(builder.data_path, exist_ok=True)
  builder.info.write_to_directory(builder.data_path)
  return data_dir


@pytest.fixture(scope="module")
def host_state():
  """A fresh TrainState of configs/test.py on the host (numpy leaves), for checkpoint tests."""
  from configs import test as test_config  # pylint: disable=g-import-not-at-top
  from ddpm_jax import builders  # pylint: disable=g-import-not-at-top
  from ddpm_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top

  config = test_config.get_config()
  model, tx = builders.build_model(config), builders.create_optimizer(config.optim)
  return jax.device_get(state_lib.create_train_state(config, model, tx))
