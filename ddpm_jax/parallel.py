"""Devices and processes: the pmap axis, replicas, cross-process gathers, the stop agreement.

Every sharded program is a ``jax.pmap`` over the local devices with the axis
``AXIS``; what they share about devices and processes is here, so that a later
move to ``jit`` + ``shard_map`` has one file to change.
"""

from __future__ import annotations

import collections
import itertools
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

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


def pmap(fn: Callable, devices: Optional[Sequence[Any]] = None, donate_argnums=()) -> Callable:
  """``fn`` (written for one device, collectives over ``AXIS``) mapped over ``devices``.

  The one place the sharded programs (the train step, the samplers, the
  bits/dim step, the feature networks, and the compile check's versions of
  them) are made: default devices the local ones, the axis ``AXIS``.
  """
  return jax.pmap(fn, axis_name=AXIS, devices=devices, donate_argnums=donate_argnums)


def device_index() -> jax.Array:
  """This device's index along ``AXIS`` (int32 scalar), inside a ``pmap`` ped function."""
  return jax.lax.axis_index(AXIS)


def mean(tree: Any) -> Any:
  """Each leaf's mean over the devices of ``AXIS``, inside a ``pmap`` ped function."""
  return jax.lax.pmean(tree, AXIS)


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


def prefetch_to_device(
    iterator: Iterable[Any],
    size: int = 2,
    devices: Optional[Sequence[Any]] = None,
    axis_name: str = AXIS,
) -> Iterator[Any]:
  """Moves batches onto the local devices, sharded, ``size`` in flight.

  Each item is an array or a pytree of arrays whose leading axis has length
  len(devices) (e.g. [D, b, H, W, C]); leaf x is placed with x[i] on
  devices[i] (a NamedSharding over a 1-D mesh of ``devices`` named
  ``axis_name``, the pmap axis name of the consumer: jax 0.10 treats a mesh
  with another axis name as another sharding and re-lays the batch out on
  every call). Transfers are asynchronous, so up to ``size`` batches are on
  their way while the caller works. Yields the device-resident pytrees in order.
  """
  devices = list(devices) if devices is not None else jax.local_devices()
  sharding = device_sharding(devices, axis_name)

  def put(x):
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] != len(devices):
      raise ValueError(
          f"Leading axis of shape {x.shape} must equal the number of devices " f"{len(devices)}."
      )
    return jax.device_put(x, sharding)

  queue = collections.deque()
  iterator = iter(iterator)

  def enqueue(n):
    for item in itertools.islice(iterator, n):
      queue.append(jax.tree_util.tree_map(put, item))

  enqueue(max(int(size), 1))
  while queue:
    yield queue.popleft()
    enqueue(1)
