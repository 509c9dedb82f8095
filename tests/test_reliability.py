"""Reliability of training: preemption, kills, damaged checkpoints, non-finite steps.

Every run here is ``main.py --config=configs/test.py`` in a subprocess on two CPU
devices, compared bit for bit with one uninterrupted reference run (a module
fixture that checkpoints every step, so any step's state can be looked up).
The runs share a persistent XLA compilation cache: only the first one compiles
the train step (~20 s on 2 cores); loading the same executable does not change
the numbers, which the bitwise comparisons below confirm.
"""

import glob
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import pytest

from configs import test as test_config
from ddpm_jax import builders, checkpoints
from ddpm_jax.training import state as state_lib
from helpers import ENV, ROOT, complete_steps, main_command, read, start_main, wait_for_line

pytestmark = pytest.mark.slow  # every test here runs main.py in subprocesses

STEPS = 12


def _cmd(workdir, *args):
  return main_command(f"--workdir={workdir}", f"--config.training.num_train_steps={STEPS}", *args)


def _start(workdir, *args):
  """Starts main.py with stdout and stderr going to ``workdir``.log; returns (proc, log path)."""
  log = f"{workdir}.log"
  return (
      start_main(log, f"--workdir={workdir}", f"--config.training.num_train_steps={STEPS}", *args),
      log,
  )


def _run(workdir, *args, timeout=600):
  """Runs main.py to its end; returns (exit code, combined output)."""
  proc, log = _start(workdir, *args)
  rc = proc.wait(timeout=timeout)
  return rc, read(log)


# ----------------------------------------------------------------------------
# Checkpoints, read in this process
# ----------------------------------------------------------------------------

_TARGET = {}


def _target():
  if not _TARGET:
    config = test_config.get_config()
    model, tx = builders.build_model(config), builders.create_optimizer(config.optim)
    _TARGET["state"] = jax.device_get(state_lib.create_train_state(config, model, tx))
  return _TARGET["state"]


def load(workdir, step=None):
  """The state of checkpoint ``step`` (None: what resuming would restore), as numpy."""
  config = test_config.get_config()
  manager = checkpoints.create_manager(workdir, read_only=True)
  if step is None:
    state = checkpoints.restore_train_state(manager, _target(), config)
    return None if state is None else jax.device_get(state)
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
  t = _target()
  out = manager.restore(
      step,
      args=ocp.args.Composite(
          state=ocp.args.StandardRestore(
              abstract({"step": t.step, "params": t.params, "opt_state": t.opt_state, "rng": t.rng})
          ),
          ema_params=ocp.args.StandardRestore(abstract(t.ema_params)),
      ),
  )
  core = out["state"]
  return jax.device_get(
      checkpoints.TrainState(
          step=core["step"],
          params=core["params"],
          ema_params=out["ema_params"],
          opt_state=core["opt_state"],
          rng=core["rng"],
      )
  )


def assert_states_equal(a, b):
  """Step, params, EMA, optimizer state and rng agree bit for bit."""
  assert int(a.step) == int(b.step)
  for name in ("params", "ema_params", "opt_state", "rng"):
    la, lb = jax.tree.leaves(getattr(a, name)), jax.tree.leaves(getattr(b, name))
    assert len(la) == len(lb) and la, name
    for x, y in zip(la, lb):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)


def tree_equal(a, b):
  return all(
      np.array_equal(np.asarray(x), np.asarray(y))
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def all_finite(tree):
  return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted run: STEPS steps, a checkpoint after every one, all kept."""
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  rc, out = _run(
      workdir,
      "--config.training.checkpoint_every_steps=1",
      "--config.training.keep_checkpoints=100",
      "--config.training.log_every_steps=1",
  )
  assert rc == 0, out[-3000:]
  assert complete_steps(workdir) == list(range(1, STEPS + 1))
  final = load(workdir)
  assert int(final.step) == STEPS and all_finite(final.params)
  return workdir, final


# ----------------------------------------------------------------------------
# Preemption (SIGTERM) and kills (SIGKILL)
# ----------------------------------------------------------------------------


def test_sigterm_checkpoints_exits_143_and_resumes_bitwise(tmp_path, reference):
  """A preempted run is not a success (`train && sample` stops; job controllers restart it):
  it writes its checkpoint, then exits with the status a shell gives SIGTERM, 143."""
  ref_dir, ref_final = reference
  workdir = str(tmp_path / "run")
  args = ("--config.training.checkpoint_every_steps=4", "--config.training.log_every_steps=1")
  proc, log = _start(workdir, *args)
  wait_for_line(proc, log, rf"step 1/{STEPS} ")
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=300) == 143, read(log)[-3000:]
  out = read(log)
  assert "SIGTERM received: stopping after this step, once its checkpoint is written" in out
  m = re.search(r"Signal 15 received: checkpointing step (\d+) and stopping", out)
  assert m, out[-3000:]
  stopped = int(m.group(1))
  assert 1 <= stopped < STEPS, "the signal came too late to interrupt the run"
  assert f"Checkpoint at step {stopped} written" in out
  assert f"Stopped at step {stopped} of {STEPS}, checkpoint written; exit status 143" in out
  assert "Traceback" not in out and "error:" not in out
  # The checkpoint of the step it stopped at is complete and is the reference's state there.
  assert max(complete_steps(workdir)) == stopped
  assert_states_equal(load(workdir), load(ref_dir, stopped))

  rc, out = _run(workdir, *args)
  assert rc == 0, out[-3000:]
  assert f"Resumed from the checkpoint at step {stopped} " in out
  assert_states_equal(load(workdir), ref_final)


KILL_SEED = int(os.environ.get("DDPM_TEST_KILL_SEED", "1"))


def test_sigkill_during_a_checkpoint_write_then_resume_bitwise(tmp_path, reference):
  """SIGKILL while the k-th checkpoint is being written (k and a delay drawn from a seed)."""
  _, ref_final = reference
  rng = random.Random(KILL_SEED)
  k, delay = rng.randint(2, 8), rng.uniform(0.0, 0.03)
  workdir = str(tmp_path / "run")
  ckpt_dir = checkpoints.checkpoint_dir(workdir)
  # keep_checkpoints=2: old checkpoints are being deleted too while it is killed.
  args = (
      "--config.training.checkpoint_every_steps=1",
      "--config.training.keep_checkpoints=2",
      "--config.training.log_every_steps=1",
  )
  proc, log = _start(workdir, *args)
  seen = set()
  deadline = time.time() + 300
  while len(seen) < k:
    assert proc.poll() is None, (
        f"ended before the kill (rc {proc.returncode}):\n" + read(log)[-3000:]
    )
    assert time.time() < deadline, read(log)[-3000:]
    try:
      seen.update(n.split(".")[0] for n in os.listdir(ckpt_dir) if ".orbax-checkpoint-tmp" in n)
    except FileNotFoundError:
      pass
    time.sleep(0.0005)
  time.sleep(delay)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait(timeout=60) == -signal.SIGKILL
  complete = complete_steps(workdir)
  unfinished = [n for n in os.listdir(ckpt_dir) if ".orbax-checkpoint-tmp" in n]
  assert complete and max(complete) < STEPS
  newest = max(complete)
  if not any(n.split(".")[0].isdigit() and int(n.split(".")[0]) > newest for n in unfinished):
    # The kill fell just after a write: leave a half-written newer checkpoint as a kill
    # a moment earlier would have (its state item copied, no meta, no commit).
    fake = os.path.join(ckpt_dir, f"{newest + 1}.orbax-checkpoint-tmp-0")
    shutil.copytree(os.path.join(ckpt_dir, str(newest), "state"), os.path.join(fake, "state"))
    unfinished.append(os.path.basename(fake))
  print(
      f"seed {KILL_SEED}: killed during write #{k} (+{delay * 1e3:.1f} ms); complete "
      f"{complete}, unfinished {unfinished}"
  )

  rc, out = _run(workdir, *args)
  assert rc == 0, out[-3000:]
  # The newest complete checkpoint is taken; the unfinished write is neither read nor kept.
  assert f"Resumed from the checkpoint at step {newest} " in out
  assert "could not be read" not in out
  assert not [n for n in os.listdir(ckpt_dir) if ".orbax-checkpoint-tmp" in n]
  assert_states_equal(load(workdir), ref_final)


# ----------------------------------------------------------------------------
# Damaged checkpoints
# ----------------------------------------------------------------------------


def _data_files(step_dir, item):
  files = glob.glob(os.path.join(step_dir, item, "ocdbt.process_0", "d", "*"))
  return sorted(files, key=os.path.getsize, reverse=True)


def _flip_bytes(path, n=8):
  """Flips the lowest bit of n bytes in the middle of ``path``: the size stays the same."""
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    mid = len(data) // 2
    for i in range(mid, mid + n):
      data[i] ^= 0x01
    f.seek(0)
    f.write(data)


def _truncate_all(step_dir):
  for path in glob.glob(os.path.join(step_dir, "**"), recursive=True):
    if os.path.isfile(path):
      os.truncate(path, os.path.getsize(path) // 2)


def _delete_data(step_dir):
  for path in _data_files(step_dir, "ema_params"):
    os.remove(path)


CORRUPTIONS = {
    "truncated": _truncate_all,
    "data_file_deleted": _delete_data,
    # Same size, plausible bytes: orbax/tensorstore read it without complaint; the
    # checksum stored in the meta item is what catches it.
    "params_bits_flipped": lambda d: _flip_bytes(_data_files(d, "state")[0]),
    "ema_bits_flipped": lambda d: _flip_bytes(_data_files(d, "ema_params")[0]),
    "meta_overwritten": lambda d: open(os.path.join(d, "meta", "metadata"), "w").write("{garbage"),
}


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_damaged_newest_checkpoint_is_never_loaded(tmp_path, reference, how, caplog):
  ref_dir, _ = reference
  workdir = str(tmp_path / "run")
  shutil.copytree(ref_dir, workdir)
  CORRUPTIONS[how](os.path.join(checkpoints.checkpoint_dir(workdir), str(STEPS)))
  with caplog.at_level("WARNING"):
    state = load(workdir)
  assert int(state.step) == STEPS - 1
  assert_states_equal(state, load(ref_dir, STEPS - 1))
  assert f"Checkpoint at step {STEPS} could not be read" in caplog.text


def test_resume_over_a_damaged_checkpoint_replays_to_the_same_state(tmp_path, reference):
  """Bits flipped in the newest checkpoint's parameters: warning, fallback, same result."""
  ref_dir, ref_final = reference
  workdir = str(tmp_path / "run")
  shutil.copytree(ref_dir, workdir)
  ckpt_dir = checkpoints.checkpoint_dir(workdir)
  CORRUPTIONS["params_bits_flipped"](os.path.join(ckpt_dir, str(STEPS)))
  rc, out = _run(
      workdir,
      "--config.training.checkpoint_every_steps=1",
      "--config.training.keep_checkpoints=100",
  )
  assert rc == 0, out[-3000:]
  assert (
      f"Checkpoint at step {STEPS} could not be read (CorruptCheckpointError: state fails "
      "its checksum"
  ) in out
  aside = os.path.join(workdir, "checkpoints.unreadable", str(STEPS))
  assert f"moved the unreadable checkpoint of step {STEPS} to {aside}" in out
  assert f"Resumed from the checkpoint at step {STEPS - 1} " in out
  assert os.path.isdir(aside)  # kept for inspection, out of the way
  assert "Traceback" not in out and "Event loop is closed" not in out
  # Step STEPS was trained again from step STEPS - 1: the same bits as the first time.
  assert_states_equal(load(workdir), ref_final)


# ----------------------------------------------------------------------------
# Non-finite steps
# ----------------------------------------------------------------------------

POISON = ("--config.training.num_train_steps=8", "--config.training.debug_poison_step=5")


def _error_lines(out):
  return [line for line in out.splitlines() if line.startswith("error:")]


def test_nan_policy_stop_exits_1_naming_the_step_and_the_intact_checkpoint(tmp_path, reference):
  ref_dir, _ = reference
  workdir = str(tmp_path / "run")
  # checkpoint_every_steps=2, log_every_steps=2 (configs/test.py)
  rc, out = _run(workdir, *POISON, "--config.training.nan_policy=stop")
  assert rc == 1, out[-3000:]
  ckpt_dir = checkpoints.checkpoint_dir(workdir)
  # debug_poison_step counts from 0: the batch of step index 5 is the 6th update, and
  # steps are logged 1-based ("step 6/8" is the state after 6 updates).
  assert _error_lines(out) == [
      "error: stopped at step 6 after 1 non-finite step(s) in a row "
      "(training.nan_policy='stop', training.max_consecutive_nonfinite=10); "
      f"the last good checkpoint, step 4 in {ckpt_dir}, is intact"
  ]
  assert "Non-finite loss or gradients at step 6 " in out
  assert "Traceback" not in out
  assert complete_steps(workdir) == [2, 4]
  state = load(workdir)
  assert int(state.step) == 4 and all_finite(state.params) and all_finite(state.ema_params)
  assert_states_equal(state, load(ref_dir, 4))


def test_nan_policy_skip_drops_the_update_and_finishes(tmp_path, reference):
  ref_dir, _ = reference
  workdir = str(tmp_path / "run")
  rc, out = _run(
      workdir,
      *POISON,
      "--config.training.nan_policy=skip",
      "--config.training.checkpoint_every_steps=1",
      "--config.training.keep_checkpoints=100",
  )
  assert rc == 0, out[-3000:]
  assert re.search(
      r"Non-finite loss or gradients at step 6 \(loss nan, grad norm nan\): " r"update skipped\.",
      out,
  ), out[-3000:]
  assert len(re.findall("Non-finite loss", out)) == 1
  before, skipped, after = load(workdir, 5), load(workdir, 6), load(workdir, 7)
  assert_states_equal(before, load(ref_dir, 5))  # untouched up to the poisoned batch
  assert int(skipped.step) == 6
  for name in ("params", "ema_params", "opt_state", "rng"):  # the update was dropped
    assert tree_equal(getattr(skipped, name), getattr(before, name)), name
  assert not tree_equal(after.params, skipped.params)  # and training went on
  final = load(workdir)
  assert int(final.step) == 8 and all_finite(final.params) and all_finite(final.ema_params)


def test_nan_policy_skip_stops_after_max_consecutive_nonfinite(tmp_path):
  workdir = str(tmp_path / "run")
  rc, out = _run(
      workdir,
      *POISON,
      "--config.training.nan_policy=skip",
      "--config.training.max_consecutive_nonfinite=1",
  )
  assert rc == 1, out[-3000:]
  assert _error_lines(out) == [
      "error: stopped at step 6 after 1 non-finite step(s) in a row "
      "(training.nan_policy='skip', training.max_consecutive_nonfinite=1); "
      f"the last good checkpoint, step 4 in {checkpoints.checkpoint_dir(workdir)}, is intact"
  ]
  assert "Traceback" not in out
  assert all_finite(load(workdir).params)


# ----------------------------------------------------------------------------
# One writer per workdir
# ----------------------------------------------------------------------------


def test_a_second_training_into_the_same_workdir_stops_at_once(tmp_path, reference):
  """The first run holds the workdir's lock and finishes with the reference's state bit for bit;
  the second (another learning rate) stops at once with one line naming the holder."""
  _, ref_final = reference
  workdir = str(tmp_path / "run")
  first, first_log = _start(workdir, "--config.training.log_every_steps=1")
  wait_for_line(first, first_log, r"Model: ")  # past the lock
  second = subprocess.run(
      _cmd(workdir, "--config.optim.lr=2e-3"),
      cwd=ROOT,
      env={**os.environ, **ENV},
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert first.poll() is None, "the first run ended before the second was refused"
  assert second.returncode == 1, second.stderr[-3000:]
  lines = _error_lines(second.stderr)
  assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
  assert re.fullmatch(
      rf"error: --workdir={re.escape(workdir)} is in use by a train run, pid {first.pid} on "
      rf"{re.escape(socket.gethostname())} \(since [\d :-]+\); wait for it to finish, stop it, "
      r"or use another --workdir",
      lines[0],
  ), lines[0]
  assert first.wait(timeout=600) == 0, read(first_log)[-3000:]
  assert_states_equal(load(workdir), ref_final)


# ----------------------------------------------------------------------------
# Two processes (gloo on CPU): the multi-host paths
# ----------------------------------------------------------------------------


# Two processes hung in their first cross-process all-gather when every compile,
# also the small collective programs, went through the shared persistent cache
# (conftest.py): they keep jax's default, which caches only compiles of over 1 s.
MULTI_PROCESS_ENV = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1"}


def _start_pair(workdir, *args):
  """main.py as 2 processes of 2 CPU devices each, joined over gloo; returns [(proc, log)]."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  out = []
  for i in range(2):
    log = f"{workdir}.process{i}.log"
    with open(log, "w") as f:
      cmd = _cmd(
          workdir,
          *args,
          f"--coordinator_address=localhost:{port}",
          "--num_processes=2",
          f"--process_id={i}",
      )
      proc = subprocess.Popen(
          cmd,
          cwd=ROOT,
          env={**os.environ, **ENV, **MULTI_PROCESS_ENV},
          stdout=f,
          stderr=subprocess.STDOUT,
      )
    out.append((proc, log))
  return out


def _wait_pair(pair, timeout=600, status=0):
  for proc, log in pair:
    assert proc.wait(timeout=timeout) == status, read(log)[-3000:]
  return [read(log) for _, log in pair]


def test_two_processes_match_one_process_then_set_a_corrupt_checkpoint_aside_and_agree_on_sigterm(
    tmp_path,
):
  """One pair of 2-process runs (2 devices each, gloo), three behaviours:

  1. 4 steps equal 4 steps of one process with 4 devices (to float rounding);
  2. with the newest checkpoint (step 4) corrupted, both processes set it aside and resume
     from step 2;
  3. SIGTERM to process 1 alone: both stop after the same step, a log point (where the
     processes compare their stop flags: every training.log_every_steps = 2 steps), write its
     checkpoint together and exit 143 (a preempted run, not a success).
  """
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
  args = ("--config.training.num_train_steps=4", "--config.training.checkpoint_every_steps=2")
  flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
  r = subprocess.run(
      _cmd(single, *args),
      cwd=ROOT,
      env={**os.environ, **ENV, "XLA_FLAGS": flags},
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  outs = _wait_pair(_start_pair(multi, *args))
  assert "2 processes, 4 devices" in outs[0], outs[0][-3000:]
  a, b = load(single), load(multi)
  assert int(a.step) == int(b.step) == 4
  for name in ("params", "ema_params"):
    for x, y in zip(jax.tree.leaves(getattr(a, name)), jax.tree.leaves(getattr(b, name))):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5, err_msg=name)
  assert complete_steps(multi) == [2, 4]

  CORRUPTIONS["params_bits_flipped"](os.path.join(checkpoints.checkpoint_dir(multi), "4"))
  pair = _start_pair(
      multi,
      "--config.training.num_train_steps=200",
      "--config.training.checkpoint_every_steps=2",
      "--config.training.log_every_steps=2",
  )
  wait_for_line(*pair[0], r"step 4/200 ")
  pair[1][0].send_signal(signal.SIGTERM)
  outs = _wait_pair(pair, status=143)
  for out in outs:
    assert "Resumed from the checkpoint at step 2 " in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
  assert os.path.isdir(os.path.join(multi, checkpoints.UNREADABLE_DIR, "4"))
  steps = [
      re.search(
          r"(?:Signal 15 received|Another process received a stop signal): "
          r"checkpointing step (\d+)",
          out,
      )
      for out in outs
  ]
  assert all(steps), [out[-2000:] for out in outs]
  assert "Signal 15 received" in outs[1] and "Another process received" in outs[0]
  stopped = {int(m.group(1)) for m in steps}
  assert len(stopped) == 1 and 4 <= min(stopped) < 200 and min(stopped) % 2 == 0, stopped
  last = stopped.pop()
  assert complete_steps(multi)[-1] == last
  final = load(multi)
  assert int(final.step) == last and all_finite(final.params)


def test_ctrl_c_during_compilation_is_acknowledged_and_a_second_stops_at_once(tmp_path):
  """100 steps per call: a new program, compiled for seconds, during which Python's own
  handlers would not run. The first Ctrl-C is acknowledged at once, the second ends the run
  at once (status 130), before any checkpoint."""
  workdir = str(tmp_path / "run")
  proc, log = _start(
      workdir,
      "--config.training.num_train_steps=200",
      "--config.training.steps_per_call=100",
      "--config.training.multi_step_loop=scan",
      "--config.training.log_every_steps=100",
      "--config.training.checkpoint_every_steps=100",
  )
  wait_for_line(proc, log, r"Training steps 1 to 200 \(the first call compiles\)")
  proc.send_signal(signal.SIGINT)
  start = time.time()
  wait_for_line(proc, log, r"SIGINT \(Ctrl-C\) received: stopping after this step", timeout=10)
  assert time.time() - start < 10
  assert "step 100/200" not in read(log)  # still compiling or in the first call
  proc.send_signal(signal.SIGINT)
  assert proc.wait(timeout=30) == 130, read(log)[-3000:]
  out = read(log)
  assert "step 100/200" not in out, out[-3000:]
  lines = [line for line in out.splitlines() if line.startswith("error:")]
  assert lines == [
      "error: stopped at once by a second SIGINT (Ctrl-C); no checkpoint had been written yet"
  ], out[-3000:]
  assert "Traceback" not in out and "KeyboardInterrupt" not in out
  assert not os.path.isdir(os.path.join(workdir, "checkpoints")) or complete_steps(workdir) == []
