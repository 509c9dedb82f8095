"""The allocator advice of ddpm_jax/cpu/malloc.py, checked against the kernel's page-fault count.

A fresh 144 MB block is 144e6 / 4096 = 35,156 pages, each faulted in on first
touch. glibc as started maps and unmaps such a block on every call; with the
advised environment the faults mostly go away, and ``describe`` names it.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from ddpm_jax.cpu import malloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = 144e6 / 4096

# A child that allocates a fresh 144 MB XLA output buffer per call (as a train
# step's temporaries are) and prints its page faults per call and its allocator.
_CHILD = textwrap.dedent("""
    import resource
    import jax, jax.numpy as jnp
    from ddpm_jax.cpu import malloc
    x = jnp.ones((36_000_000,), jnp.float32)
    f = jax.jit(lambda a: a * 2.0)
    for _ in range(20):  # jemalloc's per-thread pools fill during the warm-up
      f(x).block_until_ready()
    flt = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    before = flt()
    for _ in range(10):
      y = f(x); y.block_until_ready(); del y
    print("FAULTS", (flt() - before) / 10, malloc.describe())
""")


def _faults(env):
  e = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "GLIBC_TUNABLES")}
  e.update(env)
  out = subprocess.run(
      [sys.executable, "-c", _CHILD], cwd=ROOT, env=e, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-2000:]
  words = out.stdout.split()
  i = words.index("FAULTS")
  return float(words[i + 1]), words[i + 2]


def _thp_available():
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return "[never]" not in f.read()
  except OSError:
    return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc")
def test_system_glibc_faults_in_every_page_of_a_fresh_buffer():
  faults, name = _faults({})
  assert name == "system" and faults >= 0.9 * PAGES


@pytest.mark.slow
@pytest.mark.skipif(not _thp_available(), reason="transparent huge pages are off")
def test_glibc_huge_pages_cut_the_faults():
  faults, name = _faults({"GLIBC_TUNABLES": malloc.GLIBC_THP_TUNABLE})
  assert name == "glibc_thp" and faults < 0.1 * PAGES  # 2 MiB pages: ~70 faults per block


@pytest.mark.slow
@pytest.mark.skipif(malloc.find_jemalloc() is None, reason="libjemalloc.so.2 is not installed")
def test_jemalloc_keeping_freed_pages_cuts_the_faults():
  faults, name = _faults(
      {"LD_PRELOAD": malloc.find_jemalloc(), "MALLOC_CONF": malloc.JEMALLOC_CONF}
  )
  # Mostly none; a call can land on a thread arena it has not used yet, so the bound is loose.
  assert name == "jemalloc" and faults < 0.25 * PAGES
