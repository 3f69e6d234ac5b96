"""Data for the tests: scikit-learn's 8x8 digits (shipped with sklearn).

The split is the one of `experiments.data.load_digits_split` (checked in
tests/test_experiment_data.py), so a test's numbers and an experiment's
are comparable; the tests do not import experiments/.
"""

import functools

import numpy as np


@functools.lru_cache(maxsize=2)
def digits(seed: int = 0):
  """(x_train, y_train, x_test, y_test): 1347 / 450 images, split 75 / 25 in
  `numpy.random.default_rng(seed).permutation` order; float32 images in
  [0, 1] shaped (N, 8, 8, 1), int32 labels 0..9. Read-only arrays."""
  from sklearn.datasets import load_digits

  data = load_digits()
  images = (data.images / 16.0).astype(np.float32)[..., None]
  labels = data.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(images))
  cut = int(0.75 * len(images))
  out = (images[order[:cut]], labels[order[:cut]], images[order[cut:]],
         labels[order[cut:]])
  for a in out:
    a.flags.writeable = False
  return out
