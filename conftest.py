"""Doctests of jaxquant/ run with these names imported (`--doctest-modules`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
  doctest_namespace.update(jax=jax, jnp=jnp, np=np, jq=jq)
