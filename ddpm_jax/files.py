"""Files written whole or not at all: a temporary name in the same directory, then a rename.

A reader (or a run restarted after SIGKILL or a full disk) sees the old file or
the new one, never a truncated one; on failure the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from typing import Any, Iterator

import numpy as np

from ddpm_jax import errors

# The storage refusing a write: a one-line StorageError, not a traceback.
STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
}


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb") -> Iterator[Any]:
  """Opens a temporary file next to ``path``; on a clean exit it is synced and renamed to it."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
  try:
    with open(tmp, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    if isinstance(e, OSError):
      raise_if_storage(e, f"could not write {path}", "nothing was left half-written")
    raise


def raise_if_storage(e: OSError, doing: str, consequence: str) -> None:
  """Raises a one-line StorageError for ``e`` if the storage refused the write; else returns."""
  if e.errno in STORAGE_ERRNOS:
    raise errors.StorageError(f"{doing}: {STORAGE_ERRNOS[e.errno]}; {consequence}") from e


def write_bytes(path: str, data: bytes) -> None:
  with atomic_open(path, "wb") as f:
    f.write(data)


def write_text(path: str, text: str) -> None:
  with atomic_open(path, "w") as f:
    f.write(text)


def write_json(path: str, obj: Any) -> None:
  """``obj`` as indented JSON with sorted keys and a final newline."""
  write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def savez(path: str, **arrays) -> None:
  """``np.savez`` to exactly ``path`` (no '.npz' appended)."""
  with atomic_open(path, "wb") as f:
    np.savez(f, **arrays)
