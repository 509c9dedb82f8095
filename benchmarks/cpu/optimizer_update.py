"""Time of the guarded optimiser + EMA update alone, two formulations, alternating.

  python benchmarks/cpu/optimizer_update.py --config=configs/cifar10.py [--reps=5] [--calls=5]

The train step applies Adam, the EMA and the non-finite guard to every leaf of
the state, with the state donated. Two ways of writing the guard:

* ``select``: compute the new state, then ``where(finite, new, old)`` for every
  leaf (what the train step did before);
* ``cond``: ``lax.cond(finite, update, identity)``
  (``ddpm_jax.training.step.apply_update_if``).

Both run as pmap-ed programs over all local devices, with a fixed gradient tree
that is averaged over the devices first, as in the train step; ``grads_only``
is that averaging alone, the floor under both. Prints the milliseconds per call
(medians over the rounds), the number of copy instructions in each compiled
program, and one JSON line.
"""

import json
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks import bench_setup  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)
flags.DEFINE_integer("reps", 5, "Timed rounds; each program runs --calls times per round.")
flags.DEFINE_integer("calls", 5, "Calls per program per round.")
flags.DEFINE_integer("cpu_devices", 0, "CPU host devices (0: one per core).")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  config = FLAGS.config
  bench_setup.setup(config, FLAGS.cpu_devices)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from ddpm_jax import builders, parallel  # pylint: disable=g-import-not-at-top
  from ddpm_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  from ddpm_jax.training import step  # pylint: disable=g-import-not-at-top

  tx = builders.create_optimizer(config.optim)
  state = state_lib.create_train_state(config, builders.build_model(config), tx)
  decay = config.optim.ema_decay
  grads = parallel.replicate(jax.tree.map(lambda p: jnp.full_like(p, 1e-3), state.params))

  def averaged(g):
    g = jax.lax.pmean(g, parallel.AXIS)
    return g, jnp.isfinite(optax.global_norm(g))

  def select(s, g):
    g, finite = averaged(g)
    updates, opt_state = tx.update(g, s.opt_state, s.params)
    params = optax.apply_updates(s.params, updates)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, s.ema_params, params)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    return s.replace(
        step=s.step + 1,
        params=keep(params, s.params),
        ema_params=keep(ema, s.ema_params),
        opt_state=keep(opt_state, s.opt_state),
    )

  def cond(s, g):
    g, finite = averaged(g)
    return step.apply_update_if(finite, s, g, tx, decay).replace(step=s.step + 1)

  def grads_only(s, g):
    _, finite = averaged(g)
    return s.replace(step=s.step + finite.astype(jnp.int32))

  variants = {"select": select, "cond": cond, "grads_only": grads_only}
  progs, states, copies = {}, {}, {}
  for name, fn in variants.items():
    progs[name] = jax.pmap(fn, axis_name=parallel.AXIS, donate_argnums=(0,))
    states[name] = parallel.replicate(state)
    copies[name] = progs[name].lower(states[name], grads).compile().as_text().count(" copy(")
    for _ in range(2):
      states[name] = progs[name](states[name], grads)
    jax.block_until_ready(states[name])

  def call(name):
    states[name] = progs[name](states[name], grads)
    return states[name]

  medians = bench_setup.median_ms_alternating(
      {name: {"call": lambda name=name: call(name)} for name in variants},
      (),
      FLAGS.reps,
      FLAGS.calls,
  )
  ms = {name: round(medians[f"{name}_call_ms"], 2) for name in variants}
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  for name in variants:
    print(f"{name:>10}: {ms[name]:8.1f} ms per call, {copies[name]:5d} copies", file=sys.stderr)
  print(
      json.dumps(
          dict(
              params=n_params,
              devices=jax.local_device_count(),
              ms=ms,
              copies=copies,
              select_over_cond=round(ms["select"] / ms["cond"], 3),
          )
      )
  )


if __name__ == "__main__":
  app.run(main)
