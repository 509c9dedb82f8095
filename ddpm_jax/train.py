"""Training: the train state, the optimizer, and the pmap-ed step of Algorithm 1.

The step is written for one device and mapped over all of them with
``jax.pmap(axis_name='batch')``; gradients and metrics are averaged with
``lax.pmean``. Each example's randomness (its timestep t, its noise eps and its
dropout mask) is drawn from ``fold_in(fold_in(rng, step), global_index)``, where
the global index is the example's row in the global batch. Together with the
step-derived data order of the input pipeline this makes the trajectory
independent of how the batch is split over devices, hosts and micro-batches.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable

from absl import logging
import flax
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import ml_collections
import numpy as np
import optax

from ddpm_jax import image_utils, input_pipeline, schedules
from ddpm_jax.diffusion import GaussianDiffusion, respaced
from ddpm_jax.models.unet import UNet

AXIS = "batch"


@flax.struct.dataclass
class TrainState:
  """Everything that determines the rest of a run (saved in every checkpoint).

  step: int32 scalar, optimiser steps taken.
  params: the network parameters (float32).
  ema_params: their exponential moving average (used for sampling).
  opt_state: the optax state (Adam moments, step counts).
  rng: the run's base PRNG key; step and example index are folded into it.
  """
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array


# ----------------------------------------------------------------------------
# Construction from a config
# ----------------------------------------------------------------------------

def get_betas(config: ml_collections.ConfigDict) -> np.ndarray:
  """The float64 schedule of ``config.diffusion``."""
  d = config.diffusion
  return schedules.get_beta_schedule(d.beta_schedule, d.num_timesteps, d.beta_start, d.beta_end)


def _diffusion_kwargs(config):
  d = config.diffusion
  return dict(model_mean_type=d.model_mean_type, model_var_type=d.model_var_type,
              loss_type=d.loss_type)


def build_diffusion(config: ml_collections.ConfigDict) -> GaussianDiffusion:
  """The training process (all T steps)."""
  return GaussianDiffusion(get_betas(config), **_diffusion_kwargs(config))


def build_sampling_diffusion(config: ml_collections.ConfigDict) -> GaussianDiffusion:
  """The process the sampler walks: all T steps, or a respaced subset."""
  betas = get_betas(config)
  s = config.sampling
  if not s.num_steps or s.num_steps == len(betas):
    return GaussianDiffusion(betas, **_diffusion_kwargs(config))
  spec = f"ddim{s.num_steps}" if s.sampler == "ddim" else str(s.num_steps)
  return respaced(betas, schedules.space_timesteps(len(betas), spec), **_diffusion_kwargs(config))


def build_model(config: ml_collections.ConfigDict) -> UNet:
  """The U-Net of ``config.model``; 2x channels out when the variance is learned."""
  m = config.model
  learned = config.diffusion.model_var_type in ("learned", "learned_range")
  return UNet(ch=m.ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
              attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout,
              resamp_with_conv=m.resamp_with_conv,
              out_ch=config.data.channels * (2 if learned else 1),
              num_classes=m.num_classes or None,
              dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16}[m.dtype],
              remat=m.remat)


def learning_rate_schedule(optim: ml_collections.ConfigDict) -> Callable[[Any], Any]:
  """lr * min(step / warmup, 1), as the paper's code (0 at the first step)."""
  if optim.warmup_steps <= 0:
    return lambda count: jnp.asarray(optim.lr, jnp.float32)
  return lambda count: optim.lr * jnp.minimum(count / optim.warmup_steps, 1.0)


def create_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam with linear warm-up and global-norm clipping (paper: 2e-4, 5000, 1.0)."""
  parts = [optax.clip_by_global_norm(optim.grad_clip)] if optim.grad_clip > 0 else []
  parts += [optax.scale_by_adam(b1=optim.beta1, b2=optim.beta2, eps=optim.eps),
            optax.scale_by_learning_rate(learning_rate_schedule(optim))]
  return optax.chain(*parts)


def image_shape(config) -> tuple[int, int, int]:
  return (config.data.image_size, config.data.image_size, config.data.channels)


def init_params(model: UNet, config, rng: jax.Array):
  """Parameters of ``model`` for ``config``'s image shape (float32)."""
  x = jnp.zeros((1,) + image_shape(config), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  y = jnp.zeros((1,), jnp.int32) if config.model.num_classes else None
  return model.init({"params": rng}, x, t, y, train=False)["params"]


def create_train_state(config, model: UNet, tx: optax.GradientTransformation) -> TrainState:
  """A fresh state on the host: params from ``training.seed``, EMA = params."""
  rng = jax.random.PRNGKey(config.training.seed)
  init_rng, run_rng = jax.random.split(rng)
  params = jax.jit(functools.partial(init_params, model, config))(init_rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                    rng=run_rng)


def replicate(tree, devices=None):
  """One copy per local device (or per device of ``devices``), on a mesh named like the pmap axis.

  The name matters: jax 0.10 treats a mesh with another axis name as another
  sharding and re-lays the state out on every call (measured: 2 ms -> 4 s).

  Each leaf goes to the host once and from there to each device, as that
  device's shard of a ``[D, ...]`` array (``flax.jax_utils.replicate``'s
  layout). Flax's stacks D copies on the first device and splits them, which
  compiles a stack per leaf shape: 15 s against 1.1 s for the CIFAR-10 train
  state on 8 CPU devices.
  """
  devices = list(devices or jax.local_devices())
  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS,)),
                                        jax.sharding.PartitionSpec(AXIS))

  def one(x):
    x = np.asarray(x)[None]
    return jax.make_array_from_single_device_arrays(
        (len(devices),) + x.shape[1:], sharding, [jax.device_put(x, d) for d in devices])
  return jax.tree_util.tree_map(one, tree)


def unreplicate(tree):
  """The first local device's copy, as numpy arrays on the host (works multi-process)."""
  def first(x):
    if not isinstance(x, jax.Array):
      return np.asarray(x)[0]
    shard = np.asarray(x.addressable_shards[0].data)
    return shard[0] if shard.ndim == x.ndim else shard  # the shard may keep the device axis
  return jax.tree.map(first, tree)


# ----------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------

def example_randomness(rng, step, global_index, num_timesteps: int, shape):
  """Per-example (t, noise, dropout key) from the step and the example's global index.

  Args: rng: base key; step: int32 scalar; global_index: [b] int32;
    shape: (H, W, C) of one example.
  Returns: t [b] int32 uniform in [0, T); noise [b, H, W, C] N(0, 1);
    dropout keys [b] (one key per example).
  """
  step_key = jax.random.fold_in(rng, step)

  def one(i):
    k_t, k_noise, k_drop = jax.random.split(jax.random.fold_in(step_key, i), 3)
    t = jax.random.randint(k_t, (), 0, num_timesteps, dtype=jnp.int32)
    return t, jax.random.normal(k_noise, shape, jnp.float32), k_drop
  return jax.vmap(one)(global_index)


def make_model_fn(model: UNet, params, train: bool, dropout_keys=None, labels=None):
  """model_fn(x_t [B, H, W, C], t [B]) -> output, for the diffusion core.

  At train time each example's dropout masks come from its own key
  (``dropout_keys`` [B]), not from its place in a batch.
  """
  if not (train and model.dropout > 0):
    return lambda x, t: model.apply({"params": params}, x, t, labels, train=False)
  return lambda x, t: model.apply({"params": params}, x, t, labels, train=True,
                                  dropout_keys=dropout_keys)


def apply_update_if(finite, state: TrainState, grads, tx: optax.GradientTransformation,
                    ema_decay: float) -> TrainState:
  """The optimiser and EMA update of ``state`` when ``finite``, else ``state`` unchanged.

  Args: finite: bool scalar, the same on every device; grads: a tree like
    ``state.params`` (already averaged over devices); ema_decay: the EMA's decay.
  The step counter is left to the caller.

  A branch, not a select of new and old values: with the state donated, a
  select made XLA copy every old parameter, Adam moment and EMA leaf before
  overwriting it in place (about 1,300 copies for the CIFAR-10 U-Net; see
  ``benchmarks/optimizer_update.py``).
  """
  def update(s: TrainState) -> TrainState:
    updates, new_opt_state = tx.update(grads, s.opt_state, s.params)
    new_params = optax.apply_updates(s.params, updates)
    new_ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
                           s.ema_params, new_params)
    return s.replace(params=new_params, ema_params=new_ema, opt_state=new_opt_state)

  return jax.lax.cond(finite, update, lambda s: s, state)


def grad_all_reduce(config, platform: str | None = None) -> str:
  """'flat' or 'tree': how the train step averages gradients over devices.

  'flat' concatenates every gradient (and the loss terms) into one float32
  vector for a single ``lax.pmean``; 'tree' pmeans the tree, one buffer per
  leaf, and leaves combining them to XLA. 'auto' is 'flat' on CPU and 'tree'
  elsewhere. For the 1.1M-parameter U-Net on 2 CPU devices (jax 0.10.2), the
  tree's all-reduce (~130 buffers, 4.4 MB) took about 18 ms on the device that
  reached it last, the flat one about 1 ms (a ``jax.profiler`` trace), and the
  step went 532 -> 508 ms (``benchmarks/config_ab.py
  --field=training.grad_all_reduce --values=tree,flat``). On accelerators XLA's
  all-reduce combiner already batches the buffers, and flattening would add two
  copies.
  """
  return _auto_by_platform(config.training.grad_all_reduce, platform, on_cpu="flat",
                           elsewhere="tree")


def _auto_by_platform(choice: str, platform: str | None, on_cpu: str, elsewhere: str) -> str:
  """``choice``, with 'auto' resolved for ``platform`` (default: JAX's backend)."""
  if choice != "auto":
    return choice
  return on_cpu if (platform or jax.default_backend()) == "cpu" else elsewhere


def _device_mean(tree: Any, how: str) -> Any:
  """``lax.pmean`` of a tree of float32 arrays over the devices, per leaf or as one vector."""
  if how == "tree":
    return jax.lax.pmean(tree, AXIS)
  flat, unflatten = ravel_pytree(tree)
  return unflatten(jax.lax.pmean(flat, AXIS))


def make_train_step(model: UNet, diffusion: GaussianDiffusion, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict, platform: str | None = None):
  """Returns train_step(state, x0) -> (state, metrics) for one device, inside pmap.

  ``platform`` ('cpu', 'gpu', 'tpu'; default: JAX's) picks ``grad_all_reduce``'s 'auto'.

  x0: [b, H, W, C] in [-1, 1], this device's share of the global batch.
  metrics: dict of float32 scalars averaged over devices: loss, mse, vb,
    grad_norm (before clipping), lr, nonfinite (1 if the update was dropped).
  """
  accum = config.training.grad_accum_steps
  all_reduce = grad_all_reduce(config, platform)
  ema_decay = config.optim.ema_decay
  lr_fn = learning_rate_schedule(config.optim)
  T = diffusion.num_timesteps

  def loss_fn(params, x0, global_index, step, rng):
    t, noise, drop_keys = example_randomness(rng, step, global_index, T, x0.shape[1:])
    model_fn = make_model_fn(model, params, train=True, dropout_keys=drop_keys)
    losses = diffusion.training_losses(model_fn, x0, t, noise)
    return jnp.mean(losses["loss"]), {k: jnp.mean(v) for k, v in losses.items()}

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, x0):
    b = x0.shape[0]
    if b % accum:
      raise ValueError(f"training.grad_accum_steps={accum} must divide the per-device batch {b}")
    mb = b // accum
    first = jax.lax.axis_index(AXIS) * b
    micro = x0.reshape((accum, mb) + x0.shape[1:])

    def one_micro(carry, i):
      index = first + i * mb + jnp.arange(mb, dtype=jnp.int32)
      (_, aux), grads = grad_fn(state.params, micro[i], index, state.step, state.rng)
      g_sum, aux_sum = carry
      return (jax.tree.map(jnp.add, g_sum, grads), jax.tree.map(jnp.add, aux_sum, aux)), None

    if accum == 1:  # XLA:CPU runs loop bodies several times slower: no loop unless needed
      (_, aux), grads = grad_fn(state.params, x0, first + jnp.arange(b, dtype=jnp.int32),
                                state.step, state.rng)
    else:
      zeros_g = jax.tree.map(jnp.zeros_like, state.params)
      zeros_aux = {k: jnp.zeros((), jnp.float32) for k in ("loss", "mse", "vb")}
      (grads, aux), _ = jax.lax.scan(one_micro, (zeros_g, zeros_aux), jnp.arange(accum))
      grads = jax.tree.map(lambda g: g / accum, grads)
      aux = {k: v / accum for k, v in aux.items()}
    grads, aux = _device_mean((grads, aux), all_reduce)

    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(aux["loss"]) & jnp.isfinite(grad_norm)

    new_state = apply_update_if(finite, state, grads, tx, ema_decay)
    new_state = new_state.replace(step=state.step + 1)
    metrics = dict(aux, grad_norm=grad_norm, lr=jnp.asarray(lr_fn(state.step), jnp.float32),
                   nonfinite=1.0 - finite.astype(jnp.float32))
    return new_state, metrics

  return train_step


def multi_step_loop(config, platform: str | None = None) -> str:
  """'scan' or 'unroll': how ``training.steps_per_call`` steps are chained in one program.

  'auto' is 'unroll' on CPU and 'scan' elsewhere. On XLA:CPU (jax 0.10.2) the
  step inside ``lax.scan`` ran 2.2x slower than unrolled (68.7 vs 30.6 ms per
  step, configs/test.py, steps_per_call=4; an earlier measurement saw 9x), though
  it compiled in 14 s instead of 45 s; scan's compile time does not grow with
  steps_per_call.
  """
  return _auto_by_platform(config.training.multi_step_loop, platform, on_cpu="unroll",
                           elsewhere="scan")


def make_p_train_step(model, diffusion, tx, config, devices=None):
  """The pmap-ed multi-step: (state [D...], x0 [D, n, b, H, W, C]) -> (state, metrics [D, n]).

  n = ``training.steps_per_call`` steps run in one device call, chained with
  ``lax.scan`` or unrolled (``multi_step_loop``); the state is donated, so its
  buffers are updated in place.
  """
  platform = (devices[0] if devices else jax.local_devices()[0]).platform
  step = make_train_step(model, diffusion, tx, config, platform)
  loop = multi_step_loop(config, platform)

  def multi_step(state, batches):
    if loop == "scan":
      return jax.lax.scan(step, state, batches)
    metrics = []
    for i in range(batches.shape[0]):  # unrolled at trace time
      state, m = step(state, batches[i])
      metrics.append(m)
    return state, jax.tree.map(lambda *xs: jnp.stack(xs), *metrics)

  return jax.pmap(multi_step, axis_name=AXIS, donate_argnums=(0,), devices=devices)


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------

class NonFiniteError(RuntimeError):
  """Training stopped on non-finite losses or gradients."""


class _StopFlag:
  """Set by SIGTERM/SIGINT: finish the current call, checkpoint, exit cleanly."""

  def __init__(self):
    self.signum = None

  def install(self):
    import signal  # pylint: disable=g-import-not-at-top
    self._previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.signum = signum

  def restore(self):
    import signal  # pylint: disable=g-import-not-at-top
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def should_stop(self) -> bool:
    local = self.signum is not None
    if jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(np.any(multihost_utils.process_allgather(np.int32(local))))


def _stacked_batches(iterator, n: int, start_step: int, poison_step: int = -1):
  """Groups n consecutive step batches [D, b, ...] into [D, n, b, ...].

  The batch of step ``poison_step`` (counting steps from 0) is replaced by NaN,
  to exercise the non-finite guards (``training.debug_poison_step``).
  """
  step = start_step
  while True:
    group = [next(iterator) for _ in range(n)]
    for i in range(n):
      if step + i == poison_step:
        group[i] = np.full_like(group[i], np.nan)
    step += n
    yield np.stack(group, axis=1)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains to ``training.num_train_steps``, resuming from ``workdir`` if it holds a checkpoint.

  Writes to workdir: checkpoints/ (orbax), events.* (TensorBoard: loss, mse,
  grad_norm, lr, steps_per_sec, images_per_sec), samples/grid_step_*.png (EMA
  samples every ``training.sample_every_steps``). Returns the final state (host).
  """
  from flax.metrics import tensorboard  # pylint: disable=g-import-not-at-top
  # Imported here: they import this module.
  from ddpm_jax import checkpoint, generate  # pylint: disable=g-import-not-at-top

  tcfg = config.training
  model = build_model(config)
  diffusion = build_diffusion(config)
  tx = create_optimizer(config.optim)
  manager = checkpoint.create_manager(workdir, keep=tcfg.keep_checkpoints)
  state = create_train_state(config, model, tx)
  restored = checkpoint.restore_train_state(manager, state, config)
  if restored is not None:
    state = restored
    logging.info("Resumed from the checkpoint at step %d in %s", int(state.step), workdir)
  start_step = int(state.step)
  n = tcfg.steps_per_call
  logging.info("Model: %s parameters; %s; %d local devices, %d processes",
               f"{sum(x.size for x in jax.tree.leaves(state.params)):,}", diffusion,
               jax.local_device_count(), jax.process_count())

  is_chief = jax.process_index() == 0
  writer = tensorboard.SummaryWriter(workdir) if is_chief else None
  p_state = replicate(state)
  del state
  p_step = make_p_train_step(model, diffusion, tx, config)
  batches = input_pipeline.create_train_iterator(config.data, tcfg.batch_size,
                                                 start_step=start_step)
  batches = input_pipeline.prefetch_to_device(
      _stacked_batches(batches, n, start_step, tcfg.get("debug_poison_step", -1)), tcfg.prefetch)

  sample_fn = None
  if tcfg.sample_every_steps:
    d = jax.local_device_count()
    per_device = -(-tcfg.num_grid_samples // d)
    sample_fn = generate.make_p_sample(model, build_sampling_diffusion(config), config, per_device)

  stop = _StopFlag().install()
  step = start_step
  last_good = manager.latest_step()
  bad_in_a_row = 0
  unread = []  # device metrics not yet read back: reading syncs, so it waits for log points
  t_log, step_log = time.time(), step

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
        if bad:
          logging.warning("Non-finite loss or gradients at step %d (loss %s, grad norm %s): "
                          "update skipped.", first + i + 1, m["loss"][i], m["grad_norm"][i])
          if tcfg.nan_policy == "stop" or bad_in_a_row >= tcfg.max_consecutive_nonfinite:
            raise NonFiniteError(
                f"stopped at step {first + i + 1} after {bad_in_a_row} non-finite step(s) in a "
                f"row (training.nan_policy={tcfg.nan_policy!r}, "
                f"training.max_consecutive_nonfinite={tcfg.max_consecutive_nonfinite}); "
                + (f"the last good checkpoint, step {last_good} in {manager.directory}, is intact"
                   if last_good is not None else "no checkpoint had been written yet"))
      for k, v in m.items():
        sums[k] = sums.get(k, 0.0) + float(np.sum(v))
      count += len(m["loss"])
    means = {k: v / count for k, v in sums.items()}
    means["lr"] = float(got[-1][1]["lr"][-1])
    return means

  def crossed(every: int) -> bool:
    return bool(every) and step // every > (step - n) // every

  def save(final=False):
    read_metrics()  # never checkpoint past a step that should have stopped the run
    checkpoint.save(manager, unreplicate(p_state), config)
    if final:
      manager.wait_until_finished()
    logging.info("Checkpoint at step %d written to %s", step, manager.directory)

  try:
    while step < tcfg.num_train_steps:
      p_state, metrics = p_step(p_state, next(batches))
      unread.append((step, metrics))
      step += n
      if crossed(tcfg.log_every_steps) or step >= tcfg.num_train_steps:
        means = read_metrics()
        rate = (step - step_log) / max(time.time() - t_log, 1e-9)
        eta = (tcfg.num_train_steps - step) / max(rate, 1e-9)
        logging.info("step %d/%d  loss %.4f  grad_norm %.3f  lr %.2e  %.2f steps/s  "
                     "%.1f images/s  ETA %s", step, tcfg.num_train_steps, means["loss"],
                     means["grad_norm"], means["lr"], rate, rate * tcfg.batch_size,
                     time.strftime("%H:%M:%S", time.gmtime(eta)))
        if writer is not None:
          for k, v in means.items():
            writer.scalar(f"train/{k}", v, step)
          writer.scalar("train/steps_per_sec", rate, step)
          writer.scalar("train/images_per_sec", rate * tcfg.batch_size, step)
          writer.flush()
        t_log, step_log = time.time(), step
      if crossed(tcfg.checkpoint_every_steps) and step < tcfg.num_train_steps:
        save()
        last_good = step
      if sample_fn is not None and crossed(tcfg.sample_every_steps):
        imgs = generate.generate(sample_fn, p_state.ema_params, tcfg.num_grid_samples,
                                 per_call=tcfg.num_grid_samples, seed=config.sampling.seed,
                                 log_progress=False)
        if is_chief:
          image_utils.save_grid(os.path.join(workdir, "samples", f"grid_step_{step}.png"), imgs)
          writer.image("samples/ema", image_utils.make_grid(imgs)[None], step)
        t_log = time.time()  # sampling time is not training time
      if stop.should_stop():
        logging.info("Signal %s received: checkpointing step %d and stopping.", stop.signum, step)
        break
    save(final=True)
    return unreplicate(p_state)
  finally:
    stop.restore()
    manager.wait_until_finished()
    if writer is not None:
      writer.flush()
