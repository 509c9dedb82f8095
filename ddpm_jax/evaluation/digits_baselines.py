"""Digits FID / IS of reference image sets and of model samples, all scored the same way.

  python -m ddpm_jax.evaluation.digits_baselines [--samples=A.npz,B.npz] [--num=512]
      [--seeds=0,1,2] [--summary] [--config=configs/digits.py]

Prints one JSON line per image set, scored like --mode=eval_fid on the digits
config (the digits classifier's features and class probabilities): FID against
the held-out split's statistics (``fid_test``, what eval_fid reports as
fid_test) and against the train split's (``fid_train``), and IS. Reference sets:
``real_train`` (``--num`` training digits drawn without replacement, one line
per seed: the FID real data reaches at that sample size), ``real_heldout``
(all 297 held-out digits: the IS to match), uniform noise and samples of a
Gaussian fitted to the training pixels. ``--samples``: model samples (uint8
NHWC under key 'images'), their first ``--num``, each item a path or a glob
pattern; with key 'labels' (a class-conditional model) also the classifier's
accuracy on the requested class. ``--summary``: then one line per way of
sampling (the files' stored settings less the seed): the seeds, per-seed FID
(held-out), IS, class accuracy and their means, for tables over sampling seeds.
Also per set: the classifier's mean top-class probability, the share of images
under 0.9, and the entropy of the mean class distribution (ln 10 = 2.303 when
balanced): IS falls with the first two and rises with the third.

IS cuts a set into 10 consecutive splits, so it depends on the order of the
images. Samples come in a random order and ``real_train`` draws too; the
held-out digits are stored in the order scikit-learn ships them, whose
consecutive runs of 30 hold the ten classes more evenly than random runs do.
Their ``is_mean`` is therefore the mean over ``--orders`` random orders
(``is_std`` its spread over them), and ``is_stored_order`` the IS in the stored
order (8.78, against 8.05-8.84 for random orders).
"""

import argparse
import collections
import glob
import json

import numpy as np

from ddpm_jax import config_loading
from ddpm_jax.data import sources
from ddpm_jax.evaluation import features, metrics


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--samples", default="", help="comma-separated .npz of model samples")
  parser.add_argument("--num", type=int, default=512, help="images per set")
  parser.add_argument("--seeds", default="0,1,2", help="draws of the real_train set")
  parser.add_argument("--orders", type=int, default=100, help="random orders of the held-out IS")
  parser.add_argument("--summary", action="store_true", help="means over seeds per sampler")
  parser.add_argument(
      "--config", default="configs/digits.py", help="the config whose data and FID features score"
  )
  args = parser.parse_args()
  config = config_loading.load(args.config)
  extractor = features.get_feature_extractor(config)
  train = sources.load_split_array(config.data, "train")
  test = sources.load_split_array(config.data, "test")
  refs = {
      name: metrics.feature_statistics(extractor(images)[0])
      for name, images in (("test", test), ("train", train))
  }
  rng = np.random.default_rng(0)
  flat = train.reshape(len(train), -1).astype(np.float64)
  gauss = rng.multivariate_normal(flat.mean(0), np.cov(flat, rowvar=False), size=args.num)
  sets = [("real_heldout", test, None)]
  for seed in args.seeds.split(","):
    pick = np.random.default_rng(int(seed)).choice(len(train), args.num, replace=False)
    sets.append((f"real_train_seed{seed}", train[pick], None))
  sets.append(
      ("uniform_noise", rng.integers(0, 256, (args.num,) + train.shape[1:], np.uint8), None)
  )
  sets.append(
      (
          "gaussian_fit",
          np.clip(np.round(gauss), 0, 255).astype(np.uint8).reshape((-1,) + train.shape[1:]),
          None,
      )
  )
  settings = {}
  for item in filter(None, args.samples.split(",")):
    for path in sorted(glob.glob(item)) or [item]:
      with np.load(path) as z:
        labels = z["labels"][: args.num] if "labels" in z.files else None
        sets.append((path, z["images"][: args.num], labels))
        if "settings" in z.files:
          settings[path] = json.loads(str(z["settings"]))
  rows = []
  for name, images, labels in sets:
    feats, probs = extractor(images)
    m, s = metrics.feature_statistics(feats)
    is_mean, is_std = metrics.inception_score(probs, num_splits=10)
    row = dict(set=name, num=len(images), is_mean=round(is_mean, 3), is_std=round(is_std, 3))
    if name == "real_heldout":
      order_rng = np.random.default_rng(0)
      shuffled = [
          metrics.inception_score(probs[order_rng.permutation(len(probs))], num_splits=10)[0]
          for _ in range(args.orders)
      ]
      row.update(
          is_mean=round(float(np.mean(shuffled)), 3),
          is_std=round(float(np.std(shuffled)), 3),
          is_stored_order=round(is_mean, 3),
      )
    for split, (mu, sigma) in refs.items():
      row[f"fid_{split}"] = round(metrics.frechet_distance(m, s, mu, sigma), 3)
    # Where IS comes from: the confidence per image and the balance of the classes.
    top = np.max(probs, axis=1)
    mean_probs = np.mean(probs, axis=0)
    row["mean_top_prob"] = round(float(np.mean(top)), 4)
    row["frac_top_prob_below_0.9"] = round(float(np.mean(top < 0.9)), 4)
    row["class_entropy_nats"] = round(float(-np.sum(mean_probs * np.log(mean_probs))), 4)
    if labels is not None:
      row["class_accuracy"] = round(float(np.mean(np.argmax(probs, axis=1) == labels)), 4)
    print(json.dumps(row))
    rows.append(row)
  if args.summary:
    summarise(rows, settings)


def summarise(rows, settings):
  """One line per way of sampling: per-seed values and means of FID (held-out), IS, accuracy."""
  groups = collections.defaultdict(list)
  for row in rows:
    if row["set"] in settings:
      got = dict(settings[row["set"]])
      seed = got.pop("seed")
      groups[json.dumps(got, sort_keys=True)].append((seed, row))
  for key, members in groups.items():
    members.sort(key=lambda m: m[0])
    out = dict(settings=json.loads(key), seeds=[seed for seed, _ in members])
    for field in ("fid_test", "is_mean", "class_accuracy", "frac_top_prob_below_0.9"):
      values = [row[field] for _, row in members if field in row]
      if values:
        out[field] = values
        out[f"{field}_mean"] = round(float(np.mean(values)), 3)
    print(json.dumps(out))


if __name__ == "__main__":
  main()
