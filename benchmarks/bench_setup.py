"""Setup shared by the benchmark scripts: devices, the process, the real train step's inputs."""

import os


def use_all_cores(cpu_devices: int = 0) -> None:
  """One CPU host device per core (or ``cpu_devices``); call before any JAX op.

  An XLA_FLAGS device count set from outside wins. For the scripts that time
  single operations; the ones that build a model from a config call
  :func:`setup` (which does this too).
  """
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    import jax  # pylint: disable=g-import-not-at-top

    jax.config.update("jax_num_cpu_devices", cpu_devices or os.cpu_count() or 1)


def setup(config, cpu_devices: int = 0) -> None:
  """The process as main.py sets it up for ``config`` (``ddpm_jax.host.setup``); before any JAX op."""
  from ddpm_jax import host  # pylint: disable=g-import-not-at-top

  use_all_cores(cpu_devices)
  host.setup(config, cpu_devices)


def config_with_cpu_kernels_or_cores(config, cpu_devices: int = 0):
  """For the A/B scripts that take --config or --shapes; call before any JAX op.

  With a config: the config with ``model.cpu_kernels=True`` and the process
  set up for it (:func:`setup`); without one: one device per core
  (:func:`use_all_cores`) and None.
  """
  if config is None:
    use_all_cores(cpu_devices)
    return None
  config = with_cpu_kernels(config)
  setup(config, cpu_devices)
  return config


def malloc_info() -> dict:
  """The C allocator of this process, for the JSON lines (``ddpm_jax.cpu.malloc.describe``)."""
  from ddpm_jax.cpu import malloc  # pylint: disable=g-import-not-at-top

  return dict(malloc=malloc.describe())


# The allocator variants of a benchmark process (host_malloc.py; compare_torch.py's peer).
MALLOC_VARIANTS = ("system", "glibc_thp", "jemalloc")


def malloc_environment(variant: str, environ=None) -> dict:
  """A copy of ``environ`` (default: this process's) for a child started with ``variant``.

  'system': glibc as is; 'glibc_thp': glibc with transparent huge pages (glibc
  2.35+); 'jemalloc': jemalloc preloaded, keeping the pages it frees
  (ValueError when ``libjemalloc.so.2`` is not found). Allocators already
  preloaded and the huge-page tunable are removed first, so each variant starts
  from the system's.
  """
  from ddpm_jax.cpu import malloc  # pylint: disable=g-import-not-at-top

  if variant not in MALLOC_VARIANTS:
    raise ValueError(f"unknown allocator variant {variant!r}; expected one of {MALLOC_VARIANTS}")
  env = dict(os.environ if environ is None else environ)
  allocators = ("jemalloc", "tcmalloc", "mimalloc")
  preload = [p for p in env.pop("LD_PRELOAD", "").split() if not any(a in p for a in allocators)]
  tunables = [
      t for t in env.pop("GLIBC_TUNABLES", "").split(":") if t and t != malloc.GLIBC_THP_TUNABLE
  ]
  if variant == "glibc_thp":
    tunables.append(malloc.GLIBC_THP_TUNABLE)
  if variant == "jemalloc":
    path = malloc.find_jemalloc()
    if not path:
      raise ValueError("libjemalloc.so.2 was not found (Debian/Ubuntu: apt install libjemalloc2)")
    preload.insert(0, path)
    env["MALLOC_CONF"] = ",".join(
        c for c in (malloc.JEMALLOC_CONF, env.get("MALLOC_CONF", "")) if c
    )
  if preload:
    env["LD_PRELOAD"] = " ".join(preload)
  if tunables:
    env["GLIBC_TUNABLES"] = ":".join(tunables)
  return env


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


def with_cpu_kernels(config, on: bool = True):
  """A copy of ``config`` with ``model.cpu_kernels`` set to ``on``."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.cpu_kernels = on
  return config


def train_step_and_inputs(config):
  """(pmap-ed train step, replicated state, one device-sharded batch of uniform noise images).

  The batch is ``{'image': [D, steps_per_call, B / D, H, W, C]}`` (plus
  random 'label' [D, steps_per_call, B / D] for a conditional model), already
  on the devices.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ddpm_jax import config_validation  # pylint: disable=g-import-not-at-top
  from ddpm_jax import builders, parallel  # pylint: disable=g-import-not-at-top
  from ddpm_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  from ddpm_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top

  config_validation.validate(config, jax.device_count(), jax.local_device_count())
  d = jax.local_device_count()
  model = builders.build_model(config)
  tx = builders.create_optimizer(config.optim)
  state = parallel.replicate(state_lib.create_train_state(config, model, tx))
  p_step = step_lib.make_p_train_step(model, builders.build_diffusion(config), tx, config)
  lead = (d, config.training.steps_per_call, config.training.batch_size // d)
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(-1, 1, lead + builders.image_shape(config)).astype(np.float32)}
  if config.model.num_classes:
    batch["label"] = rng.integers(0, config.model.num_classes, lead).astype(np.int32)
  batch = next(parallel.prefetch_to_device(iter([batch]), 1))
  return p_step, state, batch


def compiled_train_step(config, options=None):
  """A zero-argument call of the real train step, compiled now (with XLA ``options``, if any).

  Each call runs one step on a fixed batch and returns the metrics; the state
  is donated and carried from call to call. Whatever module attributes the
  model reads at trace time are read here, so programs built one after another
  can differ (the A/B benchmarks patch ``ddpm_jax.cpu`` functions this way).
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
  from ddpm_jax import builders, config_validation, parallel  # pylint: disable=g-import-not-at-top

  config_validation.validate(config, jax.device_count(), jax.local_device_count())
  model = builders.build_model(config)
  params = jax.jit(functools.partial(builders.init_params, model, config))(jax.random.PRNGKey(0))
  return model, parallel.replicate(params)


def compiled_forward(config):
  """(compiled pmap-ed network forward, its args): ``sampling.batch_size`` images at t = T/2.

  Compiled as the samplers are: with ``cpu.compile_options.forward_options``
  when the model uses the CPU kernels; random parameters, zero images.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ddpm_jax import builders  # pylint: disable=g-import-not-at-top
  from ddpm_jax.cpu import compile_options  # pylint: disable=g-import-not-at-top

  model, p_params = model_and_random_params(config)
  d = jax.local_device_count()
  b = config.sampling.batch_size // d
  x = jnp.zeros((d, b) + builders.image_shape(config), jnp.float32)
  t = jnp.full((d, b), config.diffusion.num_timesteps // 2, jnp.int32)
  y = jnp.zeros((d, b), jnp.int32) if config.model.num_classes else None
  fn = compile_options.CompiledWithOptions(
      jax.pmap(lambda p, x, t, y: model.apply({"params": p}, x, t, y, train=False)),
      compile_options.forward_options() if model.cpu_kernels else None,
  )
  args = (p_params, x, t, y)
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
    print(
        f"{case:>20} {n:>24}: {v:9.2f} ms per call, {ms[baseline_of(n)] / v:5.2f}x", file=sys.stderr
    )
  return ms
