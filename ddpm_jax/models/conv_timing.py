"""Which of two ways to compute a 3x3 convolution is faster on this host, measured once per shape.

Winograd's F(4x4, 3x3) (``models/winograd.py``) beat XLA:CPU's direct
convolution at 64 or more channels on every CPU it was measured on. At 32 to
63 channels the answer depends on the CPU (``benchmarks/winograd_conv.py
--shapes=16x32x32x32x32,16x32x32x96x32,16x32x32x64x32``, forward plus both
gradients, 2 devices):

* a 2-core Intel Xeon VM: 0.83-0.98x (slower), so XLA's;
* a 2-core AMD EPYC (Zen 3) VM: 1.85-2.16x, which made the 1.1M-parameter
  U-Net's train step 1.10x faster and its sampler's forward 1.22x faster.

So for those shapes :func:`conv.conv3x3 <ddpm_jax.models.conv.conv3x3>` asks
:func:`winograd_is_faster`, which times both, forward plus both gradients, on
``MEASURE_BATCH`` examples on every local CPU device at once (as the pmap-ed
train step runs them), when the program is traced. The answer is kept for the
life of the process and holds for every batch size, so a layer shape costs one
measurement (two to five seconds), and every program traced later (the
model's initialisation, the train step, the samplers) makes the same choice.
Winograd must win by ``MARGIN``: a host where the two are close keeps XLA's
convolution, and a small timing noise cannot flip the choice between runs. The
two differ by float32 rounding only.

The U-Net's upsample conv asks the same question (kind
``'upsample2x_conv3x3'``): its two-phase 2x2 convs against Winograd on the
upsampled input (``models/unet.py``, ``upsample_conv``).

Nothing is measured, and XLA's convolution is kept, unless the default backend
is the CPU and this is a single-process run (processes of a multi-process run
must compile the same program).
"""

from __future__ import annotations

import concurrent.futures
import statistics
import time
from typing import Callable, Dict, Sequence, Tuple

from absl import logging
import jax
import numpy as np

# Winograd is used only when XLA's convolution takes at least MARGIN times as long.
MARGIN = 1.1
# Examples per device in the measurement, whatever the batch of the traced program
# (the 1.1M U-Net trains with 16 per device on 2 devices and samples with 8),
# fewer where a call's direct-conv forward would pass MEASURE_FLOPS per device.
# A layer with one example over MEASURE_FLOPS (the CIFAR-10 U-Net's 256-channel
# upsample to 32x32, the 256x256 models' wide layers) is not measured, so that
# no measurement takes more than a few seconds, and keeps XLA's way.
MEASURE_BATCH = 8
MEASURE_FLOPS = 1e9
# Timed rounds per measurement; in each, both programs run CALLS times in turn.
ROUNDS = 3
CALLS = 2

Key = Tuple[str, int, int, int, int, str]
_results: Dict[Key, dict] = {}


def results() -> Dict[Key, dict]:
  """The measurements of this process so far: {(kind, H, W, Cin, Cout, dtype): record}.

  Each record has ``xla_ms`` and ``winograd_ms`` (median ms per call of forward
  plus both gradients of ``batch`` examples on every local device at once) and
  ``winograd`` (the choice).
  """
  return {k: dict(v) for k, v in _results.items()}


def _measurable() -> bool:
  return jax.default_backend() == "cpu" and jax.process_count() == 1


def _timed_programs(x_shape: Sequence[int], c_out: int, dtype: str,
                    convs: Dict[str, Callable]) -> Dict[str, Callable[[], object]]:
  """Zero-argument programs: forward and both gradients of each conv, pmap-ed over the CPU devices."""
  devices = jax.local_devices(backend="cpu")
  d = len(devices)
  rng = np.random.default_rng(0)
  c_in = x_shape[-1]
  x = rng.standard_normal((d, *x_shape)).astype(dtype)
  k = (rng.standard_normal((d, 3, 3, c_in, c_out)) / np.sqrt(9 * c_in)).astype(dtype)
  y_shape = jax.eval_shape(next(iter(convs.values())), jax.ShapeDtypeStruct(x_shape, dtype),
                           jax.ShapeDtypeStruct((3, 3, c_in, c_out), dtype)).shape
  dy = rng.standard_normal((d, *y_shape)).astype(dtype)
  put = jax.pmap(lambda a: a, devices=devices)  # one copy per device, before the timing
  x, k, dy = put(x), put(k), put(dy)
  progs = {}
  for name, conv in convs.items():
    def grads(x, k, dy, conv=conv):
      y, vjp = jax.vjp(conv, x, k)
      return y, vjp(dy)
    compiled = jax.pmap(grads, devices=devices).lower(x, k, dy).compile()
    progs[name] = lambda compiled=compiled: compiled(x, k, dy)
  return progs


def _median_ms(progs: Dict[str, Callable[[], object]]) -> Dict[str, float]:
  for fn in progs.values():
    jax.block_until_ready(fn())  # untimed first call
  times = {name: [] for name in progs}
  for _ in range(ROUNDS):
    for name, fn in progs.items():
      start = time.perf_counter()
      for _ in range(CALLS):
        out = fn()
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - start) / CALLS * 1e3)
  return {name: statistics.median(ts) for name, ts in times.items()}


def winograd_is_faster(x_shape: Sequence[int], c_out: int, dtype, xla_conv: Callable,
                       winograd_conv: Callable, kind: str = "conv3x3") -> bool:
  """Whether ``winograd_conv`` is at least ``MARGIN`` times faster than ``xla_conv`` here.

  Args:
    x_shape: ``(B, H, W, Cin)`` of one device's input; c_out: output channels.
    dtype: the computation dtype.
    xla_conv, winograd_conv: ``(x [B, H, W, Cin], kernel [3, 3, Cin, Cout]) ->
      y [B, H', W', Cout]``, two ways to compute the same 3x3 'SAME' conv.
    kind: what the two compute, part of the record's key: ``'conv3x3'`` (the
      conv of x), ``'upsample2x_conv3x3'`` (of x upsampled 2x, H' = 2H).

  Measured on the first call for a layer shape (H, W, Cin, Cout) and dtype,
  whatever B is (both convs compiled and timed at ``MEASURE_BATCH`` examples
  per device, fewer for large layers; see the module docstring), then
  answered from this process's record.
  False without measuring where measuring does not apply (``_measurable``) or
  one example is over ``MEASURE_FLOPS``.
  """
  _, h, w, c_in = (int(s) for s in x_shape)
  out_pixels = h * w * (4 if kind == "upsample2x_conv3x3" else 1)
  example_flops = 2 * 9 * out_pixels * c_in * int(c_out)
  if not _measurable() or example_flops > MEASURE_FLOPS:
    return False
  key = (kind, h, w, c_in, int(c_out), np.dtype(dtype).name)
  if key not in _results:
    batch = int(min(MEASURE_BATCH, MEASURE_FLOPS // example_flops))
    # In a thread of its own: JAX's tracing state is per thread, so the
    # measurement's programs are built and run as if nothing were being traced,
    # though the caller is in the middle of tracing its own program.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      ms = pool.submit(lambda: _median_ms(_timed_programs(
          (batch, h, w, c_in), key[4], key[5],
          {"xla": xla_conv, "winograd": winograd_conv}))).result()
    chosen = ms["xla"] >= MARGIN * ms["winograd"]
    _results[key] = dict(xla_ms=round(ms["xla"], 3), winograd_ms=round(ms["winograd"], 3),
                         batch=batch, winograd=chosen)
    logging.info("%s %dx%d, %d -> %d channels (%s): XLA %.1f ms, Winograd %.1f ms per "
                 "forward + gradients of %d examples on each of %d devices: %s", *key,
                 ms["xla"], ms["winograd"], batch, jax.local_device_count("cpu"),
                 "Winograd" if chosen else "XLA's convolution")
  return _results[key]["winograd"]
