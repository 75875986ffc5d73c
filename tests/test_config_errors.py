"""The bad-input catalogue: every mistake a user can make with a config, a target rule or a layout fails early with a
ValueError whose message says what is wrong (asserted with ``pytest.raises(..., match=...)``)."""

import re

import flax.linen as nn
import jax
import numpy as np
import pytest

import jgoat

# fp32 layer vs float64 NumPy, dot products of ≤ 32 terms: summation-order rounding ≈ √32 · eps32 ≈ 1e-6 relative;
# 1e-5 leaves headroom and a wrong reshape or a missing term is O(1).
TOL_FP32 = 1e-5


def tiny_params():
    """A hand-built params tree: encoder/dense [48 → 40], encoder/out [40 → 8], classifier [8 → 3] (no compilation)."""
    rng = np.random.default_rng(0)

    def dense(n, m):
        return {"kernel": rng.standard_normal((n, m)).astype(np.float32), "bias": np.zeros(m, np.float32)}

    return {"encoder": {"dense": dense(48, 40), "out": dense(40, 8)}, "classifier": dense(8, 3)}


# ----------------------------------------------------------------------------------------------------------------------
# Config construction
# ----------------------------------------------------------------------------------------------------------------------

CONFIG_ERRORS = [
    pytest.param(lambda: jgoat.GoatConfig(rank=0), r"rank must be a positive integer, got 0", id="goat-rank-0"),
    pytest.param(lambda: jgoat.GoatConfig(rank=-8), r"rank must be a positive integer, got -8", id="goat-rank-neg"),
    pytest.param(lambda: jgoat.GoatConfig(rank=8.0), r"rank must be a positive integer, got 8\.0",
                 id="goat-rank-float"),
    pytest.param(lambda: jgoat.LoraConfig(rank=0), r"rank must be a positive integer, got 0", id="lora-rank-0"),
    pytest.param(lambda: jgoat.GoatConfig(rank=12, experts=8),
                 r"rank 12 is not divisible by experts 8", id="goat-rank-not-divisible"),
    pytest.param(lambda: jgoat.GoatConfig(rank=4, experts=8),
                 r"rank 4 is not divisible by experts 8", id="goat-rank-below-experts"),
    pytest.param(lambda: jgoat.GoatConfig(rank=16, experts=4, top_k=5),
                 r"top_k 5 > experts 4", id="goat-k-above-experts"),
    pytest.param(lambda: jgoat.GoatConfig(top_k=0), r"top_k must be a positive integer, got 0", id="goat-k-0"),
    pytest.param(lambda: jgoat.GoatConfig(experts=0), r"experts must be a positive integer, got 0", id="goat-E-0"),
    pytest.param(lambda: jgoat.GoatConfig(init="svd"), r"unknown init 'svd'; allowed: goat, goat_mini, pissa",
                 id="goat-unknown-init"),
    pytest.param(lambda: jgoat.GoatConfig(scaling="sqrt"), r"unknown scaling 'sqrt'; allowed: theory, alpha",
                 id="goat-unknown-scaling"),
    pytest.param(lambda: jgoat.GoatConfig(aux_form="mean"), r"unknown aux_form 'mean'; allowed: code, paper",
                 id="goat-unknown-aux-form"),
    pytest.param(lambda: jgoat.GoatConfig(dropout_mode="tied"), r"unknown dropout_mode 'tied'",
                 id="goat-unknown-dropout-mode"),
    pytest.param(lambda: jgoat.GoatConfig(dropout=-0.1), r"dropout must be in \[0, 1\), got -0\.1",
                 id="goat-dropout-neg"),
    pytest.param(lambda: jgoat.GoatConfig(dropout=1.0), r"dropout must be in \[0, 1\), got 1\.0", id="goat-dropout-1"),
    pytest.param(lambda: jgoat.LoraConfig(dropout=1.5), r"dropout must be in \[0, 1\), got 1\.5", id="lora-dropout"),
    pytest.param(lambda: jgoat.GoatConfig(rho=0.0), r"rho must be > 0, got 0\.0", id="goat-rho-0"),
    pytest.param(lambda: jgoat.GoatConfig(eta=-1.0), r"eta must be > 0, got -1\.0", id="goat-eta-neg"),
    pytest.param(lambda: jgoat.GoatConfig(alpha=0.0), r"alpha must be > 0, got 0\.0", id="goat-alpha-0"),
    pytest.param(lambda: jgoat.GoatConfig(init_cof=-0.5), r"init_cof must be >= 0", id="goat-init-cof-neg"),
    pytest.param(lambda: jgoat.GoatConfig(targets=""), r"targets is empty", id="targets-empty"),
    pytest.param(lambda: jgoat.GoatConfig(targets=["q", 3]),
                 r"targets must be a regex string or a sequence of module names", id="targets-not-str"),
    pytest.param(lambda: jgoat.MoLoraConfig(rank=6, experts=4), r"rank 6 is not divisible by experts 4",
                 id="molora-rank"),
    pytest.param(lambda: jgoat.LoraConfig(init="svd"), r"unknown LoRA init 'svd'; allowed: kaiming", id="lora-init"),
    pytest.param(lambda: jgoat.LoraConfig(init="pissa_niter_x"), r"unknown LoRA init 'pissa_niter_x'",
                 id="lora-init-niter"),
    pytest.param(lambda: jgoat.LoraConfig(use_dora=True, init="pissa"),
                 r"use_dora=True supports init='kaiming' only, got init='pissa'", id="dora-pissa"),
    pytest.param(lambda: jgoat.LoraConfig(alpha=0.0), r"alpha must be > 0, got 0\.0", id="lora-alpha-0"),
]


@pytest.mark.parametrize(("make", "match"), CONFIG_ERRORS)
def test_config_rejects(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_valid_configs_construct():
    """The boundaries themselves are accepted: k = E, r = E, dropout = 0, init_cof = 0, a list target."""
    jgoat.GoatConfig(rank=8, experts=8, top_k=8, dropout=0.0, init_cof=0.0, targets=["query"])
    assert jgoat.GoatConfig(targets=["q", "v"]).targets == ("q", "v")  # lists become tuples (hashable)


# ----------------------------------------------------------------------------------------------------------------------
# Target selection and per-layer checks (raised before anything is compiled)
# ----------------------------------------------------------------------------------------------------------------------

REAL_PATHS = r"some real module paths: 'classifier', 'encoder/dense', 'encoder/out'"
WRAP_ERRORS = [
    pytest.param(jgoat.GoatConfig(rank=16, experts=4, targets=["out"]),
                 r"rank 16 > min\(in, out\) = 8 for layer 'encoder/out' \[40 -> 8\]", id="goat-rank-above-min"),
    pytest.param(jgoat.LoraConfig(rank=16, targets=r"encoder/o.*"),
                 r"rank 16 > min\(in, out\) = 8 for layer 'encoder/out' \[40 -> 8\]", id="lora-rank-above-min"),
    pytest.param(jgoat.GoatConfig(rank=16, experts=4, targets=r".*/query"),
                 re.escape("targets rule '.*/query' matches no linear module; ") + REAL_PATHS, id="regex-target"),
    pytest.param(jgoat.GoatConfig(rank=16, experts=4, targets=r"dense"),  # a regex must match the whole path
                 re.escape("targets rule 'dense' matches no linear module; ") + REAL_PATHS, id="regex-not-full-path"),
    pytest.param(jgoat.GoatConfig(rank=16, experts=4, targets=["dense", "query"]),
                 r"targets rule 'query' matches no linear module; " + REAL_PATHS, id="list-target"),
    pytest.param(jgoat.GoatConfig(rank=16, experts=4, targets=["dense"], exclude=["value"]),
                 r"exclude rule 'value' matches no linear module; " + REAL_PATHS, id="list-exclude"),
    pytest.param(jgoat.GoatConfig(rank=16, experts=4, targets=["dense"], exclude=r"enc/.*"),
                 re.escape("exclude rule 'enc/.*' matches no linear module"), id="regex-exclude"),
    pytest.param(jgoat.GoatConfig(rank=16, experts=4, targets=["dense"], exclude=["dense"]),
                 r"targets=\('dense',\) minus exclude=\('dense',\) selects no module", id="exclude-everything"),
]


@pytest.mark.parametrize(("cfg", "match"), WRAP_ERRORS)
def test_wrap_rejects(cfg, match):
    with pytest.raises(ValueError, match=match):
        jgoat.wrap(tiny_params(), cfg, key=jax.random.key(0))


def test_wrap_rejects_a_tree_without_linears():
    with pytest.raises(ValueError, match=r"params contain no module with a 'kernel' array"):
        jgoat.wrap({"embed": {"embedding": np.zeros((4, 8), np.float32)}}, jgoat.GoatConfig(), key=jax.random.key(0))


# ----------------------------------------------------------------------------------------------------------------------
# merge / unmerge / apply misuse
# ----------------------------------------------------------------------------------------------------------------------


class Small(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(8, name="dense")(x)


def small_params():
    rng = np.random.default_rng(1)
    return {"dense": {"kernel": rng.standard_normal((8, 8)).astype(np.float32),
                      "bias": rng.standard_normal(8).astype(np.float32)}}


def test_merge_of_goat_raises():
    wrapped = jgoat.wrap(small_params(), jgoat.GoatConfig(rank=4, experts=2, top_k=1), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"'dense' holds a GOAT adapter: GOAT is never merged"):
        jgoat.merge(wrapped)
    with pytest.raises(ValueError, match=r"aux_mask of shape \(3,\) does not match the leading dims \(2, 5\)"):
        jgoat.apply(Small().apply)({"params": wrapped}, np.ones((2, 5, 8), np.float32), aux_mask=np.ones(3))


def test_unmerge_of_dora_raises():
    wrapped = jgoat.wrap(small_params(), jgoat.LoraConfig(rank=2, use_dora=True), key=jax.random.key(0))
    merged = jgoat.merge(wrapped)
    assert "jgoat" not in merged["dense"]
    with pytest.raises(ValueError, match=r"'dense' holds a DoRA adapter, which has no exact unmerge"):
        jgoat.unmerge(merged, wrapped)


# ----------------------------------------------------------------------------------------------------------------------
# DenseGeneral kernels need a layout
# ----------------------------------------------------------------------------------------------------------------------

N_IN, HEADS, HEAD_DIM = 32, 4, 8  # N_IN = HEADS·HEAD_DIM: both flat kernels are [32, 32] (one init compile)


class Attn(nn.Module):
    """q: DenseGeneral kernel [in, H, Dh]; o: DenseGeneral over (H, Dh), kernel [H, Dh, in]."""

    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((HEADS, HEAD_DIM), name="q")(x)
        return nn.DenseGeneral(N_IN, axis=(-2, -1), name="o")(q)


def attn_params():
    rng = np.random.default_rng(2)
    return {"q": {"kernel": rng.standard_normal((N_IN, HEADS, HEAD_DIM)).astype(np.float32) / 4,
                  "bias": rng.standard_normal((HEADS, HEAD_DIM)).astype(np.float32)},
            "o": {"kernel": rng.standard_normal((HEADS, HEAD_DIM, N_IN)).astype(np.float32) / 6,
                  "bias": rng.standard_normal(N_IN).astype(np.float32)}}


def goat_dense(x, kernel, bias, ad):
    """Float64 NumPy forward of one GOAT layer on a flat [in, out] kernel (GOAT.md §3, dense gates). top_k = E here,
    so every expert is chosen and the gates are the softmax itself: no top-k selection to get wrong."""
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    logits = x @ f(ad.router)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expert = np.einsum("ti,eid,edo->teo", x, f(ad.A), f(ad.B))
    return x @ (kernel - f(ad.res_A) @ f(ad.res_B)) + bias + ad.scale * np.einsum("te,teo->to", p, expert)


def test_dense_general_needs_probe_layouts():
    model, params = Attn(), attn_params()
    cfg = jgoat.GoatConfig(rank=4, experts=2, top_k=2, targets=["q"])
    x = np.random.default_rng(3).standard_normal((2, 5, N_IN)).astype(np.float32)
    # Without layouts the [32, 4, 8] kernel reads as 32 stacked [4 → 8] layers: wrap cannot know; apply must say so.
    wrapped = jgoat.wrap(params, cfg, key=jax.random.key(0))
    assert jgoat.adapters(wrapped)[0][1].A.shape[0] == N_IN
    with pytest.raises(ValueError, match=r"adapter at 'q' has 1 extra leading axes .*jgoat\.probe"):
        jgoat.apply(model.apply)({"params": wrapped}, x)

    layouts = jgoat.probe(model, params, x)
    assert layouts == {"q": jgoat.Layout(n_stack=0, n_in=1), "o": jgoat.Layout(n_stack=0, n_in=2)}
    cfg = jgoat.GoatConfig(rank=4, experts=2, top_k=2, targets=["q", "o"])
    wrapped = jgoat.wrap(params, cfg, key=jax.random.key(0), layouts=layouts)
    ad_q, ad_o = wrapped["q"]["jgoat"], wrapped["o"]["jgoat"]
    assert ad_q.A.shape == (2, N_IN, 2) and ad_q.B.shape == (2, 2, HEADS * HEAD_DIM)
    assert ad_o.A.shape == (2, HEADS * HEAD_DIM, 2) and ad_o.B.shape == (2, 2, N_IN)
    out, aux = jax.jit(jgoat.apply(model.apply))({"params": wrapped}, x)

    # NumPy: the same layers as plain dense maps on the flattened kernels, reshaped back.
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    x_T = f64(x).reshape(-1, N_IN)
    q = goat_dense(x_T, f64(params["q"]["kernel"]).reshape(N_IN, -1), f64(params["q"]["bias"]).reshape(-1), ad_q)
    q = q.reshape(-1, HEADS, HEAD_DIM)  # what the model sees between the layers
    y = goat_dense(q.reshape(-1, HEADS * HEAD_DIM), f64(params["o"]["kernel"]).reshape(-1, N_IN),
                   f64(params["o"]["bias"]), ad_o)
    np.testing.assert_equal(out.shape, x.shape)
    err = np.abs(f64(out).reshape(-1, N_IN) - y).max()
    assert err <= TOL_FP32 * np.abs(y).max(), err
    assert float(aux) > 0
    # the adapters changed the output (the comparison is not a base-vs-base one)
    q_base = x_T @ f64(params["q"]["kernel"]).reshape(N_IN, -1) + f64(params["q"]["bias"]).reshape(-1)
    base = q_base @ f64(params["o"]["kernel"]).reshape(-1, N_IN) + f64(params["o"]["bias"])
    assert np.abs(y - base).max() > 1e-3 * np.abs(y).max()
