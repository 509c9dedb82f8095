"""Digits FID / IS of reference image sets, to read a trained model's numbers against.

  python benchmarks/digits_baselines.py [--samples=WORKDIR/samples/samples_*.npz] [--num=1000]

Prints one JSON line per image set, all scored like --mode=eval_fid on the
digits config (the digits classifier's features and class probabilities; FID
against the train split's statistics): held-out real digits, uniform noise,
samples of a Gaussian fitted to the training pixels (mean and full covariance),
and, when given, model samples (uint8 NHWC under key 'images').
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import digits  # pylint: disable=g-import-not-at-top
from ddpm_jax.data import sources  # pylint: disable=g-import-not-at-top
from ddpm_jax.evaluation import features, metrics  # pylint: disable=g-import-not-at-top


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--samples", default="", help="an .npz of model samples (key 'images')")
  parser.add_argument("--num", type=int, default=1000, help="images per synthetic set")
  args = parser.parse_args()
  config = digits.get_config()
  extractor = features.get_feature_extractor(config)
  train = sources.load_split_array(config.data, "train")
  test = sources.load_split_array(config.data, "test")
  mu, sigma = metrics.feature_statistics(extractor(train)[0])
  rng = np.random.default_rng(0)
  flat = train.reshape(len(train), -1).astype(np.float64)
  gauss = rng.multivariate_normal(flat.mean(0), np.cov(flat, rowvar=False), size=args.num)
  sets = {
      "real_heldout": test,
      "uniform_noise": rng.integers(0, 256, (args.num,) + train.shape[1:], dtype=np.uint8),
      "gaussian_fit": np.clip(np.round(gauss), 0, 255)
      .astype(np.uint8)
      .reshape((-1,) + train.shape[1:]),
  }
  if args.samples:
    sets["model_samples"] = np.load(args.samples)["images"][: args.num]
  for name, images in sets.items():
    feats, probs = extractor(images)
    m, s = metrics.feature_statistics(feats)
    is_mean, is_std = metrics.inception_score(probs, num_splits=10)
    print(
        json.dumps(
            dict(
                set=name,
                num=len(images),
                fid_train=round(metrics.frechet_distance(m, s, mu, sigma), 3),
                is_mean=round(is_mean, 3),
                is_std=round(is_std, 3),
            )
        )
    )


if __name__ == "__main__":
  main()
