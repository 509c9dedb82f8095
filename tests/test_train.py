"""The training program: device-count independence, EMA, warm-up, clipping, resume, sampling."""

import glob
import json
import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
import pytest

from configs import test as test_config
from ddpm_jax import builders, checkpoints, config_loading, parallel
from ddpm_jax import cpu as cpu_lib
from ddpm_jax import images as image_lib
from ddpm_jax.data import order, sources
from ddpm_jax.training import loop
from ddpm_jax.training import state as state_lib
from ddpm_jax.training import step as step_lib
from helpers import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_REFERENCE = {}


def reference_run():
  """configs/test.py for 4 steps on 2 devices: (host states after each call, metrics per step).

  Computed once and shared by the tests that compare against it.
  """
  if not _REFERENCE:
    _REFERENCE["run"] = run_steps(test_config.get_config(), jax.local_devices()[:2], 4)
  return _REFERENCE["run"]


def run_steps(config, devices, num_steps):
  """Runs the real pmap step on ``devices``, ``training.steps_per_call`` steps a call.

  Returns the host states after each call and the metrics of each step.
  """
  n = config.training.steps_per_call
  model = builders.build_model(config)
  diffusion = builders.build_diffusion(config)
  tx = builders.create_optimizer(config.optim)
  state = state_lib.create_train_state(config, model, tx)
  p_state = parallel.replicate(state, devices)
  p_step = step_lib.make_p_train_step(model, diffusion, tx, config, devices=devices)
  split = sources.load_split(config.data, "train")
  images, labels = split.images, split.labels if config.model.num_classes else None
  states, metrics = [jax.device_get(state)], []
  for first in range(0, num_steps, n):
    steps = [
        order.local_batch(
            images,
            labels,
            s,
            config.training.batch_size,
            config.data.shuffle_seed,
            config.data.random_flip,
            0,
            1,
            len(devices),
        )
        for s in range(first, first + n)
    ]
    batch = jax.tree.map(lambda *xs: np.stack(xs, axis=1), *steps)  # [D, n, b, H, W, C]
    batch = next(parallel.prefetch_to_device(iter([batch]), 1, devices))
    p_state, m = p_step(p_state, batch)
    assert m["loss"].shape == (len(devices), n)  # [devices, steps]
    states.append(parallel.unreplicate(p_state))
    metrics.extend(jax.device_get(jax.tree.map(lambda x: x[0, i], m)) for i in range(n))
  return states, metrics


def assert_trees_close(a, b, rtol, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.slow
def test_trajectory_does_not_depend_on_device_count_or_micro_batches():
  """A class-conditional run with label dropout and importance-sampled t: 2 devices with 4
  micro-batches each follow the trajectory of 8 devices with one batch each (to float
  rounding), with the same t history bit for bit."""
  config = test_config.get_config()
  assert len(jax.local_devices()) >= 8
  config.model.num_classes, config.training.t_sampler = 10, "loss_aware"
  eight, m8 = run_steps(config, jax.local_devices()[:8], 3)
  config.training.grad_accum_steps = 4  # 4 per device: micro-batches of 1
  accum, ma = run_steps(config, jax.local_devices()[:2], 3)
  # Summation order differs, so float32 rounding does; Adam's m/sqrt(v) turns that into
  # update differences for near-zero gradients. 1e-5 is 1% of one step (lr 1e-3).
  assert_trees_close(eight[-1].params, accum[-1].params, rtol=1e-4, atol=1e-5)
  assert_trees_close(eight[-1].ema_params, accum[-1].ema_params, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose([m["loss"] for m in m8], [m["loss"] for m in ma], rtol=1e-5)
  # The runs did move: the comparison is not between untouched parameters.
  moved = max(
      float(np.abs(np.asarray(a) - np.asarray(b)).max())
      for a, b in zip(jax.tree.leaves(eight[0].params), jax.tree.leaves(eight[-1].params))
  )
  assert moved > 1e-4
  # Every device added the same 3 x 8 (t, loss) pairs in the global batch's order.
  assert int(np.sum(accum[-1].t_history["count"])) == 24
  np.testing.assert_array_equal(accum[-1].t_history["count"], eight[-1].t_history["count"])
  np.testing.assert_allclose(
      accum[-1].t_history["losses"], eight[-1].t_history["losses"], rtol=1e-5
  )


@pytest.mark.slow
def test_several_steps_per_call_are_the_same_steps():
  """steps_per_call=2, by lax.scan and unrolled, follows the trajectory of one step per call."""
  config = test_config.get_config()
  devices = jax.local_devices()[:2]
  ref, ref_metrics = reference_run()
  for loop in ("scan", "unroll"):
    config.training.steps_per_call, config.training.multi_step_loop = 2, loop
    states, metrics = run_steps(config, devices, 4)  # checks metrics are [devices, 2] per call
    state = states[-1]
    assert int(state.step) == 4, loop
    np.testing.assert_allclose(
        [m["loss"] for m in metrics], [m["loss"] for m in ref_metrics], rtol=1e-5, err_msg=loop
    )
    # Another program, so other float32 rounding; tolerances as in the device-count test above.
    assert_trees_close(ref[-1].params, state.params, rtol=1e-4, atol=1e-5)
    assert_trees_close(ref[-1].ema_params, state.ema_params, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "field,on_cpu,elsewhere",
    [("multi_step_loop", "unroll", "scan"), ("grad_all_reduce", "flat", "tree")],
)
def test_auto_choices_follow_the_cpu_kernels(field, on_cpu, elsewhere):
  """'auto' takes the CPU choice only with model.cpu_kernels on a CPU; an explicit value is kept."""
  config = test_config.get_config()
  choose = getattr(step_lib, field)  # step_lib.multi_step_loop / step_lib.grad_all_reduce
  assert config.training[field] == "auto" and config.model.cpu_kernels is True  # the defaults
  assert choose(config, "cpu") == on_cpu
  assert choose(config, "tpu") == elsewhere
  assert choose(config, "gpu") == elsewhere
  config.model.cpu_kernels = False
  assert choose(config, "cpu") == elsewhere  # the plain model's program is the standard one
  config.model.cpu_kernels = True
  config.training[field] = elsewhere
  assert choose(config, "cpu") == elsewhere


def test_every_config_builds_the_cpu_kernels_for_a_cpu_only():
  """model.cpu_kernels is on in configs/default.py and every config file inherits it: a program
  built for the CPU (this test's backend) traces the kernels' convolutions (``cpu.conv.conv2d``
  and ``cpu.winograd.conv3x3``, custom_jvp functions); one built for a TPU or GPU, or with the
  setting off, is the plain Flax model, which has none."""
  paths = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
  paths = [p for p in paths if "def get_config():" in open(p).read()]  # not the helpers
  assert len(paths) > 10
  for path in paths:
    assert config_loading.load_file(path).model.cpu_kernels is True, path
  config = test_config.get_config()
  assert jax.default_backend() == "cpu"
  assert cpu_lib.cpu_kernels_active(config) and cpu_lib.cpu_kernels_active(config, "cpu")
  assert not cpu_lib.cpu_kernels_active(config, "tpu")
  assert not cpu_lib.cpu_kernels_active(config, "gpu")

  def kernel_convs(model):
    x, t = jnp.zeros((2, 8, 8, 1), jnp.float32), jnp.zeros((2,), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t)
    jaxpr = str(jax.make_jaxpr(model.apply)(params, x, t))
    return re.findall(r"custom_jvp_call\[\s*name=(conv2d|conv3x3)\b", jaxpr)

  assert builders.build_model(config).cpu_kernels
  assert len(kernel_convs(builders.build_model(config))) > 10
  assert not builders.build_model(config, "tpu").cpu_kernels
  assert kernel_convs(builders.build_model(config, "tpu")) == []
  config.model.cpu_kernels = False
  assert not builders.build_model(config).cpu_kernels
  assert kernel_convs(builders.build_model(config)) == []


@pytest.mark.slow
def test_flat_and_tree_all_reduce_are_the_same_steps():
  """Averaging the gradients as one flat vector or leaf by leaf: the same sums, so the same
  trajectory bit for bit; and both equal the mean of each device's own gradient."""
  config = test_config.get_config()
  devices = jax.local_devices()[:2]
  # The reference run's: 'auto' with the CPU kernels, on by default, is 'flat'.
  assert step_lib.grad_all_reduce(config) == "flat"
  flat_states, flat_metrics = reference_run()
  config.training.grad_all_reduce = "tree"
  tree_states, tree_metrics = run_steps(config, devices, 2)
  for a, b in zip(jax.tree.leaves(tree_states[-1]), jax.tree.leaves(flat_states[2])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert [m["loss"] for m in tree_metrics] == [m["loss"] for m in flat_metrics[:2]]

  # Independent of both: pmean of a [D, n] tree by hand, as numpy's mean over devices.
  tree = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.float32([[1.5], [-2.0]])}
  mean = jax.pmap(
      lambda t: step_lib._device_mean(t, "flat"), axis_name=parallel.AXIS, devices=devices
  )(tree)
  np.testing.assert_array_equal(np.asarray(mean["a"]), np.tile(tree["a"].mean(0), (2, 1)))
  np.testing.assert_array_equal(np.asarray(mean["b"]), np.tile(tree["b"].mean(0), (2, 1)))


@pytest.mark.slow
def test_ema_warmup_and_first_step():
  config = test_config.get_config()
  states, metrics = reference_run()
  states, metrics = states[:4], metrics[:3]
  d = config.optim.ema_decay
  # Paper's warm-up: lr * min(step / warmup, 1) is 0 at the first step, so params stay put.
  assert_trees_close(states[1].params, states[0].params, rtol=0, atol=0)
  np.testing.assert_allclose(
      [m["lr"] for m in metrics], [0.0, config.optim.lr / 2, config.optim.lr], rtol=1e-6
  )
  for k in (1, 2, 3):
    want = jax.tree.map(
        lambda e, p: d * np.asarray(e, np.float64) + (1 - d) * np.asarray(p, np.float64),
        states[k - 1].ema_params,
        states[k].params,
    )
    assert_trees_close(states[k].ema_params, want, rtol=1e-6, atol=1e-7)
  assert [int(s.step) for s in states] == [0, 1, 2, 3]


def test_optimizer_is_adam_with_warmup_and_global_norm_clipping():
  config = test_config.get_config()
  config.optim.eps = 1.0  # makes Adam's update depend on the gradient's scale
  config.optim.warmup_steps = 4
  tx = builders.create_optimizer(config.optim)
  params = {"w": jnp.zeros(3), "b": jnp.zeros(2)}
  grads = {"w": jnp.array([30.0, -40.0, 0.0]), "b": jnp.array([0.0, 0.0])}  # global norm 50
  ref = optax.adam(1.0, b1=config.optim.beta1, b2=config.optim.beta2, eps=1.0)
  state, ref_state = tx.init(params), ref.init(params)
  for step in range(6):
    upd, state = tx.update(grads, state, params)
    clipped = jax.tree.map(lambda g: g * (config.optim.grad_clip / 50.0), grads)
    ref_upd, ref_state = ref.update(clipped, ref_state, params)
    lr = config.optim.lr * min(step / 4, 1.0)
    assert_trees_close(upd, jax.tree.map(lambda u: u * lr, ref_upd), rtol=1e-6, atol=1e-12)


def test_cosine_decay_after_warmup_matches_the_closed_form():
  config = test_config.get_config()
  config.optim.lr, config.optim.warmup_steps, config.optim.decay_steps = 1e-3, 10, 110
  lr_fn = builders.learning_rate_schedule(config.optim)
  steps = [0, 5, 10, 35, 60, 85, 110, 200]
  # warm-up to 1e-3 by step 10, then 1e-3 * (1 + cos(pi * (s - 10) / 100)) / 2
  want = [0.0, 5e-4, 1e-3, 1e-3 * (1 + np.sqrt(0.5)) / 2, 5e-4, 1e-3 * (1 - np.sqrt(0.5)) / 2, 0, 0]
  np.testing.assert_allclose([float(lr_fn(s)) for s in steps], want, rtol=1e-6, atol=1e-10)
  config.optim.decay_steps = 0  # the paper's constant rate after warm-up
  constant = builders.learning_rate_schedule(config.optim)
  assert [float(constant(s)) for s in (10, 110, 10**6)] == [float(np.float32(1e-3))] * 3


def _xla_flags(devices):
  """The session's XLA_FLAGS, if any, with ``devices`` CPU devices."""
  return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"


def _final_state(workdir, config=None):
  config = config or test_config.get_config()
  model = builders.build_model(config)
  tx = builders.create_optimizer(config.optim)
  target = state_lib.create_train_state(config, model, tx)
  manager = checkpoints.create_manager(workdir, read_only=True)
  return checkpoints.restore_train_state(manager, target, config)


def assert_states_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_resume_with_labels_loss_aware_t_and_the_cpu_kernels_is_bitwise_and_sample_mode(tmp_path):
  """2 + 2 steps in two processes equal 4 steps in one, bit for bit, with labels, label dropout,
  the t history (which the checkpoint carries) and the CPU kernels (the default on a CPU), in
  processes where nothing is measured. The checkpoint records the kernels: resuming without
  them is warned about by name; resuming with another t_sampler is refused by name. Then
  --mode=sample on the full run's workdir."""
  env = {"XLA_FLAGS": _xla_flags(2)}
  args = (
      "--config.model.num_classes=10",
      "--config.training.t_sampler=loss_aware",
      "--config.training.p_uncond=0.3",
  )
  full, part = str(tmp_path / "full"), str(tmp_path / "part")
  # The full run also draws a grid at step 4: 20 samples, the 10 classes in turn.
  grid = ("--config.training.sample_every_steps=4", "--config.training.num_grid_samples=20")
  for workdir, steps, extra in ((full, 4, grid), (part, 2, ()), (part, 4, ())):
    r = run_main(
        f"--workdir={workdir}", f"--config.training.num_train_steps={steps}", *args, *extra, env=env
    )
    assert r.returncode == 0, r.stderr[-3000:]
  assert "Resumed from the checkpoint at step 2" in r.stderr
  # The console shows progress and TensorBoard events are written.
  assert re.search(
      r"step 4/4 .* [\d.]+ steps/s  [\d.]+ images/s  ETA 00:00:00\n", r.stderr
  ), r.stderr[-3000:]
  assert glob.glob(os.path.join(part, "events.out.tfevents.*"))
  # One row per class, as in --mode=sample's grids: 10 rows of 2 tiles (8x8 enlarged to 32).
  with Image.open(os.path.join(full, "samples", "grid_step_4.png")) as im:
    assert im.size == (2 * 33 + 1, 10 * 33 + 1)
  config = test_config.get_config()
  config.model.num_classes, config.training.t_sampler = 10, "loss_aware"
  a, b = _final_state(full, config), _final_state(part, config)
  assert int(a.step) == int(b.step) == 4 and int(np.sum(b.t_history["count"])) == 4 * 8
  assert_states_equal(a, b)  # t_history included
  with open(os.path.join(full, "classes.json")) as f:
    assert json.load(f) == [str(d) for d in range(10)]
  with open(os.path.join(full, "checkpoints", "4", "meta", "metadata")) as f:
    assert json.load(f)["model.cpu_kernels_active"] is True
  r = run_main(f"--workdir={part}", "--config.training.num_train_steps=6", args[0], env=env)
  assert r.returncode == 1
  assert "config.training.t_sampler='loss_aware', the config says 'uniform'" in r.stderr
  # The warning comes with the restore, before any program is built: a run with nothing
  # left to train shows it without compiling the plain model.
  r = run_main(
      f"--workdir={part}",
      "--config.training.num_train_steps=4",
      *args,
      "--config.model.cpu_kernels=False",
      env=env,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert "trained with the CPU kernels on, this run has them off" in r.stderr
  assert "workdir is at step 4 >= num_train_steps 4: nothing to train" in r.stderr

  # --mode=sample writes the documented files from the EMA parameters.
  r = run_main(
      f"--workdir={full}",
      "--mode=sample",
      "--config.sampling.num_samples=6",
      "--config.sampling.batch_size=4",
      *args,
      env=env,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  npz = glob.glob(os.path.join(full, "samples", "samples_step4_*.npz"))
  png = glob.glob(os.path.join(full, "samples", "grid_step4_*.png"))
  assert len(npz) == 1 and len(png) == 1
  # The count and the batch, which change the images, are in the name.
  assert os.path.basename(npz[0]) == "samples_step4_ancestral100_seed1_n6_bs4.npz"
  assert re.search(
      r"sampled 4/6 images, [\d.]+ images/s, ETA \d\d:\d\d:\d\d\n", r.stderr
  ), r.stderr[-3000:]
  assert "Given directory is read only" not in r.stderr  # orbax's notice is not shown
  images = np.load(npz[0])["images"]
  assert images.dtype == np.uint8 and images.shape == (6, 8, 8, 1)
  assert images.std() > 0


def test_a_checkpoint_of_the_plain_model_resumes_with_the_kernels_and_a_warning(caplog):
  """Checkpoints from before the kernels were the default record model.cpu_kernels_active=False;
  resuming one with the default on a CPU goes on with the kernels and says so by name. One
  that records the same setting, or none (older still), is resumed without a word."""
  config = test_config.get_config()  # the default: kernels on, on this CPU
  with caplog.at_level(logging.WARNING):
    checkpoints._warn_if_cpu_kernels_differ({checkpoints.CPU_KERNELS_KEY: False}, config, 7)
  assert "step 7 was trained with the CPU kernels off, this run has them on" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    checkpoints._warn_if_cpu_kernels_differ({checkpoints.CPU_KERNELS_KEY: True}, config, 7)
    checkpoints._warn_if_cpu_kernels_differ({}, config, 7)
    config.model.cpu_kernels = False
    checkpoints._warn_if_cpu_kernels_differ({checkpoints.CPU_KERNELS_KEY: False}, config, 7)
  assert "CPU kernels" not in caplog.text


@pytest.mark.slow
def test_cifar10_config_runs_two_steps_on_mock_data(tmp_path, cifar_metadata_dir):
  """The paper's config and its real TFDS pipeline, on tfds.testing.mock_data."""
  import tensorflow_datasets as tfds
  from configs import cifar10

  config = cifar10.get_config()
  config.training.batch_size = 8
  config.training.num_train_steps = 2
  config.training.log_every_steps = 1
  config.training.checkpoint_every_steps = 2
  config.training.sample_every_steps = 0
  config.data.data_dir = cifar_metadata_dir
  with tfds.testing.mock_data(
      num_examples=16, data_dir=cifar_metadata_dir, policy=tfds.testing.MockPolicy.USE_FILES
  ):
    state = loop.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 2
  n = sum(x.size for x in jax.tree.leaves(state.params))
  assert n == 35_746_307
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))
  assert _final_state(str(tmp_path), config).step == 2


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_training_reduces_the_loss_in_float32_and_bfloat16(dtype):
  """A fixed evaluation of L_simple (fixed batch, t and noise) drops within 12 steps."""
  config = test_config.get_config()
  config.model.dtype = dtype
  config.model.dropout = 0.0
  states, _ = run_steps(config, jax.local_devices()[:2], 12)
  model, diffusion = builders.build_model(config), builders.build_diffusion(config)
  x0 = jnp.asarray(image_lib.scale_images(sources.load_split_array(config.data, "test")[:64]))
  t = jnp.arange(64, dtype=jnp.int32) * diffusion.num_timesteps // 64
  noise = jax.random.normal(jax.random.PRNGKey(0), x0.shape)

  def eval_loss(params):
    fn = builders.make_model_fn(model, params, train=False)
    return float(jnp.mean(diffusion.training_losses(fn, x0, t, noise)["loss"]))

  before, after = eval_loss(states[0].params), eval_loss(states[-1].params)
  # The paper's init makes the output ~0 at first, so L_simple starts at E[eps^2] = 1.
  assert abs(before - 1.0) < 0.1
  assert after < 0.8 * before, (before, after)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(states[-1].params))


def test_a_first_signal_is_acknowledged_at_once_and_a_second_stops_at_once(capsys, caplog):
  """The watcher thread acts while the main thread is busy elsewhere (here: sleeping in C)."""
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  from ddpm_jax import host  # pylint: disable=g-import-not-at-top

  exits = []
  # default_int_handler under pytest; SIG_IGN when started in the background by a shell.
  before = signal.getsignal(signal.SIGINT)
  watcher = host.SignalWatcher(exit_now=exits.append).install()
  stop = loop._StopFlag().install()  # pylint: disable=protected-access
  stop.last_checkpoint = 6
  try:
    with caplog.at_level("INFO"):
      os.kill(os.getpid(), signal.SIGINT)
      deadline = time.time() + 10
      while stop.signum is None and time.time() < deadline:
        time.sleep(0.01)
      assert stop.signum == signal.SIGINT and not exits
      assert (
          "SIGINT (Ctrl-C) received: stopping after this step, once its checkpoint is written "
          "(another signal stops at once)"
      ) in caplog.text
      os.kill(os.getpid(), signal.SIGINT)
      while not exits and time.time() < deadline:
        time.sleep(0.01)
    assert exits == [130]
    assert capsys.readouterr().err.strip() == (
        "error: stopped at once by a second SIGINT (Ctrl-C); the newest complete checkpoint, "
        "step 6, stays"
    )
  finally:
    stop.restore()
    watcher.uninstall()
  assert host.SignalWatcher.active() is None
  assert signal.getsignal(signal.SIGINT) is before  # the previous handler is back
  assert [host.exit_status(s) for s in (signal.SIGINT, signal.SIGTERM)] == [130, 143]
