"""Variance schedules beta_1..beta_T, in float64 numpy as in the paper's code.

The paper (Ho et al. 2020, Sec. 4) uses ``linear`` betas from 1e-4 to 0.02 over
T = 1000 steps. The other names are the ones the paper's code
(``diffusion_utils_2.get_beta_schedule``) provides, plus the ``cosine`` schedule
of Nichol & Dhariwal (2021, Eq. 17). Schedules are computed in float64 and only
cast to float32 where the tables are used (see ``GaussianDiffusion``).

Index convention: ``betas[i]`` is beta_{i+1} of the paper, i.e. array index
t = 0 is the first diffusion step. The same convention holds for every table.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

SCHEDULES = ("linear", "quad", "const", "jsd", "warmup10", "warmup50", "cosine")


def _warmup_betas(
    beta_start: float, beta_end: float, num_timesteps: int, warmup_frac: float
) -> np.ndarray:
  """beta_end everywhere, with a linear ramp from beta_start over the first part."""
  betas = beta_end * np.ones(num_timesteps, dtype=np.float64)
  warmup_time = int(num_timesteps * warmup_frac)
  betas[:warmup_time] = np.linspace(beta_start, beta_end, warmup_time, dtype=np.float64)
  return betas


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal (2021) Eq. 17: alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) pi/2).

  beta_t = 1 - alpha_bar(t/T) / alpha_bar((t-1)/T), capped at ``max_beta`` to
  avoid the singularity at t = T.
  """

  def alpha_bar(u):
    return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

  betas = [
      min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
      for i in range(num_timesteps)
  ]
  return np.asarray(betas, dtype=np.float64)


def get_beta_schedule(
    name: str, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> np.ndarray:
  """Returns betas: float64 [num_timesteps], each in (0, 1].

  Args:
    name: one of ``SCHEDULES``. ``linear``: the paper's (Sec. 4);
      ``quad``: linear in sqrt(beta); ``const``: beta_end throughout;
      ``jsd``: 1/T, 1/(T-1), ..., 1 (Sohl-Dickstein et al. 2015);
      ``warmup10``/``warmup50``: beta_end after a linear warm-up over the
      first 10%/50% of steps; ``cosine``: Nichol & Dhariwal (2021), where
      beta_start/beta_end are not used.
    num_timesteps: T >= 1.
    beta_start: beta_1 in (0, 1).
    beta_end: beta_T in (0, 1).

  Raises:
    ValueError: naming the offending field.
  """
  if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
    raise ValueError(f"num_timesteps must be an integer >= 1, got {num_timesteps!r}")
  if name != "cosine":
    for field, value in (("beta_start", beta_start), ("beta_end", beta_end)):
      if not 0.0 < float(value) < 1.0:
        raise ValueError(f"{field} must lie in (0, 1), got {value!r}")
  if name == "linear":
    betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
  elif name == "quad":
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2
  elif name == "const":
    betas = beta_end * np.ones(num_timesteps, dtype=np.float64)
  elif name == "jsd":
    betas = 1.0 / np.linspace(num_timesteps, 1, num_timesteps, dtype=np.float64)
  elif name == "warmup10":
    betas = _warmup_betas(beta_start, beta_end, num_timesteps, 0.1)
  elif name == "warmup50":
    betas = _warmup_betas(beta_start, beta_end, num_timesteps, 0.5)
  elif name == "cosine":
    betas = cosine_betas(num_timesteps)
  else:
    raise ValueError(f"beta_schedule must be one of {SCHEDULES}, got {name!r}")
  assert betas.shape == (num_timesteps,)
  return betas


def validate_betas(betas: np.ndarray) -> np.ndarray:
  """Checks a user-supplied schedule: 1-D, finite, every beta in (0, 1]."""
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.size < 1:
    raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
  if not np.all(np.isfinite(betas)) or not np.all((betas > 0) & (betas <= 1)):
    raise ValueError(
        "betas must all lie in (0, 1]; got min " f"{betas.min():.3g}, max {betas.max():.3g}"
    )
  return betas


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> list[int]:
  """Which of the original timesteps a respaced sampler visits.

  Following Nichol & Dhariwal (2021, Sec. 4.1) and Song et al. (2021, DDIM):
    * ``"ddimN"`` (or ``"ddim"`` + int): N steps at a fixed stride, as DDIM does;
    * an int or ``"N"``: N steps evenly spread (rounded), always including t = 0
      and t = T - 1;
    * ``"a,b,c"`` or a sequence: the range is split into len(counts) equal
      sections and section i gets counts[i] evenly spread steps.

  Returns the sorted list of kept timesteps (array indices in [0, T)).
  """
  if isinstance(section_counts, str):
    spec = section_counts.strip()
    if spec.startswith("ddim"):
      desired = int(spec[len("ddim") :])
      if not 1 <= desired <= num_timesteps:
        raise ValueError(f"sampler respacing {spec!r}: need 1 <= steps <= {num_timesteps}")
      for stride in range(1, num_timesteps + 1):
        if len(range(0, num_timesteps, stride)) == desired:
          return list(range(0, num_timesteps, stride))
      raise ValueError(
          f"sampler respacing {spec!r}: cannot make exactly {desired} "
          f"steps with an integer stride of {num_timesteps}"
      )
    counts = [int(c) for c in spec.split(",")]
  elif isinstance(section_counts, (int, np.integer)):
    counts = [int(section_counts)]
  else:
    counts = [int(c) for c in section_counts]

  size_per = num_timesteps // len(counts)
  extra = num_timesteps % len(counts)
  start = 0
  kept: list[int] = []
  for i, count in enumerate(counts):
    size = size_per + (1 if i < extra else 0)
    if not 1 <= count <= size:
      raise ValueError(f"sampler respacing: cannot take {count} steps from a section of {size}")
    if count == 1:
      kept.append(start)
    else:
      stride = (size - 1) / (count - 1)
      kept.extend(start + round(stride * j) for j in range(count))
    start += size
  return sorted(set(kept))


def respace_betas(betas: np.ndarray, use_timesteps: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """Betas of the process that visits only ``use_timesteps`` (Nichol & Dhariwal, Sec. 4).

  The new betas keep alpha_bar at every kept step:
  beta'_i = 1 - alpha_bar_{t_i} / alpha_bar_{t_{i-1}}  (alpha_bar_{t_{-1}} = 1).

  Args:
    betas: float64 [T], the original schedule.
    use_timesteps: kept original indices, any order, in [0, T).

  Returns:
    (new_betas float64 [K], timestep_map int32 [K]) where timestep_map[i] is the
    original timestep of respaced step i, the t a network trained on the full
    process must be called with.
  """
  betas = validate_betas(betas)
  kept = sorted(set(int(t) for t in use_timesteps))
  if not kept or kept[0] < 0 or kept[-1] >= len(betas):
    raise ValueError(f"use_timesteps must lie in [0, {len(betas)}), got {kept[:3]}...{kept[-3:]}")
  alphas_cumprod = np.cumprod(1.0 - betas)
  last = 1.0
  new_betas = []
  for t in kept:
    new_betas.append(1.0 - alphas_cumprod[t] / last)
    last = alphas_cumprod[t]
  return np.asarray(new_betas, dtype=np.float64), np.asarray(kept, dtype=np.int32)
