"""One 3x3 convolution's gradients on XLA:CPU against the same convolution in PyTorch.

  python benchmarks/cpu/xla_cpu_conv_grad.py [--shapes=8x32x32x128x128,...] [--reps=7] [--threads=N]

Stand-alone (jax, numpy, torch; nothing of this repository), for an upstream
XLA report. For each shape ``BxHxWxCinxCout`` (stride 1, padding 1, float32) it
times, alternating the two libraries call by call, medians of ``--reps``:

* ``forward``: y = conv(x, w);
* ``input_grad``: dx from dy (JAX: ``jax.vjp`` in x; PyTorch:
  ``torch.nn.grad.conv2d_input``);
* ``weight_grad``: dw from x and dy (JAX: ``jax.vjp`` in w, which XLA:CPU
  compiles to one convolution whose window is the whole image; PyTorch:
  ``torch.nn.grad.conv2d_weight``);
* ``train``: forward, then both gradients (JAX: one jitted program; PyTorch:
  autograd);
* ``weight_grad_in_loop``: ``weight_grad`` inside a one-trip ``lax.scan`` that
  applies it to the kernel, as a train loop with several steps per call does
  (PyTorch: ``weight_grad`` again). In a loop body XLA:CPU lays the
  convolution out as ``f01b_i01o->01bf`` and emits its own loop nest for it
  instead of calling its convolution library: this is the case that is slow
  (the profile of the plain CIFAR-10 train step, where 90% of the time is
  such convolutions, is in docs/cpu_kernels.md).

JAX uses NHWC / HWIO (XLA:CPU's preferred layouts), PyTorch NCHW / OIHW (its
default); the operands are the same numbers, and the script checks that both
libraries' results agree. Both use ``--threads`` threads (default: every core
the process may run on; XLA:CPU sizes its pool by the process's CPU affinity,
which ``--threads`` narrows). Prints the versions, then one line per shape and
operation: milliseconds per call and XLA's time over PyTorch's.
"""

import argparse
import os
import platform
import statistics
import time


def parse():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shapes", default="8x32x32x128x128,8x16x16x256x256,32x16x16x64x64")
  p.add_argument("--reps", type=int, default=7)
  p.add_argument("--threads", type=int, default=0, help="0: all cores")
  return p.parse_args()


def main():
  args = parse()
  if args.threads:  # XLA:CPU sizes its thread pool by the CPUs the process may run on
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
  threads = len(os.sched_getaffinity(0))
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # no accelerator plugin probing
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(threads)
  print(
      f"jax {jax.__version__} (jaxlib {jax.lib.__version__}, {jax.default_backend()}), "
      f"torch {torch.__version__}, numpy {np.__version__}, {threads} threads, "
      f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}"
  )

  def conv(x, w):
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )

  jax_ops = {
      "forward": jax.jit(lambda x, w, dy: conv(x, w)),
      "input_grad": jax.jit(lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0]),
      "weight_grad": jax.jit(lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0]),
      "train": jax.jit(lambda x, w, dy: (lambda y, f: (y, *f(dy)))(*jax.vjp(conv, x, w))),
      "weight_grad_in_loop": jax.jit(
          lambda x, w, dy: jax.lax.scan(
              lambda k, _: (lambda dw: (k - 0.1 * dw, dw))(
                  jax.vjp(lambda k: conv(x, k), k)[1](dy)[0]
              ),
              w,
              None,
              length=1,
          )[1][0]
      ),
  }

  def torch_train(x, w, dy):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = torch.nn.functional.conv2d(x, w, padding=1)
    y.backward(dy)
    return y, x.grad, w.grad

  torch_ops = {
      "forward": lambda x, w, dy: torch.nn.functional.conv2d(x, w, padding=1),
      "input_grad": lambda x, w, dy: torch.nn.grad.conv2d_input(x.shape, w, dy, padding=1),
      "weight_grad": lambda x, w, dy: torch.nn.grad.conv2d_weight(x, w.shape, dy, padding=1),
      "train": torch_train,
      "weight_grad_in_loop": lambda x, w, dy: torch.nn.grad.conv2d_weight(
          x, w.shape, dy, padding=1
      ),
  }
  to_torch = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # NCHW
  kernel_to_torch = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(3, 2, 0, 1)))

  for spec in args.shapes.split(","):
    b, h, w_, c_in, c_out = map(int, spec.split("x"))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, h, w_, c_in), np.float32)
    w = (rng.standard_normal((3, 3, c_in, c_out)) / np.sqrt(9 * c_in)).astype(np.float32)
    dy = rng.standard_normal((b, h, w_, c_out), np.float32)
    jx, jw, jdy = map(jnp.asarray, (x, w, dy))
    tx, tw, tdy = to_torch(x), kernel_to_torch(w), to_torch(dy)
    for name in jax_ops:
      jf, tf = jax_ops[name], torch_ops[name]
      got_j = jax.block_until_ready(jf(jx, jw, jdy))  # compiles
      got_t = tf(tx, tw, tdy)
      # The same numbers in either library's layout.
      as_tuple = lambda r: r if isinstance(r, tuple) else (r,)
      worst = 0.0
      for a, t in zip(as_tuple(got_j), as_tuple(got_t)):
        a = np.asarray(a)
        t = t.detach().numpy()
        t = t.transpose(2, 3, 1, 0) if t.shape == (c_out, c_in, 3, 3) else t.transpose(0, 2, 3, 1)
        worst = max(worst, float(np.abs(a - t).max() / np.abs(t).max()))
      assert worst < 1e-4, (spec, name, worst)
      times = {"xla": [], "torch": []}
      for _ in range(args.reps):
        t0 = time.perf_counter()
        jax.block_until_ready(jf(jx, jw, jdy))
        times["xla"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        tf(tx, tw, tdy)
        times["torch"].append(time.perf_counter() - t0)
      ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
      print(
          f"{spec:>18} {name:>19}: XLA:CPU {ms['xla']:8.2f} ms  PyTorch {ms['torch']:8.2f} ms  "
          f"XLA/PyTorch {ms['xla'] / ms['torch']:6.2f}x  (max rel. difference {worst:.1e})",
          flush=True,
      )


if __name__ == "__main__":
  main()
