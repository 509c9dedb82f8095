"""The C allocator of a CPU run: keep the memory XLA frees for the next step.

XLA:CPU allocates each call's temporary buffers (activations, gradients: about
1 GB per train step of the CIFAR-10 U-Net at batch 8) with ``malloc`` and frees
them when the call ends. glibc serves blocks over 32 MiB with ``mmap`` and
gives them back with ``munmap``, so the next step first-touches fresh pages:
about 264,000 page faults per CIFAR-10 step and 106,000 per step of the
1.1M-parameter U-Net on the 2-core development host. An allocator that keeps
freed memory avoids them; the train steps then ran 1.10x / 1.15x (glibc_thp)
and 1.17x / 1.23x (jemalloc) faster (``benchmarks/host_malloc.py``):

* ``jemalloc``: jemalloc preloaded (``LD_PRELOAD``) and told to keep the pages
  it frees (``MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1``): the process
  stays at its peak memory, which a train or sample run reaches in its first
  steps anyway. With jemalloc's default 10 s decay, part of each step's pages
  went back to the OS during the step (up to 55,000 faults per step of the
  1.1M model). Needs ``libjemalloc.so.2`` (Debian/Ubuntu: ``apt install
  libjemalloc2``).
* ``glibc_thp``: glibc's own ``malloc`` with transparent huge pages
  (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, glibc 2.35+): the blocks still go
  back each step, but come back in 2 MiB pages, 512 times fewer faults.
* ``auto``: ``jemalloc`` when the library is found, else ``glibc_thp``.
* ``system``: the process as started.

The allocator is chosen when a process starts, so :func:`relaunch_if_needed`
re-executes the current command (same interpreter, arguments and working
directory) with the environment set, once: the variable ``DDPM_JAX_MALLOC``
records what was applied, and a process that already has it (set by the
relaunch, or by a user who wants ``system``) is left alone, as is one whose
``LD_PRELOAD`` already names an allocator. This module imports nothing beyond
the standard library, so it can run before JAX.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from typing import Dict, Mapping, Optional

CHOICES = ("auto", "jemalloc", "glibc_thp", "system")
MARKER = "DDPM_JAX_MALLOC"  # set in a relaunched process to the choice applied
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
GLIBC_THP_TUNABLE = "glibc.malloc.hugetlb=1"
_JEMALLOC_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
                  "/usr/lib", "/usr/local/lib", "/opt/homebrew/lib")
_PRELOADED_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def find_jemalloc() -> Optional[str]:
  """The path of ``libjemalloc.so.2`` (or what ``ctypes.util.find_library`` finds), or None."""
  for d in _JEMALLOC_DIRS:
    path = os.path.join(d, "libjemalloc.so.2")
    if os.path.exists(path):
      return path
  name = ctypes.util.find_library("jemalloc")
  return name if name and os.path.isabs(name) else None


def environment(choice: str, environ: Mapping[str, str],
                jemalloc: Optional[str] = None) -> Dict[str, str]:
  """The variables to set for ``choice`` on top of ``environ``; {} when nothing changes.

  Args:
    choice: one of ``CHOICES``.
    environ: the current environment (only read).
    jemalloc: path of libjemalloc (``find_jemalloc()``), or None when absent.

  Raises ValueError for an unknown choice, or ``'jemalloc'`` without a library.
  The result always includes ``MARKER`` unless it is {}.
  """
  if choice not in CHOICES:
    raise ValueError(f"unknown allocator {choice!r}; expected one of {CHOICES}")
  if choice == "system" or sys.platform != "linux":
    return {}
  if any(name in environ.get("LD_PRELOAD", "") for name in _PRELOADED_ALLOCATORS):
    return {}  # the user preloaded an allocator already
  if choice == "auto":
    choice = "jemalloc" if jemalloc else "glibc_thp"
  if choice == "jemalloc":
    if not jemalloc:
      raise ValueError("libjemalloc.so.2 was not found (Debian/Ubuntu: apt install libjemalloc2)")
    preload = " ".join(p for p in (jemalloc, environ.get("LD_PRELOAD", "")) if p)
    conf = ",".join(c for c in (JEMALLOC_CONF, environ.get("MALLOC_CONF", "")) if c)
    return {"LD_PRELOAD": preload, "MALLOC_CONF": conf, MARKER: choice}
  tunables = ":".join(t for t in (environ.get("GLIBC_TUNABLES", ""), GLIBC_THP_TUNABLE) if t)
  return {"GLIBC_TUNABLES": tunables, MARKER: choice}


def relaunch_if_needed(choice: str) -> None:
  """Re-executes this process with the allocator ``choice``, unless nothing would change.

  Does nothing when ``MARKER`` is already in the environment, for ``system``,
  off Linux, or when ``LD_PRELOAD`` names an allocator. Otherwise it does not
  return: ``os.execve`` replaces the process (``sys.orig_argv``: the same
  interpreter options, script or ``-m`` module, and arguments). Call it before
  anything that must not run twice (JAX's distributed initialisation,
  writing to the workdir).
  """
  if MARKER in os.environ:
    return
  updates = environment(choice, os.environ, find_jemalloc())
  if not updates:
    return
  env = dict(os.environ, **updates)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def describe() -> str:
  """What this process runs with: 'jemalloc', 'glibc_thp' or 'system' (from its mappings)."""
  try:
    with open("/proc/self/maps") as f:
      if "libjemalloc" in f.read():
        return "jemalloc"
  except OSError:
    pass
  if "hugetlb=1" in os.environ.get("GLIBC_TUNABLES", ""):
    return "glibc_thp"
  return "system"
