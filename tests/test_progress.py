"""ddpm_jax/progress.py: the time-left format and the rate, on a clock the test sets."""

import math

import pytest

from ddpm_jax import progress


@pytest.mark.parametrize(
    "seconds, text",
    [
        (0, "00:00:00"),
        (59.4, "00:00:59"),
        (59.6, "00:01:00"),
        (3 * 3600 + 25 * 60 + 7, "03:25:07"),
        (86399, "23:59:59"),
        (86400, "1d 00:00:00"),  # strftime of gmtime read this as 00:00:00
        (30 * 3600, "1d 06:00:00"),
        (800_000 / 2.5, "3d 16:53:20"),  # the paper's 800k steps at 2.5 steps/s
        (-5, "00:00:00"),
        (math.inf, "--:--:--"),
        (math.nan, "--:--:--"),
    ],
)
def test_format_duration(seconds, text):
  assert progress.format_duration(seconds) == text


class Clock:

  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


def test_rate_and_eta_over_the_window_since_the_last_restart():
  clock = Clock()
  p = progress.Progress(800_000, "steps", done=100, clock=clock)  # resumed at step 100
  clock.now += 50.0
  r = p.report(200)
  assert r.rate == pytest.approx(2.0)  # (200 - 100) / 50 s
  assert r.eta_s == pytest.approx((800_000 - 200) / 2.0)
  assert str(r) == "200/800000 steps, 2.00 steps/s, ETA 4d 15:05:00"
  # Without a restart the window keeps growing.
  clock.now += 10.0
  assert p.report(260).rate == pytest.approx(160 / 60)
  # Time that is not progress (a sample grid) is left out by restarting.
  clock.now += 300.0
  p.restart(260)
  clock.now += 20.0
  assert p.report(300).rate == pytest.approx(2.0)


def test_skip_first_leaves_the_first_calls_compilation_out_of_later_rates():
  clock = Clock()
  p = progress.Progress(96, "images", skip_first=True, clock=clock)
  clock.now += 30.0  # the first call: compilation + 32 images
  first = p.report(32)
  assert first.rate == pytest.approx(32 / 30)
  clock.now += 2.0
  second = p.report(64)
  assert second.rate == pytest.approx(16.0) and second.eta_s == pytest.approx(2.0)
  assert str(second) == "64/96 images, 16.00 images/s, ETA 00:00:02"


def test_unknown_total_rate_and_finished_loops():
  clock = Clock()
  p = progress.Progress(None, "images", clock=clock)
  clock.now += 4.0
  r = p.report(40)
  assert r.rate == pytest.approx(10.0) and math.isnan(r.eta_s)
  assert str(r) == "40 images, 10.00 images/s"
  q = progress.Progress(10, "steps", done=10, clock=clock)
  assert str(q.report(10)) == "10/10 steps, nan steps/s, ETA --:--:--"  # no time has passed
  clock.now += 1.0
  assert q.report(10).eta_s == 0.0  # done: no time left even at rate 0
  stalled = progress.Progress(10, "steps", clock=clock)
  clock.now += 1.0
  assert math.isinf(stalled.report(0).eta_s)
