"""Strict numerics for every test: rank promotion raises, fp32 everywhere, CPU. Hermetic: the tokenised-data cache of
this test session (and of the CLI runs it starts) is a fresh folder, never the user's ~/.cache/jgoat, and the Hub is
offline (huggingface_hub reads HF_HUB_OFFLINE when first imported, after this file), so no test can reach a network."""

import os
import tempfile

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")
os.environ["JGOAT_CACHE"] = tempfile.mkdtemp(prefix="jgoat-test-cache-")
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture
def key():
    return jax.random.key(0)
