"""evaluation/metrics.py, models/inception.py and evaluation/digits_classifier.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from ddpm_jax.evaluation import digits_classifier, metrics
from ddpm_jax.models import inception


# --------------------------------------------------------------------------- #
# Frechet distance / feature statistics
# --------------------------------------------------------------------------- #
def _random_spd(rng, d):
  a = rng.normal(size=(d, 2 * d))
  return a @ a.T / (2 * d) + 0.1 * np.eye(d)


def _reference_fd(mu1, s1, mu2, s2):
  """Textbook formula with scipy's sqrtm (independent of metrics.py)."""
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(covmean)))


@pytest.mark.parametrize("d", [1, 7, 64])
def test_frechet_distance_matches_scipy_reference(d):
  rng = np.random.default_rng(d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
  got = metrics.frechet_distance(mu1, s1, mu2, s2)
  assert isinstance(got, float)
  np.testing.assert_allclose(got, _reference_fd(mu1, s1, mu2, s2), rtol=1e-6)
  # Symmetric in its two arguments.
  np.testing.assert_allclose(metrics.frechet_distance(mu2, s2, mu1, s1), got, rtol=1e-6)


def test_frechet_distance_identical_statistics_is_zero():
  rng = np.random.default_rng(0)
  mu, sigma = rng.normal(size=32), _random_spd(rng, 32)
  assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_frechet_distance_diagonal_closed_form():
  rng = np.random.default_rng(1)
  a, b = rng.uniform(0.1, 3.0, size=10), rng.uniform(0.1, 3.0, size=10)
  mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
  np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_frechet_distance_rank_deficient_covariances_are_finite():
  # Fewer samples than dimensions: both covariances (and their product) are singular.
  rng = np.random.default_rng(2)
  s1 = metrics.feature_statistics(rng.normal(size=(10, 32)))
  s2 = metrics.feature_statistics(rng.normal(size=(12, 32)))
  fd = metrics.frechet_distance(*s1, *s2)
  assert np.isfinite(fd) and fd > 0
  assert abs(metrics.frechet_distance(*s1, *s1)) < 1e-4


def test_frechet_distance_retries_with_eps_when_sqrtm_fails(monkeypatch):
  rng = np.random.default_rng(3)
  mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
  s1, s2 = _random_spd(rng, 5), _random_spd(rng, 5)
  real_sqrtm = metrics._sqrtm
  calls = []

  def flaky_sqrtm(a):
    calls.append(a)
    return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

  monkeypatch.setattr(metrics, "_sqrtm", flaky_sqrtm)
  eps = 1e-3
  got = metrics.frechet_distance(mu1, s1, mu2, s2, eps=eps)
  assert len(calls) == 2
  off = eps * np.eye(5)
  np.testing.assert_allclose(calls[1], (s1 + off) @ (s2 + off))
  diff = mu1 - mu2
  expected = (
      diff @ diff
      + np.trace(s1)
      + np.trace(s2)
      - 2 * np.trace(np.real(scipy.linalg.sqrtm(calls[1])))
  )
  np.testing.assert_allclose(got, expected, rtol=1e-8)


def test_frechet_distance_rejects_invalid_input():
  z = np.zeros(3)
  with pytest.raises(ValueError, match="imaginary"):
    metrics.frechet_distance(z, -np.eye(3), z, np.eye(3))  # sqrtm(-I) = i I
  with pytest.raises(ValueError):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError):
    metrics.frechet_distance(z, np.eye(3), z, np.eye(2))


def test_feature_statistics():
  rng = np.random.default_rng(4)
  feats = rng.normal(size=(100, 6)).astype(np.float32)
  mu, sigma = metrics.feature_statistics(feats)
  assert mu.dtype == np.float64 and sigma.dtype == np.float64
  assert mu.shape == (6,) and sigma.shape == (6, 6)
  np.testing.assert_allclose(mu, feats.astype(np.float64).mean(0))
  np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64), rowvar=False))
  mu1, sigma1 = metrics.feature_statistics(feats[:, :1])
  assert mu1.shape == (1,) and sigma1.shape == (1, 1)
  with pytest.raises(ValueError):
    metrics.feature_statistics(feats[0])
  with pytest.raises(ValueError):
    metrics.feature_statistics(feats[:1])


# --------------------------------------------------------------------------- #
# Inception Score
# --------------------------------------------------------------------------- #
def test_inception_score_hand_computation():
  # One split of [[.5, .5], [1, 0]]: p(y) = [.75, .25];
  # KL_1 = .5 ln(.5/.75) + .5 ln(.5/.25) = .5 ln(4/3), KL_2 = ln(1/.75) = ln(4/3);
  # IS = exp(mean KL) = exp(.75 ln(4/3)) = (4/3) ** .75.
  probs = np.array([[0.5, 0.5], [1.0, 0.0]])
  mean, std = metrics.inception_score(probs, num_splits=1)
  np.testing.assert_allclose(mean, (4 / 3) ** 0.75, rtol=1e-12)
  assert std == 0.0
  # Two splits: the second, [[.2, .8], [.6, .4]], has p(y) = [.4, .6].
  more = np.array([[0.2, 0.8], [0.6, 0.4]])
  kl = 0.5 * (
      0.2 * np.log(0.2 / 0.4)
      + 0.8 * np.log(0.8 / 0.6)
      + 0.6 * np.log(0.6 / 0.4)
      + 0.4 * np.log(0.4 / 0.6)
  )
  scores = np.array([(4 / 3) ** 0.75, np.exp(kl)])
  mean, std = metrics.inception_score(np.concatenate([probs, more]), num_splits=2)
  np.testing.assert_allclose([mean, std], [scores.mean(), scores.std()], rtol=1e-12)


def test_inception_score_extremes():
  k, splits = 7, 4
  one_hot = np.tile(np.eye(k), (splits, 1))  # every split: each class exactly once
  mean, std = metrics.inception_score(one_hot, num_splits=splits)
  np.testing.assert_allclose(mean, k, rtol=1e-12)
  assert std < 1e-12
  same = np.tile(np.random.default_rng(0).dirichlet(np.ones(k)), (40, 1))
  mean, std = metrics.inception_score(same, num_splits=10)
  np.testing.assert_allclose(mean, 1.0, rtol=1e-12)
  # Uneven splits are allowed (sizes differ by one).
  mean, _ = metrics.inception_score(np.tile(np.eye(k), (3, 1)), num_splits=2)
  assert 1.0 < mean <= k


def test_inception_score_rejects_invalid_input():
  with pytest.raises(ValueError):
    metrics.inception_score(np.eye(3), num_splits=4)
  with pytest.raises(ValueError):
    metrics.inception_score(np.full((4, 3), 0.5), num_splits=1)
  with pytest.raises(ValueError):
    metrics.inception_score(np.ones(3), num_splits=1)


# --------------------------------------------------------------------------- #
# Statistics files
# --------------------------------------------------------------------------- #
def test_statistics_roundtrip_and_errors(tmp_path):
  rng = np.random.default_rng(5)
  mu, sigma = rng.normal(size=4), _random_spd(rng, 4)
  path = tmp_path / "sub" / "stats.npz"
  metrics.save_statistics(path, mu, sigma)
  mu2, sigma2 = metrics.load_statistics(path)
  np.testing.assert_array_equal(mu2, mu)
  np.testing.assert_array_equal(sigma2, sigma)

  with pytest.raises(FileNotFoundError, match="no feature-statistics file"):
    metrics.load_statistics(tmp_path / "missing.npz")
  np.savez(tmp_path / "wrong_keys.npz", m=mu, s=sigma)
  with pytest.raises(ValueError, match="'mu' and 'sigma'"):
    metrics.load_statistics(tmp_path / "wrong_keys.npz")
  np.savez(tmp_path / "wrong_shapes.npz", mu=mu, sigma=sigma[:3])
  with pytest.raises(ValueError, match="malformed"):
    metrics.load_statistics(tmp_path / "wrong_shapes.npz")
  (tmp_path / "garbage.npz").write_bytes(b"not a zip file")
  with pytest.raises(ValueError, match="could not read"):
    metrics.load_statistics(tmp_path / "garbage.npz")
  with pytest.raises(ValueError):
    metrics.save_statistics(tmp_path / "bad.npz", mu, sigma[:, :3])


# --------------------------------------------------------------------------- #
# Inception-v3 FID graph
# --------------------------------------------------------------------------- #
# Parameter count of pytorch-fid's FIDInceptionV3 (= torchvision inception_v3
# with num_classes=1008, aux_logits=False):
#   torchvision inception_v3 (aux logits, 1000 classes):      27,161,264
#   - AuxLogits: conv0 768*128 + 2*128         =     98,560
#                conv1 128*768*5*5 + 2*768     =  2,459,136
#                fc    768*1000 + 1000         =    769,000   -> -3,326,696
#   + 8 more classes in fc: 8*2048 + 8                       ->    +16,392
#   = 23,850,960 trainable numbers (conv kernels, BN gamma/beta, fc).
# BN running mean/var: 2 * (sum of the 94 convs' output channels) with
#   stem 32+32+64+80+192 = 400; A(pf) = 432+pf: 464+496+496 = 1456; B = 640;
#   C(c7) = 768+6*c7: 1536+1728+1728+1920 = 6912; D = 1280; E = 3264 (x2) = 6528
#   total 17,216 channels -> 34,432 numbers.
INCEPTION_PARAMS = 23_850_960
INCEPTION_BN_STATS = 34_432
INCEPTION_CONVS = 5 + 3 * 7 + 4 + 4 * 10 + 6 + 2 * 9  # = 94


def test_inception_structure_and_parameter_count():
  shapes = inception.inception_variable_shapes()
  params = {k: v for k, v in shapes.items() if k.startswith("params/")}
  stats = {k: v for k, v in shapes.items() if k.startswith("batch_stats/")}
  assert {k.split("/")[1] for k in params} == set(inception.LAYER_NAMES)
  assert sum(int(np.prod(s)) for s in params.values()) == INCEPTION_PARAMS
  assert sum(int(np.prod(s)) for s in stats.values()) == INCEPTION_BN_STATS
  assert sum(k.endswith("/conv/kernel") for k in params) == INCEPTION_CONVS
  # pytorch-fid's state dict has 4 BN tensors + 1 conv weight per conv, plus fc.{weight,bias}.
  assert len(shapes) == 5 * INCEPTION_CONVS + 2
  assert shapes["params/Conv2d_1a_3x3/conv/kernel"] == (3, 3, 3, 32)
  assert shapes["params/Conv2d_1a_3x3/bn/scale"] == (32,)
  assert shapes["batch_stats/Conv2d_1a_3x3/bn/var"] == (32,)
  assert shapes["params/Mixed_5b/branch_pool/conv/kernel"] == (1, 1, 192, 32)
  assert shapes["params/Mixed_6b/branch7x7_2/conv/kernel"] == (1, 7, 128, 128)
  assert shapes["params/Mixed_6e/branch7x7dbl_5/conv/kernel"] == (1, 7, 192, 192)
  assert shapes["params/Mixed_7a/branch7x7x3_4/conv/kernel"] == (3, 3, 192, 192)
  assert shapes["params/Mixed_7c/branch3x3dbl_3b/conv/kernel"] == (3, 1, 384, 384)
  assert shapes["params/fc/kernel"] == (2048, 1008)
  assert shapes["params/fc/bias"] == (1008,)


def test_inception_output_shapes_eval_shape():
  model = inception.InceptionV3()
  images = jax.ShapeDtypeStruct((4, 32, 32, 3), jnp.uint8)
  variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), images)
  pool3, logits = jax.eval_shape(model.apply, variables, images)
  assert pool3.shape == (4, 2048) and logits.shape == (4, 1008)
  assert pool3.dtype == jnp.float32 and logits.dtype == jnp.float32


def _random_variables(seed=0):
  """He-normal kernels, random BN affine/statistics, as numpy float32."""
  rng = np.random.default_rng(seed)
  flat = {}
  for k, s in inception.inception_variable_shapes().items():
    if k.endswith("/kernel"):
      flat[k] = rng.normal(0, np.sqrt(2.0 / np.prod(s[:-1])), s)
    elif k.endswith("/scale") or k.endswith("/var"):
      flat[k] = rng.uniform(0.5, 1.5, s)
    else:
      flat[k] = rng.normal(0, 0.1, s)
  return inception._unflatten({k: v.astype(np.float32) for k, v in flat.items()})


@pytest.fixture(scope="module")
def random_variables():
  return _random_variables()


def test_inception_forward_random_init(random_variables):
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  pool3, logits = jax.jit(inception.InceptionV3().apply)(random_variables, images)
  assert pool3.shape == (2, 2048) and logits.shape == (2, 1008)
  assert np.all(np.isfinite(pool3)) and np.all(np.isfinite(logits))
  assert np.all(np.asarray(pool3) >= 0)  # mean of ReLU outputs
  fc = random_variables["params"]["fc"]
  np.testing.assert_allclose(
      logits, np.asarray(pool3) @ fc["kernel"] + fc["bias"], rtol=1e-4, atol=1e-3
  )

  # Without resizing any size >= 75x75 goes through; smaller is refused.
  small = inception.InceptionV3(resize_input=False)
  big = np.random.default_rng(1).integers(0, 256, (2, 75, 80, 3), dtype=np.uint8)
  pool3, _ = jax.jit(small.apply)(random_variables, big)
  assert pool3.shape == (2, 2048)
  with pytest.raises(ValueError, match="at least 75"):
    small.apply(random_variables, images)
  with pytest.raises(ValueError):
    inception.InceptionV3(preprocess="caffe").apply(random_variables, images)


def test_missing_inception_weights_error(tmp_path, monkeypatch):
  missing = tmp_path / "nope.npz"
  with pytest.raises(FileNotFoundError) as info:
    inception.load_inception_params(missing)
  assert isinstance(info.value, inception.InceptionWeightsNotFoundError)
  message = str(info.value)
  assert "pt_inception-2015-12-05-6726825d.pth" in message
  assert "inception-2015-12-05" in message and "--convert" in message
  monkeypatch.setenv(inception.WEIGHTS_ENV_VAR, str(missing))
  with pytest.raises(inception.InceptionWeightsNotFoundError, match="nope.npz"):
    inception.load_inception_params()


def _as_pytorch_fid_state_dict(variables):
  """The torch-layout state dict these variables correspond to (numpy)."""
  from flax import traverse_util

  sd = {}
  for path, value in traverse_util.flatten_dict(variables).items():
    collection, *layer, leaf = path
    value = np.asarray(value)
    if collection == "params" and layer == ["fc"]:
      sd["fc." + ("weight" if leaf == "kernel" else "bias")] = (
          value.T if leaf == "kernel" else value
      )
    elif leaf == "kernel":
      sd[".".join(layer) + ".weight"] = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    else:
      torch_leaf = {
          "scale": "weight",
          "bias": "bias",
          "mean": "running_mean",
          "var": "running_var",
      }[leaf]
      sd[".".join(layer) + "." + torch_leaf] = value
      if leaf == "mean":
        sd[".".join(layer) + ".num_batches_tracked"] = np.array(0)
  return sd


def test_convert_pytorch_fid_state_dict_and_npz_roundtrip(tmp_path, random_variables):
  sd = _as_pytorch_fid_state_dict(random_variables)
  assert len(sd) == 6 * INCEPTION_CONVS + 2  # as in pytorch-fid's file, with num_batches_tracked
  assert sd["Mixed_6b.branch7x7_2.conv.weight"].shape == (128, 128, 1, 7)
  assert sd["fc.weight"].shape == (1008, 2048)
  converted = inception.convert_pytorch_fid_state_dict(sd)
  assert set(converted) == {"params", "batch_stats"}
  jax.tree_util.tree_map(np.testing.assert_array_equal, converted, random_variables)

  path = tmp_path / "inception.npz"
  inception.save_inception_params(path, converted)
  with np.load(path) as data:
    assert "params/Mixed_5b/branch1x1/conv/kernel" in data.files
    assert "batch_stats/Conv2d_1a_3x3/bn/mean" in data.files
  loaded = inception.load_inception_params(path)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, random_variables)

  with pytest.raises(ValueError, match="not part of"):
    inception.convert_pytorch_fid_state_dict({**sd, "AuxLogits.fc.weight": np.zeros((1000, 768))})
  bad = dict(sd)
  bad["fc.weight"] = np.zeros((1000, 2048))
  bad["fc.bias"] = np.zeros(1000)
  with pytest.raises(ValueError, match="params/fc/kernel"):
    inception.convert_pytorch_fid_state_dict(bad)
  del bad["Conv2d_1a_3x3.bn.running_var"]
  with pytest.raises(ValueError, match="missing"):
    inception.convert_pytorch_fid_state_dict(bad)
  (tmp_path / "broken.npz").write_bytes(b"junk")
  with pytest.raises(ValueError, match="could not read"):
    inception.load_inception_params(tmp_path / "broken.npz")


def test_bilinear_resize_half_pixel_matches_jax_image_resize():
  # torch interpolate(align_corners=False) == jax.image.resize("linear", antialias=False).
  x = jnp.asarray(np.random.default_rng(0).uniform(0, 255, (2, 13, 9, 3)), jnp.float32)
  for size in [(299, 299), (5, 4), (13, 20)]:
    ours = inception.bilinear_resize(x, size, half_pixel=True)
    ref = jax.image.resize(x, (2, *size, 3), method="linear", antialias=False)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-3)
  assert inception.bilinear_resize(x, (13, 9), half_pixel=False) is x


def test_bilinear_resize_legacy_matches_tensorflow():
  tf = pytest.importorskip("tensorflow")
  x = np.random.default_rng(1).uniform(0, 255, (2, 11, 7, 3)).astype(np.float32)
  for size in [(299, 299), (4, 5)]:
    ref = tf.compat.v1.image.resize_bilinear(x, size, align_corners=False, half_pixel_centers=False)
    ours = inception.bilinear_resize(jnp.asarray(x), size, half_pixel=False)
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-5, atol=1e-3)


def test_preprocessing_ranges():
  images = jnp.asarray([0, 128, 255], jnp.uint8).reshape(1, 1, 3, 1).repeat(3, -1)
  tf_mode = inception._preprocess(images, "tf", resize=False)
  torch_mode = inception._preprocess(images, "pytorch_fid", resize=False)
  np.testing.assert_allclose(tf_mode[0, 0, :, 0], [-1.0, 0.0, 127 / 128], atol=1e-6)
  np.testing.assert_allclose(torch_mode[0, 0, :, 0], [-1.0, 0.5 / 127.5, 1.0], atol=1e-6)


def test_avg_pool_excludes_padding_and_max_pool_pads_with_minus_inf():
  x = np.random.default_rng(2).normal(size=(1, 5, 6, 2)).astype(np.float32)
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  counts = np.pad(np.ones_like(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
  windows = lambda a: sum(a[:, i : i + 5, j : j + 6] for i in range(3) for j in range(3))
  np.testing.assert_allclose(
      inception._avg_pool_3x3_same(jnp.asarray(x)), windows(padded) / windows(counts), rtol=1e-5
  )
  neg = -np.abs(x) - 1.0  # all negative: zero padding would leak into the max
  neg_padded = np.pad(neg, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  ref = np.max([neg_padded[:, i : i + 5, j : j + 6] for i in range(3) for j in range(3)], axis=0)
  np.testing.assert_allclose(inception._max_pool_3x3_same(jnp.asarray(neg)), ref)


# --------------------------------------------------------------------------- #
# Digits classifier
# --------------------------------------------------------------------------- #
def test_digits_images_and_split():
  train, y_train = digits_classifier.load_digits_images("train")
  held, y_held = digits_classifier.load_digits_images("heldout")
  assert train.shape == (1500, 8, 8, 1) and held.shape == (297, 8, 8, 1)
  assert train.dtype == np.uint8 and train.max() == 255 and train.min() == 0
  assert set(np.unique(train)) <= {round(v * 255 / 16) for v in range(17)}
  assert y_train.shape == (1500,) and set(y_held) == set(range(10))
  with pytest.raises(ValueError):
    digits_classifier.load_digits_images("validation")


@pytest.mark.slow  # fits the classifier twice (all digits, training split): ~25 s
def test_digits_classifier_outputs_and_accuracy():
  held, _ = digits_classifier.load_digits_images("heldout")
  feats = digits_classifier.features(held)
  probs = digits_classifier.probs(held)
  assert feats.shape == (297, 128) and np.all(feats >= 0)
  assert probs.shape == (297, 10)
  np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-9)
  # Float input in [0, 255] gives the same answer as uint8.
  np.testing.assert_allclose(digits_classifier.features(held.astype(np.float32)), feats)
  acc = digits_classifier.heldout_accuracy()
  print(f"digits classifier held-out accuracy: {acc:.4f}")
  assert acc > 0.9
  assert digits_classifier.get_classifier() is digits_classifier.get_classifier()  # cached
  with pytest.raises(ValueError):
    digits_classifier.features(np.zeros((3, 28, 28, 1), np.uint8))


def test_digits_fid_and_inception_score():
  train, _ = digits_classifier.load_digits_images("train")
  held, _ = digits_classifier.load_digits_images("heldout")
  noise = np.random.default_rng(0).integers(0, 256, held.shape, dtype=np.uint8)
  ref = metrics.feature_statistics(digits_classifier.features(train))
  fid_real = metrics.frechet_distance(
      *metrics.feature_statistics(digits_classifier.features(held)), *ref
  )
  fid_noise = metrics.frechet_distance(
      *metrics.feature_statistics(digits_classifier.features(noise)), *ref
  )
  is_real, is_real_std = metrics.inception_score(digits_classifier.probs(held), num_splits=1)
  is_real10, is_real10_std = metrics.inception_score(digits_classifier.probs(held), num_splits=10)
  is_noise, _ = metrics.inception_score(digits_classifier.probs(noise), num_splits=1)
  print(
      f"digits FID held-out vs train {fid_real:.2f}, uniform noise vs train {fid_noise:.2f}; "
      f"IS held-out {is_real:.3f} (1 split), {is_real10:.3f} +- {is_real10_std:.3f} (10 splits); "
      f"IS noise {is_noise:.3f}"
  )
  assert 0 < fid_real < 5
  assert fid_noise > 10 * fid_real
  # Samples of a Gaussian fitted to the training pixels (right mean and covariance,
  # no digit shapes) must score clearly worse than real digits.
  flat = train.reshape(len(train), -1).astype(np.float64)
  gauss = np.random.default_rng(1).multivariate_normal(
      flat.mean(0), np.cov(flat, rowvar=False), 1000
  )
  gauss = np.clip(np.round(gauss), 0, 255).astype(np.uint8).reshape(-1, 8, 8, 1)
  fid_gauss = metrics.frechet_distance(
      *metrics.feature_statistics(digits_classifier.features(gauss)), *ref
  )
  assert fid_gauss > 2 * fid_real, (fid_gauss, fid_real)
  assert 8.0 < is_real <= 10.0
  assert is_noise < is_real - 3
