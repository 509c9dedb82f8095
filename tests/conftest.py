"""Eight CPU devices for every test process, set before JAX creates its backend.

Tests that need one device pass ``devices=jax.local_devices()[:1]``.
"""

import atexit
import os
import shutil
import tempfile

import jax
import pytest

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  jax.config.update("jax_num_cpu_devices", 8)
# The suite is compile-bound: most tests compile a train step or a sampler and
# run it a few times. XLA:CPU's backend optimisation level 0 (LLVM's -O0 on the
# generated loops; the same HLO, fusions and library calls) made compile-heavy
# tests 1.4-2x faster on a 2-core host, run-heavy ones up to 1.3x slower, and
# the suite 1.12x faster in all. Main.py subprocesses inherit it through
# XLA_FLAGS, so bitwise comparisons between processes hold. Benchmarks and real
# runs keep the default level. Setting the level in XLA_FLAGS from outside wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join(
      [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]
  ).strip()
# One persistent XLA compilation cache for the test process and every main.py it
# starts (they inherit the variable): programs that several tests build, such as
# the test config's train step and sampler, are compiled once. Entries are keyed
# by the program, the compiler flags and the jax version. Only compiles of over
# a second are stored (jax's default threshold). Unless JAX_COMPILATION_CACHE_DIR
# names a directory to keep, the cache (about 0.6 GB for the suite) is a fresh
# temporary directory, deleted when the session ends.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ddpm_jax_test_xla_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
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
