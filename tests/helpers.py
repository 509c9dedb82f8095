"""What several test files share: the main.py runners, the checkpoint listing, the one-line check.

Every ``main.py`` a test starts runs ``configs/test.py`` on two CPU devices
with the session's persistent XLA compilation cache (conftest.py), so
programs compiled by one test are loaded, not compiled, by the next.
"""

import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_CONFIG = os.path.join(ROOT, "configs", "test.py")
# The session's XLA_FLAGS, if any, and two devices; the session's compilation cache.
ENV = {
    "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2",
    "JAX_COMPILATION_CACHE_DIR": os.environ["JAX_COMPILATION_CACHE_DIR"],
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
}


def main_command(*args, config=TEST_CONFIG):
  """``python main.py [--config=config] args...`` (no --config when ``config`` is None)."""
  return (
      [sys.executable, os.path.join(ROOT, "main.py")]
      + ([f"--config={config}"] if config else [])
      + list(args)
  )


def run_main(*args, config=TEST_CONFIG, env=None, timeout=600):
  """Runs main.py to its end in the repository; returns the ``subprocess.CompletedProcess``.

  ``env`` adds to (or replaces) ``ENV`` and the test process's environment.
  """
  return subprocess.run(
      main_command(*args, config=config),
      cwd=ROOT,
      env={**os.environ, **ENV, **(env or {})},
      capture_output=True,
      text=True,
      timeout=timeout,
  )


def run_python(code, env, cwd=ROOT, timeout=120):
  """``python -c code`` with exactly the environment ``env``; returns the CompletedProcess."""
  return subprocess.run(
      [sys.executable, "-c", code],
      cwd=cwd,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
  )


def start_main(log, *args, config=TEST_CONFIG, stdout_too=True, env=None):
  """Starts main.py with stderr (and stdout, unless ``stdout_too`` is False) going to ``log``."""
  with open(log, "w") as f:
    return subprocess.Popen(
        main_command(*args, config=config),
        cwd=ROOT,
        env={**os.environ, **ENV, **(env or {})},
        stdout=f if stdout_too else subprocess.DEVNULL,
        stderr=subprocess.STDOUT if stdout_too else f,
    )


def read(path):
  with open(path, errors="replace") as f:
    return f.read()


def wait_for_line(proc, log, pattern, timeout=300):
  """Polls ``log`` until the regex ``pattern`` matches; fails if ``proc`` ends first."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    m = re.search(pattern, read(log))
    if m:
      return m
    assert proc.poll() is None, (
        f"ended (rc {proc.returncode}) before {pattern!r}:\n" + read(log)[-3000:]
    )
    time.sleep(0.005)
  proc.kill()
  raise AssertionError(f"no {pattern!r} within {timeout} s:\n" + read(log)[-3000:])


def cli(*args, workdir=None, config="configs/test.py", timeout=600):
  """Runs main.py; returns (exit code, stderr)."""
  extra = [f"--workdir={workdir}"] if workdir else []
  r = run_main(*extra, *args, config=config, timeout=timeout)
  return r.returncode, r.stderr


def assert_one_line_error(rc, stderr, expected):
  """Exit 1, exactly one 'error:' line equal to ``expected`` (str) or matching it (Pattern)."""
  assert rc == 1, stderr[-3000:]
  lines = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1, stderr[-3000:]
  if isinstance(expected, re.Pattern):
    assert expected.fullmatch(lines[0]), lines[0]
  else:
    assert lines[0] == expected
  assert "Traceback" not in stderr and "Event loop is closed" not in stderr, stderr[-3000:]
  assert stderr.count(lines[0][len("error: ") :]) == 1, stderr[-3000:]  # not logged as well
  return lines[0]


def complete_steps(workdir):
  """Steps with a finished (renamed) checkpoint directory in ``workdir``."""
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit() and os.path.isdir(os.path.join(d, n)))


def save_checkpoint(workdir, state, step, config=None):
  """Writes ``state`` as the checkpoint of ``step`` in ``workdir``; returns the manager."""
  from configs import test as test_config  # pylint: disable=g-import-not-at-top
  from ddpm_jax import checkpoints  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  manager = checkpoints.create_manager(workdir)
  checkpoints.save(manager, state.replace(step=np.int32(step)), config or test_config.get_config())
  return manager


def write_images(folder, good, bad):
  """``good`` random 8x8 grey PNGs and ``bad`` files named .png that are not images, in ``folder``."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(0)
  for i in range(good):
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(
        os.path.join(folder, f"good{i}.png")
    )
  for i in range(bad):
    with open(os.path.join(folder, f"bad{i}.png"), "wb") as f:
      f.write(b"\x89PNG\r\n\x1a\n this is not an image")
