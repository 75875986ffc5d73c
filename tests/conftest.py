"""Strict numerics for every test: rank promotion raises, fp32 everywhere, CPU."""

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def key():
    return jax.random.key(0)
