"""The allocator a CPU run restarts itself with (ddpm_jax/host_malloc.py)."""

import os
import subprocess
import sys
import textwrap

import pytest

from configs import test as test_config
from ddpm_jax import config_validation, host_malloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JEMALLOC = host_malloc.find_jemalloc()
MARKER = host_malloc.MARKER


def test_environment_of_each_choice():
  env = host_malloc.environment
  assert env("system", {}) == {}
  assert env("glibc_thp", {}) == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", MARKER: "glibc_thp"}
  # Existing settings are kept, ours added.
  assert env("glibc_thp", {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"] == (
      "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
  assert env("jemalloc", {"LD_PRELOAD": "/x/libfoo.so", "MALLOC_CONF": "narenas:2"},
             jemalloc="/j/libjemalloc.so.2") == {
                 "LD_PRELOAD": "/j/libjemalloc.so.2 /x/libfoo.so",
                 "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1,narenas:2",
                 MARKER: "jemalloc"}
  assert env("auto", {}, jemalloc=None)[MARKER] == "glibc_thp"
  assert env("auto", {}, jemalloc="/j/libjemalloc.so.2")[MARKER] == "jemalloc"
  # An allocator the user preloaded is left alone.
  assert env("auto", {"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}, jemalloc="/j/x.so") == {}
  with pytest.raises(ValueError, match="libjemalloc.so.2 was not found"):
    env("jemalloc", {}, jemalloc=None)
  with pytest.raises(ValueError, match="unknown allocator 'tcmalloc'"):
    env("tcmalloc", {})


def test_config_field_is_checked():
  config = test_config.get_config()
  config_validation.validate_host(config)  # the default, 'auto', is valid anywhere
  config.host.malloc = "tcmalloc"
  with pytest.raises(config_validation.ConfigError, match=r"config.host.malloc='tcmalloc'"):
    config_validation.validate_host(config)


# A child process that allocates a fresh 144 MB XLA output buffer per call (as a
# train step's temporaries are) and prints its page faults per call, the
# allocator it runs with, and how often its top-level code ran (a relaunch
# re-runs it from the start, in the same process).
_CHILD = textwrap.dedent("""
    import os, resource, sys
    from ddpm_jax import host_malloc
    print("START", flush=True)
    host_malloc.relaunch_if_needed(sys.argv[1])
    import jax, jax.numpy as jnp
    x = jnp.ones((36_000_000,), jnp.float32)
    f = jax.jit(lambda a: a * 2.0)
    for _ in range(20):  # warm-up: the allocator's pools (one per thread for jemalloc) fill
      f(x).block_until_ready()
    flt = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    before = flt()
    for _ in range(10):
      y = f(x); y.block_until_ready(); del y
    print("FAULTS", (flt() - before) / 10, host_malloc.describe(), os.environ.get(sys.argv[2]))
""")


def _run_child(choice, show="DDPM_JAX_MALLOC", env=None):
  e = {k: v for k, v in os.environ.items() if k not in (MARKER, "LD_PRELOAD")}
  e.update(env or {})
  out = subprocess.run([sys.executable, "-c", _CHILD, choice, show], cwd=ROOT, env=e,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.split()
  faults_at = lines.index("FAULTS")
  return lines.count("START"), float(lines[faults_at + 1]), lines[faults_at + 2:]


def _thp_available():
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return "[never]" not in f.read()
  except OSError:
    return False


@pytest.mark.skipif(sys.platform != "linux", reason="Linux only")
def test_system_allocator_faults_in_every_page_of_a_fresh_buffer():
  # The reference: with the system's malloc a 144 MB block is mmap-ed afresh for
  # each call and each of its 144e6 / 4096 = 35,156 pages is faulted in.
  starts, faults, (described, marker) = _run_child("system")
  assert starts == 1 and marker == "None" and described == "system"
  assert faults >= 0.9 * 144e6 / 4096


@pytest.mark.skipif(not _thp_available(), reason="transparent huge pages are off")
def test_relaunch_with_glibc_huge_pages_cuts_the_faults():
  starts, faults, (described, tunables) = _run_child("glibc_thp", show="GLIBC_TUNABLES")
  assert starts == 2  # the top-level code ran again after the exec
  assert described == "glibc_thp" and tunables.endswith("glibc.malloc.hugetlb=1")
  assert faults < 0.1 * 144e6 / 4096  # 2 MiB pages: about 70 faults per block, plus others


@pytest.mark.skipif(JEMALLOC is None, reason="libjemalloc.so.2 is not installed")
def test_relaunch_with_jemalloc_reuses_freed_pages():
  starts, faults, (described, marker) = _run_child("jemalloc")
  assert starts == 2 and described == "jemalloc" and marker == "jemalloc"
  # Mostly none; under CI load a call can land on a thread arena it has not used yet
  # (3,517 per call seen once with a 5-call warm-up), so the bound is loose.
  assert faults < 0.25 * 144e6 / 4096


def test_marker_in_the_environment_means_no_relaunch():
  starts, _, (described, marker) = _run_child("auto", env={MARKER: "system"})
  assert starts == 1 and marker == "system" and described == "system"
