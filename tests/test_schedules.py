"""Schedules and the precomputed tables, against float64 re-derivations and known values."""

import math

import numpy as np
import pytest

from ddpm_jax.diffusion import schedules
from ddpm_jax.diffusion.gaussian import GaussianDiffusion


def test_linear_alphas_cumprod_known_values():
  # Known values of the paper's schedule (linear 1e-4..0.02, T = 1000).
  betas = schedules.get_beta_schedule("linear", 1000)
  assert betas.dtype == np.float64
  ac = np.cumprod(1.0 - betas)
  np.testing.assert_allclose(ac[[0, 1, 500]], [0.9999, 0.99978009, 0.07779666], rtol=1e-7)
  np.testing.assert_allclose(ac[999], 4.0358e-05, rtol=1e-4)
  assert betas[0] == 1e-4 and betas[-1] == 0.02


def test_each_schedule_against_its_definition():
  T = 1000
  quad = schedules.get_beta_schedule("quad", T, 1e-4, 0.02)
  root = np.sqrt(quad)
  np.testing.assert_allclose(
      np.diff(root), (math.sqrt(0.02) - math.sqrt(1e-4)) / (T - 1), rtol=1e-9
  )
  np.testing.assert_allclose(schedules.get_beta_schedule("const", T, 1e-4, 0.02), 0.02)
  jsd = schedules.get_beta_schedule("jsd", T)
  np.testing.assert_allclose(jsd, [1.0 / (T - i) for i in range(T)], rtol=1e-12)
  for name, frac in (("warmup10", 0.1), ("warmup50", 0.5)):
    b = schedules.get_beta_schedule(name, T, 1e-4, 0.02)
    n = int(T * frac)
    np.testing.assert_allclose(
        b[:n], [1e-4 + (0.02 - 1e-4) * i / (n - 1) for i in range(n)], rtol=1e-9
    )
    np.testing.assert_allclose(b[n:], 0.02)
  cos = schedules.get_beta_schedule("cosine", T)
  assert cos.max() <= 0.999 and cos[-1] == 0.999
  f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
  ac = np.cumprod(1.0 - cos)
  # Where the cap is inactive, alpha_bar telescopes to f(t/T) / f(0) (Improved DDPM Eq. 17).
  for t in (0, 10, 500, 900):
    np.testing.assert_allclose(ac[t], f((t + 1) / T) / f(0.0), rtol=1e-9)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(name="linearr"), "beta_schedule"),
        (dict(name="linear", num_timesteps=0), "num_timesteps"),
        (dict(name="linear", beta_start=0.0), "beta_start"),
        (dict(name="linear", beta_end=1.5), "beta_end"),
    ],
)
def test_bad_schedule_arguments_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    schedules.get_beta_schedule(**kwargs)


def test_tables_match_float64_reference():
  betas = schedules.get_beta_schedule("linear", 1000)
  d = GaussianDiffusion(betas)
  # Independent re-derivation with Python floats, one step at a time.
  ac, ac_prev, post_var, coef1, coef2 = [], [], [], [], []
  prod = 1.0
  for beta in betas.tolist():
    prev = prod
    prod *= 1.0 - beta
    ac.append(prod)
    ac_prev.append(prev)
    post_var.append(beta * (1.0 - prev) / (1.0 - prod))
    coef1.append(beta * math.sqrt(prev) / (1.0 - prod))
    coef2.append((1.0 - prev) * math.sqrt(1.0 - beta) / (1.0 - prod))
  ref = dict(
      alphas_cumprod=ac,
      alphas_cumprod_prev=ac_prev,
      sqrt_alphas_cumprod=[math.sqrt(a) for a in ac],
      sqrt_one_minus_alphas_cumprod=[math.sqrt(1 - a) for a in ac],
      log_one_minus_alphas_cumprod=[math.log(1 - a) for a in ac],
      sqrt_recip_alphas_cumprod=[1 / math.sqrt(a) for a in ac],
      sqrt_recipm1_alphas_cumprod=[math.sqrt(1 / a - 1) for a in ac],
      posterior_variance=post_var,
      posterior_log_variance_clipped=[math.log(post_var[1])] + [math.log(v) for v in post_var[1:]],
      posterior_mean_coef1=coef1,
      posterior_mean_coef2=coef2,
      fixedlarge_variance=[post_var[1]] + betas[1:].tolist(),
  )
  for name, values in ref.items():
    table = np.asarray(getattr(d, name))
    assert table.dtype == np.float32, name
    np.testing.assert_allclose(table, np.asarray(values), rtol=1e-6, atol=1e-12, err_msg=name)
  assert float(d.posterior_variance[0]) == 0.0


def test_space_timesteps():
  assert schedules.space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
  kept = schedules.space_timesteps(1000, "50")
  assert len(kept) == 50 and kept[0] == 0 and kept[-1] == 999
  kept = schedules.space_timesteps(300, "10,15,20")
  assert len(kept) == 45
  assert sum(t < 100 for t in kept) == 10 and sum(100 <= t < 200 for t in kept) == 15
  with pytest.raises(ValueError, match="respacing"):
    schedules.space_timesteps(100, "ddim300")


def test_respaced_betas_preserve_alphas_cumprod():
  betas = schedules.get_beta_schedule("linear", 1000)
  kept = schedules.space_timesteps(1000, "50")
  new_betas, tmap = schedules.respace_betas(betas, kept)
  assert new_betas.shape == (50,) and list(tmap) == kept
  np.testing.assert_allclose(np.cumprod(1 - new_betas), np.cumprod(1 - betas)[kept], rtol=1e-12)
  # The first respaced beta is 1 - alpha_bar of the first kept step; later ones are ratios.
  ac = np.cumprod(1 - betas)
  np.testing.assert_allclose(new_betas[1], 1 - ac[kept[1]] / ac[kept[0]], rtol=1e-12)
  # Keeping every step is the identity.
  same, _ = schedules.respace_betas(betas, range(1000))
  np.testing.assert_allclose(same, betas, rtol=1e-9)
