"""Setup shared by the benchmark scripts: host devices and the real train step's inputs."""

import os


def use_all_cores(cpu_devices: int = 0) -> None:
  """The process as main.py sets it up on a CPU host; call before any JAX op.

  First the allocator: the process is re-executed once with
  ``ddpm_jax.host_malloc``'s 'auto' choice (jemalloc, else glibc with huge
  pages), like main.py's default ``host.malloc``; ``DDPM_JAX_MALLOC=system``
  in the environment keeps the system's (``benchmarks/host_malloc.py``
  compares them). Then one CPU host device per core (or ``cpu_devices``); an
  XLA_FLAGS device count set from outside wins.
  """
  from ddpm_jax import host_malloc  # pylint: disable=g-import-not-at-top
  host_malloc.relaunch_if_needed("auto")
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_num_cpu_devices", cpu_devices or os.cpu_count() or 1)


def run_json(cmd, env=None) -> dict:
  """Runs ``cmd`` (argv) from the repo root; returns its last stdout line starting with '{', parsed.

  A non-zero exit or no such line raises RuntimeError with the end of its stderr.
  """
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
  lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
  if out.returncode or not lines:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
  return json.loads(lines[-1])


def train_step_and_inputs(config):
  """(pmap-ed train step, replicated state, one device-sharded batch of uniform noise images).

  The batch is [D, steps_per_call, B / D, H, W, C], already on the devices.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ddpm_jax import config_validation, input_pipeline, train  # pylint: disable=g-import-not-at-top

  config_validation.validate(config, jax.device_count(), jax.local_device_count())
  d = jax.local_device_count()
  model = train.build_model(config)
  tx = train.create_optimizer(config.optim)
  state = train.replicate(train.create_train_state(config, model, tx))
  p_step = train.make_p_train_step(model, train.build_diffusion(config), tx, config)
  shape = (d, config.training.steps_per_call, config.training.batch_size // d) + train.image_shape(config)
  images = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
  batch = next(input_pipeline.prefetch_to_device(iter([images]), 1))
  return p_step, state, batch


def compiled_train_step(config, options=None):
  """A zero-argument call of the real train step, compiled now (with XLA ``options``, if any).

  Each call runs one step on a fixed batch and returns the metrics; the state
  is donated and carried from call to call. Whatever module-level switches the
  model reads at trace time are read here, so programs built one after another
  can differ (the A/B benchmarks rely on this).
  """
  fn, state, batch = train_step_and_inputs(config)
  lowered = fn.lower(state, batch)
  compiled = lowered.compile(options) if options else lowered.compile()
  box = [state]

  def call():
    box[0], metrics = compiled(box[0], batch)
    return metrics
  return call


def model_and_random_params(config):
  """(U-Net, its randomly initialised parameters replicated over the local devices).

  Throughput needs no trained weights.
  """
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from ddpm_jax import config_validation, train  # pylint: disable=g-import-not-at-top

  config_validation.validate(config, jax.device_count(), jax.local_device_count())
  model = train.build_model(config)
  params = jax.jit(functools.partial(train.init_params, model, config))(jax.random.PRNGKey(0))
  return model, train.replicate(params)


def compiled_forward(config):
  """(compiled pmap-ed network forward, its args): ``sampling.batch_size`` images at t = T/2.

  Compiled with the samplers' XLA options (``compile_options.forward_options``),
  as the samplers are; random parameters, zero images.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ddpm_jax import compile_options, train  # pylint: disable=g-import-not-at-top

  model, p_params = model_and_random_params(config)
  d = jax.local_device_count()
  b = config.sampling.batch_size // d
  x = jnp.zeros((d, b) + train.image_shape(config), jnp.float32)
  t = jnp.full((d, b), config.diffusion.num_timesteps // 2, jnp.int32)
  fn = compile_options.CompiledWithOptions(
      jax.pmap(lambda p, x, t: model.apply({"params": p}, x, t, train=False)),
      compile_options.forward_options(config.sampling.cpu_compile_options))
  args = (p_params, x, t)
  return fn.compile(*args), args


def conv_operands(shape):
  """(x, kernel, dy) of a 3x3 'SAME' conv, random float32, one copy per local device.

  shape: ``(B, H, W, Cin, Cout)`` per device; x ``[D, B, H, W, Cin]``, kernel
  ``[D, 3, 3, Cin, Cout]`` (scaled by 1/sqrt(9 Cin)), dy ``[D, B, H, W, Cout]``.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  d = jax.local_device_count()
  b, h, w, c_in, c_out = shape
  rng = np.random.default_rng(0)
  put = jax.pmap(lambda a: a)
  x = put(rng.standard_normal((d, b, h, w, c_in), np.float32))
  kernel = put(rng.standard_normal((d, 3, 3, c_in, c_out), np.float32) / np.sqrt(9 * c_in))
  dy = put(rng.standard_normal((d, b, h, w, c_out), np.float32))
  return x, kernel, dy


def median_ms_alternating(progs, args, reps: int, calls: int) -> dict:
  """Median milliseconds per call of each program, the programs taking turns.

  Args:
    progs: {name: {kind: compiled function}}, each called as ``fn(*args)``.
    args: the arguments of every call.
    reps: timed rounds; in each, every program runs ``calls`` times in a row.

  Returns:
    {"<name>_<kind>_ms": median over the rounds, rounded to microseconds}.
  """
  import statistics  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  times = {(n, k): [] for n, fns in progs.items() for k in fns}
  for _ in range(reps):
    for (name, kind), ts in times.items():
      fn = progs[name][kind]
      t = time.perf_counter()
      for _ in range(calls):
        out = fn(*args)
      jax.block_until_ready(out)
      ts.append((time.perf_counter() - t) / calls * 1e3)
  return {f"{n}_{k}_ms": round(statistics.median(v), 3) for (n, k), v in times.items()}


def time_against_baselines(progs, baseline_of, reps: int, calls: int, case: str = "") -> dict:
  """Median ms of zero-argument programs called in turns, each printed with its speed-up.

  Args:
    progs: {name: zero-argument function}, compiled already; each gets one
      untimed call first.
    baseline_of: name -> the name of the program it is compared with.
    case: a label for the printed lines.

  Prints one line per program on stderr; returns {name: median ms per call}.
  """
  import sys  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  for fn in progs.values():
    jax.block_until_ready(fn())
  medians = median_ms_alternating({n: {"call": fn} for n, fn in progs.items()}, (), reps, calls)
  ms = {n: medians[f"{n}_call_ms"] for n in progs}
  for n, v in ms.items():
    print(f"{case:>20} {n:>24}: {v:9.2f} ms per call, {ms[baseline_of(n)] / v:5.2f}x",
          file=sys.stderr)
  return ms
