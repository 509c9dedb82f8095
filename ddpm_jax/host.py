"""The process: its log, its signals, and its devices before JAX starts them (CPU count,
multi-host, allocator)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable, Optional

from absl import flags
from absl import logging
import jax

from ddpm_jax import config_validation, errors
from ddpm_jax.cpu import malloc

# orbax warns on every read-only manager, i.e. in every sampling and evaluation run.
_NOISE = ("Given directory is read only",)


class _OwnInfoOnly(logging.logging.Filter):
  """INFO lines of ddpm_jax only: orbax, TF and JAX log every file they touch."""

  def filter(self, record):
    if str(record.msg).startswith(_NOISE):
      return False
    return record.levelno >= logging.logging.WARNING or "ddpm_jax" in record.pathname


def setup_logging(workdir: Optional[str] = None) -> None:
  """Our INFO lines and everyone's warnings on stderr; with ``workdir``, also in workdir/log.INFO."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _OwnInfoOnly) for f in handler.filters):
    handler.addFilter(_OwnInfoOnly())
  flags.FLAGS.alsologtostderr = True
  if workdir is not None:
    handler.use_absl_log_file("log", workdir)


def fail(message, log: bool = False) -> None:
  """The one line ``error: ...`` on stderr, exit status 1 (main.py's way to report a UserError);
  with ``log``, also in workdir/log.INFO.

  ``message``: a string or an exception (logged with its type's name).
  """
  if log:
    log_error(f"{type(message).__name__}: {message}" if isinstance(message, Exception) else message)
  print("error: " + " ".join(str(message).split()), file=sys.stderr)
  sys.exit(1)


def log_error(message: str) -> None:
  """``message`` as an ERROR line in workdir/log.INFO only: stderr gets the one ``error:`` line.

  Before the log file is set up there is nowhere else to write, and nothing is logged.
  """
  handler = logging.get_absl_handler().python_handler
  if handler.stream is sys.stderr:
    return
  also = flags.FLAGS.alsologtostderr
  flags.FLAGS.alsologtostderr = False
  try:
    logging.error("%s", message)
  finally:
    flags.FLAGS.alsologtostderr = also


# ----------------------------------------------------------------------------
# Signals
# ----------------------------------------------------------------------------

SIGNALS = (signal.SIGINT, signal.SIGTERM)
SIGNAL_NAMES = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}


def exit_status(signum: int) -> int:
  """The status a shell reports for a process ended by ``signum``: 128 + signum (130, 143)."""
  return 128 + int(signum)


def _ignore(signum, frame):  # pylint: disable=unused-argument
  """The Python-level handler: the watcher's thread acts, nothing runs in the main thread."""


class SignalWatcher:
  """SIGINT and SIGTERM acted on at once, even while the main thread is inside XLA.

  Python runs its signal handlers in the main thread between bytecodes, so a
  signal that comes during a compilation, a device wait or a blocking connect
  would wait for it to end. Here the C-level handler's wake-up byte
  (``signal.set_wakeup_fd``) reaches a thread that calls the newest handler of
  a stack (``push``/``pop``) with the signal number. With none pushed (set-up,
  sampling, evaluation), the process runs the ``at_exit`` callbacks, prints one
  line and exits at once with 128 + signum; files are written under temporary
  names and renamed (``files.py``), so none is left half-written. Training
  pushes its own: stop after this step, and at once on a second signal.
  """

  _active: Optional["SignalWatcher"] = None

  def __init__(self, exit_now: Callable[[int], None] = os._exit):
    self._exit_now = exit_now
    self._handlers: list[Callable[[int], None]] = []
    self.at_exit: list[Callable[[], None]] = []
    self._previous = {}
    self._previous_fd = None
    self._fds = None

  @classmethod
  def active(cls) -> Optional["SignalWatcher"]:
    """The installed watcher, or None."""
    return cls._active

  def install(self) -> "SignalWatcher":
    """Takes over SIGINT and SIGTERM (from the main thread)."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    self._fds = (read_fd, write_fd)
    self._previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    for sig in SIGNALS:  # a Python-level handler is what makes the C handler write the byte
      self._previous[sig] = signal.signal(sig, _ignore)
    threading.Thread(target=self._watch, args=(read_fd,), daemon=True, name="signals").start()
    SignalWatcher._active = self
    return self

  def reclaim(self) -> None:
    """Takes the signals back from C++ code that installed its own handler since ``install``.

    ``jax.distributed.initialize`` does, for SIGTERM: its preemption notifier, which
    records the notice and lets the process run on.
    """
    for sig in SIGNALS:
      signal.signal(sig, _ignore)

  def uninstall(self) -> None:
    """Gives the signals back to the handlers they had before ``install``."""
    if SignalWatcher._active is self:
      SignalWatcher._active = None
    signal.set_wakeup_fd(self._previous_fd if self._previous_fd is not None else -1)
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
    if self._fds is not None:
      os.close(self._fds[1])  # the thread reads end-of-file and returns
      self._fds = None

  def push(self, handler: Callable[[int], None]) -> None:
    self._handlers.append(handler)

  def pop(self, handler: Callable[[int], None]) -> None:
    if handler in self._handlers:
      self._handlers.remove(handler)

  def _watch(self, read_fd: int) -> None:
    try:
      while True:
        data = os.read(read_fd, 64)
        if not data:
          return
        for signum in data:
          if signum in SIGNALS:
            (self._handlers[-1] if self._handlers else self.exit)(signum)
    finally:
      os.close(read_fd)

  def exit(self, signum: int, message: str = "") -> None:
    """Runs the ``at_exit`` callbacks, prints one line and ends the process with 128 + signum."""
    for callback in self.at_exit:
      try:
        callback()
      except Exception:  # pylint: disable=broad-except
        pass
    print(
        message
        or f"error: stopped by {SIGNAL_NAMES.get(signum, signum)}; no file was left "
        "half-written",
        file=sys.stderr,
        flush=True,
    )
    self._exit_now(exit_status(signum))


# ----------------------------------------------------------------------------
# Devices and processes
# ----------------------------------------------------------------------------

FORCED_DEVICES_FLAG = "xla_force_host_platform_device_count"


def check_process_flags(
    config, coordinator_address: Optional[str], num_processes: Optional[int], process_id
) -> None:
  """Refuses process flags that would do nothing or that cannot name a process."""
  given = [
      f"--{name}={value}"
      for name, value in (("num_processes", num_processes), ("process_id", process_id))
      if value is not None
  ]
  if given and not coordinator_address and not config.distributed.initialize:
    raise errors.DistributedError(
        f"{' and '.join(given)} do nothing without --coordinator_address=HOST:PORT (or "
        "--config.distributed.initialize=True on a TPU pod or under SLURM)"
    )
  if num_processes is not None and process_id is not None and process_id >= num_processes:
    raise errors.DistributedError(
        f"--process_id={process_id} is invalid: the {num_processes} processes of "
        f"--num_processes={num_processes} are numbered 0..{num_processes - 1}"
    )


def _initialize_distributed(
    coordinator_address: Optional[str],
    num_processes: Optional[int],
    process_id: Optional[int],
    timeout_s: int,
) -> None:
  """``jax.distributed.initialize``, waiting at most ``timeout_s`` for the other processes.

  JAX's own time-out ends the process with a C++ stack dump; this one says what
  to do in one line (printed by a watchdog thread, which ends the process with
  status 1) and is reached first.
  """
  if coordinator_address:  # e.g. several CPU processes on one machine
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  more = (num_processes or 0) - 1
  others = f"{more} more process{'' if more == 1 else 'es'}" if more > 0 else "the other processes"
  where = f"the coordinator at {coordinator_address}" if coordinator_address else "the cluster"
  logging.info(
      "Waiting for %s to join %s (at most %d s; --coordinator_timeout)", others, where, timeout_s
  )
  joined = threading.Event()

  def watchdog():
    waited = 0
    while waited < timeout_s:
      wait = min(30, timeout_s - waited)
      if joined.wait(wait):
        return
      waited += wait
      if waited < timeout_s:
        logging.info("Still waiting for %s to join %s (%d s)", others, where, waited)
    print(
        f"error: {others} did not join {where} within {timeout_s} s (--coordinator_timeout); "
        "start every process with the same --coordinator_address and --num_processes, each "
        "with its own --process_id",
        file=sys.stderr,
        flush=True,
    )
    os._exit(1)

  threading.Thread(target=watchdog, daemon=True, name="coordinator-watchdog").start()
  try:
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=timeout_s + 60,  # after the watchdog's
    )
  except (ValueError, TypeError, RuntimeError) as e:
    hint = (
        "; outside a TPU pod or SLURM, pass --coordinator_address=HOST:PORT "
        "--num_processes=N --process_id=I"
        if not coordinator_address
        else ""
    )
    raise errors.DistributedError(
        f"could not join the processes ({type(e).__name__}: {str(e).splitlines()[0]}){hint}"
    ) from None
  finally:
    joined.set()


def default_cpu_devices(config, num_processes: int = 1) -> int:
  """One CPU device per core, rounded down to a count that splits every batch of ``config``."""
  return config_validation.devices_that_fit(config, os.cpu_count() or 1, num_processes)


def device_hint(config) -> str:
  """How to change the device count, for an error about batch sizes the devices do not divide."""
  if jax.default_backend() != "cpu":
    return ""
  fit = config_validation.devices_that_fit(config, jax.local_device_count(), jax.process_count())
  if FORCED_DEVICES_FLAG in os.environ.get("XLA_FLAGS", ""):
    return (
        f"the CPU device count comes from XLA_FLAGS' --{FORCED_DEVICES_FLAG}: {fit} would "
        "divide every batch size"
    )
  return f"choose the CPU device count with --cpu_devices: {fit} divides every batch size"


def setup(
    config,
    cpu_devices: int = 0,
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    coordinator_timeout: int = 300,
) -> tuple[int, int, str]:
  """Sets up JAX's devices for ``config``; call before any JAX computation.

  Returns (devices of all processes, devices of this one, ``device_hint(config)``), the
  arguments of ``config_validation.validate`` after the config.

  On a CPU host the batch is split over ``cpu_devices`` devices (0: one per
  core, rounded down to a count that divides the batch sizes; an ``XLA_FLAGS``
  device count set from outside wins). Several processes are joined with
  ``jax.distributed.initialize`` when ``distributed.initialize`` is set (TPU
  pods, SLURM: auto-detected) or a coordinator address is given (then over
  gloo on CPU), waiting at most ``coordinator_timeout`` seconds for the others.
  Logs the C allocator, and with ``model.cpu_kernels`` on a CPU with glibc's
  default, how to start with a faster one (``cpu/malloc.py``). Process flags
  that do nothing or do not fit are a DistributedError.
  """
  check_process_flags(config, coordinator_address, num_processes, process_id)
  xla_flags = os.environ.get("XLA_FLAGS", "")
  rounded = False
  if FORCED_DEVICES_FLAG not in xla_flags:
    n = cpu_devices or default_cpu_devices(config, num_processes or 1)
    rounded = not cpu_devices and n < (os.cpu_count() or 1)
    jax.config.update("jax_num_cpu_devices", n)
  if "collective_call_terminate_timeout" not in xla_flags:
    # CPU all-reduces abort after 40 s by default, which a busy CPU host can exceed.
    os.environ["XLA_FLAGS"] = (
        xla_flags + " --xla_cpu_collective_call_terminate_timeout_seconds=3600"
    ).strip()
  if config.distributed.initialize or coordinator_address:
    _initialize_distributed(coordinator_address, num_processes, process_id, coordinator_timeout)
    if SignalWatcher.active() is not None:
      SignalWatcher.active().reclaim()
  logging.info(
      "JAX %s: %d processes, %d devices (%s); C allocator: %s",
      jax.__version__,
      jax.process_count(),
      jax.device_count(),
      jax.default_backend(),
      malloc.describe(),
  )
  if rounded and jax.default_backend() == "cpu":
    logging.info(
        "Split over %d CPU devices, not one per core (%d), so that training.batch_size=%s, "
        "sampling.batch_size=%s and eval.batch_size=%s divide evenly (--cpu_devices to choose)",
        jax.local_device_count(),
        os.cpu_count(),
        config.training.batch_size,
        config.sampling.batch_size,
        config.eval.batch_size,
    )
  if config.model.cpu_kernels and jax.default_backend() == "cpu" and malloc.describe() == "system":
    logging.info("On a CPU, %s.", malloc.ADVICE)
  return jax.device_count(), jax.local_device_count(), device_hint(config)
