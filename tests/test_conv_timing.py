"""Tests for the measured choice between Winograd and XLA's 3x3 convolution on CPU.

The choice must follow the timings (checked with given timings, and with a
real measurement against the program that was compiled), be made once per
layer shape, and leave programs without a measurable host unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.models import conv, conv_timing, unet, winograd
from tests.test_conv import np_conv


MEASURE_FLOPS = conv_timing.MEASURE_FLOPS  # the module's own (conftest turns measuring off)


@pytest.fixture(autouse=True)
def fresh_record(monkeypatch):
  monkeypatch.setattr(conv_timing, "_results", {})
  monkeypatch.setattr(conv_timing, "MEASURE_FLOPS", MEASURE_FLOPS)


def _grad_program(x_shape, c_out):
  """The compiled text of conv3x3's forward + both gradients, traced now."""
  x, k = jnp.ones(x_shape), jnp.ones((3, 3, x_shape[-1], c_out))
  loss = jax.grad(lambda x, k: jnp.sum(conv.conv3x3(x, k) ** 2), argnums=(0, 1))
  return jax.jit(loss).lower(x, k).compile().as_text()


@pytest.mark.parametrize("x_shape, k_shape, expected", [
    ((4, 32, 32, 32), (3, 3, 32, 32), True),
    ((4, 16, 16, 96), (3, 3, 96, 32), True),     # the fewer channels count
    ((4, 16, 16, 32), (3, 3, 32, 63), True),
    ((4, 16, 16, 64), (3, 3, 64, 64), False),    # always Winograd (winograd.applies)
    ((4, 32, 32, 16), (3, 3, 16, 32), False),    # too few channels
    ((4, 8, 8, 32), (3, 3, 32, 32), False),      # too small
])
def test_worth_measuring(x_shape, k_shape, expected):
  assert winograd.worth_measuring(x_shape, k_shape, (1, 1), "SAME", jnp.float32) == expected
  assert not winograd.worth_measuring(x_shape, k_shape, (1, 1), "SAME", jnp.bfloat16)
  assert not winograd.worth_measuring(x_shape, k_shape, (2, 2), "SAME", jnp.float32)


@pytest.mark.parametrize("xla_ms, winograd_ms, chosen", [
    (10.0, 5.0, True),
    (10.0, 9.5, False),   # faster, but by less than MARGIN (1.1x)
    (10.0, 20.0, False),
])
def test_choice_follows_the_timings_and_is_made_once(monkeypatch, xla_ms, winograd_ms, chosen):
  calls = []

  def fake_median_ms(progs):
    calls.append(sorted(progs))
    return {"xla": xla_ms, "winograd": winograd_ms}

  monkeypatch.setattr(conv_timing, "_median_ms", fake_median_ms)
  hlo = _grad_program((2, 16, 16, 32), 32)
  # Winograd leaves no convolution op in the program; XLA's has three (forward,
  # input gradient, weight gradient).
  assert (" convolution(" not in hlo) == chosen
  assert calls == [["winograd", "xla"]] or calls == [["xla", "winograd"]]
  # Another batch size, and another program, reuse the record: no new measurement.
  _grad_program((6, 16, 16, 32), 32)
  assert len(calls) == 1
  assert conv_timing.results() == {("conv3x3", 16, 16, 32, 32, "float32"): dict(
      xla_ms=xla_ms, winograd_ms=winograd_ms, batch=conv_timing.MEASURE_BATCH, winograd=chosen)}
  # A new layer shape is measured.
  _grad_program((2, 16, 16, 32), 48)
  assert len(calls) == 2


def test_a_real_measurement_inside_a_trace_decides_the_program():
  """Measured while a pmap-ed program is traced; that program takes the recorded choice
  and computes the convolution (float64 reference)."""
  d = jax.local_device_count()
  rng = np.random.RandomState(0)
  x = rng.randn(d, 2, 16, 16, 32).astype(np.float32)
  k = (rng.randn(3, 3, 32, 40) / np.sqrt(9 * 32)).astype(np.float32)
  f = jax.pmap(lambda x: conv.conv3x3(x, jnp.asarray(k)))
  compiled = f.lower(x).compile()
  record = conv_timing.results()[("conv3x3", 16, 16, 32, 40, "float32")]
  assert record["xla_ms"] > 0 and record["winograd_ms"] > 0
  assert record["winograd"] == (record["xla_ms"] >= conv_timing.MARGIN * record["winograd_ms"])
  assert (" convolution(" not in compiled.as_text()) == record["winograd"]
  y = np.asarray(compiled(x))
  ref = np_conv(x.reshape(-1, 16, 16, 32), k, (1, 1), "SAME").reshape(y.shape)
  np.testing.assert_allclose(y, ref, atol=5e-5 * np.abs(ref).max(), rtol=0)


def test_nothing_is_measured_off_cpu_or_when_switched_off(monkeypatch):
  def fail(progs):
    raise AssertionError("measured")

  monkeypatch.setattr(conv_timing, "_median_ms", fail)
  monkeypatch.setattr(conv_timing, "_measurable", lambda: False)
  assert " convolution(" in _grad_program((2, 16, 16, 32), 32)  # XLA's, as before
  monkeypatch.setattr(conv_timing, "_measurable", lambda: True)
  monkeypatch.setattr(conv, "CPU_WINOGRAD", False)
  assert " convolution(" in _grad_program((2, 16, 16, 32), 32)
  monkeypatch.setattr(conv, "CPU_WINOGRAD", True)
  # One example over MEASURE_FLOPS (2 * 9 * 128 * 128 * 63 * 32 = 595 MFLOP): too slow to measure.
  monkeypatch.setattr(conv_timing, "MEASURE_FLOPS", 5e8)
  x, k = jnp.ones((1, 128, 128, 63)), jnp.ones((3, 3, 63, 32))
  lowered = jax.jit(lambda x, k: conv.conv3x3(x, k)).lower(x, k).as_text()
  assert "stablehlo.convolution" in lowered
  assert conv_timing.results() == {}


@pytest.mark.parametrize("winograd_ms, chosen", [(5.0, True), (20.0, False)])
def test_upsample_conv_follows_the_timings(monkeypatch, winograd_ms, chosen):
  """The upsample conv: Winograd of the upsampled input where measured faster, else the
  two-phase convs; both equal the float64 conv of the 2x nearest-upsampled input."""
  monkeypatch.setattr(conv_timing, "_median_ms",
                      lambda progs: {"xla": 10.0, "winograd": winograd_ms})
  rng = np.random.RandomState(4)
  x = rng.randn(2, 8, 8, 32).astype(np.float32)
  k = (rng.randn(3, 3, 32, 32) / np.sqrt(9 * 32)).astype(np.float32)
  bias = rng.randn(32).astype(np.float32)
  # A new function: jit would reuse an earlier trace (and its choice) of the same one.
  compiled = jax.jit(lambda *a: unet.upsample_conv(*a)).lower(x, k, bias).compile()
  assert list(conv_timing.results()) == [("upsample2x_conv3x3", 8, 8, 32, 32, "float32")]
  # The two-phase form is four 2x2 convolutions; Winograd has none.
  assert compiled.as_text().count(" convolution(") == (0 if chosen else 4)
  up = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)
  ref = np_conv(up, k, (1, 1), "SAME") + bias
  np.testing.assert_allclose(np.asarray(compiled(x, k, bias)), ref,
                             atol=5e-5 * np.abs(ref).max(), rtol=0)
