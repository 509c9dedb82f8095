"""Devices and processes: the pmap axis, replicas, cross-process gathers, the stop agreement.

Every sharded program is a ``jax.pmap`` over the local devices with the axis
``AXIS``; what they share about devices and processes is here, so that a later
move to ``jit`` + ``shard_map`` has one file to change.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import numpy as np

# The pmap axis of every sharded program (and the name of the 1-D device mesh).
AXIS = "batch"


def device_sharding(
    devices: Optional[Sequence[Any]] = None, axis_name: str = AXIS
) -> jax.sharding.NamedSharding:
  """Leading axis split over ``devices`` (default: the local ones), on a mesh named ``axis_name``.

  The name matters: jax 0.10 treats a mesh with another axis name than the
  consuming pmap's as another sharding and re-lays the arrays out on every call.
  """
  devices = list(devices or jax.local_devices())
  return jax.sharding.NamedSharding(
      jax.sharding.Mesh(np.array(devices), (axis_name,)), jax.sharding.PartitionSpec(axis_name)
  )


def replicate(tree: Any, devices: Optional[Sequence[Any]] = None) -> Any:
  """One copy per local device (or per device of ``devices``): leaves [D, ...], ready for pmap.

  Each leaf goes to the host once and from there to each device as that
  device's shard (``flax.jax_utils.replicate``'s layout, without its per-shape
  compiled stack).
  """
  devices = list(devices or jax.local_devices())
  sharding = device_sharding(devices)

  def one(x):
    x = np.asarray(x)[None]
    return jax.make_array_from_single_device_arrays(
        (len(devices),) + x.shape[1:], sharding, [jax.device_put(x, d) for d in devices]
    )

  return jax.tree_util.tree_map(one, tree)


def unreplicate(tree: Any) -> Any:
  """The first local device's copy (leaves [D, ...] -> [...]) as numpy arrays on the host.

  Works with several processes (it reads this process's first shard).
  """

  def first(x):
    if not isinstance(x, jax.Array):
      return np.asarray(x)[0]
    shard = np.asarray(x.addressable_shards[0].data)
    return shard[0] if shard.ndim == x.ndim else shard  # the shard may keep the device axis

  return jax.tree.map(first, tree)


def allgather(tree: Any) -> Any:
  """Stacks each process's host arrays along a new leading axis: leaves [...] -> [P, ...].

  Every process must call it with the same tree structure and shapes; with one
  process it only adds the axis (P = 1).
  """
  if jax.process_count() == 1:
    return jax.tree.map(lambda x: np.asarray(x)[None], tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree))


def any_process(flag: bool) -> bool:
  """Whether ``flag`` is True on any process: every process gets the same answer.

  A cross-process gather: every process must call it at the same point of its
  program (the training loop's log points, for its stop agreement).
  """
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.any(allgather(np.int32(bool(flag)))))
