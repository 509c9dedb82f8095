"""``--mode=compile --topology=NAME``: every program of a config, compiled for a TPU slice from this host.

Needs libtpu (``requirements-tpu.txt``), not a TPU, data or weights. For the
train step, the sampler, the bits/dim step and the FID/IS feature network it
reports per device what the TPU compiler allocates (arguments, outputs,
temporaries, code) against the chip's HBM, the FLOPs and XLA's cost-model time
per call, and what they imply (steps/s, images/s, fraction of the chip's
peak). A program that does not fit gets the largest per-device batch that
does and the settings that make the configured batch fit, each found by
compiling. Writes ``workdir/compile_<topology>.json``.

XLA's cost analysis counts a loop body once. So the train step's FLOPs are
multiplied by its loop trips (``steps_per_call``, ``grad_accum_steps``), and the
sampler's and the bits/dim step's are the network's forward pass, compiled on
its own, times the network calls. The times are XLA's estimate, not a
measurement: they leave out host input, infeed, the interconnect's latency
and anything the cost model does not see.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from typing import Any, Callable, Optional

from absl import logging
import jax
import jax.numpy as jnp

from ddpm_jax import builders, files, parallel, sample, tpu
from ddpm_jax.evaluation import bpd
from ddpm_jax.models import inception
from ddpm_jax.training import state as state_lib
from ddpm_jax.training import step as step_lib

PROGRAMS = ("train", "sample", "eval_bpd", "fid_features")
# Candidate per-device batches are compiled at most this many times per program.
MAX_SEARCH_COMPILES = 8


@dataclasses.dataclass
class Program:
  """One program of a config, lowered for a per-device batch b.

  lower(b): the pmap-ed program lowered with abstract inputs for batch b per device.
  cost(b): (flops, seconds or None) of one call per device, loops counted in full.
  batch: the configured per-device batch; images(b): images one call handles on
  the whole slice; steps: optimiser steps per call (train) else 0; field: the
  config field that sets the batch.
  """

  name: str
  lower: Callable[[int], Any]
  cost: Callable[[int, Any], tuple]
  batch: int
  images: Callable[[int], int]
  steps: int
  field: str


def _abstract(tree, devices: int):
  """ShapeDtypeStructs with a leading device axis."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct((devices,) + a.shape, a.dtype), tree)


def _cost(compiled) -> tuple[float, Optional[float]]:
  """(flops, XLA's estimated seconds or None when it is not a positive number) of one call."""
  got = compiled.cost_analysis() or {}
  if isinstance(got, (list, tuple)):  # older jax: one dict per computation
    got = got[0] if got else {}
  seconds = got.get("optimal_seconds")
  seconds = float(seconds) if seconds is not None and seconds > 0 else None
  return float(got.get("flops", 0.0)), seconds


def _image_batch(config, lead: tuple, labels: bool) -> dict:
  """{'image': [*lead, H, W, C] float32} (+ 'label' [*lead] int32): abstract batches."""
  x = {"image": jax.ShapeDtypeStruct(lead + builders.image_shape(config), jnp.float32)}
  if labels:
    x["label"] = jax.ShapeDtypeStruct(lead, jnp.int32)
  return x


def _forward_program(model, config, devices, b: int, learned_variance: bool):
  """The network once, as the samplers call it (guided: both branches), for b images per device."""
  d = len(devices)
  params = builders.abstract_params(model, config)
  conditional = bool(config.model.num_classes)

  def forward(p, x, t, y):
    return sample.sampling_model_fn(model, p, y, config, _VarianceOnly(learned_variance))(x, t)

  args = (
      _abstract(params, d),
      jax.ShapeDtypeStruct((d, b) + builders.image_shape(config), jnp.float32),
      jax.ShapeDtypeStruct((d, b), jnp.int32),
      jax.ShapeDtypeStruct((d, b), jnp.int32) if conditional else None,
  )
  return parallel.pmap(forward, devices).lower(*args)


@dataclasses.dataclass
class _VarianceOnly:
  """What guidance needs of a diffusion: whether the variance is learned."""

  learned_variance: bool


def _network_cost(model, config, devices, calls: int, learned_variance: bool):
  """cost(b, _) of a program that calls the network ``calls`` times on b images per device."""

  def cost(b, _compiled):
    flops, seconds = _cost(_forward_program(model, config, devices, b, learned_variance).compile())
    return flops * calls, (seconds * calls if seconds else None)

  return cost


def build_programs(config, devices) -> dict[str, Program]:
  """The programs ``config`` runs, for ``devices`` (compile-only TPU devices or real ones)."""
  platform = devices[0].platform
  d = len(devices)
  local = sum(1 for x in devices if x.process_index == devices[0].process_index)
  hosts = d // local
  model = builders.build_model(config, platform=platform)
  conditional = bool(config.model.num_classes)
  out = {}

  # The train step (Algorithm 1), steps_per_call steps per call.
  diffusion = builders.build_diffusion(config)
  tx = builders.create_optimizer(config.optim)
  tcfg = config.training
  n = int(tcfg.steps_per_call)
  accum = int(tcfg.grad_accum_steps)
  trips = (n if step_lib.multi_step_loop(config, platform) == "scan" else 1) * accum
  state = jax.eval_shape(lambda: state_lib.create_train_state(config, model, tx))
  p_train = step_lib.make_p_train_step(model, diffusion, tx, config, devices=devices)

  def train_cost(_b, compiled):
    flops, seconds = _cost(compiled)
    return flops * trips, (seconds * trips if seconds else None)

  out["train"] = Program(
      "train",
      lambda b: p_train.lower(_abstract(state, d), _image_batch(config, (d, n, b), conditional)),
      train_cost,
      tcfg.batch_size // d,
      lambda b: b * d * n,
      n,
      "training.batch_size",
  )

  # The sampler: sampling.batch_size images per call over a host's devices.
  sdiff = builders.build_sampling_diffusion(config)
  params = _abstract(builders.abstract_params(model, config), d)

  def lower_sample(b):
    p = sample.make_p_sample(model, sdiff, config, b, devices=devices)
    y = jax.ShapeDtypeStruct((d, b), jnp.int32) if conditional else None
    return p.lower(params, jax.ShapeDtypeStruct((d, 2), jnp.uint32), y)

  out["sample"] = Program(
      "sample",
      lower_sample,
      _network_cost(
          model, config, devices, builders.sampling_steps(config), sdiff.learned_variance
      ),
      config.sampling.batch_size // local,
      lambda b: b * d,
      0,
      "sampling.batch_size",
  )

  # The bits/dim step: the whole bound (T network calls) of b test images per device.
  def lower_bpd(b):
    p = bpd.make_p_bpd(model, diffusion, 0, bool(config.sampling.clip_denoised), devices=devices)
    batch = _image_batch(config, (d, b), conditional)
    return p.lower(params, batch, jax.ShapeDtypeStruct((d, b), jnp.int32))

  out["eval_bpd"] = Program(
      "eval_bpd",
      lower_bpd,
      _network_cost(model, config, devices, diffusion.num_timesteps, diffusion.learned_variance),
      config.eval.batch_size // (hosts * local),
      lambda b: b * d,
      0,
      "eval.batch_size",
  )

  # FID/IS features: Inception-v3 on 299x299 (the digits use a scikit-learn MLP instead).
  if config.data.dataset != "digits":
    net = inception.InceptionV3()
    size = config.data.image_size

    def lower_fid(b):
      variables = jax.eval_shape(
          net.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3), jnp.float32)
      )

      def apply(v, x):
        pool3, logits = net.apply(v, x)
        return pool3, jax.nn.softmax(logits, axis=-1)

      x = jax.ShapeDtypeStruct((d, b, size, size, 3), jnp.float32)
      return parallel.pmap(apply, devices).lower(_abstract(variables, d), x)

    out["fid_features"] = Program(
        "fid_features",
        lower_fid,
        lambda _b, compiled: _cost(compiled),
        -(-config.eval.batch_size // local),
        lambda b: b * d,
        0,
        "eval.batch_size",
    )
  return out


def _memory(compiled, devices: int) -> dict:
  """Per-device bytes: arguments, outputs, temporaries, code, and their total (donated inputs once).

  ``argument_bytes_logical``: the arguments' own sizes, before the TPU's tiled
  layouts pad them (``argument_bytes``).
  """
  m = compiled.memory_analysis()
  logical = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(compiled.in_avals))
  got = dict(
      argument_bytes_logical=int(logical) // devices,
      argument_bytes=int(m.argument_size_in_bytes),
      output_bytes=int(m.output_size_in_bytes),
      alias_bytes=int(m.alias_size_in_bytes),
      temp_bytes=int(m.temp_size_in_bytes),
      code_bytes=int(m.generated_code_size_in_bytes),
  )
  got["total_bytes"] = (
      got["argument_bytes"]
      + got["output_bytes"]
      - got["alias_bytes"]
      + got["temp_bytes"]
      + got["code_bytes"]
  )
  return got


def _compile(program: Program, b: int):
  """(compiled, seconds); a program the compiler refuses for lack of memory gives (None, s)."""
  start = time.time()
  try:
    return program.lower(b).compile(), time.time() - start
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" in str(e) or "memory" in str(e).lower():
      return None, time.time() - start
    raise


def _fits(program: Program, b: int, hbm: int) -> tuple[bool, Optional[int]]:
  compiled, _ = _compile(program, b)
  if compiled is None:
    return False, None
  total = _memory(compiled, 1)["total_bytes"]
  return total <= hbm, total


def largest_batch(program: Program, hbm: int, too_big: int, too_big_bytes: Optional[int]):
  """The largest per-device batch below ``too_big`` that fits in ``hbm`` bytes, found by compiling.

  Memory is close to affine in the batch, so each try is the secant estimate
  through the two newest compiled points (the first: a quarter of
  ``too_big``), kept inside the bracket of the largest batch known to fit and
  the smallest known not to, then its neighbour across the limit, which closes
  the bracket when the estimate was right. Near the limit the TPU compiler
  rematerialises to fit, which bends the curve; when one end of the bracket has
  stayed put for two tries, the next try halves the bracket instead. At most
  ``MAX_SEARCH_COMPILES`` compiles.

  Returns a dict: largest_fitting (0 if not even 1 fits), largest_fitting_bytes,
  smallest_failing (the bracket's other end), compiles, and exact
  (smallest_failing == largest_fitting + 1).
  """
  lo, lo_bytes, hi = 0, None, too_big
  points = [(too_big, too_big_bytes)] if too_big_bytes is not None else []
  compiles = 0

  def attempt(b):
    nonlocal lo, lo_bytes, hi, compiles
    ok, total = _fits(program, b, hbm)
    compiles += 1
    if ok:
      lo, lo_bytes = b, total
    else:
      hi = b
    if total is not None:
      points.append((b, total))
    return ok

  secant_moved = []  # which end each secant try moved
  while hi - lo > 1 and compiles < MAX_SEARCH_COMPILES:
    stuck = len(secant_moved) >= 2 and secant_moved[-1] == secant_moved[-2]
    secant = len(points) >= 2 and points[-2][1] != points[-1][1] and not stuck
    if secant:
      (b1, m1), (b2, m2) = points[-2:]
      b = int(b2 + (hbm - m2) * (b2 - b1) / (m2 - m1))
    else:
      b = max(1, hi // 4) if lo == 0 else (lo + hi) // 2
      secant_moved.clear()
    b = min(max(b, lo + 1), hi - 1)
    ok = attempt(b)
    if not ok and b == 1:
      break
    if secant:
      secant_moved.append(ok)
      neighbour = b + 1 if ok else b - 1  # (below b only once a batch is known to fit)
      if lo < neighbour < hi and (ok or lo > 0) and compiles < MAX_SEARCH_COMPILES:
        attempt(neighbour)
  return dict(
      largest_fitting=lo,
      largest_fitting_bytes=lo_bytes,
      smallest_failing=hi,
      compiles=compiles,
      exact=hi - lo <= 1,
  )


def _variants(config, name: str) -> list[tuple[str, Any]]:
  """(override, config) pairs of existing settings that cut a program's memory, in that order."""
  out = []
  if name == "train":
    accum = config.training.grad_accum_steps * 2
    while accum <= config.training.batch_size:
      c = copy.deepcopy(config)
      c.training.grad_accum_steps = accum
      out.append((f"training.grad_accum_steps={accum}", c))
      accum *= 2
  if config.model.dtype != "bfloat16":
    c = copy.deepcopy(config)
    c.model.dtype = "bfloat16"
    out.append(("model.dtype=bfloat16", c))
  if name == "train" and not config.model.remat:
    c = copy.deepcopy(config)
    c.model.remat = True
    out.append(("model.remat=True", c))
  return out


def _fixes(config, devices, name: str, batch: int, hbm: int) -> dict:
  """{override: fits} for each setting of ``_variants``, compiled at the configured batch.

  grad_accum_steps stops at the first value that fits.
  """
  found = {}
  for label, variant in _variants(config, name):
    if label.startswith("training.grad_accum_steps") and any(
        ok for k, ok in found.items() if k.startswith("training.grad_accum_steps")
    ):
      continue
    if name == "train" and batch % variant.training.grad_accum_steps:
      continue
    ok, _ = _fits(build_programs(variant, devices)[name], batch, hbm)
    found[label] = ok
  return found


def _gib(x) -> str:
  return f"{x / tpu.GiB:.2f}"


def report_program(config, devices, topology, program: Program, search: bool = True) -> dict:
  """One program compiled for the slice: memory, cost, implied rates, fit (and, if not, fixes)."""
  d = len(devices)
  chip = topology.chip
  b = program.batch
  compiled, seconds = _compile(program, b)
  row: dict = dict(program=program.name, per_device_batch=b, batch_field=program.field)
  row["images_per_call"] = program.images(b)
  row["compile_seconds"] = round(seconds, 1)
  row["hbm_bytes"] = chip.hbm_bytes
  if compiled is None:
    row.update(fits=False, total_bytes=None, refused="the compiler ran out of memory")
  else:
    row.update(_memory(compiled, d))
    row["fits"] = row["total_bytes"] <= chip.hbm_bytes
    flops, est = program.cost(b, compiled)
    row["flops_per_call"] = flops
    row["flops_per_image"] = flops * d / max(program.images(b), 1)
    row["estimated_seconds_per_call"] = est
    if est:
      row["estimated_images_per_second"] = program.images(b) / est
      if program.steps:
        row["estimated_steps_per_second"] = program.steps / est
      row["estimated_fraction_of_peak"] = flops / est / chip.peak_flops
  if not row["fits"] and search:
    found = largest_batch(program, chip.hbm_bytes, b, row.get("total_bytes"))
    row["largest_fitting_per_device_batch"] = found["largest_fitting"]
    row["largest_fitting_total_bytes"] = found["largest_fitting_bytes"]
    row["smallest_failing_per_device_batch"] = found["smallest_failing"]
    row["largest_fitting_is_exact"] = found["exact"]
    row["search_compiles"] = found["compiles"]
    row["fixes"] = _fixes(config, devices, program.name, b, chip.hbm_bytes)
  return row


def format_rate(x: float) -> str:
  """A rate for the log and docs tables: whole units, or two significant digits below 10."""
  return f"{x:.2g}" if x < 10 else f"{x:.0f}"


def _fmt_row(r: dict) -> str:
  est = r.get("estimated_seconds_per_call")
  rate = ""
  if est:
    rate = f"{format_rate(r['estimated_images_per_second'])} img/s"
    if "estimated_steps_per_second" in r:
      rate = f"{r['estimated_steps_per_second']:.2f} steps/s, " + rate
    rate += f", {100 * r['estimated_fraction_of_peak']:.0f}% of peak"
  if r.get("total_bytes") is None:
    mem = "does not compile: out of memory"
  else:
    mem = (
        f"args {_gib(r['argument_bytes'])} + out {_gib(r['output_bytes'] - r['alias_bytes'])}"
        f" + temp {_gib(r['temp_bytes'])} + code {_gib(r['code_bytes'])}"
        f" = {_gib(r['total_bytes'])} / {_gib(r['hbm_bytes'])} GiB"
    )
  cost = ""
  if "flops_per_call" in r:
    cost = (
        f"{r['flops_per_call'] / 1e12:.3f} TFLOP/call, {r['flops_per_image'] / 1e9:.2f} GFLOP/img"
    )
    cost += f", {est * 1e3:.1f} ms/call (XLA estimate)" if est else ", time: unavailable"
  fit = "fits" if r["fits"] else "DOES NOT FIT"
  line = f"{r['program']:<13} b={r['per_device_batch']:<5} {mem}; {cost}; {rate}; {fit}"
  if not r["fits"] and "largest_fitting_per_device_batch" in r:
    fixes = [k for k, ok in r["fixes"].items() if ok]
    largest = str(r["largest_fitting_per_device_batch"])
    if not r.get("largest_fitting_is_exact", True):  # the search stopped with a bracket
      largest += f" to {r['smallest_failing_per_device_batch'] - 1}"
    line += (
        f" (largest per-device batch that fits: {largest};"
        f" fits with: {', '.join(fixes) or 'none of grad_accum_steps, bfloat16, remat'})"
    )
  return line


def run_compile(
    config, workdir: str, topology_name: str, programs=PROGRAMS, search: bool = True
) -> dict:
  """--mode=compile: compiles ``programs`` of ``config`` for ``topology_name``; writes the JSON.

  Returns the report: {'topology', 'devices', 'hosts', 'chip', 'programs': [row, ...]}.
  """
  topology = tpu.parse(topology_name)
  devices = tpu.devices(topology)
  logging.info("Compiling for %s", tpu.describe(topology, devices))
  built = build_programs(config, devices)
  rows = []
  for name in programs:
    if name not in built:
      logging.info("%s: not a JAX program for data.dataset=%r; skipped", name, config.data.dataset)
      continue
    row = report_program(config, devices, topology, built[name], search)
    logging.info("%s", _fmt_row(row))
    rows.append(row)
  report = dict(
      topology=topology.name,
      libtpu_topology=topology.libtpu_name,
      devices=len(devices),
      hosts=len({x.process_index for x in devices}),
      chip=dataclasses.asdict(topology.chip),
      model_dtype=config.model.dtype,
      note="times are XLA's cost-model estimates for the TPU, not measurements",
      programs=rows,
  )
  path = os.path.join(workdir, f"compile_{topology.file_tag}.json")
  files.write_json(path, report)
  logging.info("Wrote %s", path)
  return report


def slice_device_counts(topology_name: str) -> tuple[int, int, str]:
  """(devices, devices of one host, "") of the slice, for the start-up config check.

  The third item, the empty hint on changing the device count, matches ``host.setup``'s:
  a slice's count is fixed.

  Call before JAX starts its backends (see ``tpu.prepare_environment``).
  """
  tpu.prepare_environment()
  topology = tpu.parse(topology_name)
  devs = tpu.devices(topology)
  first = devs[0].process_index
  return len(devs), sum(1 for x in devs if x.process_index == first), ""
