"""Samplers with an oracle network for Gaussian data, where the answer is known."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.diffusion import samplers as sampling
from ddpm_jax.diffusion import schedules
from ddpm_jax.diffusion.gaussian import GaussianDiffusion, respaced

BETAS = schedules.get_beta_schedule("linear", 1000)
AC = np.cumprod(1.0 - BETAS)
M, S = 0.3, 0.5  # data distribution N(M, S^2)


def gaussian_oracle(trace_counter=None):
  """E[eps | x_t] for x0 ~ N(M, S^2): sqrt(1-ab) (x_t - sqrt(ab) M) / (ab S^2 + 1 - ab).

  Called with original timesteps (respacing maps them), so it reads the full table.
  """
  ac = jnp.asarray(AC, jnp.float32)

  def model_fn(x_t, t):
    if trace_counter is not None:
      trace_counter.append(1)  # runs once per trace, not per step
    a = ac[t].reshape((-1,) + (1,) * (x_t.ndim - 1))
    return jnp.sqrt(1 - a) * (x_t - jnp.sqrt(a) * M) / (a * S**2 + 1 - a)

  return model_fn


N = 20_000
SHAPE = (N, 1, 1, 1)


def _check_moments(x, tol_scale=1.0):
  x = np.asarray(x, np.float64).ravel()
  mean_err = 4 * S / math.sqrt(N)
  std_err = 4 * S / math.sqrt(2 * N)
  assert abs(x.mean() - M) < tol_scale * mean_err, (x.mean(), M)
  assert abs(x.std() - S) < tol_scale * std_err, (x.std(), S)


@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall"])
def test_ancestral_sampling_recovers_the_data_distribution(var_type):
  d = GaussianDiffusion(BETAS, model_var_type=var_type)
  sample = jax.jit(
      lambda key: sampling.ancestral_sample_loop(
          d, gaussian_oracle(), SHAPE, key, clip_denoised=False
      )
  )
  _check_moments(sample(jax.random.PRNGKey(0)))


def test_same_key_same_samples_and_other_key_other_samples():
  d = GaussianDiffusion(schedules.get_beta_schedule("linear", 100, 1e-3, 0.2))
  f = jax.jit(lambda key: sampling.ancestral_sample_loop(d, gaussian_oracle(), (4, 2, 2, 1), key))
  a, b, c = f(jax.random.PRNGKey(1)), f(jax.random.PRNGKey(1)), f(jax.random.PRNGKey(2))
  np.testing.assert_array_equal(a, b)
  assert float(jnp.abs(a - c).max()) > 1e-3


def test_sampler_traces_the_network_once_whatever_T():
  for T in (10, 1000):
    d = GaussianDiffusion(schedules.get_beta_schedule("linear", T))
    calls = []
    jax.jit(
        lambda key: sampling.ancestral_sample_loop(d, gaussian_oracle(calls), (2, 1, 1, 1), key)
    )(jax.random.PRNGKey(0)).block_until_ready()
    assert len(calls) == 1, (T, len(calls))
    calls.clear()
    jax.jit(
        lambda key: sampling.ancestral_sample_loop(
            d, gaussian_oracle(calls), (2, 1, 1, 1), key, return_every=T // 5
        )
    )(jax.random.PRNGKey(0))
    assert len(calls) == 1


def test_trajectory_every_k_steps():
  d = GaussianDiffusion(BETAS)
  x, traj = sampling.ancestral_sample_loop(
      d, gaussian_oracle(), (3, 2, 2, 1), jax.random.PRNGKey(3), return_every=100
  )
  assert traj["x_t"].shape == (10, 3, 2, 2, 1) and traj["pred_xstart"].shape == (10, 3, 2, 2, 1)
  np.testing.assert_array_equal(traj["t"], np.arange(900, -1, -100))
  np.testing.assert_array_equal(traj["x_t"][-1], x)
  # The same key without the trajectory gives the same sample.
  np.testing.assert_allclose(
      sampling.ancestral_sample_loop(d, gaussian_oracle(), (3, 2, 2, 1), jax.random.PRNGKey(3)),
      x,
      atol=1e-6,
  )
  with pytest.raises(ValueError, match="return_every"):
    sampling.ancestral_sample_loop(
        d, gaussian_oracle(), (1, 1, 1, 1), jax.random.PRNGKey(0), return_every=300
    )


def test_respacing_every_step_is_the_original_sampler():
  d = GaussianDiffusion(BETAS)
  r = respaced(BETAS, range(1000))
  f = lambda diff: sampling.ancestral_sample_loop(
      diff, gaussian_oracle(), (8, 1, 1, 1), jax.random.PRNGKey(4), clip_denoised=False
  )
  np.testing.assert_allclose(np.asarray(f(r)), np.asarray(f(d)), atol=1e-5)


def _check_discretised(x, rel):
  """Fewer steps bias the spread (discretisation error), not the mean."""
  x = np.asarray(x, np.float64).ravel()
  assert abs(x.mean() - M) < 4 * S / math.sqrt(N) + 0.01, x.mean()
  assert abs(x.std() / S - 1) < rel, x.std()


def test_respaced_ancestral_sampling_is_close_to_the_data_distribution():
  kept = schedules.space_timesteps(1000, "100")
  d = respaced(BETAS, kept, model_var_type="fixedsmall")
  assert d.num_timesteps == 100
  np.testing.assert_allclose(np.asarray(d.alphas_cumprod), AC[kept], rtol=1e-5)
  x = jax.jit(
      lambda k: sampling.ancestral_sample_loop(d, gaussian_oracle(), SHAPE, k, clip_denoised=False)
  )(jax.random.PRNGKey(4))
  _check_discretised(x, rel=0.08)  # measured: std 0.472 for S = 0.5 at 100 steps


def test_ddim_eta0_is_deterministic_and_follows_the_ode():
  noise = jax.random.normal(jax.random.PRNGKey(5), SHAPE)
  results = {}
  for spec in ("ddim1000", "ddim50"):
    d = respaced(BETAS, schedules.space_timesteps(1000, spec))
    f = jax.jit(
        lambda key: sampling.ddim_sample_loop(
            d, gaussian_oracle(), SHAPE, key, eta=0.0, clip_denoised=False, noise=noise
        )
    )
    a, b = f(jax.random.PRNGKey(6)), f(jax.random.PRNGKey(7))
    np.testing.assert_array_equal(a, b)  # no noise is drawn at eta = 0
    results[spec] = np.asarray(a)
  # For Gaussian data the probability-flow ODE is the affine map x0 = M + S x_T.
  np.testing.assert_allclose(results["ddim1000"], M + S * np.asarray(noise), atol=1.5e-2)
  _check_discretised(results["ddim50"], rel=0.08)  # measured: std 0.472 at 50 steps


def test_ddim_eta1_is_stochastic_and_matches_the_data_distribution():
  d = respaced(BETAS, schedules.space_timesteps(1000, "ddim250"))
  f = jax.jit(
      lambda key: sampling.ddim_sample_loop(
          d, gaussian_oracle(), SHAPE, key, eta=1.0, clip_denoised=False
      )
  )
  a, b = f(jax.random.PRNGKey(8)), f(jax.random.PRNGKey(9))
  assert float(jnp.abs(a - b).max()) > 0.1
  _check_discretised(a, rel=0.05)


def test_ddim_inversion_round_trip():
  d = respaced(BETAS, schedules.space_timesteps(1000, "ddim1000"))
  x0 = jnp.asarray(np.linspace(-0.2, 0.8, 16).reshape(16, 1, 1, 1), jnp.float32)
  x_T = jax.jit(lambda x: sampling.ddim_reverse_loop(d, gaussian_oracle(), x))(x0)
  # The encoding is the ODE's affine map run backwards: x_T = (x0 - M) / S.
  np.testing.assert_allclose(np.asarray(x_T), (np.asarray(x0) - M) / S, atol=3e-2)
  back = sampling.ddim_sample_loop(
      d, gaussian_oracle(), x0.shape, jax.random.PRNGKey(0), eta=0.0, clip_denoised=False, noise=x_T
  )
  np.testing.assert_allclose(np.asarray(back), np.asarray(x0), atol=5e-3)


@pytest.mark.parametrize("loop", ["ancestral", "ddim"])
def test_sampler_program_does_not_grow_with_the_number_of_steps(loop):
  """One lax.scan over the steps: the network is traced once, and the compiled program for
  1000 steps has a while loop and as many instructions as the one for 10 steps (an unrolled
  loop would have ~100x more), so its compile time does not grow with T."""
  sizes = {}
  for T in (10, 1000):
    d = GaussianDiffusion(schedules.get_beta_schedule("linear", T))
    traced = []
    oracle = gaussian_oracle(traced)
    sample_loop = {"ancestral": sampling.ancestral_sample_loop, "ddim": sampling.ddim_sample_loop}[
        loop
    ]
    fn = functools.partial(sample_loop, d, oracle, (4, 2, 2, 1))
    hlo = jax.jit(fn).lower(jax.random.PRNGKey(0)).compile().as_text()
    assert len(traced) == 1, (T, len(traced))
    assert " while(" in hlo
    sizes[T] = sum(1 for line in hlo.splitlines() if " = " in line)  # HLO instructions
  assert sizes[1000] <= sizes[10] + 10, sizes


# ----------------------------------------------------------------------------
# DPM-Solver++ against the probability-flow ODE's closed form and diffusers
# ----------------------------------------------------------------------------


def continuous_oracle(diffusion, trace_counter=None):
  """E[eps | x_t] for N(M, S^2) data at a real t, with log-SNR interpolated linearly in t
  (the schedule DPM-Solver++ solves on); at integer t it is gaussian_oracle's."""
  lam = jnp.asarray(sampling.log_snr(diffusion), jnp.float32)

  def model_fn(x_t, t):
    if trace_counter is not None:
      trace_counter.append(1)
    t = t.astype(jnp.float32)
    lo = jnp.clip(jnp.floor(t), 0, lam.shape[0] - 1).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, lam.shape[0] - 1)
    l = lam[lo] + (t - lo) * (lam[hi] - lam[lo])
    a = jax.nn.sigmoid(2.0 * l).reshape((-1,) + (1,) * (x_t.ndim - 1))  # alpha_bar
    return jnp.sqrt(1 - a) * (x_t - jnp.sqrt(a) * M) / (a * S**2 + 1 - a)

  return model_fn


def ode_endpoint(x_T):
  """Where the probability-flow ODE takes x_T (at t = T-1) for N(M, S^2) data: the affine map
  that keeps the marginals, z = (x_T - sqrt(ab) M) / sqrt(ab S^2 + 1 - ab) -> M + S z."""
  ab = AC[-1]
  return M + S * (np.asarray(x_T, np.float64) - np.sqrt(ab) * M) / np.sqrt(ab * S**2 + 1 - ab)


def diffusers_dpm_solver(x_T, num_steps, spacing):
  """diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2) driven by the exact eps."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  sched = diffusers.DPMSolverMultistepScheduler(
      num_train_timesteps=1000,
      beta_start=1e-4,
      beta_end=0.02,
      beta_schedule="linear",
      solver_order=2,
      prediction_type="epsilon",
      algorithm_type="dpmsolver++",
      timestep_spacing="linspace",
      use_lu_lambdas=spacing == "logsnr",
      lower_order_final=True,
      final_sigmas_type="zero",
  )
  sched.set_timesteps(num_steps)
  oracle = gaussian_oracle()
  x = torch.from_numpy(np.asarray(x_T, np.float64))
  for t in sched.timesteps:
    eps = oracle(jnp.asarray(x.numpy(), jnp.float32), jnp.full((x.shape[0],), int(t)))
    x = sched.step(torch.from_numpy(np.asarray(eps, np.float64)), t, x).prev_sample
  return x.numpy()


@pytest.mark.parametrize("spacing", ["uniform", "logsnr"])
def test_dpm_solver_reaches_the_ode_endpoint_as_well_as_diffusers_and_beats_ddim(spacing):
  d = GaussianDiffusion(BETAS)
  x_T = jax.random.normal(jax.random.PRNGKey(4), (2000, 1, 1, 1))
  target = ode_endpoint(x_T)
  errs = {}
  for n in (10, 20, 50):
    ours = jax.jit(
        lambda x: sampling.dpm_solver_sample_loop(
            d,
            continuous_oracle(d),
            x.shape,
            jax.random.PRNGKey(0),
            num_steps=n,
            spacing=spacing,
            noise=x,
        )
    )(x_T)
    theirs = diffusers_dpm_solver(x_T, n, spacing)
    errs[n] = (np.abs(np.asarray(ours, np.float64) - target).mean(), np.abs(theirs - target).mean())
    assert errs[n][0] <= 1.1 * errs[n][1], errs
  assert errs[50][0] < errs[10][0]  # it converges
  ddim = respaced(BETAS, schedules.space_timesteps(1000, 20))  # t = 999 first, as here
  ddim_x0 = sampling.ddim_sample_loop(
      ddim,
      gaussian_oracle(),
      x_T.shape,
      jax.random.PRNGKey(0),
      eta=0.0,
      clip_denoised=False,
      noise=x_T,
  )
  assert errs[20][0] < np.abs(np.asarray(ddim_x0, np.float64) - target).mean(), errs
  print(spacing, {n: tuple(f"{e:.2e}" for e in v) for n, v in errs.items()})


@pytest.mark.parametrize(
    "loop", [sampling.dpm_solver_sample_loop, sampling.dpm_solver_sde_sample_loop]
)
def test_dpm_solver_program_does_not_grow_with_the_number_of_steps(loop):
  d = GaussianDiffusion(BETAS)
  sizes = {}
  for n in (10, 200):
    traced = []
    fn = functools.partial(loop, d, continuous_oracle(d, traced), (4, 2, 2, 1), num_steps=n)
    hlo = jax.jit(fn).lower(jax.random.PRNGKey(0)).compile().as_text()
    assert len(traced) == 1 and " while(" in hlo
    sizes[n] = sum(1 for line in hlo.splitlines() if " = " in line)
  assert sizes[200] <= sizes[10] + 10, sizes


# ----------------------------------------------------------------------------
# SDE-DPM-Solver++(2M) against diffusers' sde-dpmsolver++ on Gaussian data
# ----------------------------------------------------------------------------

# Per-coordinate data N(MEANS, STDS^2): the spread of small-scale coordinates is what few
# stochastic steps lose (the last step returns the posterior mean, which under-disperses them).
MEANS = np.array([0.3, -0.4, 0.1])
STDS = np.array([0.5, 0.2, 0.1])
CHAINS = 10_000


def vector_oracle(diffusion):
  """E[eps | x_t] for x0 ~ N(MEANS, diag STDS^2) over the last axis, at a real t
  (log-SNR interpolated linearly in t, as continuous_oracle)."""
  lam = jnp.asarray(sampling.log_snr(diffusion), jnp.float32)
  m, s2 = jnp.asarray(MEANS, jnp.float32), jnp.asarray(STDS**2, jnp.float32)

  def model_fn(x_t, t):
    t = t.astype(jnp.float32)
    lo = jnp.clip(jnp.floor(t), 0, lam.shape[0] - 1).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, lam.shape[0] - 1)
    a = jax.nn.sigmoid(2.0 * (lam[lo] + (t - lo) * (lam[hi] - lam[lo])))
    a = a.reshape((-1,) + (1,) * (x_t.ndim - 1))
    return jnp.sqrt(1 - a) * (x_t - jnp.sqrt(a) * m) / (a * s2 + 1 - a)

  return model_fn


def diffusers_sde_dpm_solver(num_steps, spacing, seed=0):
  """diffusers' DPMSolverMultistepScheduler (sde-dpmsolver++, order 2) driven by the exact eps
  (its own noise): samples [CHAINS, len(MEANS)]."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  sched = diffusers.DPMSolverMultistepScheduler(
      num_train_timesteps=1000,
      beta_start=1e-4,
      beta_end=0.02,
      beta_schedule="linear",
      solver_order=2,
      prediction_type="epsilon",
      algorithm_type="sde-dpmsolver++",
      timestep_spacing="linspace",
      use_lu_lambdas=spacing == "logsnr",
      lower_order_final=True,
      final_sigmas_type="zero",
  )
  sched.set_timesteps(num_steps)
  gen = torch.Generator().manual_seed(seed)
  x = torch.randn((CHAINS, len(MEANS)), generator=gen)
  for t in sched.timesteps:
    a = AC[int(t)]
    eps = np.sqrt(1 - a) * (x.numpy() - np.sqrt(a) * MEANS) / (a * STDS**2 + 1 - a)
    x = sched.step(torch.from_numpy(eps.astype(np.float32)), t, x, generator=gen).prev_sample
  return x.numpy()


def moment_errors(x):
  """Per-coordinate |mean - MEANS|, |var - STDS^2| and their Monte-Carlo standard errors."""
  x = np.asarray(x, np.float64).reshape(-1, len(MEANS))
  n, var = len(x), x.var(0, ddof=1)
  return dict(
      mean=np.abs(x.mean(0) - MEANS),
      var=np.abs(var - STDS**2),
      mean_se=np.sqrt(var / n),
      var_se=var * np.sqrt(2 / (n - 1)),
      ratio=var / STDS**2,
  )


@pytest.mark.parametrize("spacing", ["uniform", "logsnr"])
def test_sde_dpm_solver_moments_match_diffusers_and_converge(spacing):
  d = GaussianDiffusion(BETAS)
  shape = (CHAINS, 1, 1, len(MEANS))
  ratios = {}
  for n in (10, 20, 50, 200):
    ours = moment_errors(
        jax.jit(
            lambda key: sampling.dpm_solver_sde_sample_loop(
                d, vector_oracle(d), shape, key, num_steps=n, spacing=spacing
            )
        )(jax.random.PRNGKey(n))
    )
    ratios[n] = np.round(ours["ratio"], 3)
    if n == 200:
      # Converged: the spread of every coordinate, 0.1 included, is the data's.
      assert 0.97 <= ours["ratio"].mean() <= 1.03, ratios
      continue
    theirs = moment_errors(diffusers_sde_dpm_solver(n, spacing))
    ratios[n] = (ratios[n], np.round(theirs["ratio"], 3))
    for m in ("mean", "var"):
      se = np.hypot(ours[f"{m}_se"], theirs[f"{m}_se"])  # of the difference of two estimates
      assert np.all(ours[m] <= 1.1 * theirs[m] + 3 * se), (n, m, ours, theirs)
  print(spacing, "variance ratios (ours, diffusers'):", ratios)


def test_sde_dpm_solver_is_the_same_sampler_for_eps_x0_and_v_models():
  """The exact eps rewritten as the x0 and v a perfect network would output gives the same
  samples from the same key; the same key gives the same samples, another key others."""
  eps_fn = continuous_oracle(GaussianDiffusion(BETAS))
  lam = jnp.asarray(sampling.log_snr(GaussianDiffusion(BETAS)), jnp.float32)

  def alpha_sigma(t):
    l = jnp.interp(t.astype(jnp.float32), jnp.arange(1000.0), lam).reshape(-1, 1, 1, 1)
    return jnp.sqrt(jax.nn.sigmoid(2 * l)), jnp.sqrt(jax.nn.sigmoid(-2 * l))

  def x0_fn(x, t):
    a, s = alpha_sigma(t)
    return (x - s * eps_fn(x, t)) / a

  def v_fn(x, t):
    a, s = alpha_sigma(t)
    return a * eps_fn(x, t) - s * x0_fn(x, t)

  out = {}
  for kind, fn in (("eps", eps_fn), ("x0", x0_fn), ("v", v_fn)):
    d = GaussianDiffusion(BETAS, model_mean_type=kind)
    out[kind] = np.asarray(
        sampling.dpm_solver_sde_sample_loop(
            d, fn, (64, 1, 1, 1), jax.random.PRNGKey(1), num_steps=20, spacing="logsnr"
        )
    )
  np.testing.assert_allclose(out["x0"], out["eps"], atol=1e-4)
  np.testing.assert_allclose(out["v"], out["eps"], atol=1e-4)
  d = GaussianDiffusion(BETAS)
  again = sampling.dpm_solver_sde_sample_loop(
      d, eps_fn, (64, 1, 1, 1), jax.random.PRNGKey(1), num_steps=20, spacing="logsnr"
  )
  np.testing.assert_array_equal(np.asarray(again), out["eps"])
  other = sampling.dpm_solver_sde_sample_loop(
      d, eps_fn, (64, 1, 1, 1), jax.random.PRNGKey(2), num_steps=20, spacing="logsnr"
  )
  assert float(np.abs(np.asarray(other) - out["eps"]).max()) > 0.1
