"""Errors a user can fix: main.py prints each as one line and exits with status 1.

Everything else (a bug, an unexpected library failure) keeps its traceback. The
library raises these where it knows the cause is the input: the config, the
data, the workdir, the checkpoints, the disk, or a run that diverged.
"""


class UserError(Exception):
  """A problem the user can fix; the message is one line saying what and how."""


class ConfigError(UserError, ValueError):
  """An invalid config file, field or value; the message names the field."""


class DataError(UserError, ValueError):
  """Data that cannot be used: an empty split, no decodable image, a bad label."""


class DataNotPreparedError(UserError):
  """A TFDS data set is not prepared on disk (nothing is downloaded)."""


class DistributedError(UserError):
  """Several processes cannot be joined: process flags that do not fit, no cluster, a time-out."""


class WorkdirError(UserError):
  """The workdir cannot be used: not a directory, not writable, or in use by another run."""


class NoCheckpointError(UserError, FileNotFoundError):
  """The workdir holds no checkpoint (or not the requested step)."""


class CheckpointMismatchError(UserError, ValueError):
  """The workdir holds a checkpoint of another architecture or diffusion process."""


class CorruptCheckpointError(UserError, ValueError):
  """A checkpoint's files do not hold what was written (failed checksum, unreadable)."""


class StorageError(UserError, OSError):
  """The storage refused a write (full disk, quota, read-only file system)."""


class NonFiniteError(UserError, RuntimeError):
  """Training stopped on non-finite losses or gradients."""


class WeightsError(UserError, ValueError):
  """Pretrained weights (Inception-v3 for FID, released DDPM models) missing, unreadable or unfit."""


class WeightsNotFoundError(WeightsError, FileNotFoundError):
  """A file or folder of pretrained weights is not on disk."""


class Stopped(SystemExit):
  """Training stopped by a signal after writing its checkpoint: the process exits with ``status``.

  Not a UserError: nothing went wrong, but the run did not finish, so a shell
  (``train && sample``) or a job controller must not take it for a success. A
  SystemExit whose code is the status (130, 143), so it ends the program
  without a traceback wherever it is not caught.
  """

  def __init__(self, message: str, status: int):
    super().__init__(status)
    self.message = message
    self.status = status

  def __str__(self) -> str:
    return self.message
