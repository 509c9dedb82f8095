"""Progress of a long loop: units done (steps, images), the rate, and the time left.

One reporter for training, sampling and evaluation, so that every log line says
it the same way: ``64/256 images, 12.30 images/s, ETA 00:00:15``. Times left
read ``HH:MM:SS`` under a day and ``Nd HH:MM:SS`` from a day on (the paper's
800k-step runs last days).

clu's ``periodic_actions.ReportProgress`` was weighed against this: it reports
the steps of a training loop on its own schedule through clu's metric writers,
while sampling and evaluation count images and log per call; what it would
bring here is these few lines, for a dependency (and its own pins) more.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Optional


def format_duration(seconds: float) -> str:
  """'HH:MM:SS' under a day, 'Nd HH:MM:SS' from a day on, '--:--:--' when unknown.

  Rounded to whole seconds; negative times read as 0, inf and NaN as unknown.
  E.g. 59.6 -> '00:01:00', 30 h -> '1d 06:00:00'.
  """
  if not math.isfinite(seconds):
    return "--:--:--"
  s = max(0, int(round(seconds)))
  days, s = divmod(s, 86400)
  hours, s = divmod(s, 3600)
  minutes, s = divmod(s, 60)
  hms = f"{hours:02d}:{minutes:02d}:{s:02d}"
  return f"{days}d {hms}" if days else hms


@dataclasses.dataclass(frozen=True)
class Report:
  """Where a loop stands: ``str()`` is the log line's progress part.

  done: units done; total: units at the end (None: unknown); unit: e.g.
  'steps'; rate: units per second over the measuring window (NaN before any
  time has passed); eta_s: seconds left at that rate (inf at rate 0, NaN when
  the rate or the total is unknown).
  """

  done: int
  total: Optional[int]
  unit: str
  rate: float
  eta_s: float

  def __str__(self) -> str:
    of = "" if self.total is None else f"/{self.total}"
    out = f"{self.done}{of} {self.unit}, {self.rate:.2f} {self.unit}/s"
    if self.total is not None:
      out += f", ETA {format_duration(self.eta_s)}"
    return out


class Progress:
  """Counts ``unit``s towards ``total``; rates are measured from the last ``restart``.

  Args:
    total: units at the end (None: unknown, no ETA).
    unit: what is counted, plural ('steps', 'images').
    done: units already done when it starts (a resumed run).
    skip_first: restart the window after the first report, so that the first
      call's compilation counts in the first rate only.
    clock: seconds on a monotonic clock (tests pass their own).
  """

  def __init__(
      self,
      total: Optional[int],
      unit: str,
      done: int = 0,
      skip_first: bool = False,
      clock: Callable[[], float] = time.monotonic,
  ):
    self.total = None if total is None else int(total)
    self.unit = unit
    self._clock = clock
    self._skip_first = skip_first
    self.restart(done)

  def restart(self, done: int) -> None:
    """Starts a new measuring window at ``done`` units, now (e.g. after time that is no progress)."""
    self._t0, self._done0 = self._clock(), int(done)

  def report(self, done: int) -> Report:
    """The rate over the window and the time left, at ``done`` units done."""
    done = int(done)
    elapsed = self._clock() - self._t0
    rate = (done - self._done0) / elapsed if elapsed > 0 else math.nan
    eta = math.nan
    if self.total is not None and not math.isnan(rate):
      left = max(self.total - done, 0)
      eta = left / rate if rate > 0 else (0.0 if left == 0 else math.inf)
    if self._skip_first:
      self._skip_first = False
      self.restart(done)
    return Report(done, self.total, self.unit, rate, eta)
