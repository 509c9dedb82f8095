"""XLA:CPU compiler options for the forward-only programs (the samplers and the bits/dim loop).

XLA:CPU (jaxlib 0.10) hands dots, convolutions and reductions to YNNPACK by
default. In the forward-only programs the YNNPACK reductions (GroupNorm's
statistics here) are slower than XLA's own loops, so those programs are
compiled with only dots and convolutions given to YNNPACK. Training keeps the
defaults (there the same setting was slower). Options apply to one compiled
program (``Lowered.compile(options)``), not to the process.
If a future jaxlib rejects an option, the program is compiled with the
defaults and a warning is logged.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from absl import logging
import jax

# Forward-only programs on CPU: YNNPACK for dots and convolutions only (no reduce fusions).
CPU_FORWARD_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
}


def forward_options() -> dict:
  """Compiler options for a forward-only program on XLA:CPU."""
  return dict(CPU_FORWARD_OPTIONS)


class CompiledWithOptions:
  """Wraps a jit/pmap-ed function; compiles it with ``options`` on first call per signature.

  Calls go to the compiled executable; a call with new shapes, dtypes or tree
  structure compiles again. With ``options=None`` this is a plain pass-through.
  """

  def __init__(self, fn: Callable[..., Any], options: Optional[dict]):
    self._fn = fn
    self._options = options
    self._cache: dict = {}

  @staticmethod
  def _signature(args) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(args)
    return treedef, tuple(
        (getattr(x, "shape", None), str(getattr(x, "dtype", type(x)))) for x in leaves
    )

  def compile(self, *args):
    """The executable for these arguments (compiled with the options, cached)."""
    sig = self._signature(args)
    compiled = self._cache.get(sig)
    if compiled is None:
      lowered = self._fn.lower(*args)
      try:
        compiled = lowered.compile(self._options) if self._options else lowered.compile()
      except jax.errors.JaxRuntimeError as e:
        if not self._options:
          raise
        logging.warning(
            "compiler options %s were rejected (%s); using the defaults",
            self._options,
            str(e).splitlines()[0][:200],
        )
        self._options = None
        compiled = lowered.compile()
      self._cache[sig] = compiled
    return compiled

  def lower(self, *args):
    """The wrapped function lowered for these arguments (``jax.ShapeDtypeStruct`` leaves work)."""
    return self._fn.lower(*args)

  def __call__(self, *args):
    if not self._options:
      return self._fn(*args)
    return self.compile(*args)(*args)

  @property
  def options(self) -> Optional[dict]:
    return self._options
