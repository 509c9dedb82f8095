"""The training loop (``--mode=train``): resume, step, log, checkpoint, sample grids, stop cleanly.

Writes to the workdir: ``checkpoints/`` (orbax), ``events.*`` (TensorBoard: loss,
mse, vb, grad_norm, lr, steps/s, images/s, sample grids) and
``samples/grid_step_*.png`` (EMA samples every ``training.sample_every_steps``).
SIGTERM/SIGINT are acknowledged at once; the current call finishes, its
checkpoint is written and ``errors.Stopped`` carries the exit status a shell
expects (143, 130); a second signal stops at once.
"""

from __future__ import annotations

import os
import signal

from absl import logging
import jax
import ml_collections
import numpy as np

from ddpm_jax import builders, checkpoints, errors, files, host, images, parallel, progress
from ddpm_jax import sample, summaries, workdirs
from ddpm_jax.data import pipeline
from ddpm_jax.training import state as state_lib
from ddpm_jax.training import step as step_lib
from ddpm_jax.checkpoints import TrainState


class _StopFlag:
  """Set by SIGTERM/SIGINT: say so at once, finish the current call, checkpoint, stop.

  The signals reach a thread (``host.SignalWatcher``), so the first one is
  acknowledged even while the main thread compiles or waits on the devices; a
  second one ends the process at once with 128 + signum. The newest complete
  checkpoint stays either way (orbax renames a checkpoint only once it is whole).
  """

  def __init__(self):
    self.signum = None
    self.last_checkpoint = None  # step of the newest complete checkpoint, for the messages
    self._watcher = None
    self._own_watcher = False

  def install(self):
    self._watcher = host.SignalWatcher.active()
    if self._watcher is None:  # not started by main.py (e.g. a test calling the loop)
      self._watcher, self._own_watcher = host.SignalWatcher().install(), True
    else:
      self._watcher.reclaim()  # from handlers installed since, e.g. JAX's preemption notifier
    self._watcher.push(self._handle)
    return self

  def _handle(self, signum):  # on the watcher's thread
    name = host.SIGNAL_NAMES.get(signum, f"signal {signum}")
    if self.signum is None:
      self.signum = signum
      logging.info(
          "%s received: stopping after this step, once its checkpoint is written (another "
          "signal stops at once)",
          name,
      )
      return
    kept = (
        f"the newest complete checkpoint, step {self.last_checkpoint}, stays"
        if self.last_checkpoint is not None
        else "no checkpoint had been written yet"
    )
    self._watcher.exit(signum, f"error: stopped at once by a second {name}; {kept}")

  def restore(self):
    self._watcher.pop(self._handle)
    if self._own_watcher:
      self._watcher.uninstall()

  def should_stop(self, agree: bool = True) -> bool:
    """Whether to stop after this call: at once on a signal, or together with the other processes.

    Several processes compare their flags only where ``agree`` is True (the
    loop's log points, every ``training.log_every_steps``, where it waits for
    the device anyway to read the metrics), so the calls in between never wait
    on a cross-process collective; a signal to any process stops all of them
    at the next log point, after the same step.
    """
    local = self.signum is not None
    if jax.process_count() == 1:
      return local
    if not agree:
      return False
    return parallel.any_process(local)


def _stacked_batches(iterator, n: int, start_step: int, poison_step: int = -1):
  """Groups n consecutive step batches (leaves [D, b, ...]) into one (leaves [D, n, b, ...]).

  The images of step ``poison_step`` (counting steps from 0) are replaced by NaN,
  to exercise the non-finite guards (``training.debug_poison_step``).
  """
  step = start_step
  while True:
    group = [next(iterator) for _ in range(n)]
    for i in range(n):
      if step + i == poison_step:
        group[i] = dict(group[i], image=np.full_like(group[i]["image"], np.nan))
    step += n
    yield jax.tree.map(lambda *xs: np.stack(xs, axis=1), *group)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains to ``training.num_train_steps``, resuming from ``workdir`` if it holds a checkpoint.

  Returns the final state (host arrays).
  """
  tcfg = config.training
  data = pipeline.load_train_data(config.data, config.model.num_classes)  # before the model
  model = builders.build_model(config)
  diffusion = builders.build_diffusion(config)
  tx = builders.create_optimizer(config.optim)
  manager = checkpoints.create_manager(workdir, keep=tcfg.keep_checkpoints)
  state = state_lib.create_train_state(config, model, tx)
  restored = checkpoints.restore_train_state(manager, state, config)
  if restored is not None:
    state = restored
    logging.info("Resumed from the checkpoint at step %d in %s", int(state.step), workdir)
  start_step = int(state.step)
  if start_step >= tcfg.num_train_steps:
    logging.info(
        "workdir is at step %d >= num_train_steps %d: nothing to train",
        start_step,
        tcfg.num_train_steps,
    )
    return state
  batches = pipeline.create_train_iterator(
      config.data,
      tcfg.batch_size,
      start_step=start_step,
      num_classes=config.model.num_classes,
      data=data,
  )
  workdirs.write_record(config, workdir, "train")
  if (
      config.model.num_classes
      and data is not None
      and data.class_names
      and jax.process_index() == 0
  ):
    files.write_json(os.path.join(workdir, "classes.json"), list(data.class_names))
  n = tcfg.steps_per_call
  logging.info(
      "Model: %s parameters%s; %s; %d local devices, %d processes",
      f"{sum(x.size for x in jax.tree.leaves(state.params)):,}",
      " (CPU kernels on)" if model.cpu_kernels else " (CPU kernels off: the plain model)",
      diffusion,
      jax.local_device_count(),
      jax.process_count(),
  )

  is_chief = jax.process_index() == 0
  writer = summaries.SummaryWriter(workdir) if is_chief else None
  p_state = parallel.replicate(state)
  del state
  p_step = step_lib.make_p_train_step(model, diffusion, tx, config)
  batches = parallel.prefetch_to_device(
      _stacked_batches(batches, n, start_step, tcfg.debug_poison_step), tcfg.prefetch
  )

  sample_fn, per_device = None, 0
  if tcfg.sample_every_steps:
    per_device = -(-tcfg.num_grid_samples // jax.local_device_count())
    sample_fn = sample.make_p_sample(
        model, builders.build_sampling_diffusion(config), config, per_device
    )

  stop = _StopFlag().install()
  logging.info(
      "Training steps %d to %d (the first call compiles); SIGTERM or Ctrl-C stops after the "
      "current step, with a checkpoint",
      start_step + 1,
      tcfg.num_train_steps,
  )
  step = start_step
  last_good = stop.last_checkpoint = manager.latest_step()
  bad_in_a_row = 0
  unread = []  # device metrics not yet read back: reading syncs, so it waits for log points
  steps = progress.Progress(tcfg.num_train_steps, "steps", done=step)  # rate since the last log

  def read_metrics():
    """Reads the unread metrics, stops on non-finite steps as configured, returns means."""
    nonlocal bad_in_a_row, unread
    if not unread:
      return None
    # Copied whole and indexed on the host: x[0] on the device would dispatch one
    # small program per metric and step on every device behind the queued steps.
    got = [(first, jax.tree.map(lambda x: x[0], m)) for first, m in jax.device_get(unread)]
    unread = []
    sums, count = {}, 0
    for first, m in got:
      for i, bad in enumerate(m["nonfinite"]):
        bad_in_a_row = bad_in_a_row + 1 if bad else 0
        if not bad:
          continue
        logging.warning(
            "Non-finite loss or gradients at step %d (loss %s, grad norm %s): " "update skipped.",
            first + i + 1,
            m["loss"][i],
            m["grad_norm"][i],
        )
        if tcfg.nan_policy == "stop" or bad_in_a_row >= tcfg.max_consecutive_nonfinite:
          raise errors.NonFiniteError(
              f"stopped at step {first + i + 1} after {bad_in_a_row} non-finite step(s) in a "
              f"row (training.nan_policy={tcfg.nan_policy!r}, "
              f"training.max_consecutive_nonfinite={tcfg.max_consecutive_nonfinite}); "
              + (
                  f"the last good checkpoint, step {last_good} in {manager.directory}, is intact"
                  if last_good is not None
                  else "no checkpoint had been written yet"
              )
          )
      for k, v in m.items():
        sums[k] = sums.get(k, 0.0) + float(np.sum(v))
      count += len(m["loss"])
    means = {k: v / count for k, v in sums.items()}
    means["lr"] = float(got[-1][1]["lr"][-1])
    return means

  def crossed(every: int) -> bool:
    return bool(every) and step // every > (step - n) // every

  def save():
    read_metrics()  # never checkpoint past a step that should have stopped the run
    if checkpoints.save(manager, parallel.unreplicate(p_state), config):
      logging.info("Checkpoint at step %d written to %s", step, manager.directory)

  try:
    while step < tcfg.num_train_steps:
      p_state, metrics = p_step(p_state, next(batches))
      unread.append((step, metrics))
      step += n
      logged = crossed(tcfg.log_every_steps) or step >= tcfg.num_train_steps
      if logged:
        means = read_metrics()
        report = steps.report(step)
        rate = report.rate
        logging.info(
            "step %d/%d  loss %.4f  grad_norm %.3f  lr %.2e  %.2f steps/s  "
            "%.1f images/s  ETA %s",
            step,
            tcfg.num_train_steps,
            means["loss"],
            means["grad_norm"],
            means["lr"],
            rate,
            rate * tcfg.batch_size,
            progress.format_duration(report.eta_s),
        )
        if writer is not None:
          for k, v in means.items():
            writer.scalar(f"train/{k}", v, step)
          writer.scalar("train/steps_per_sec", rate, step)
          writer.scalar("train/images_per_sec", rate * tcfg.batch_size, step)
          writer.flush()
        steps.restart(step)
      if crossed(tcfg.checkpoint_every_steps) and step < tcfg.num_train_steps:
        save()
        last_good = stop.last_checkpoint = step
      if sample_fn is not None and crossed(tcfg.sample_every_steps):
        imgs, labels = sample.generate(
            sample_fn,
            p_state.ema_params,
            tcfg.num_grid_samples,
            per_call=per_device * jax.local_device_count(),
            seed=config.sampling.seed,
            log_progress=False,
            labels=sample.labels_in_turn(config),
        )
        if is_chief:
          path = os.path.join(workdir, "samples", f"grid_step_{step}.png")
          ncol = None
          if labels is not None:  # one row per class, as --mode=sample's grids
            imgs, ncol = sample.class_rows(imgs, labels)
          images.save_grid(path, imgs, ncol)
          writer.image("samples/ema", images.display_grid(imgs, ncol), step)
        steps.restart(step)  # sampling time is not training time
      if stop.should_stop(agree=logged):
        if stop.signum is not None:
          logging.info("Signal %s received: checkpointing step %d and stopping.", stop.signum, step)
        else:
          logging.info(
              "Another process received a stop signal: checkpointing step %d and stopping.", step
          )
        break
    save()
    if step < tcfg.num_train_steps:  # stopped by a signal
      # A stopped run is not a success: `train && sample` must not go on, and job
      # controllers restart a preempted run only when it does not report one.
      status = host.exit_status(stop.signum or signal.SIGTERM)
      logging.info(
          "Stopped at step %d of %d, checkpoint written; exit status %d (run the same "
          "command to resume)",
          step,
          tcfg.num_train_steps,
          status,
      )
      raise errors.Stopped(f"stopped at step {step}", status)
    return parallel.unreplicate(p_state)
  finally:
    stop.restore()
    if writer is not None:
      writer.close()
