import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

# A script run in a subprocess by test_sharding.py: not collected (doctest
# collection would import it into the workers, with its 8-device flag).
collect_ignore = ["sharded_run.py"]

from typing import NamedTuple

import pytest
from hypothesis import settings

from jaxquant.engine import lowering

# Derandomized, so CI runs the same examples every time; explore more with
# HYPOTHESIS_PROFILE=explore.
settings.register_profile("ci", max_examples=40, deadline=None,
                          derandomize=True)
settings.register_profile("explore", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(params=sorted(lowering.PROFILES))
def machine(request) -> str:
  """Each lowering profile in turn, whatever this host is: every machine's
  choices compute on any backend, so each one's numbers are tested here
  (the host only decides which one is fast)."""
  return request.param


class Trained(NamedTuple):
  model: object
  params: dict
  x_train: object
  y_train: object
  x_test: object
  y_test: object


@pytest.fixture(scope="session")
def digits_cnn() -> Trained:
  """`models.DigitsCNN` trained 12 epochs on digits (test accuracy ~0.98).

  Session-scoped: tests/test_calibration.py and tests/test_analysis.py share
  one training run (a few seconds) per test process. Treat it as read-only.
  """
  import data
  import models

  x_train, y_train, x_test, y_test = data.digits(seed=0)
  model = models.DigitsCNN()
  params = models.train(model, x_train, y_train, epochs=12)
  return Trained(model, params, x_train, y_train, x_test, y_test)
