"""Samplers: Algorithm 2, DDIM, DDIM inversion, DPM-Solver++ (ODE and SDE), each one ``lax.scan``.

Each loop is a pure function of (diffusion, model_fn, key): wrap it in
``jax.jit`` with the network parameters passed in (closed over, concrete
parameters become constants of the program, and a large model's make the
compile slow), e.g.::

    @jax.jit
    def sample(params, key):
      model_fn = lambda x, t: model.apply({'params': params}, x, t)
      return ancestral_sample_loop(diffusion, model_fn, (16, 32, 32, 3), key)

The loop body (and so the network) is traced once, whatever T is. Respaced
sampling (fewer steps) is the same loop on ``gaussian.respaced(...)``.

Randomness: x_T comes from ``fold_in(key, T)`` and the noise of step t from
``fold_in(key, t)``, so the same key gives the same samples (use one key per
shard to shard sampling).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.diffusion.gaussian import GaussianDiffusion, ModelFn, extract

NoiseFn = Callable[[jax.Array], jax.Array]


def _scan_steps(step_fn, x, t_start: int, return_every: Optional[int]):
  """Runs ``x = step_fn(x, t)`` for t = t_start, ..., 0 in one scan.

  step_fn returns (new_x, pred_xstart). With ``return_every=K`` the loop is a
  scan of (t_start + 1) / K chunks of K steps, and after each chunk the
  current x_t and the last pred_xstart are recorded.
  """
  n = t_start + 1
  ts = jnp.arange(t_start, -1, -1, dtype=jnp.int32)
  if return_every is None:
    x, _ = jax.lax.scan(lambda x, t: (step_fn(x, t)[0], None), x, ts)
    return x, None
  if n % return_every:
    raise ValueError(f"return_every={return_every} must divide the number of steps {n}")

  def chunk(x, ts_chunk):
    def inner(carry, t):
      x, _ = carry
      return step_fn(x, t), None

    (x, pred_xstart), _ = jax.lax.scan(inner, (x, jnp.zeros_like(x)), ts_chunk)
    return x, (x, pred_xstart)

  x, (xs, x0s) = jax.lax.scan(chunk, x, ts.reshape(n // return_every, return_every))
  return x, dict(x_t=xs, pred_xstart=x0s, t=ts.reshape(-1, return_every)[:, -1])


def _initial_noise(key: jax.Array, T: int, shape: Sequence[int]) -> jax.Array:
  return jax.random.normal(jax.random.fold_in(key, T), shape)


def _step_noise(key: jax.Array, shape: Sequence[int]) -> NoiseFn:
  return lambda t: jax.random.normal(jax.random.fold_in(key, t), shape)


def _predict(diffusion: GaussianDiffusion, model_fn: ModelFn, x, t_scalar, clip_denoised):
  """t [B] and ``p_mean_variance``'s dict for x_t [B, ...] at the scalar timestep."""
  t = jnp.full((x.shape[0],), t_scalar, dtype=jnp.int32)
  out = diffusion.p_mean_variance(
      diffusion.call_model(model_fn, x, t), x, t, clip_denoised=clip_denoised
  )
  return t, out


def ancestral_step(diffusion, model_fn, x, t_scalar, z, clip_denoised: bool = True):
  """One step of Algorithm 2: x_{t-1} = mu_theta(x_t, t) + sigma_t z (no noise at t = 0).

  Args: x: [B, H, W, C] = x_t; t_scalar: int32 scalar; z: standard normal noise
    broadcastable to x. Returns (x_{t-1}, pred_xstart), both [B, H, W, C].
  """
  _, out = _predict(diffusion, model_fn, x, t_scalar, clip_denoised)
  nonzero = (t_scalar > 0).astype(x.dtype)
  return out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * z, out["pred_xstart"]


def ancestral_from(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    x_t: jax.Array,
    t_start: int,
    noise_fn: NoiseFn,
    clip_denoised: bool = True,
    return_every: Optional[int] = None,
):
  """Algorithm 2 from x_t at array timestep ``t_start`` down to x_0 (one scan).

  Args:
    x_t: [B, H, W, C], a sample at timestep ``t_start`` (T - 1 for x_T).
    noise_fn: t (int32 scalar) -> the noise z_t of that step, broadcastable to
      x_t, so the caller decides which examples share noise (the paper's
      interpolations decode every mixture with the same noise).
    return_every: record the trajectory every K steps (see ``ancestral_sample_loop``).
  Returns: x_0 [B, H, W, C], or (x_0, trajectory) with ``return_every``.
  """

  def step(x, t):
    return ancestral_step(diffusion, model_fn, x, t, noise_fn(t), clip_denoised)

  x, traj = _scan_steps(step, x_t, t_start, return_every)
  return x if return_every is None else (x, traj)


def ancestral_sample_loop(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    shape: Sequence[int],
    key: jax.Array,
    clip_denoised: bool = True,
    noise: Optional[jax.Array] = None,
    return_every: Optional[int] = None,
):
  """Algorithm 2: x_T ~ N(0, I); x_{t-1} = mu_theta(x_t, t) + sigma_t z; return x_0.

  Args:
    diffusion: the process (possibly respaced).
    model_fn: (x_t [B, H, W, C], t [B] int) -> output.
    shape: (B, H, W, C).
    key: PRNG key.
    clip_denoised: clip predicted x0 to [-1, 1] at each step (the paper does).
    noise: optional x_T [B, H, W, C]; drawn from the key when None.
    return_every: record the trajectory every K steps (the paper's Fig. 6).
  Returns:
    x0 [B, H, W, C] (roughly in [-1, 1]), or (x0, trajectory) with
    trajectory['x_t'], trajectory['pred_xstart']: [T/K, B, H, W, C] and
    trajectory['t'] [T/K], when ``return_every`` is given.
  """
  T = diffusion.num_timesteps
  x = _initial_noise(key, T, shape) if noise is None else noise
  return ancestral_from(
      diffusion, model_fn, x, T - 1, _step_noise(key, shape), clip_denoised, return_every
  )


def ddim_sample_loop(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    shape: Sequence[int],
    key: jax.Array,
    eta: float = 0.0,
    clip_denoised: bool = True,
    noise: Optional[jax.Array] = None,
    return_every: Optional[int] = None,
):
  """DDIM (Song et al. 2021, Eq. 12): deterministic at eta = 0, DDPM-like at eta = 1.

  x_{t-1} = sqrt(ab_{t-1}) x0_hat + sqrt(1 - ab_{t-1} - s_t^2) eps_hat + s_t z,
  s_t = eta sqrt((1 - ab_{t-1}) / (1 - ab_t)) sqrt(1 - ab_t / ab_{t-1}).
  Usually run on a respaced process (e.g. 50 steps). Arguments and return as
  ``ancestral_sample_loop``.
  """
  T = diffusion.num_timesteps
  x = _initial_noise(key, T, shape) if noise is None else noise
  step_noise = _step_noise(key, shape)

  def step(x, t_scalar):
    t, out = _predict(diffusion, model_fn, x, t_scalar, clip_denoised)
    x0 = out["pred_xstart"]
    eps = diffusion.predict_eps_from_xstart(x, t, x0)
    ab = extract(diffusion.alphas_cumprod, t, x.ndim)
    ab_prev = extract(diffusion.alphas_cumprod_prev, t, x.ndim)
    sigma = eta * jnp.sqrt((1 - ab_prev) / (1 - ab)) * jnp.sqrt(1 - ab / ab_prev)
    mean = jnp.sqrt(ab_prev) * x0 + jnp.sqrt(1 - ab_prev - sigma**2) * eps
    nonzero = (t_scalar > 0).astype(x.dtype)
    return mean + nonzero * sigma * step_noise(t_scalar), x0

  x, traj = _scan_steps(step, x, T - 1, return_every)
  return x if return_every is None else (x, traj)


def ddim_reverse_loop(
    diffusion: GaussianDiffusion, model_fn: ModelFn, x0: jax.Array, clip_denoised: bool = False
) -> jax.Array:
  """Deterministic DDIM encoding x0 -> x_T (the eta = 0 ODE run forwards).

  x_{t+1} = sqrt(ab_{t+1}) x0_hat(x_t) + sqrt(1 - ab_{t+1}) eps_hat(x_t), starting
  from x_0 at the first step. ``ddim_sample_loop(..., eta=0, noise=x_T)`` maps
  the result back to x0 up to discretisation error.

  Args: x0: [B, H, W, C] in [-1, 1]. Returns: x_T [B, H, W, C].
  """
  T = diffusion.num_timesteps

  def step(x, t_scalar):
    t, out = _predict(diffusion, model_fn, x, t_scalar, clip_denoised)
    xs = out["pred_xstart"]
    eps = diffusion.predict_eps_from_xstart(x, t, xs)
    ab_next = extract(diffusion.alphas_cumprod_next, t, x.ndim)
    return jnp.sqrt(ab_next) * xs + jnp.sqrt(1 - ab_next) * eps, None

  # Steps t = 0 .. T-2 reach x_{T-1}, the last index of the array convention.
  x, _ = jax.lax.scan(step, x0, jnp.arange(0, T - 1, dtype=jnp.int32))
  return x


# ----------------------------------------------------------------------------
# DPM-Solver++ (Lu et al. 2022)
# ----------------------------------------------------------------------------

TIMESTEP_SPACINGS = ("uniform", "logsnr")


def log_snr(diffusion: GaussianDiffusion) -> np.ndarray:
  """lambda_n = log(alpha_n / sigma_n) of the discrete schedule, float64 [T] (decreasing in n)."""
  ac = np.cumprod(1.0 - np.asarray(diffusion.betas, np.float64))
  return 0.5 * (np.log(ac) - np.log1p(-ac))


def dpm_solver_times(
    diffusion: GaussianDiffusion, num_steps: int, spacing: str = "uniform"
) -> tuple[np.ndarray, np.ndarray]:
  """The solver's grid: (times float64 [N], lambdas float64 [N]), from t = T-1 down.

  'uniform': N times evenly spread in [0, T-1] excluding 0 and rounded to
  integers, like diffusers' 'linspace' spacing; 'logsnr': N times with
  lambda evenly spread from lambda(T-1) to lambda(0), t found by inverting
  the piecewise-linear interpolation of lambda in t (continuous times). After
  the last one the solver steps to sigma = 0 (the data).
  """
  T = diffusion.num_timesteps
  lam = log_snr(diffusion)
  if spacing == "uniform":
    times = np.linspace(0, T - 1, num_steps + 1).round()[::-1][:-1]
  elif spacing == "logsnr":
    lambdas = np.linspace(lam[-1], lam[0], num_steps)
    times = np.interp(lambdas, lam[::-1], np.arange(T - 1, -1, -1, dtype=np.float64))
  else:
    raise ValueError(f"timestep spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")
  return times.astype(np.float64), np.interp(times, np.arange(T), lam)


def _data_prediction(diffusion, output, x, alpha, sigma):
  """x0 from the network output at (alpha, sigma): eps, x0 or v parameterisation."""
  out, _ = diffusion.split_model_output(output)
  if diffusion.model_mean_type == "eps":
    return (x - sigma * out) / alpha
  if diffusion.model_mean_type == "x0":
    return out
  if diffusion.model_mean_type == "v":
    return alpha * x - sigma * out
  raise ValueError("DPM-Solver++ needs an eps, x0 or v model, not 'xprev'")


def dynamic_threshold(x0: jax.Array, percentile: float = 0.995, max_value: float = 1.0):
  """Saharia et al. (2022): per-example percentile s of |x0|, clipped to [1, max]; x0 in [-s, s] / s."""
  flat = jnp.abs(x0.reshape(x0.shape[0], -1))
  s = jnp.clip(jnp.quantile(flat, percentile, axis=1), 1.0, max_value)
  s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
  return jnp.clip(x0, -s, s) / s


def dpm_solver_sample_loop(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    shape: Sequence[int],
    key: jax.Array,
    num_steps: int = 20,
    spacing: str = "uniform",
    thresholding: bool = False,
    noise: Optional[jax.Array] = None,
):
  """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): the probability-flow ODE in ``num_steps`` calls.

  Multistep, second order, data prediction, on the discrete-time schedule of
  ``diffusion`` (all T steps; log-SNR interpolated linearly in t): the first
  and the last step are first order, as in the paper. One ``lax.scan``.

  Args:
    diffusion: the full T-step process the network was trained with.
    model_fn: (x_t [B, H, W, C], t [B] float) -> output; t may be non-integer
      with ``spacing='logsnr'``.
    shape: (B, H, W, C); key: x_T comes from ``fold_in(key, T)`` like the
      other samplers (``noise`` overrides it).
    num_steps: network calls, >= 1.
    spacing: 'uniform' (in t) or 'logsnr' (see ``dpm_solver_times``).
    thresholding: dynamic thresholding of each data prediction (off: the
      plain ODE solver).
  Returns: x0 [B, H, W, C].
  """
  return _dpm_solver_loop(
      diffusion, model_fn, shape, key, num_steps, spacing, thresholding, noise, sde=False
  )


def dpm_solver_sde_sample_loop(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    shape: Sequence[int],
    key: jax.Array,
    num_steps: int = 20,
    spacing: str = "uniform",
    thresholding: bool = False,
    noise: Optional[jax.Array] = None,
):
  """SDE-DPM-Solver++(2M) (Lu et al. 2022b): the reverse SDE in ``num_steps`` calls.

  With lambda = log(alpha / sigma) and h = lambda_next - lambda, a step from x
  (at alpha, sigma) to (alpha_n, sigma_n) is

    x_n = (sigma_n / sigma) e^{-h} x + alpha_n (1 - e^{-2h}) D + sigma_n sqrt(1 - e^{-2h}) z,

  D = x0 (first order: then it is the DDPM posterior q(x_n | x, x0) with x0
  predicted, i.e. DDIM at eta = 1) or x0 + (x0 - x0_prev) / (2 r), r = h_prev / h
  (second order, multistep); z is fresh standard normal noise. The time grid,
  the first-order first and last steps, thresholding and the eps/x0/v
  conversion are ``dpm_solver_sample_loop``'s; the last step lands on the data
  prediction (sigma_n = 0, no noise).

  Args: as ``dpm_solver_sample_loop``; key: x_T comes from ``fold_in(key, T)``
    and the noise z of step k (k = 0 .. num_steps - 1, from x_T down) from
    ``fold_in(key, k)``.
  Returns: x0 [B, H, W, C].
  """
  return _dpm_solver_loop(
      diffusion, model_fn, shape, key, num_steps, spacing, thresholding, noise, sde=True
  )


def _dpm_solver_loop(
    diffusion, model_fn, shape, key, num_steps, spacing, thresholding, noise, sde: bool
):
  """The multistep loop of DPM-Solver++(2M): the ODE variant, or with ``sde`` the SDE one."""
  T = diffusion.num_timesteps
  times, lambdas = dpm_solver_times(diffusion, num_steps, spacing)
  x = _initial_noise(key, T, shape) if noise is None else noise
  step_noise = _step_noise(key, shape)
  # Per step k: its time, lambda, and the next lambda (+inf after the last: sigma = 0).
  lam_next = np.append(lambdas[1:], np.inf)
  order = np.full(num_steps, 2, np.int32)
  order[0] = 1
  order[-1] = 1
  xs = dict(
      k=jnp.arange(num_steps, dtype=jnp.int32),
      t=jnp.asarray(times, jnp.float32),
      lam=jnp.asarray(lambdas, jnp.float32),
      lam_next=jnp.asarray(lam_next, jnp.float32),
      lam_prev=jnp.asarray(np.append(np.nan, lambdas[:-1]), jnp.float32),
      order=jnp.asarray(order),
  )

  def alpha_sigma(lam):
    return jnp.sqrt(jax.nn.sigmoid(2.0 * lam)), jnp.sqrt(jax.nn.sigmoid(-2.0 * lam))

  def step(carry, k):
    x, d_prev = carry
    alpha, sigma = alpha_sigma(k["lam"])
    t = jnp.full((x.shape[0],), k["t"], jnp.float32)
    d = _data_prediction(diffusion, model_fn(x, t), x, alpha, sigma)
    if thresholding:
      d = dynamic_threshold(d)
    h = k["lam_next"] - k["lam"]
    alpha_next, sigma_next = alpha_sigma(k["lam_next"])
    r = (k["lam"] - k["lam_prev"]) / h  # h_{k-1} / h_k
    d_mix = jnp.where(k["order"] == 2, d + 0.5 / r * (d - d_prev), d)
    if sde:
      phi = -jnp.expm1(-2.0 * h)  # 1 - e^{-2h}; 1 at the last step (h = inf)
      x_next = (
          (sigma_next / sigma) * jnp.exp(-h) * x
          + alpha_next * phi * d_mix
          + sigma_next * jnp.sqrt(phi) * step_noise(k["k"])
      )
    else:
      phi = -jnp.expm1(-h)  # 1 - e^{-h}; 1 at the last step (h = inf)
      x_next = (sigma_next / sigma) * x + alpha_next * phi * d_mix
    return (x_next, d), None

  (x, _), _ = jax.lax.scan(step, (x, jnp.zeros_like(x)), xs)
  return x
