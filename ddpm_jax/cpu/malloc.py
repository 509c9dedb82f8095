"""Which C allocator this process runs with, and the advice for XLA:CPU.

XLA:CPU allocates each call's temporary buffers (activations, gradients) with
``malloc`` and frees them when the call ends. glibc serves large blocks with
``mmap`` and unmaps them when freed, so each step faults its memory in again
(about 100,000 page faults per step of the 1.1M-parameter U-Net at batch 32).
An allocator chosen when the process starts avoids that (docs/cpu_kernels.md):

* ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc 2.35+): glibc with
  transparent huge pages, 512 times fewer faults;
* ``LD_PRELOAD=libjemalloc.so.2 MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1``:
  jemalloc keeping the pages it frees.

Both must be in the environment when the process starts; glibc's ``mallopt``
from inside the running process (no ``mmap``, no trimming) did not reduce the
faults, so the program does not change its allocator itself: it says which one
it runs with (:func:`describe`) and, on a CPU, how to pick a faster one.
"""

from __future__ import annotations

import ctypes.util
import os
from typing import Optional

GLIBC_THP_TUNABLE = "glibc.malloc.hugetlb=1"
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
ADVICE = (
    f"GLIBC_TUNABLES={GLIBC_THP_TUNABLE} (or LD_PRELOAD=libjemalloc.so.2 "
    f"MALLOC_CONF={JEMALLOC_CONF}) in the environment makes CPU steps 1.15x faster "
    "(docs/cpu_kernels.md)"
)
_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
_JEMALLOC_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
    "/opt/homebrew/lib",
)


def describe() -> str:
  """'jemalloc', 'tcmalloc', 'mimalloc' (loaded into this process), 'glibc_thp' or 'system'."""
  try:
    with open("/proc/self/maps") as f:
      maps = f.read()
  except OSError:
    maps = os.environ.get("LD_PRELOAD", "")
  loaded = next((name for name in _ALLOCATORS if f"lib{name}" in maps), None)
  if loaded:
    return loaded
  if GLIBC_THP_TUNABLE in os.environ.get("GLIBC_TUNABLES", ""):
    return "glibc_thp"
  return "system"


def find_jemalloc() -> Optional[str]:
  """The path of ``libjemalloc.so.2`` (or what ``ctypes.util.find_library`` finds), or None."""
  for d in _JEMALLOC_DIRS:
    path = os.path.join(d, "libjemalloc.so.2")
    if os.path.exists(path):
      return path
  name = ctypes.util.find_library("jemalloc")
  return name if name and os.path.isabs(name) else None
