"""The workdir: created and checked at start-up, locked by the run that trains in it, and its run records.

Only training takes the lock (``workdir/.lock``, an advisory ``fcntl.flock``
held by the chief process for the whole run): a second training run into the
same workdir stops at once, naming the holder. The kernel releases the lock
when its process ends, however it ends, so a stale lock file never blocks.
Sampling and evaluation write only files of their own and may run beside it.

``config_<mode>.json`` records the config of the last run of each mode; it is
written once the run has passed every check (so a refused run leaves the
record of the checkpoints as it was).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import time

from ddpm_jax import errors, files

LOCK_FILE = ".lock"


def prepare(workdir: str) -> list[str]:
  """Creates ``workdir``; a path that cannot be a writable directory is a WorkdirError.

  Returns the directories it created, outermost first (empty when ``workdir``
  existed), for ``remove_created``.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.WorkdirError(f"--workdir={workdir} is a file, not a directory")
  parent = os.path.dirname(os.path.abspath(workdir))
  while parent and not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if parent and not os.path.isdir(parent):
    raise errors.WorkdirError(
        f"--workdir={workdir} cannot be created: {parent} is a file, not a directory"
    )
  created = []
  path = os.path.abspath(workdir)
  while not os.path.exists(path):
    created.insert(0, path)
    path = os.path.dirname(path)
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise errors.WorkdirError(f"--workdir={workdir} cannot be created: {e.strerror or e}") from e
  if not os.access(workdir, os.W_OK):
    raise errors.WorkdirError(f"--workdir={workdir} is not writable")
  return created


def _only_logs(directory: str) -> bool:
  """Whether ``directory`` holds nothing but this program's logs (``log.*``) and the lock."""
  for _, _, names in os.walk(directory):
    if any(not (n.startswith("log.") or n == LOCK_FILE) for n in names):
      return False
  return True


def remove_created(created: list[str]) -> None:
  """Removes what ``prepare`` created for a run that failed before writing anything.

  The workdir goes only when it holds nothing but the failed run's log; then the
  parents ``prepare`` created go too, if empty. Anything else is left alone.
  """
  if not created or not os.path.isdir(created[-1]) or not _only_logs(created[-1]):
    return
  shutil.rmtree(created[-1], ignore_errors=True)
  for directory in reversed(created[:-1]):
    try:
      os.rmdir(directory)
    except OSError:
      return


class Lock:
  """The exclusive lock of a workdir, held from ``acquire`` until ``release`` or process exit."""

  def __init__(self, workdir: str, what: str = "train"):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.what = what
    self._fd = None

  def acquire(self) -> "Lock":
    """Takes the lock; raises WorkdirError naming the holder's pid and host if another has it.

    A full (or read-only) file system is a StorageError here, at start-up, rather
    than at the first checkpoint.
    """
    try:
      self._acquire()
    except OSError as e:
      files.raise_if_storage(e, f"could not take the lock {self.path}", "nothing was written")
      raise
    return self

  def _acquire(self) -> None:
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
      os.close(fd)
      raise errors.WorkdirError(
          f"--workdir={os.path.dirname(self.path)} is in use by {holder}; wait for it to "
          "finish, stop it, or use another --workdir"
      ) from None
    try:
      os.ftruncate(fd, 0)
      stamp = time.strftime("%Y-%m-%d %H:%M:%S")
      os.write(
          fd,
          f"a {self.what} run, pid {os.getpid()} on {socket.gethostname()} (since "
          f"{stamp})".encode(),
      )
    except OSError:
      os.close(fd)
      raise
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing the last descriptor releases the lock
      self._fd = None


def record_path(workdir: str, mode: str) -> str:
  return os.path.join(workdir, f"config_{mode}.json")


def write_record(config, workdir: str, mode: str) -> None:
  """Writes ``config_<mode>.json`` (the chief process only), atomically."""
  import jax  # pylint: disable=g-import-not-at-top

  if jax.process_index() == 0:
    files.write_text(record_path(workdir, mode), config.to_json_best_effort(indent=2) + "\n")
