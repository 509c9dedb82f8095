"""The process: its log, and its devices before JAX starts them (CPU count, multi-host, allocator)."""

from __future__ import annotations

import os
import sys
from typing import Optional

from absl import flags
from absl import logging
import jax

from ddpm_jax.cpu import malloc


def fail(message) -> None:
  """The one line ``error: ...`` on stderr, exit status 1 (main.py's way to report a UserError)."""
  print("error: " + " ".join(str(message).split()), file=sys.stderr)
  sys.exit(1)


class _OwnInfoOnly(logging.logging.Filter):
  """INFO lines of ddpm_jax only: orbax, TF and JAX log every file they touch."""

  def filter(self, record):
    return record.levelno >= logging.logging.WARNING or "ddpm_jax" in record.pathname


def setup_logging(workdir: Optional[str] = None) -> None:
  """Our INFO lines and everyone's warnings on stderr; with ``workdir``, also in workdir/log.INFO."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _OwnInfoOnly) for f in handler.filters):
    handler.addFilter(_OwnInfoOnly())
  flags.FLAGS.alsologtostderr = True
  if workdir is not None:
    handler.use_absl_log_file("log", workdir)


def setup(
    config,
    cpu_devices: int = 0,
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
) -> tuple[int, int]:
  """Sets up JAX's devices for ``config``; call before any JAX computation.

  Returns (devices of all processes, devices of this one).

  On a CPU host the batch is split over ``cpu_devices`` devices (0: one per
  core; an ``XLA_FLAGS`` device count set from outside wins). Several processes
  are joined with ``jax.distributed.initialize`` when ``distributed.initialize``
  is set (TPU pods, SLURM: auto-detected) or a coordinator address is given
  (then over gloo on CPU). Logs the C allocator, and with ``model.cpu_kernels``
  on a CPU with glibc's default, how to start with a faster one (``cpu/malloc.py``).
  """
  xla_flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in xla_flags:
    jax.config.update("jax_num_cpu_devices", cpu_devices or os.cpu_count() or 1)
  if "collective_call_terminate_timeout" not in xla_flags:
    # CPU all-reduces abort after 40 s by default, which a busy CPU host can exceed.
    os.environ["XLA_FLAGS"] = (
        xla_flags + " --xla_cpu_collective_call_terminate_timeout_seconds=3600"
    ).strip()
  if config.distributed.initialize or coordinator_address:
    if coordinator_address:  # e.g. several CPU processes on one machine
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
  logging.info(
      "JAX %s: %d processes, %d devices (%s); C allocator: %s",
      jax.__version__,
      jax.process_count(),
      jax.device_count(),
      jax.default_backend(),
      malloc.describe(),
  )
  if config.model.cpu_kernels and jax.default_backend() == "cpu" and malloc.describe() == "system":
    logging.info("On a CPU, %s.", malloc.ADVICE)
  return jax.device_count(), jax.local_device_count()
