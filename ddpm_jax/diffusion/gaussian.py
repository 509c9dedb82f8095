"""The Gaussian diffusion process of Ho et al. (2020), as pure JAX functions.

Everything about the diffusion lives in ``GaussianDiffusion``: the forward
process q, the reverse process p_theta parameterised by a network output, the
training losses and the variational bound in bits/dim. The network is an opaque
``model_fn(x_t, t) -> output``; this module knows nothing about Flax.

Equation numbers refer to Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic
Models" (NeurIPS 2020). Extensions cite their source: learned variances and the
hybrid loss (Nichol & Dhariwal 2021, "Improved DDPM"), v-prediction (Salimans &
Ho 2022).

Conventions. Images ``x0, x_t: [B, H, W, C]`` (any trailing shape works) with
data in [-1, 1]; timesteps ``t: [B]`` int32 array indices in [0, T), where
index 0 is the paper's t = 1. Tables are computed in float64 numpy and stored as
float32 arrays; the object is a registered pytree (tables are leaves, the
configuration strings are static), so it can be an argument of
``jit``/``pmap``/``scan`` or be closed over.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.diffusion import schedules

MEAN_TYPES = ("eps", "x0", "xprev", "v")
VAR_TYPES = ("fixedlarge", "fixedsmall", "learned", "learned_range")
LOSS_TYPES = ("mse", "kl", "hybrid")

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


# ----------------------------------------------------------------------------
# Gaussian helpers (used by the variational bound, Eq. 5)
# ----------------------------------------------------------------------------


def mean_flat(x: jax.Array) -> jax.Array:
  """Mean over all but the batch axis. x: [B, ...] -> [B]."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

  Closed form for two Gaussians, as used for every L_{t-1} term of Eq. 5.
  Arguments broadcast against each other.
  """
  return 0.5 * (
      -1.0
      + logvar2
      - logvar1
      + jnp.exp(logvar1 - logvar2)
      + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
  )


def approx_standard_normal_cdf(x):
  """Phi(x) by the tanh approximation used in the paper's code (max error ~3e-4)."""
  return 0.5 * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """log p(x) of the paper's discrete decoder L_0 (Eq. 13), elementwise, in nats.

  The 256 intensity levels of 8-bit data scaled to [-1, 1] are bins of width
  2/255 centred on x; the outermost bins extend to -inf and +inf, so the 256
  probabilities sum to exactly 1.

  Args:
    x: [...] data on the grid {-1, -1 + 2/255, ..., 1}.
    means: [...] decoder means mu_theta(x_1, 1).
    log_scales: [...] log standard deviations.
  Returns:
    [...] log-probabilities (<= 0).
  """
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  cdf_delta = cdf_plus - cdf_min
  return jnp.where(
      x < -0.999,
      log_cdf_plus,
      jnp.where(x > 0.999, log_one_minus_cdf_min, jnp.log(jnp.maximum(cdf_delta, 1e-12))),
  )


def extract(table: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
  """table[t] reshaped to [B, 1, ..., 1] so it broadcasts against [B, ...] arrays.

  Args: table: [T]; t: [B] int in [0, T); ndim: rank of the arrays it multiplies.
  """
  out = jnp.take(table, t, axis=0)
  return out.reshape(out.shape + (1,) * (ndim - out.ndim))


# ----------------------------------------------------------------------------
# The process
# ----------------------------------------------------------------------------

_TABLES = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "alphas_cumprod_next",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "fixedlarge_variance",
    "fixedlarge_log_variance",
    "timestep_map",
)


@jax.tree_util.register_pytree_node_class
class GaussianDiffusion:
  """Forward process, reverse process, losses and likelihood of a DDPM.

  Attributes (float32 [T] tables, named as in the paper's code):
    betas: beta_t of Eq. 2.
    alphas_cumprod: alpha_bar_t = prod_{s<=t} (1 - beta_s) (Eq. 4).
    alphas_cumprod_prev: alpha_bar_{t-1} (1 at t = 0).
    alphas_cumprod_next: alpha_bar_{t+1} (0 at the end), for DDIM inversion.
    sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, log_one_minus_alphas_cumprod,
    sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod: derived tables.
    posterior_variance: beta~_t of Eq. 7.
    posterior_log_variance_clipped: log beta~_t with t = 0 replaced by t = 1
      (beta~ at t = 0 is 0).
    posterior_mean_coef1, posterior_mean_coef2: mu~_t(x_t, x0) = coef1 x0 + coef2 x_t (Eq. 7).
    fixedlarge_variance, fixedlarge_log_variance: sigma_t^2 = beta_t, with
      t = 0 using beta~_1 as the paper's code does (Sec. 3.2).
    timestep_map: int32 [T]; the timestep the network is called with (the
      identity, or the original timesteps of a respaced process).
  """

  def __init__(
      self,
      betas: np.ndarray,
      model_mean_type: str = "eps",
      model_var_type: str = "fixedlarge",
      loss_type: str = "mse",
      timestep_map: Optional[np.ndarray] = None,
      vlb_weight: float = 0.001,
  ):
    """Precomputes the tables in float64.

    Args:
      betas: [T] float64 in (0, 1], from ``schedules.get_beta_schedule``.
      model_mean_type: what the network predicts: 'eps' (the paper, Eq. 11),
        'x0', 'xprev' (mu~ directly) or 'v' (sqrt(ab) eps - sqrt(1-ab) x0).
      model_var_type: 'fixedlarge' (sigma^2 = beta), 'fixedsmall'
        (sigma^2 = beta~), 'learned' (the network outputs log sigma^2) or
        'learned_range' (it interpolates log beta and log beta~).
      loss_type: 'mse' (L_simple, Eq. 14), 'kl' (the bound's term L_t) or
        'hybrid' (L_simple + vlb_weight * L_vlb, mean frozen in L_vlb).
      timestep_map: [T] int, for respaced processes (``respaced``).
      vlb_weight: lambda of the hybrid loss (Nichol & Dhariwal: 0.001).
    """
    for field, value, allowed in (
        ("model_mean_type", model_mean_type, MEAN_TYPES),
        ("model_var_type", model_var_type, VAR_TYPES),
        ("loss_type", loss_type, LOSS_TYPES),
    ):
      if value not in allowed:
        raise ValueError(f"{field} must be one of {allowed}, got {value!r}")
    learned = model_var_type in ("learned", "learned_range")
    if loss_type == "mse" and learned:
      raise ValueError(
          f"loss_type='mse' gives the variance of model_var_type="
          f"{model_var_type!r} no gradient; use 'hybrid' or 'kl'"
      )
    if loss_type == "hybrid" and not learned:
      raise ValueError(
          "loss_type='hybrid' only makes sense with a learned variance "
          f"(model_var_type 'learned' or 'learned_range'), got {model_var_type!r}"
      )
    self.model_mean_type = model_mean_type
    self.model_var_type = model_var_type
    self.loss_type = loss_type
    self.vlb_weight = float(vlb_weight)

    b = schedules.validate_betas(betas)
    T = len(b)
    self.num_timesteps = T
    alphas = 1.0 - b
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    ac_next = np.append(ac[1:], 0.0)
    with np.errstate(divide="ignore"):
      post_var = b * (1.0 - ac_prev) / (1.0 - ac)
      post_var_first = post_var[1] if T > 1 else b[0]
      tables = dict(
          betas=b,
          alphas_cumprod=ac,
          alphas_cumprod_prev=ac_prev,
          alphas_cumprod_next=ac_next,
          sqrt_alphas_cumprod=np.sqrt(ac),
          sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
          log_one_minus_alphas_cumprod=np.log(1.0 - ac),
          sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
          sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1.0),
          posterior_variance=post_var,
          posterior_log_variance_clipped=np.log(np.append(post_var_first, post_var[1:])),
          posterior_mean_coef1=b * np.sqrt(ac_prev) / (1.0 - ac),
          posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
          fixedlarge_variance=np.append(post_var_first, b[1:]),
          fixedlarge_log_variance=np.log(np.append(post_var_first, b[1:])),
      )
    for name, value in tables.items():
      assert value.shape == (T,), name
      setattr(self, name, jnp.asarray(value, dtype=jnp.float32))
    if timestep_map is None:
      timestep_map = np.arange(T)
    timestep_map = np.asarray(timestep_map)
    if timestep_map.shape != (T,):
      raise ValueError(f"timestep_map must have shape ({T},), got {timestep_map.shape}")
    self.timestep_map = jnp.asarray(timestep_map, dtype=jnp.int32)

  # -- pytree ------------------------------------------------------------------
  def tree_flatten(self):
    children = tuple(getattr(self, n) for n in _TABLES)
    aux = (
        self.model_mean_type,
        self.model_var_type,
        self.loss_type,
        self.vlb_weight,
        self.num_timesteps,
    )
    return children, aux

  @classmethod
  def tree_unflatten(cls, aux, children):
    obj = object.__new__(cls)
    obj.model_mean_type, obj.model_var_type, obj.loss_type, obj.vlb_weight, obj.num_timesteps = aux
    for name, value in zip(_TABLES, children):
      setattr(obj, name, value)
    return obj

  def __repr__(self):
    return (
        f"GaussianDiffusion(T={self.num_timesteps}, mean={self.model_mean_type}, "
        f"var={self.model_var_type}, loss={self.loss_type})"
    )

  @property
  def learned_variance(self) -> bool:
    return self.model_var_type in ("learned", "learned_range")

  def call_model(self, model_fn: ModelFn, x_t, t):
    """model_fn(x_t, t') with t' the timestep the network was trained on (respacing-aware).

    Args: x_t: [B, H, W, C]; t: [B] int indices of this (possibly respaced) process.
    Returns: the network output [B, H, W, C or 2C].
    """
    return model_fn(x_t, jnp.take(self.timestep_map, t))

  # -- forward process q -----------------------------------------------------
  def q_mean_variance(self, x0, t):
    """q(x_t | x0) = N(sqrt(ab_t) x0, (1 - ab_t) I)  (Eq. 4).

    Args: x0: [B, ...] in [-1, 1]; t: [B] int.
    Returns: (mean [B, ...], variance [B, 1...], log_variance [B, 1...]).
    """
    mean = extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
    variance = extract(1.0 - self.alphas_cumprod, t, x0.ndim)
    log_variance = extract(self.log_one_minus_alphas_cumprod, t, x0.ndim)
    return mean, variance, log_variance

  def q_sample(self, x0, t, noise):
    """Draws x_t ~ q(x_t | x0) by reparameterisation: sqrt(ab) x0 + sqrt(1-ab) eps (Eq. 4).

    Args: x0: [B, ...] in [-1, 1]; t: [B] int; noise: [B, ...] standard normal.
    Returns: x_t [B, ...].
    """
    return (
        extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
        + extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise
    )

  def q_posterior_mean_variance(self, x0, x_t, t):
    """q(x_{t-1} | x_t, x0) = N(mu~_t(x_t, x0), beta~_t I)  (Eqs. 6-7).

    Args: x0, x_t: [B, ...]; t: [B] int.
    Returns: (mean [B, ...], variance [B, 1...], log_variance_clipped [B, 1...]).
    """
    mean = (
        extract(self.posterior_mean_coef1, t, x_t.ndim) * x0
        + extract(self.posterior_mean_coef2, t, x_t.ndim) * x_t
    )
    return (
        mean,
        extract(self.posterior_variance, t, x_t.ndim),
        extract(self.posterior_log_variance_clipped, t, x_t.ndim),
    )

  # -- conversions between parameterisations -----------------------------------
  def predict_xstart_from_eps(self, x_t, t, eps):
    """x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab)  (Eq. 4 solved for x0; Eq. 15)."""
    return (
        extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
        - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps
    )

  def predict_eps_from_xstart(self, x_t, t, x0):
    """eps = (x_t / sqrt(ab) - x0) / sqrt(1/ab - 1), the inverse of the above."""
    return (extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x0) / extract(
        self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim
    )

  def predict_xstart_from_xprev(self, x_t, t, xprev):
    """x0 from mu~_t = coef1 x0 + coef2 x_t (Eq. 7 solved for x0)."""
    return (xprev - extract(self.posterior_mean_coef2, t, x_t.ndim) * x_t) / extract(
        self.posterior_mean_coef1, t, x_t.ndim
    )

  def predict_xstart_from_v(self, x_t, t, v):
    """x0 = sqrt(ab) x_t - sqrt(1 - ab) v  (Salimans & Ho 2022)."""
    return (
        extract(self.sqrt_alphas_cumprod, t, x_t.ndim) * x_t
        - extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * v
    )

  def v_target(self, x0, t, noise):
    """v = sqrt(ab) eps - sqrt(1 - ab) x0  (Salimans & Ho 2022)."""
    return (
        extract(self.sqrt_alphas_cumprod, t, x0.ndim) * noise
        - extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0
    )

  # -- reverse process p -------------------------------------------------------
  def split_model_output(self, model_output):
    """Splits [B, ..., 2C] into (mean part, variance part) for learned variances."""
    if self.learned_variance:
      return jnp.split(model_output, 2, axis=-1)
    return model_output, None

  def p_mean_variance(self, model_output, x_t, t, clip_denoised: bool = True):
    """p_theta(x_{t-1} | x_t) = N(mu_theta, sigma_t^2)  (Eq. 1), from a network output.

    Args:
      model_output: [B, H, W, C] (or [B, H, W, 2C] for learned variances:
        the mean part first, then the variance part).
      x_t: [B, H, W, C]; t: [B] int.
      clip_denoised: clip the predicted x0 to [-1, 1] before forming the mean
        (the paper's sampler does; it does not change the 'xprev' mean).
    Returns: dict with 'mean' [B, ...], 'variance' and 'log_variance'
      ([B, 1...] for fixed, [B, ...] for learned), 'pred_xstart' [B, ...].
    """
    out, var_out = self.split_model_output(model_output)
    nd = x_t.ndim
    if self.model_var_type == "fixedlarge":
      variance = extract(self.fixedlarge_variance, t, nd)
      log_variance = extract(self.fixedlarge_log_variance, t, nd)
    elif self.model_var_type == "fixedsmall":
      variance = extract(self.posterior_variance, t, nd)
      log_variance = extract(self.posterior_log_variance_clipped, t, nd)
    elif self.model_var_type == "learned":
      log_variance = var_out
      variance = jnp.exp(log_variance)
    else:  # learned_range: v in [-1, 1] interpolates log beta~ .. log beta (Improved DDPM Eq. 15)
      min_log = extract(self.posterior_log_variance_clipped, t, nd)
      max_log = extract(jnp.log(self.betas), t, nd)
      frac = (var_out + 1.0) / 2.0
      log_variance = frac * max_log + (1.0 - frac) * min_log
      variance = jnp.exp(log_variance)

    maybe_clip = (lambda x: jnp.clip(x, -1.0, 1.0)) if clip_denoised else (lambda x: x)
    if self.model_mean_type == "xprev":
      pred_xstart = maybe_clip(self.predict_xstart_from_xprev(x_t, t, out))
      mean = out
    else:
      if self.model_mean_type == "eps":
        pred_xstart = self.predict_xstart_from_eps(x_t, t, out)
      elif self.model_mean_type == "x0":
        pred_xstart = out
      else:
        pred_xstart = self.predict_xstart_from_v(x_t, t, out)
      pred_xstart = maybe_clip(pred_xstart)
      mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
    return dict(mean=mean, variance=variance, log_variance=log_variance, pred_xstart=pred_xstart)

  # -- the variational bound (Eq. 5) ------------------------------------------
  def vb_terms_bpd(self, model_output, x0, x_t, t, clip_denoised: bool = False):
    """One term of the bound in bits/dim: L_{t-1} = KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)),
    or the decoder NLL L_0 = -log p(x0 | x_1) (Eq. 13) at t = 0.

    Args: model_output: as for ``p_mean_variance``; x0, x_t: [B, ...]; t: [B] int.
    Returns: (bits/dim [B], pred_xstart [B, ...]).
    """
    true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
    p = self.p_mean_variance(model_output, x_t, t, clip_denoised=clip_denoised)
    kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / np.log(2.0)
    nll = -mean_flat(
        discretized_gaussian_log_likelihood(
            x0, p["mean"], 0.5 * jnp.broadcast_to(p["log_variance"], x0.shape)
        )
    ) / np.log(2.0)
    return jnp.where(t == 0, nll, kl), p["pred_xstart"]

  def prior_bpd(self, x0):
    """L_T = KL(q(x_T | x0) || N(0, I)) in bits/dim (Eq. 5). x0: [B, ...] -> [B]."""
    t = jnp.full((x0.shape[0],), self.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_var = self.q_mean_variance(x0, t)
    return mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / np.log(2.0)

  # -- training (Algorithm 1) --------------------------------------------------
  def training_losses(self, model_fn: ModelFn, x0, t, noise):
    """Per-example losses for one draw of (t, eps) per example (Algorithm 1).

    Args:
      model_fn: (x_t [B, H, W, C], t [B] int) -> output [B, H, W, C or 2C].
      x0: [B, H, W, C] data in [-1, 1].
      t: [B] int in [0, T), drawn by the caller (uniformly in the paper).
      noise: [B, H, W, C] standard normal.
    Returns: dict of [B] arrays: 'loss' (what to minimise), 'mse' (the mean
      squared error of the mean prediction, L_simple of Eq. 14 for 'eps'), and
      'vb' (the bound's term at t in bits/dim; 0 for loss_type 'mse').
      'kl' minimises vb (its expectation over uniform t is (L_vlb - L_T) / T);
      'hybrid' minimises mse + vlb_weight * T * vb with the mean frozen in vb
      (Nichol & Dhariwal 2021, Sec. 3.1).
    """
    x_t = self.q_sample(x0, t, noise)
    model_output = self.call_model(model_fn, x_t, t)
    losses = {}
    if self.loss_type == "kl":
      vb, _ = self.vb_terms_bpd(model_output, x0, x_t, t)
      losses["vb"] = vb
      losses["loss"] = vb
    mean_out, var_out = self.split_model_output(model_output)
    target = {
        "eps": noise,
        "x0": x0,
        "xprev": self.q_posterior_mean_variance(x0, x_t, t)[0],
        "v": self.v_target(x0, t, noise),
    }[self.model_mean_type]
    losses["mse"] = mean_flat(jnp.square(target - mean_out))
    if self.loss_type == "mse":
      losses["vb"] = jnp.zeros_like(losses["mse"])
      losses["loss"] = losses["mse"]
    elif self.loss_type == "hybrid":
      frozen = jnp.concatenate([jax.lax.stop_gradient(mean_out), var_out], axis=-1)
      vb, _ = self.vb_terms_bpd(frozen, x0, x_t, t)
      losses["vb"] = vb
      losses["loss"] = losses["mse"] + self.vlb_weight * self.num_timesteps * vb
    return losses

  # -- evaluation of the bound (Sec. 4.2, Table 2) ------------------------------
  def calc_bpd_loop(self, model_fn: ModelFn, x0, key, clip_denoised: bool = True):
    """The full variational bound L = L_T + sum_{t>1} L_{t-1} + L_0 in bits/dim.

    One ``lax.scan`` over all T timesteps; each term uses a fresh x_t ~ q(x_t|x0).

    Args:
      model_fn: the network, as in ``training_losses``.
      x0: [B, H, W, C] on the 8-bit grid in [-1, 1].
      key: PRNG key for the q(x_t | x0) draws.
    Returns: dict with 'total_bpd' [B], 'prior_bpd' [B], 'terms_bpd' [B, T]
      (index t: L_t of the array convention, the decoder at t = 0) and
      'xstart_mse' [B, T] (the rate/distortion view: MSE of predicted x0).
    """
    B = x0.shape[0]

    def body(carry, t_scalar):
      t = jnp.full((B,), t_scalar, dtype=jnp.int32)
      noise = jax.random.normal(jax.random.fold_in(key, t_scalar), x0.shape, x0.dtype)
      x_t = self.q_sample(x0, t, noise)
      vb, pred_xstart = self.vb_terms_bpd(
          self.call_model(model_fn, x_t, t), x0, x_t, t, clip_denoised=clip_denoised
      )
      return carry, (vb, mean_flat(jnp.square(pred_xstart - x0)))

    ts = jnp.arange(self.num_timesteps - 1, -1, -1, dtype=jnp.int32)
    _, (terms, mse) = jax.lax.scan(body, None, ts)
    terms = terms[::-1].T  # [B, T], index t
    mse = mse[::-1].T
    prior = self.prior_bpd(x0)
    return dict(
        total_bpd=jnp.sum(terms, axis=1) + prior, prior_bpd=prior, terms_bpd=terms, xstart_mse=mse
    )


def respaced(betas: np.ndarray, use_timesteps, **diffusion_kwargs) -> GaussianDiffusion:
  """A process on a subset of timesteps whose alpha_bar equals the original's there.

  Args:
    betas: [T] float64, the original schedule.
    use_timesteps: the kept indices (``schedules.space_timesteps``).
    **diffusion_kwargs: the mean/var/loss types of the original process.
  """
  new_betas, timestep_map = schedules.respace_betas(betas, use_timesteps)
  return GaussianDiffusion(new_betas, timestep_map=timestep_map, **diffusion_kwargs)
