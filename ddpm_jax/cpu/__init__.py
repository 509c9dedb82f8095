"""Kernels that make the U-Net faster on XLA:CPU, in every program built for a CPU.

``config.model.cpu_kernels`` is on by default: a program built for a CPU
backend gets the U-Net with ``cpu_kernels=True``, one built for GPU or TPU the
plain Flax model, with none of this package in it (``cpu_kernels_active(config,
platform)`` below decides, ``ddpm_jax.builders.build_model`` applies it).
``--config.model.cpu_kernels=False`` gives the plain model on a CPU too. What
changes with it on:

* ``conv.py``: 3x3 convs by Winograd's F(4x4, 3x3) (``winograd.py``) at 16x16
  and above with enough channels, as one matrix product on outputs of at most
  2x2 pixels, and with weight gradients summed over cache-sized batch chunks
  elsewhere;
* ``upsample.py``: the Upsample conv as four 2x2 convs of the small input;
* GroupNorm reduced over space with the channels minor (the U-Net's
  ``group_norm_channels_minor``, which bfloat16 models use on every platform);
* ``dropout.py``: dropout masks hashed once and stored (the same bits as
  ``jax.random.bernoulli``);
* ``compile_options.py``: XLA options for the samplers and the bits/dim loop;
* ``malloc.py``: which C allocator the process runs with (set in the
  environment at start: see its docstring);
* the train step averages gradients as one flat vector and unrolls
  ``training.steps_per_call`` (``training.grad_all_reduce``/``multi_step_loop``
  'auto').

Every choice is a function of the config and static shapes: nothing is timed,
so a resumed run computes the same program. The kernels change float rounding
only (dropout: not even that); the setting is recorded in each checkpoint and
in the start-up log. The convolutions' hand-written backward passes keep
forward-mode differentiation (``jax.jvp``, ``jax.linearize``) working
(``autodiff.py``). Measurements: docs/cpu_kernels.md.
"""

from typing import Optional

import jax


def cpu_kernels_active(config, platform: Optional[str] = None) -> bool:
  """Whether a program built for ``platform`` uses the CPU kernels (``ddpm_jax/cpu``).

  True when ``config.model.cpu_kernels`` is on (the default) and ``platform`` is
  'cpu'; a program for 'gpu' or 'tpu' is the plain model whatever the config
  says. ``platform``: the platform the program is compiled for (default: JAX's
  default backend; a program compiled ahead of time for another one passes it).
  """
  return bool(config.model.cpu_kernels) and (platform or jax.default_backend()) == "cpu"


def auto_choice(
    choice: str, config, platform: Optional[str], with_cpu_kernels: str, otherwise: str
) -> str:
  """``choice``, with 'auto' resolved: ``with_cpu_kernels`` when they are active, else ``otherwise``."""
  if choice != "auto":
    return choice
  return with_cpu_kernels if cpu_kernels_active(config, platform) else otherwise
