"""Per-program compiler options: they take effect, change no result, and fail soft."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from ddpm_jax import sample
from ddpm_jax.cpu import compile_options
from ddpm_jax import builders, parallel


def _ynn_reduce_fusions(hlo_text):
  """Number of YNNPACK fusion computations that contain a reduce."""
  bodies = re.findall(r"\n%?fused_computation[\w.]* [^\n]*\{\n(.*?)\n\}", hlo_text, re.S)
  calls = set(re.findall(r"kind=kCustom, calls=%?([\w.\-]+)", hlo_text))
  names = re.findall(r"\n%?(fused_computation[\w.]*) ", hlo_text)
  return sum(1 for n, b in zip(names, bodies) if n in calls and " reduce(" in b)


def test_options_take_effect_on_the_compiled_program():
  # A GroupNorm-like reduction: by default XLA:CPU gives it to YNNPACK; with the
  # forward options it must stay an XLA loop.
  f = jax.jit(lambda x: (x - x.mean(-1, keepdims=True)).sum(-1))
  x = jnp.ones((64, 128))
  default = f.lower(x).compile().as_text()
  wrapped = compile_options.CompiledWithOptions(f, compile_options.forward_options())
  tuned = wrapped.compile(x).as_text()
  assert _ynn_reduce_fusions(default) >= 1, "expected a YNNPACK reduce fusion by default"
  assert _ynn_reduce_fusions(tuned) == 0
  np.testing.assert_array_equal(wrapped(x), np.zeros(64, np.float32))


def test_rejected_option_falls_back_to_the_defaults():
  f = jax.jit(lambda x: x * 2.0 + 1.0)
  wrapped = compile_options.CompiledWithOptions(f, {"xla_cpu_no_such_option": True})
  np.testing.assert_array_equal(wrapped(jnp.arange(3.0)), [1.0, 3.0, 5.0])
  assert wrapped.options is None


@pytest.mark.slow
def test_sampler_with_and_without_cpu_options_agree():
  config = test_config.get_config()
  config.sampling.num_steps = 10  # a respaced 10-step sampler keeps the test short
  params = parallel.replicate(
      builders.init_params(builders.build_model(config), config, jax.random.PRNGKey(0))
  )
  diffusion = builders.build_sampling_diffusion(config)
  d = jax.local_device_count()
  keys = jnp.broadcast_to(jax.random.PRNGKey(3), (d, 2))
  out = {}
  for enabled in (True, False):
    config.model.cpu_kernels = enabled  # the options come with the CPU kernels
    p_sample = sample.make_p_sample(
        builders.build_model(config), diffusion, config, per_device_batch=2
    )
    assert (p_sample.options is not None) == enabled
    out[enabled] = np.asarray(p_sample(params, keys, None))
  assert out[True].shape == (d, 2, 8, 8, 1)
  np.testing.assert_allclose(out[True], out[False], atol=2e-5)
