"""Forward/reverse process, losses and the bound, against closed forms and scipy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from ddpm_jax.diffusion import schedules
from ddpm_jax.diffusion.gaussian import (
    GaussianDiffusion,
    discretized_gaussian_log_likelihood,
    normal_kl,
)

BETAS = schedules.get_beta_schedule("linear", 1000)
AC = np.cumprod(1.0 - BETAS)  # float64 reference alpha_bar
AC_PREV = np.append(1.0, AC[:-1])
POST_VAR = BETAS * (1 - AC_PREV) / (1 - AC)


def grid_images(key, shape=(2, 4, 4, 3)):
  """Random images on the 8-bit grid, scaled to [-1, 1], including both extremes."""
  ints = np.array(jax.random.randint(key, shape, 0, 256))
  ints.flat[0], ints.flat[1] = 0, 255
  return jnp.asarray(ints / 127.5 - 1.0, jnp.float32)


def test_q_sample_closed_form():
  d = GaussianDiffusion(BETAS)
  x0 = jax.random.uniform(jax.random.PRNGKey(0), (4, 3, 3, 2), minval=-1, maxval=1)
  noise = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
  t = jnp.array([0, 1, 500, 999])
  got = jax.jit(d.q_sample)(x0, t, noise)
  a = AC[np.asarray(t)][:, None, None, None]
  want = np.sqrt(a) * np.asarray(x0, np.float64) + np.sqrt(1 - a) * np.asarray(noise, np.float64)
  np.testing.assert_allclose(got, want, atol=2e-6)


def test_q_sample_monte_carlo_matches_q_mean_variance():
  d = GaussianDiffusion(BETAS)
  n = 200_000
  x0 = jnp.full((n, 1), 0.7)
  for ti in (3, 250, 999):
    t = jnp.full((n,), ti)
    x_t = d.q_sample(x0, t, jax.random.normal(jax.random.PRNGKey(ti), x0.shape))
    mean, var, logvar = d.q_mean_variance(x0, t)
    sd = math.sqrt(1 - AC[ti])
    assert abs(float(x_t.mean()) - float(mean[0, 0])) < 5 * sd / math.sqrt(n)
    assert abs(float(x_t.var()) / float(var[0, 0]) - 1) < 5 * math.sqrt(2 / n)
    np.testing.assert_allclose(float(mean[0, 0]), math.sqrt(AC[ti]) * 0.7, rtol=1e-6)
    np.testing.assert_allclose(float(logvar[0, 0]), math.log(1 - AC[ti]), rtol=1e-5)


@pytest.mark.parametrize("ti", [1, 10, 500])
def test_posterior_is_bayes_rule(ti):
  """q(x_{t-1}|x_t,x0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x0), integrated on a fine grid."""
  d = GaussianDiffusion(BETAS)
  x0, x_t = 0.3, -0.2
  beta = BETAS[ti]
  prior_mean, prior_var = math.sqrt(AC[ti - 1]) * x0, 1 - AC[ti - 1]
  lik_sd = math.sqrt(beta)
  # The product is concentrated within a few sd of the likelihood around x_t/sqrt(1-beta).
  sd = min(lik_sd / math.sqrt(1 - beta), math.sqrt(prior_var))
  centre = x_t / math.sqrt(1 - beta)
  grid = np.linspace(centre - 40 * sd, centre + 40 * sd, 200_001)
  log_w = stats.norm.logpdf(x_t, math.sqrt(1 - beta) * grid, lik_sd) + stats.norm.logpdf(
      grid, prior_mean, math.sqrt(prior_var)
  )
  w = np.exp(log_w - log_w.max())
  w /= w.sum()
  ref_mean = float((w * grid).sum())
  ref_var = float((w * (grid - ref_mean) ** 2).sum())
  mean, var, _ = d.q_posterior_mean_variance(jnp.array([[x0]]), jnp.array([[x_t]]), jnp.array([ti]))
  np.testing.assert_allclose(float(mean[0, 0]), ref_mean, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(float(var[0, 0]), ref_var, rtol=1e-4)


def test_normal_kl_against_numerical_integration():
  for m1, s1, m2, s2 in ((0.0, 1.0, 0.0, 1.0), (0.3, 0.5, -0.2, 1.3), (1.0, 2.0, 0.0, 0.7)):
    p, q = stats.norm(m1, s1), stats.norm(m2, s2)
    ref, _ = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), -30, 30)
    got = float(normal_kl(m1, 2 * math.log(s1), m2, 2 * math.log(s2)))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)


def test_discretized_gaussian_likelihood_sums_to_one_and_matches_scipy():
  bins = jnp.linspace(-1.0, 1.0, 256)
  for mean, sd in ((0.0, 0.1), (0.37, 0.01), (-0.95, 0.3), (0.999, 0.004)):
    logp = discretized_gaussian_log_likelihood(
        bins, jnp.full(256, mean), jnp.full(256, math.log(sd))
    )
    p = np.exp(np.asarray(logp, np.float64))
    np.testing.assert_allclose(p.sum(), 1.0, atol=2e-5)
    edges = np.concatenate([[-np.inf], (np.arange(255) + 0.5) / 127.5 - 1.0, [np.inf]])
    ref = np.diff(stats.norm.cdf(edges, mean, sd))
    # The paper's code uses the tanh approximation of Phi (max abs error ~3e-4).
    np.testing.assert_allclose(p, ref, atol=6e-4)


def _oracle_eps_model(x0_data, learned=False):
  """eps-model that knows the data set is the single image x0_data: [1, H, W, C]."""
  sqrt_ac = jnp.asarray(np.sqrt(AC), jnp.float32)
  sqrt_1m = jnp.asarray(np.sqrt(1 - AC), jnp.float32)
  log_pv = jnp.asarray(np.log(np.append(POST_VAR[1], POST_VAR[1:])), jnp.float32)

  def model_fn(x_t, t):
    eps = (x_t - sqrt_ac[t][:, None, None, None] * x0_data) / sqrt_1m[t][:, None, None, None]
    if not learned:
      return eps
    # The exact posterior variance for t > 0 and a near-delta decoder at t = 0.
    logvar = jnp.where(t == 0, -30.0, log_pv[t])[:, None, None, None] * jnp.ones_like(x_t)
    return jnp.concatenate([eps, logvar], axis=-1)

  return model_fn


def _closed_form_prior_bits(x0):
  a = AC[-1]
  return np.mean(0.5 * (-1 - math.log(1 - a) + (1 - a) + a * x0**2)) / math.log(2)


def test_bpd_of_an_oracle_is_near_zero_with_learned_variance():
  x0 = grid_images(jax.random.PRNGKey(0), (1, 4, 4, 3))
  d = GaussianDiffusion(BETAS, model_var_type="learned", loss_type="kl")
  out = jax.jit(
      lambda x: d.calc_bpd_loop(_oracle_eps_model(x, learned=True), x, jax.random.PRNGKey(1))
  )(x0)
  assert out["terms_bpd"].shape == (1, 1000) and out["xstart_mse"].shape == (1, 1000)
  np.testing.assert_allclose(
      float(out["prior_bpd"][0]), _closed_form_prior_bits(np.asarray(x0, np.float64)), rtol=1e-3
  )
  assert float(out["total_bpd"][0]) < 1e-3
  assert float(jnp.max(out["xstart_mse"])) < 1e-8


@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall"])
def test_bpd_of_an_oracle_with_fixed_variance_is_the_closed_form(var_type):
  """Exact means; what is left is the variance mismatch (fixedlarge) and the decoder width."""
  x0 = grid_images(jax.random.PRNGKey(2), (1, 4, 4, 3))
  d = GaussianDiffusion(BETAS, model_var_type=var_type)
  out = jax.jit(lambda x: d.calc_bpd_loop(_oracle_eps_model(x), x, jax.random.PRNGKey(3)))(x0)
  x = np.asarray(x0, np.float64).ravel()
  model_var = BETAS[1:] if var_type == "fixedlarge" else POST_VAR[1:]
  kl_t = 0.5 * (-1 + np.log(model_var / POST_VAR[1:]) + POST_VAR[1:] / model_var) / math.log(2)
  sd0 = math.sqrt(POST_VAR[1])  # both types use beta~_1 at t = 0
  h = 1 / 255
  p = np.where(
      x < -0.999,
      stats.norm.cdf(h / sd0),
      np.where(
          x > 0.999, stats.norm.sf(-h / sd0), stats.norm.cdf(h / sd0) - stats.norm.cdf(-h / sd0)
      ),
  )
  decoder = -np.mean(np.log2(p))
  np.testing.assert_allclose(np.asarray(out["terms_bpd"][0, 1:]), kl_t, rtol=2e-3, atol=2e-6)
  np.testing.assert_allclose(float(out["terms_bpd"][0, 0]), decoder, atol=5e-3)
  want = _closed_form_prior_bits(x) + kl_t.sum() + decoder
  np.testing.assert_allclose(float(out["total_bpd"][0]), want, rtol=2e-3)


def test_bpd_of_an_offset_x0_model_is_the_closed_form():
  """x0-model predicting x0 + delta: mu - mu~ = coef1 delta, so KL_t = coef1^2 delta^2 / (2 beta~)."""
  x0 = grid_images(jax.random.PRNGKey(4))
  delta = 0.003
  d = GaussianDiffusion(BETAS, model_mean_type="x0", model_var_type="fixedsmall")
  model = lambda x_t, t: x0 + delta
  out = d.calc_bpd_loop(model, x0, jax.random.PRNGKey(5), clip_denoised=False)
  x = np.asarray(x0, np.float64).reshape(2, -1)
  coef1 = BETAS * np.sqrt(AC_PREV) / (1 - AC)
  kl = coef1[1:] ** 2 * delta**2 / (2 * POST_VAR[1:]) / math.log(2)
  sd0 = math.sqrt(POST_VAR[1])  # decoder: mean x0 + delta (coef1 = 1 at t = 0), sd sqrt(beta~_1)
  h = 1 / 255
  p = np.where(
      x < -0.999,
      stats.norm.cdf((h - delta) / sd0),
      np.where(
          x > 0.999,
          stats.norm.sf((-h - delta) / sd0),
          stats.norm.cdf((h - delta) / sd0) - stats.norm.cdf((-h - delta) / sd0),
      ),
  )
  decoder = -np.mean(np.log2(p), axis=1)
  np.testing.assert_allclose(
      np.asarray(out["terms_bpd"][:, 1:]), np.broadcast_to(kl, (2, 999)), rtol=2e-3, atol=5e-7
  )  # float32 cancellation floor of Eq. 5 terms
  np.testing.assert_allclose(np.asarray(out["terms_bpd"][:, 0]), decoder, atol=5e-3)
  prior = np.array([_closed_form_prior_bits(row) for row in x])
  np.testing.assert_allclose(np.asarray(out["total_bpd"]), prior + kl.sum() + decoder, rtol=2e-3)
  np.testing.assert_allclose(np.asarray(out["xstart_mse"]), delta**2, rtol=1e-3)


@pytest.mark.parametrize("mean_type", ["eps", "x0", "xprev", "v"])
def test_p_mean_variance_recovers_x0_from_a_correct_prediction(mean_type):
  d = GaussianDiffusion(BETAS, model_mean_type=mean_type)
  k1, k2 = jax.random.split(jax.random.PRNGKey(6))
  x0 = jax.random.uniform(k1, (3, 2, 2, 1), minval=-0.9, maxval=0.9)
  noise = jax.random.normal(k2, x0.shape)
  t = jnp.array([5, 100, 700])
  x_t = d.q_sample(x0, t, noise)
  a = AC[np.asarray(t)][:, None, None, None]
  x0n, nn, xtn = (np.asarray(v, np.float64) for v in (x0, noise, x_t))
  c1 = (BETAS * np.sqrt(AC_PREV) / (1 - AC))[np.asarray(t)][:, None, None, None]
  c2 = ((1 - AC_PREV) * np.sqrt(1 - BETAS) / (1 - AC))[np.asarray(t)][:, None, None, None]
  true_mean = c1 * x0n + c2 * xtn
  output = {"eps": nn, "x0": x0n, "xprev": true_mean, "v": np.sqrt(a) * nn - np.sqrt(1 - a) * x0n}[
      mean_type
  ]
  out = jax.jit(d.p_mean_variance)(jnp.asarray(output, jnp.float32), x_t, t)
  tol = 3e-3 if mean_type == "xprev" else 2e-4  # xprev divides by coef1, small at late t
  np.testing.assert_allclose(out["pred_xstart"], x0n, atol=tol)
  np.testing.assert_allclose(out["mean"], true_mean, atol=2e-5)


def test_variance_types():
  t = jnp.array([0, 1, 500])
  x = jnp.zeros((3, 1, 1, 2))
  large = GaussianDiffusion(BETAS, model_var_type="fixedlarge").p_mean_variance(x, x, t)
  np.testing.assert_allclose(
      large["variance"].ravel(), [POST_VAR[1], BETAS[1], BETAS[500]], rtol=1e-6
  )
  small = GaussianDiffusion(BETAS, model_var_type="fixedsmall").p_mean_variance(x, x, t)
  np.testing.assert_allclose(
      small["variance"].ravel(), POST_VAR[[0, 1, 500]], rtol=1e-6, atol=1e-30
  )
  np.testing.assert_allclose(
      small["log_variance"].ravel(), np.log(POST_VAR[[1, 1, 500]]), rtol=1e-6
  )
  lr = GaussianDiffusion(BETAS, model_var_type="learned_range", loss_type="hybrid")
  for v, want in ((1.0, np.log(BETAS[[0, 1, 500]])), (-1.0, np.log(POST_VAR[[1, 1, 500]]))):
    out = lr.p_mean_variance(jnp.concatenate([x, jnp.full_like(x, v)], -1), x, t)
    np.testing.assert_allclose(out["log_variance"][:, 0, 0, 0], want, rtol=1e-6)
  learned = GaussianDiffusion(BETAS, model_var_type="learned", loss_type="kl")
  out = learned.p_mean_variance(jnp.concatenate([x, jnp.full_like(x, -3.0)], -1), x, t)
  np.testing.assert_allclose(out["variance"], math.exp(-3.0), rtol=1e-6)


def test_training_losses_mse_and_kl():
  x0 = grid_images(jax.random.PRNGKey(7))
  noise = jax.random.normal(jax.random.PRNGKey(8), x0.shape)
  t = jnp.array([0, 400])
  d = GaussianDiffusion(BETAS)
  oracle = jax.jit(lambda x0, t, n: d.training_losses(lambda x_t, tt: n, x0, t, n))(x0, t, noise)
  np.testing.assert_allclose(oracle["loss"], 0.0, atol=1e-12)
  zeros = d.training_losses(lambda x_t, tt: jnp.zeros_like(x_t), x0, t, noise)
  np.testing.assert_allclose(
      zeros["mse"], np.mean(np.asarray(noise) ** 2, axis=(1, 2, 3)), rtol=1e-6
  )
  # 'kl' with an x0-model outputting zeros: coef1^2 mean(x0^2) / (2 beta~) / ln 2 at t = 400.
  dk = GaussianDiffusion(BETAS, model_mean_type="x0", model_var_type="fixedsmall", loss_type="kl")
  kl = dk.training_losses(lambda x_t, tt: jnp.zeros_like(x_t), x0, t, noise)
  c1 = BETAS[400] * math.sqrt(AC_PREV[400]) / (1 - AC[400])
  want = c1**2 * np.mean(np.asarray(x0[1], np.float64) ** 2) / (2 * POST_VAR[400]) / math.log(2)
  np.testing.assert_allclose(float(kl["loss"][1]), want, rtol=1e-4)


def test_hybrid_loss_freezes_the_mean_in_the_bound():
  x0 = grid_images(jax.random.PRNGKey(9))
  noise = jax.random.normal(jax.random.PRNGKey(10), x0.shape)
  t = jnp.array([3, 600])
  d = GaussianDiffusion(BETAS, model_var_type="learned_range", loss_type="hybrid")

  def parts(params):
    model = lambda x_t, tt: jnp.concatenate(
        [params["a"] * x_t, params["b"] * jnp.ones_like(x_t)], -1
    )
    return d.training_losses(model, x0, t, noise)

  params = {"a": jnp.float32(0.5), "b": jnp.float32(0.1)}
  g_vb = jax.grad(lambda p: parts(p)["vb"].sum())(params)
  g_mse = jax.grad(lambda p: parts(p)["mse"].sum())(params)
  assert float(g_vb["a"]) == 0.0 and float(g_vb["b"]) != 0.0
  assert float(g_mse["b"]) == 0.0 and float(g_mse["a"]) != 0.0
  out = parts(params)
  np.testing.assert_allclose(out["loss"], out["mse"] + 0.001 * 1000 * out["vb"], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(model_mean_type="epsilon"), "model_mean_type"),
        (dict(model_var_type="fixed"), "model_var_type"),
        (dict(loss_type="l2"), "loss_type"),
        (dict(model_var_type="learned"), "loss_type"),
        (dict(loss_type="hybrid"), "hybrid"),
    ],
)
def test_bad_options_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    GaussianDiffusion(BETAS, **kwargs)


def test_diffusion_is_a_pytree_usable_as_a_jit_argument():
  d = GaussianDiffusion(BETAS, model_mean_type="v")
  leaves, treedef = jax.tree_util.tree_flatten(d)
  assert all(leaf.dtype in (jnp.float32, jnp.int32) for leaf in leaves)
  rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
  assert rebuilt.model_mean_type == "v" and rebuilt.num_timesteps == 1000
  f = jax.jit(lambda diff, x: diff.q_sample(x, jnp.array([999]), jnp.zeros_like(x)))
  np.testing.assert_allclose(f(d, jnp.ones((1, 2))), math.sqrt(AC[999]), rtol=1e-5)
