"""The train step of Algorithm 1, written for one device and ``pmap``-ed over all of them.

Gradients and metrics are averaged with ``lax.pmean`` over the axis ``AXIS``.
Each example's randomness (its timestep t, its noise eps and its dropout mask)
is drawn from ``fold_in(fold_in(rng, step), global_index)``, where the global
index is the example's row in the global batch. Together with the step-derived
data order this makes the trajectory independent of how the batch is split over
devices, hosts and micro-batches.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import ml_collections
import optax

from ddpm_jax.diffusion.gaussian import GaussianDiffusion
from ddpm_jax.models.unet import UNet
from ddpm_jax.training import timesteps
from ddpm_jax.builders import learning_rate_schedule, make_model_fn
from ddpm_jax.checkpoints import TrainState
from ddpm_jax.cpu import auto_choice
from ddpm_jax import parallel


def example_randomness(
    rng, step, global_index, num_timesteps: int, shape, t_probs=None, p_uncond: float = 0.0
):
  """Per-example randomness from the step and the example's global index.

  Args: rng: base key; step: int32 scalar; global_index: [b] int32;
    shape: (H, W, C) of one example; t_probs: [T] probabilities of t (None:
    uniform); p_uncond: probability of dropping the example's class label.
  Returns: t [b] int32 in [0, T); noise [b, H, W, C] N(0, 1); dropout keys [b]
    (one key per example); drop_label bool [b].
  """
  step_key = jax.random.fold_in(rng, step)

  def one(i):
    key = jax.random.fold_in(step_key, i)
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    if t_probs is None:
      t = jax.random.randint(k_t, (), 0, num_timesteps, dtype=jnp.int32)
    else:
      t = timesteps.draw(k_t, t_probs)
    drop = jax.random.bernoulli(jax.random.fold_in(key, 3), p_uncond) if p_uncond else False
    return t, jax.random.normal(k_noise, shape, jnp.float32), k_drop, jnp.asarray(drop)

  return jax.vmap(one)(global_index)


def apply_update_if(
    finite, state: TrainState, grads, tx: optax.GradientTransformation, ema_decay: float
) -> TrainState:
  """The optimiser and EMA update of ``state`` when ``finite``, else ``state`` unchanged.

  Args: finite: bool scalar; grads: like ``state.params`` (already averaged
  over devices); ema_decay: the EMA's decay. The step counter is left to the
  caller. A branch rather than a select of new and old values: with the state
  donated, a select makes XLA copy every old leaf before overwriting it.
  """

  def update(s: TrainState) -> TrainState:
    updates, new_opt_state = tx.update(grads, s.opt_state, s.params)
    new_params = optax.apply_updates(s.params, updates)
    new_ema = jax.tree.map(
        lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, s.ema_params, new_params
    )
    return s.replace(params=new_params, ema_params=new_ema, opt_state=new_opt_state)

  return jax.lax.cond(finite, update, lambda s: s, state)


def grad_all_reduce(config, platform: Optional[str] = None) -> str:
  """'flat' or 'tree': how the train step averages gradients over devices.

  'flat' concatenates every gradient (and the loss terms) into one float32
  vector for a single ``lax.pmean``; 'tree' pmeans the tree, one buffer per
  leaf, and leaves combining them to XLA. 'auto' is 'flat' when the CPU
  kernels are active (XLA:CPU's all-reduce of many buffers is slow), else 'tree'.
  """
  return auto_choice(config.training.grad_all_reduce, config, platform, "flat", "tree")


def multi_step_loop(config, platform: Optional[str] = None) -> str:
  """'scan' or 'unroll': how ``training.steps_per_call`` steps are chained in one program.

  'auto' is 'unroll' when the CPU kernels are active (XLA:CPU runs loop bodies
  slower than straight-line code), else 'scan' (compile time independent of
  ``steps_per_call``).
  """
  return auto_choice(config.training.multi_step_loop, config, platform, "unroll", "scan")


def _device_mean(tree: Any, how: str) -> Any:
  """``lax.pmean`` of a tree of float32 arrays over the devices, per leaf or as one vector."""
  if how == "tree":
    return parallel.mean(tree)
  flat, unflatten = ravel_pytree(tree)
  return unflatten(parallel.mean(flat))


def make_train_step(
    model: UNet,
    diffusion: GaussianDiffusion,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    platform: Optional[str] = None,
):
  """Returns train_step(state, batch) -> (state, metrics) for one device, inside pmap.

  batch: {'image': x0 [b, H, W, C] in [-1, 1]} (+ 'label' [b] int for a
  conditional model), this device's share of the global batch.
  metrics: dict of float32 scalars averaged over devices: loss, mse, vb,
  grad_norm (before clipping), lr, nonfinite (1 if the update was dropped).
  ``platform`` ('cpu', 'gpu', 'tpu'; default: JAX's) resolves 'auto' choices.
  """
  accum = config.training.grad_accum_steps
  all_reduce = grad_all_reduce(config, platform)
  ema_decay = config.optim.ema_decay
  lr_fn = learning_rate_schedule(config.optim)
  T = diffusion.num_timesteps
  num_classes = config.model.num_classes
  p_uncond = float(config.training.p_uncond) if num_classes else 0.0
  loss_aware = config.training.t_sampler == "loss_aware"

  def loss_fn(params, batch, global_index, step, rng, t_probs):
    """(weighted mean loss, (metric means, per-example t and loss for the history))."""
    x0 = batch["image"]
    t, noise, drop_keys, drop_label = example_randomness(
        rng, step, global_index, T, x0.shape[1:], t_probs, p_uncond
    )
    labels = batch.get("label")
    if labels is not None:  # label K is "no class"
      labels = jnp.where(drop_label, num_classes, labels)
    model_fn = make_model_fn(model, params, train=True, dropout_keys=drop_keys, labels=labels)
    losses = diffusion.training_losses(model_fn, x0, t, noise)
    per_example = {}
    if loss_aware:  # unbiased for uniform t: E_p[L_t / (T p_t)] = (1/T) sum_t L_t
      per_example = dict(t=t, loss=losses["loss"])
      losses["loss"] = losses["loss"] / (T * t_probs[t])
    return jnp.mean(losses["loss"]), ({k: jnp.mean(v) for k, v in losses.items()}, per_example)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch):
    b = batch["image"].shape[0]
    if b % accum:
      raise ValueError(f"training.grad_accum_steps={accum} must divide the per-device batch {b}")
    mb = b // accum
    first = parallel.device_index() * b
    t_probs = timesteps.probabilities(state.t_history) if loss_aware else None

    if accum == 1:  # XLA:CPU runs loop bodies several times slower: no loop unless needed
      (_, (aux, per_example)), grads = grad_fn(
          state.params,
          batch,
          first + jnp.arange(b, dtype=jnp.int32),
          state.step,
          state.rng,
          t_probs,
      )
    else:
      micro = jax.tree.map(lambda a: a.reshape((accum, mb) + a.shape[1:]), batch)

      def one_micro(carry, i):
        index = first + i * mb + jnp.arange(mb, dtype=jnp.int32)
        part = jax.tree.map(lambda a: a[i], micro)
        (_, (aux, per_example)), grads = grad_fn(
            state.params, part, index, state.step, state.rng, t_probs
        )
        g_sum, aux_sum = carry
        carry = (jax.tree.map(jnp.add, g_sum, grads), jax.tree.map(jnp.add, aux_sum, aux))
        return carry, per_example

      zeros_g = jax.tree.map(jnp.zeros_like, state.params)
      zeros_aux = {k: jnp.zeros((), jnp.float32) for k in ("loss", "mse", "vb")}
      (grads, aux), per_example = jax.lax.scan(one_micro, (zeros_g, zeros_aux), jnp.arange(accum))
      per_example = jax.tree.map(lambda a: a.reshape(b), per_example)  # micro-batches in order
      grads = jax.tree.map(lambda g: g / accum, grads)
      aux = {k: v / accum for k, v in aux.items()}
    grads, aux = _device_mean((grads, aux), all_reduce)

    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(aux["loss"]) & jnp.isfinite(grad_norm)

    new_state = apply_update_if(finite, state, grads, tx, ema_decay)
    if loss_aware:  # every device adds the whole global batch's losses, in its order
      everyone = jax.lax.all_gather(per_example, parallel.AXIS, tiled=True)
      history = timesteps.update(state.t_history, everyone["t"], everyone["loss"])
      new_state = new_state.replace(
          t_history=jax.tree.map(
              lambda new, old: jnp.where(finite, new, old), history, state.t_history
          )
      )
    new_state = new_state.replace(step=state.step + 1)
    metrics = dict(
        aux,
        grad_norm=grad_norm,
        lr=jnp.asarray(lr_fn(state.step), jnp.float32),
        nonfinite=1.0 - finite.astype(jnp.float32),
    )
    return new_state, metrics

  return train_step


def make_p_train_step(model, diffusion, tx, config, devices=None):
  """The pmap-ed multi-step: (state [D...], batches) -> (state, metrics [D, n]).

  batches: {'image': [D, n, b, H, W, C]} (+ 'label' [D, n, b]), n =
  ``training.steps_per_call`` steps run in one device call, chained with
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
    for i in range(batches["image"].shape[0]):  # unrolled at trace time
      state, m = step(state, jax.tree.map(lambda a: a[i], batches))
      metrics.append(m)
    return state, jax.tree.map(lambda *xs: jnp.stack(xs), *metrics)

  return parallel.pmap(multi_step, devices, donate_argnums=(0,))
