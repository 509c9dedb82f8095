"""A hand-written backward pass that keeps forward-mode differentiation.

``jax.custom_vjp`` gives a function its own backward pass but refuses
``jax.jvp`` and ``jax.linearize``. :func:`defvjp` gives a ``jax.custom_jvp``
function the same backward pass instead: its JVP rule returns the function's
value and, as the tangent, the transpose of the backward pass (which is linear
in the cotangent), made by ``jax.linear_transpose``. Forward mode evaluates
that transpose. Reverse mode transposes the tangent map once more, and the
transpose of each primitive's transpose is that primitive again (a convolution
gives a convolution, a slice a pad and back, a dot a dot), so the gradient is
computed by the backward pass's own operations, with the residuals ``fwd``
returns. The kernels' tests check both modes against float64 numpy, and the
U-Net's forward mode against a finite difference.
"""

from __future__ import annotations

from typing import Any, Callable

import jax


def defvjp(fun: jax.custom_jvp, fwd: Callable[..., Any], bwd: Callable[..., tuple]) -> None:
  """Gives ``fun`` (a ``jax.custom_jvp``) ``bwd`` as its reverse mode and its transpose as its JVP.

  The arguments are those of ``jax.custom_vjp.defvjp``:
    fwd: ``fwd(*args) -> (out, residuals)``, all of ``fun``'s arguments in their
      order; ``out`` one array, ``fun``'s value.
    bwd: ``bwd(*nondiff_args, residuals, cotangent) -> tuple`` of the cotangents
      of the other arguments, in their order; linear in ``cotangent`` (shaped and
      typed like ``out``), each result shaped and typed like its argument.
  """
  static_positions = tuple(fun.nondiff_argnums)

  def rule(*args):
    static, (primals, tangents) = args[: len(static_positions)], args[len(static_positions) :]
    given, rest = iter(static), iter(primals)
    ordered = [
        next(given) if i in static_positions else next(rest)
        for i in range(len(static) + len(primals))
    ]
    out, residuals = fwd(*ordered)
    transposed = jax.linear_transpose(
        lambda ct: tuple(bwd(*static, residuals, ct)), jax.ShapeDtypeStruct(out.shape, out.dtype)
    )
    (tangent,) = transposed(tuple(tangents))
    return out, tangent

  fun.defjvp(rule)
