"""TPU slices by the names users know (``v3-8``, ``v5e-16``, ``v4:2x2x1``), as compile-only devices.

libtpu, the TPU compiler, compiles for a topology on a host without TPUs
(``jax.experimental.topologies``): ``--mode=compile`` uses these devices to
size and cost every program before a run. Nothing here runs on a TPU.

Names: ``vN-K`` counts TensorCores for v2, v3, v4 and v5p (two per chip) and
chips for v5e and v6e, as Cloud TPU does; the raw ``version:AxB[xC]`` form is
passed to libtpu as it is. One JAX device is one core on v2/v3 and one chip
(megacore) on v4/v5p and the single-core v5e/v6e chips.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import tempfile
from typing import Optional

from ddpm_jax import errors

INSTALL_HINT = "pip install -r requirements-tpu.txt (libtpu, the TPU compiler; no TPU needed)"


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation, per JAX device: HBM bytes and peak bfloat16 matrix FLOP/s."""

  version: str  # libtpu's name: 'v2', 'v3', 'v4', 'v5e', 'v5p', 'v6e'
  hbm_bytes: int
  peak_flops: float
  cores_in_name: bool  # 'vN-K' counts cores (two per chip), not chips
  devices_per_chip: int
  dims: int  # 2-D (v2, v3, v5e, v6e) or 3-D (v4, v5p) torus


GiB = 2**30
# Google Cloud's published figures per chip, divided over the chip's JAX devices.
CHIPS = {
    "v2": Chip("v2", 8 * GiB, 45e12 / 2, True, 2, 2),
    "v3": Chip("v3", 16 * GiB, 123e12 / 2, True, 2, 2),
    "v4": Chip("v4", 32 * GiB, 275e12, True, 1, 3),
    "v5e": Chip("v5e", 16 * GiB, 197e12, False, 1, 2),
    "v5p": Chip("v5p", 95 * GiB, 459e12, True, 1, 3),
    "v6e": Chip("v6e", 32 * GiB, 918e12, False, 1, 2),
}


@dataclasses.dataclass(frozen=True)
class Topology:
  """A slice: its name as asked, libtpu's ``version:AxB[xC]`` and the options it needs."""

  name: str
  libtpu_name: str
  chip: Chip
  chips: int
  options: tuple  # keyword arguments of get_topology_desc, as (key, value) pairs

  @property
  def file_tag(self) -> str:
    """The name as a file-name part: 'v3-8', 'v4_2x2x1'."""
    return re.sub(r"[^A-Za-z0-9.-]", "_", self.name)


def _shape(chips: int, dims: int) -> tuple:
  """A torus of ``chips`` chips as Cloud TPU lays it out: (2, 4) for 8 in 2-D, (2, 2, 2) in 3-D."""
  if chips < 1 or chips & (chips - 1):
    raise ValueError(chips)
  chips_asked = chips
  shape = [1] * dims
  axis = 0
  while chips > 1:
    shape[axis] *= 2
    chips //= 2
    axis = (axis + 1) % dims
  if dims == 3 and chips_asked < 8:  # a single host's 2x2x1 (Cloud TPU's own names)
    return tuple(sorted(shape, reverse=True))
  return tuple(sorted(shape))


def parse(name: str) -> Topology:
  """``v3-8`` / ``v5e-16`` / ``v4:2x2x1`` -> Topology; anything else is a ConfigError naming --topology."""
  bad = lambda why: errors.ConfigError(
      f"--topology={name!r} is invalid: {why} (e.g. v3-8, v4-8, v5e-8, v5p-8, v6e-8 or v4:2x2x1)"
  )
  name = (name or "").strip()
  m = re.fullmatch(r"(v\d+[a-z]?)-(\d+)", name)
  if m:
    version, count = m.group(1), int(m.group(2))
    if version not in CHIPS:
      raise bad(f"unknown TPU version {version!r}; known: {', '.join(CHIPS)}")
    chip = CHIPS[version]
    chips = count // 2 if chip.cores_in_name else count
    if count < 1 or (chip.cores_in_name and count % 2) or chips & (chips - 1):
      raise bad(
          f"{version} slices have a power of two of {'cores' if chip.cores_in_name else 'chips'}"
      )
    shape = _shape(chips, chip.dims)
  else:
    m = re.fullmatch(r"(v\d+[a-z]?):(\d+(?:x\d+){1,2})", name)
    if not m or m.group(1) not in CHIPS:
      raise bad("not a slice name")
    chip = CHIPS[m.group(1)]
    shape = tuple(int(s) for s in m.group(2).split("x"))
    if len(shape) != chip.dims:
      raise bad(f"{chip.version} has a {chip.dims}-D topology")
    chips = 1
    for s in shape:
      chips *= s
  options = []
  if chip.version == "v4":
    options.append(("chip_config_name", "megacore"))  # one device per chip, as JAX runs v4
  if chip.version in ("v5e", "v6e") and chips <= 8:
    options.append(("chips_per_host_bounds", tuple(shape) + (1,)))  # single-host slices
  return Topology(name, f"{chip.version}:{'x'.join(map(str, shape))}", chip, chips, tuple(options))


@contextlib.contextmanager
def _quiet_stderr():
  """Hides what libtpu prints to the process's stderr (its TPU-VM metadata warnings)."""
  saved = os.dup(2)
  with tempfile.TemporaryFile() as sink:
    os.dup2(sink.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)


def prepare_environment() -> None:
  """Call before JAX starts its backends: libtpu may load in several processes (none owns a TPU).

  Also tells libtpu not to query the TPU-VM metadata server, which a host
  without TPUs does not have.
  """
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")


def devices(topology: Topology) -> list:
  """The slice's compile-only devices (``process_index`` is the host), in JAX's order.

  Raises UserError with the install command when libtpu is missing.
  """
  try:
    import libtpu  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise errors.UserError(f"--mode=compile needs libtpu: {INSTALL_HINT}") from e
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  prepare_environment()
  with _quiet_stderr():
    desc = topologies.get_topology_desc(
        topology_name=topology.libtpu_name, platform="tpu", **dict(topology.options)
    )
  return list(desc.devices)


def describe(topology: Topology, devs: Optional[list] = None) -> str:
  """'v3-8 (v3:2x2, 8 devices on 1 host)'."""
  n = len(devs) if devs is not None else topology.chips * topology.chip.devices_per_chip
  hosts = len({d.process_index for d in devs}) if devs is not None else None
  where = f" on {hosts} host{'s' if hosts != 1 else ''}" if hosts else ""
  return f"{topology.name} ({topology.libtpu_name}, {n} devices{where})"
