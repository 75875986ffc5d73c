"""GOAT against an independent float64 NumPy implementation of shared/spec/GOAT.md §1–4, and the §8 properties.

The reference below is written from the spec alone, in the spec's torch layout (W [out, in], y = W x + b, A_i [d, in],
B_i [out, d], router W_g [E, in]); jgoat stores the Flax transposes (kernel [in, out], A [E, in, d], B [E, d, out],
router [in, E]). Everything jgoat computes runs in fp32 on CPU; the reference runs in float64.

Tolerances (all normwise: max |got − want| ≤ tol · max |want|):
  * TOL_FP32 = 1e-5 for fp32-vs-float64 forward and backward passes. The longest reductions are dot products of
    ≤ 96 terms and a softmax over ≤ 8 logits; summation-order rounding there is ≈ √n · eps32 ≈ 1e-6 relative
    (measured: ≤ 3e-7 for outputs, ≤ 3e-6 for router gradients, which go through the softmax backward), so 1e-5
    leaves headroom while any real mistake (a wrong slice, a missing scale, a dropped term) is O(1e-2) or larger.
  * TOL_SVD = 5e-5 for anything built from jgoat's fp32 SVD (per-expert products, W_res, outputs at init). JAX's CPU
    fp32 SVD has backward error ≈ 1e-6 (≈ 10 eps32; measured on these matrices, vs 5e-8 for NumPy's float32 LAPACK),
    and the product U_iΣ_iV_iᵀ of a block of singular triplets amplifies that by up to σ_max / δ, δ the smallest
    singular gap at the block's edges. Our kernels have a designed spectrum linspace(2, 0.5, h) (δ = 1.5/(h − 1), so
    σ_max/δ ≈ 53 for h = 40 and 84 for h = 64): first-order bound ≈ 1e-6 · 84 ≈ 8e-5 worst case, measured ≤ 1.4e-5.
    A wrong slice, scale or ρ changes these quantities by O(1).
  * TOL_REF = 1e-6 for the float64 reference against its own central finite differences (step 1e-6: truncation
    O(h²) ≈ 1e-12, cancellation eps64 · |L| / h ≈ 1e-9).
  * MARGIN = 1e-3: every token used in a numeric comparison has p_(k) − p_(k+1) > MARGIN (asserted). fp32 rounding
    moves p by ≲ 1e-6 and finite-difference steps by ≲ 1e-5, so the chosen top-k set cannot flip.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgoat
from jgoat.adapters.goat import segment_indices

TOL_FP32 = 1e-5
TOL_SVD = 5e-5
TOL_REF = 1e-6
MARGIN = 1e-3
AUX_COEF = 0.5  # weight of the aux loss in the test loss: large so its router gradient is visible in comparisons
N_LAYERS = 3
N_TOKENS = 16  # as [2, 8] (batch, sequence)

SHAPES = {  # single-layer shapes of the brief: in, out, total rank, experts, top-k
    "48x40": dict(n=48, m=40, r=16, E=4, k=2),
    "64x96": dict(n=64, m=96, r=32, E=8, k=2),
}
STACK = dict(n=48, m=48, r=16, E=4, k=2)  # stacked (scanned) layers: square so the chained model can carry x

VARIANTS = [pytest.param(True, id="jit"), pytest.param(False, id="nojit")]  # jax.jit or eager


# ----------------------------------------------------------------------------------------------------------------------
# The float64 NumPy reference (GOAT.md §1–4), torch layout
# ----------------------------------------------------------------------------------------------------------------------


def ref_scale(scaling, n, d, eta=1.0, alpha=16.0):
    """§2: s = √(3ηn/d) ("theory") or α/d ("alpha")."""
    return np.sqrt(3.0 * eta * n / d) if scaling == "theory" else alpha / d


def ref_segments(init, h, E, d):
    """§1.2: the singular-triplet indices [E, d] each expert takes."""
    t = h // E
    r = E * d
    starts = {
        "goat": [i * t for i in range(E)],  # first d of block i
        "goat_mini": [(i + 1) * t - d for i in range(E)],  # last d of block i
        "pissa": [i * d for i in range(E)],  # top r, split in order
        "milora": [h - r + i * d for i in range(E)],  # bottom r, split in order
    }[init]
    return np.array([np.arange(s0, s0 + d) for s0 in starts])


def ref_init(W, *, init="goat", r, E, scaling="theory", alpha=16.0, eta=1.0, rho=10.0, init_cof=None, flip=()):
    """§1: A_i [E, d, n], B_i [E, m, d], W_res [m, n], s; `flip` negates the singular pairs (u_j, v_j) listed."""
    U, S, Vt = np.linalg.svd(np.asarray(W, np.float64), full_matrices=False)
    for j in flip:
        U[:, j] *= -1.0
        Vt[j] *= -1.0
    m, n = W.shape
    d = r // E
    s = ref_scale(scaling, n, d, eta, alpha)
    idx = ref_segments(init, min(m, n), E, d)
    root = np.sqrt(S[idx] / (s * rho))  # [E, d]
    A = root[:, :, None] * Vt[idx]  # diag(√(S_i/(sρ))) V_iᵀ
    B = np.transpose(U[:, idx], (1, 0, 2)) * root[:, None, :]  # U_i diag(√(S_i/(sρ)))
    cof = 1.0 / E if init_cof is None else init_cof
    W_res = cof * s * np.einsum("emd,edn->mn", B, A)
    return dict(A=A, B=B, W_res=W_res, s=s, U=U, S=S, Vt=Vt, idx=idx)


def ref_route(X, Wg, k):
    """§3: p = softmax(x W_gᵀ), top-k (ties → lower index: NumPy's stable argsort of −p), renormalised gates."""
    logits = X @ Wg.T
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = z / z.sum(axis=1, keepdims=True)
    idx = np.argsort(-p, axis=1, kind="stable")[:, :k]
    sel = np.zeros_like(p)
    np.put_along_axis(sel, idx, 1.0, axis=1)
    gates = p * sel / (p * sel).sum(axis=1, keepdims=True)
    return p, sel, gates, idx


def ref_aux(p, sel, k, aux_form="code", mask=None):
    """§4: E·Σ f_i P_i (code) or (E/k)·Σ f_i P_i (paper), over the tokens with mask 1."""
    E = p.shape[1]
    w = np.ones(len(p)) if mask is None else np.asarray(mask, np.float64).reshape(-1)
    f = (sel * w[:, None]).sum(0) / w.sum()
    P = (p * w[:, None]).sum(0) / w.sum()
    aux = E * np.sum(f * P)
    return aux / k if aux_form == "paper" else aux


def ref_forward(X, W, b, A, B, Wg, W_res, s, k, aux_form="code", mask=None):
    """§3 dense form: y = (W − W_res)x + b + Σ_i g_i s B_i A_i x; returns (Y [T, m], aux)."""
    p, sel, gates, _ = ref_route(X, Wg, k)
    expert = np.einsum("ted,emd->tem", np.einsum("tn,edn->ted", X, A), B)  # B_i A_i x for every expert
    Y = X @ (W - W_res).T + b + s * np.einsum("te,tem->tm", gates, expert)
    return Y, ref_aux(p, sel, k, aux_form, mask)


def ref_grads(X, A, B, Wg, s, k, G, coef, aux_form="code", mask=None):
    """Hand-written backward of L = Σ Y∘G + coef·aux w.r.t. A [E, d, n], B [E, m, d], W_g [E, n]."""
    E = Wg.shape[0]
    p, sel, gates, _ = ref_route(X, Wg, k)
    H = np.einsum("tn,edn->ted", X, A)  # A_i x
    expert = np.einsum("ted,emd->tem", H, B)  # B_i A_i x
    GB = np.einsum("tm,emd->ted", G, B)  # B_iᵀ g_t
    dB = s * np.einsum("te,tm,ted->emd", gates, G, H)
    dA = s * np.einsum("te,ted,tn->edn", gates, GB, X)
    dgates = s * np.einsum("tem,tm->te", expert, G)
    Z = (p * sel).sum(axis=1, keepdims=True)
    dp = sel / Z * (dgates - (gates * dgates).sum(axis=1, keepdims=True))  # through g = p·sel / Σ p·sel
    w = np.ones(len(p)) if mask is None else np.asarray(mask, np.float64).reshape(-1)
    f = (sel * w[:, None]).sum(0) / w.sum()
    daux_dp = E * f[None, :] * w[:, None] / w.sum()  # f is a count: no gradient
    dp = dp + coef * (daux_dp / k if aux_form == "paper" else daux_dp)
    dlogits = p * (dp - (p * dp).sum(axis=1, keepdims=True))
    return dict(A=dA, B=dB, router=dlogits.T @ X)


def ref_loss(X, W, b, A, B, Wg, W_res, s, k, G, coef, aux_form="code", mask=None):
    Y, aux = ref_forward(X, W, b, A, B, Wg, W_res, s, k, aux_form, mask)
    return np.sum(Y * G) + coef * aux


# ----------------------------------------------------------------------------------------------------------------------
# Helpers: models, data, conversion between layouts
# ----------------------------------------------------------------------------------------------------------------------


def np64(a):
    return np.asarray(a, dtype=np.float64)


def assert_close(got, want, tol, what):
    got, want = np64(got), np64(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    err, scale = np.abs(got - want).max(), np.abs(want).max()
    assert scale > 0, f"{what}: reference is all zero"
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} x max |want| {scale:.3g}"


def designed_kernel(rng, n, m):
    """Flax kernel [n, m] = Wᵀ with W = U diag(linspace(2, 0.5, h)) Vᵀ: a known, well-separated spectrum."""
    h = min(n, m)
    U = np.linalg.qr(rng.standard_normal((m, h)))[0]
    V = np.linalg.qr(rng.standard_normal((n, h)))[0]
    return (((U * np.linspace(2.0, 0.5, h)) @ V.T).T).astype(np.float32)


def margins(p, k):
    """p_(k) − p_(k+1) per token: how far the top-k set is from flipping."""
    ps = -np.sort(-p, axis=1)
    return ps[:, k - 1] - ps[:, k]


def pick_tokens(pool, routers_IxE, k, n_tokens=N_TOKENS, inputs=None):
    """The first n_tokens rows of `pool` whose top-k margin exceeds MARGIN for every router (Dense is per-token, so
    choosing tokens changes nothing else). `inputs[l]` are the rows layer l sees (default: the pool itself)."""
    ok = np.ones(len(pool), bool)
    for layer, router in enumerate(routers_IxE):
        x = np64(pool if inputs is None else inputs[layer])
        ok &= margins(ref_route(x, np64(router).T, k)[0], k) > MARGIN
    chosen = np.flatnonzero(ok)[:n_tokens]
    assert len(chosen) == n_tokens, "not enough well-separated tokens in the pool"
    return pool[chosen]


class Single(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.features, name="dense")(x)


class ParallelBlock(nn.Module):
    """Every scanned layer sees the same input x (the carry is passed through); outputs are stacked."""

    features: int

    @nn.compact
    def __call__(self, carry, _):
        return carry, nn.Dense(self.features, name="dense")(carry)


class ChainBlock(nn.Module):
    """A chained layer x ← tanh(Dense(x))."""

    features: int

    @nn.compact
    def __call__(self, carry, _):
        return jnp.tanh(nn.Dense(self.features, name="dense")(carry)), None


class Stacked(nn.Module):
    features: int
    chained: bool = False
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        block = ChainBlock if self.chained else ParallelBlock
        block = nn.remat(block) if self.remat else block
        scan = nn.scan(block, variable_axes={"params": 0, "jgoat_aux": 0},
                       split_rngs={"params": True}, length=N_LAYERS)
        carry, ys = scan(self.features, name="layers")(x, None)
        return carry if self.chained else ys


class Unrolled(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        for i in range(N_LAYERS):
            x, _ = ChainBlock(self.features, name=f"layers_{i}")(x, None)
        return x


@functools.cache
def single_base(shape):
    """(model, base params) of one Dense with a designed spectrum and a non-zero bias."""
    sh = SHAPES[shape]
    rng = np.random.default_rng(sum(map(ord, shape)))
    params = {"dense": {"kernel": jnp.asarray(designed_kernel(rng, sh["n"], sh["m"])),
                        "bias": jnp.asarray(0.1 * rng.standard_normal(sh["m"]), jnp.float32)}}
    return Single(sh["m"]), params


def stacked_params():
    n, m = STACK["n"], STACK["m"]
    rng = np.random.default_rng(7)
    kernel = np.stack([designed_kernel(rng, n, m) for _ in range(N_LAYERS)])
    return {"layers": {"dense": {"kernel": jnp.asarray(kernel),
                                 "bias": jnp.asarray(0.1 * rng.standard_normal((N_LAYERS, m)), jnp.float32)}}}


STACKED_PARAMS = {}  # built lazily, shared by the parallel and the chained stacked models (same params structure)


def stacked_base(chained=False, remat=False):
    if "p" not in STACKED_PARAMS:
        STACKED_PARAMS["p"] = stacked_params()
    return Stacked(STACK["m"], chained=chained, remat=remat), STACKED_PARAMS["p"]


@functools.cache
def wrap_cached(base_name, cfg):
    """jgoat.wrap of a named base with one config (each distinct config costs one init compilation)."""
    base = stacked_base()[1] if base_name == "stack" else single_base(base_name)[1]
    return jgoat.wrap(base, cfg, key=jax.random.key(1))


def wrapped_single(shape, **cfg_kw):
    sh = SHAPES[shape]
    cfg = jgoat.GoatConfig(rank=sh["r"], experts=sh["E"], top_k=sh["k"], **cfg_kw)
    return wrap_cached(shape, cfg), cfg


def wrapped_stacked(**cfg_kw):
    cfg = jgoat.GoatConfig(rank=STACK["r"], experts=STACK["E"], top_k=STACK["k"], **cfg_kw)
    return wrap_cached("stack", cfg), cfg


@functools.cache
def forward(model, jit=True):
    """jgoat.apply(model.apply), jitted once per model (so every test on that model shares the compilation)."""
    fn = jgoat.apply(model.apply)
    return jax.jit(fn) if jit else fn


@functools.cache
def value_and_grad(model, jit=True):
    """(trainable, frozen, x, G, mask) -> ((Σ out∘G + AUX_COEF·aux, (out, aux)), ∂/∂trainable)."""

    def loss(trainable, frozen, x, G, mask):
        out, aux = jgoat.apply(model.apply)({"params": jgoat.combine(trainable, frozen)}, x, aux_mask=mask)
        return jnp.sum(out * G) + AUX_COEF * aux, (out, aux)

    fn = jax.value_and_grad(loss, has_aux=True)
    return jax.jit(fn) if jit else fn


@functools.cache
def route(jit=True):
    fn = lambda ad, x: ad.route(x)  # noqa: E731
    return jax.jit(fn) if jit else fn


def adapter_of(tree):
    """The GoatAdapter of the Dense in a single or stacked tree."""
    return (tree["layers"] if "layers" in tree else tree)["dense"]["jgoat"]


def with_adapter(tree, adapter):
    if "layers" in tree:
        return {"layers": {"dense": {**tree["layers"]["dense"], "jgoat": adapter}}}
    return {"dense": {**tree["dense"], "jgoat": adapter}}


def layer_slices(tree):
    """[(kernel [n, m], adapter)] for each layer (one for a single Dense, N_LAYERS for the stacked model)."""
    dense = (tree["layers"] if "layers" in tree else tree)["dense"]
    if "layers" not in tree:
        return [(dense["kernel"], dense["jgoat"])]
    return [(dense["kernel"][i], jax.tree.map(lambda a, i=i: a[i], dense["jgoat"])) for i in range(N_LAYERS)]


def torch_view(ad):
    """A single-layer GoatAdapter in the reference's torch layout, float64: A [E, d, n], B [E, m, d], W_g, W_res."""
    A = np64(ad.A).transpose(0, 2, 1)
    B = np64(ad.B).transpose(0, 2, 1)
    W_res = (np64(ad.res_A) @ np64(ad.res_B)).T
    return A, B, np64(ad.router).T, W_res


# ----------------------------------------------------------------------------------------------------------------------
# 0. The reference checks itself: analytic backward vs finite differences, sign-flip invariance
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aux_form", ["code", "paper"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_reference_backward_matches_finite_differences(aux_form, masked):
    sh = SHAPES["48x40"]
    rng = np.random.default_rng(3)
    W = np64(designed_kernel(rng, sh["n"], sh["m"])).T
    b = rng.standard_normal(sh["m"])
    ref = ref_init(W, r=sh["r"], E=sh["E"])
    Wg = rng.uniform(-1, 1, (sh["E"], sh["n"])) / np.sqrt(sh["n"])
    X = pick_tokens(rng.standard_normal((256, sh["n"])), [Wg.T], sh["k"])
    G = rng.standard_normal((N_TOKENS, sh["m"]))
    mask = (np.arange(N_TOKENS) % 5 != 4).astype(np.float64) if masked else None
    params = dict(A=ref["A"], B=ref["B"], router=Wg)
    grads = ref_grads(X, ref["A"], ref["B"], Wg, ref["s"], sh["k"], G, AUX_COEF, aux_form, mask)

    def loss(p):
        return ref_loss(X, W, b, p["A"], p["B"], p["router"], ref["W_res"], ref["s"], sh["k"], G, AUX_COEF,
                        aux_form, mask)

    step = 1e-6
    for name, value in params.items():
        for flat in rng.choice(value.size, 6, replace=False):
            pos = np.unravel_index(flat, value.shape)
            plus, minus = {**params, name: value.copy()}, {**params, name: value.copy()}
            plus[name][pos] += step
            minus[name][pos] -= step
            fd = (loss(plus) - loss(minus)) / (2 * step)
            scale = max(1.0, np.abs(grads[name]).max())
            assert abs(fd - grads[name][pos]) <= TOL_REF * scale, (name, pos, fd, grads[name][pos])


def test_reference_sign_flip_invariance():
    """§1.6/§8: flipping (u_j, v_j) of any singular pair changes no sign-invariant quantity of the reference."""
    sh = SHAPES["48x40"]
    rng = np.random.default_rng(4)
    W = np64(designed_kernel(rng, sh["n"], sh["m"])).T
    Wg = rng.uniform(-1, 1, (sh["E"], sh["n"])) / np.sqrt(sh["n"])
    X = rng.standard_normal((N_TOKENS, sh["n"]))
    base = ref_init(W, r=sh["r"], E=sh["E"])
    flipped = ref_init(W, r=sh["r"], E=sh["E"], flip=[0, 3, 10, 12, 33, 39])  # in- and out-of-segment pairs
    assert not np.allclose(base["A"], flipped["A"])  # the factors do change ...
    # ... but products, W_res and outputs do not (float64: only rounding of identical products, ~1e-15).
    prod = np.einsum("emd,edn->emn", base["B"], base["A"])
    assert_close(np.einsum("emd,edn->emn", flipped["B"], flipped["A"]), prod, 1e-12, "B_i A_i")
    assert_close(flipped["W_res"], base["W_res"], 1e-12, "W_res")
    outs = [ref_forward(X, W, 0.0, r["A"], r["B"], Wg, r["W_res"], r["s"], sh["k"])[0] for r in (base, flipped)]
    assert_close(outs[1], outs[0], 1e-12, "output")


# ----------------------------------------------------------------------------------------------------------------------
# 1. A single jgoat GOAT layer against the reference
# ----------------------------------------------------------------------------------------------------------------------

INIT_CASES = [
    pytest.param("48x40", dict(init="goat"), id="48x40-goat"),
    pytest.param("48x40", dict(init="goat_mini"), id="48x40-goat_mini"),
    pytest.param("48x40", dict(init="pissa"), id="48x40-pissa"),
    pytest.param("48x40", dict(init="milora"), id="48x40-milora"),
    pytest.param("48x40", dict(scaling="alpha"), id="48x40-goat-alpha"),
    pytest.param("48x40", dict(eta=0.1, rho=20.0, init_cof=0.5), id="48x40-goat-eta-rho-cof"),
    pytest.param("64x96", dict(init="goat"), id="64x96-goat"),
]


@pytest.mark.parametrize(("shape", "cfg_kw"), INIT_CASES)
def test_init_and_forward_match_reference(shape, cfg_kw):
    """SVD init (sign-invariant parts), the scale s, W_res, and the forward output + aux at init."""
    sh = SHAPES[shape]
    model, base = single_base(shape)
    wrapped, cfg = wrapped_single(shape, **cfg_kw)
    ad = adapter_of(wrapped)
    W = np64(base["dense"]["kernel"]).T
    ref = ref_init(W, r=sh["r"], E=sh["E"], **cfg_kw)

    d = sh["r"] // sh["E"]
    assert ad.A.shape == (sh["E"], sh["n"], d) and ad.B.shape == (sh["E"], d, sh["m"])
    assert ad.router.shape == (sh["n"], sh["E"]) and ad.top_k == sh["k"]
    np.testing.assert_allclose(ad.scale, ref["s"], rtol=1e-12)  # a Python float computed in double precision
    # s·B_iA_i per expert (sign-invariant; §1.3) and W_res (§1.4), in torch layout.
    A, B, Wg, W_res = torch_view(ad)
    for i in range(sh["E"]):
        assert_close(ad.scale * B[i] @ A[i], ref["s"] * ref["B"][i] @ ref["A"][i], TOL_SVD, f"s·B_{i}A_{i}")
    assert_close(W_res, ref["W_res"], TOL_SVD, "W_res")
    # The router is random (U(±1/√n), §1.5): the reference uses jgoat's.
    bound = 1.0 / np.sqrt(sh["n"])
    assert np.all(np.abs(np64(ad.router)) <= bound) and np.abs(np64(ad.router)).max() > 0.8 * bound

    rng = np.random.default_rng(11)
    x = pick_tokens(rng.standard_normal((256, sh["n"])).astype(np.float32), [ad.router], sh["k"])
    out, aux = forward(model)({"params": wrapped}, x.reshape(2, -1, sh["n"]))
    y_ref, aux_ref = ref_forward(np64(x), W, np64(base["dense"]["bias"]), ref["A"], ref["B"], Wg, ref["W_res"],
                                 ref["s"], sh["k"], cfg.aux_form)
    assert_close(out.reshape(N_TOKENS, -1), y_ref, TOL_SVD, "output")
    assert_close(aux, aux_ref, TOL_FP32, "aux")


def test_segment_indices_match_spec():
    """§1.2 on a concrete case: h = 40, E = 4 (t = 10), d = 4."""
    seg = {init: ref_segments(init, 40, 4, 4)[:, 0].tolist() for init in ("goat", "goat_mini", "pissa", "milora")}
    assert seg == {"goat": [0, 10, 20, 30], "goat_mini": [6, 16, 26, 36], "pissa": [0, 4, 8, 12],
                   "milora": [24, 28, 32, 36]}
    for init in seg:
        cfg = jgoat.GoatConfig(rank=16, experts=4, init=init)
        np.testing.assert_array_equal(np.asarray(segment_indices(cfg, 40)), ref_segments(init, 40, 4, 4))


GRAD_CASES = [  # (shape, aux_form, masked)
    pytest.param("48x40", "code", False, id="48x40-code-nomask"),
    pytest.param("48x40", "paper", True, id="48x40-paper-mask"),
    pytest.param("64x96", "code", True, id="64x96-code-mask"),
]


@pytest.mark.parametrize(("shape", "aux_form", "masked"), GRAD_CASES)
def test_forward_and_grads_match_reference(shape, aux_form, masked):
    """Outputs, aux and ∂(Σ y∘G + c·aux)/∂{A, B, router} against the hand-written float64 backward, evaluated at
    jgoat's own parameters (gradients of A, B are sign-dependent, so the reference must use the same factors)."""
    sh = SHAPES[shape]
    model, base = single_base(shape)
    wrapped, _ = wrapped_single(shape)
    ad = adapter_of(wrapped).replace(aux_form=aux_form)  # a static field: no new init
    rng = np.random.default_rng(12)
    # Perturb the factors so that every expert's gradient is generic (not aligned with one singular pair).
    ad = ad.replace(A=ad.A + 0.05 * rng.standard_normal(ad.A.shape).astype(np.float32),
                    B=ad.B + 0.05 * rng.standard_normal(ad.B.shape).astype(np.float32))
    wrapped = with_adapter(wrapped, ad)
    x = pick_tokens(rng.standard_normal((256, sh["n"])).astype(np.float32), [ad.router], sh["k"])
    G = rng.standard_normal((N_TOKENS, sh["m"])).astype(np.float32)
    mask = None
    if masked:
        mask = np.ones((2, N_TOKENS // 2), np.float32)
        mask[0, -2:] = 0.0  # padding at the end of both sequences
        mask[1, -5:] = 0.0
    trainable, frozen = jgoat.split(wrapped)
    assert frozen["dense"]["jgoat"].A is None and trainable["dense"]["kernel"] is None  # the base is frozen (§5)
    (_, (out, aux)), grads = value_and_grad(model)(trainable, frozen, x.reshape(2, -1, sh["n"]),
                                                   G.reshape(2, -1, sh["m"]), mask)
    A, B, Wg, W_res = torch_view(ad)
    ref_mask = None if mask is None else mask.reshape(-1)
    y_ref, aux_ref = ref_forward(np64(x), np64(base["dense"]["kernel"]).T, np64(base["dense"]["bias"]), A, B, Wg,
                                 W_res, ad.scale, sh["k"], aux_form, ref_mask)
    assert_close(out.reshape(N_TOKENS, -1), y_ref, TOL_FP32, "output")
    assert_close(aux, aux_ref, TOL_FP32, "aux")
    g = adapter_of(grads)
    ref = ref_grads(np64(x), A, B, Wg, ad.scale, sh["k"], np64(G), AUX_COEF, aux_form, ref_mask)
    assert_close(g.A, ref["A"].transpose(0, 2, 1), TOL_FP32, "dA")
    assert_close(g.B, ref["B"].transpose(0, 2, 1), TOL_FP32, "dB")
    assert_close(g.router, ref["router"].T, TOL_FP32, "drouter")
    assert g.res_A is None and g.res_B is None  # W_res is frozen (§5)


def test_top1_router_gets_only_the_aux_gradient():
    """§3: with k = 1 the renormalised gate is ≡ 1, so the task loss sends no gradient to the router: its gradient is
    exactly the aux loss's (checked eagerly, on the single 48x40 layer with top_k set to 1)."""
    sh = SHAPES["48x40"]
    model, base = single_base("48x40")
    wrapped, _ = wrapped_single("48x40")
    ad = adapter_of(wrapped).replace(top_k=1)
    rng = np.random.default_rng(13)
    x = pick_tokens(rng.standard_normal((256, sh["n"])).astype(np.float32), [ad.router], 1)
    G = rng.standard_normal((N_TOKENS, sh["m"])).astype(np.float32)
    (_, (_, aux)), grads = value_and_grad(model, False)(*jgoat.split(with_adapter(wrapped, ad)),
                                                        x.reshape(2, -1, sh["n"]), G.reshape(2, -1, sh["m"]), None)
    A, B, Wg, _ = torch_view(ad)
    task = ref_grads(np64(x), A, B, Wg, ad.scale, 1, np64(G), 0.0)["router"]
    np.testing.assert_array_equal(task, 0.0)  # in float64 too: g_i − 1·g_i
    aux_only = ref_grads(np64(x), A, B, Wg, ad.scale, 1, np.zeros_like(G, np.float64), AUX_COEF)["router"]
    assert_close(adapter_of(grads).router, aux_only.T, TOL_FP32, "drouter == aux gradient")
    assert float(aux) > 0


# ----------------------------------------------------------------------------------------------------------------------
# 2. Routing ties
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("jit", VARIANTS)
def test_top_k_ties_pick_the_lower_index(jit):
    """Exact ties: dyadic inputs and router columns make every product and partial sum exact in fp32, so tied
    columns give bit-identical logits and probabilities. lax.top_k then keeps the lower index, which is the order of
    NumPy's stable argsort of −p (the rule the reference uses)."""
    n, E = 8, 4
    rng = np.random.default_rng(5)
    x = (rng.integers(1, 8, (N_TOKENS, n)) / 4).astype(np.float32)  # positive multiples of 1/4
    cases = [  # (router column weights in 1/8, k, expected experts)
        ((3, 2, 1, 2), 2, [0, 1]),  # p0 > p1 == p3 > p2: the tie at the top-k boundary goes to expert 1
        ((1, 3, 2, 3), 1, [1]),  # tie for first place
        ((1, 3, 2, 3), 2, [1, 3]),  # both tied experts fit
        ((2, 2, 2, 2), 3, [0, 1, 2]),  # all equal
    ]
    for cols, k, expected in cases:
        router = np.tile(np.asarray(cols, np.float32) / 8, (n, 1))
        ad = jgoat.GoatAdapter(A=jnp.zeros((E, n, 1)), B=jnp.zeros((E, 1, 3)), router=jnp.asarray(router), top_k=k)
        p, gates, idx = (np.asarray(a) for a in route(jit)(ad, x))
        for a, b in zip(*np.nonzero(np.asarray(cols)[:, None] == np.asarray(cols)[None, :]), strict=True):
            np.testing.assert_array_equal(p[:, a], p[:, b])  # the tie is exact
        np.testing.assert_array_equal(idx, np.argsort(-p, axis=1, kind="stable")[:, :k])
        np.testing.assert_array_equal(np.sort(idx, axis=1), np.tile(expected, (N_TOKENS, 1)))
        chosen = np.zeros_like(p, bool)
        np.put_along_axis(chosen, idx, True, axis=1)
        np.testing.assert_array_equal(gates > 0, chosen)
        p_chosen = np.take_along_axis(p, idx, 1)
        # renormalisation is one fp32 sum of ≤ 3 terms and a division: a few ulps
        np.testing.assert_allclose(np.take_along_axis(gates, idx, 1), p_chosen / p_chosen.sum(1, keepdims=True),
                                   rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# 3. GOAT.md §8, unstacked and stacked (nn.scan over 3 layers), jit and no-jit
# ----------------------------------------------------------------------------------------------------------------------

STACKINGS = [pytest.param(False, id="single"), pytest.param(True, id="stacked")]


def sec8_setup(stacked, **cfg_kw):
    """(model, base params, wrapped, cfg, x [2, 8, n]) with tokens well separated for every layer's router."""
    if stacked:
        model, base = stacked_base()
        wrapped, cfg = wrapped_stacked(**cfg_kw)
        n, k = STACK["n"], STACK["k"]
    else:
        model, base = single_base("48x40")
        wrapped, cfg = wrapped_single("48x40", **cfg_kw)
        n, k = SHAPES["48x40"]["n"], SHAPES["48x40"]["k"]
    routers = [ad.router for _, ad in layer_slices(wrapped)]
    x = pick_tokens(np.random.default_rng(21).standard_normal((256, n)).astype(np.float32), routers, k)
    return model, base, wrapped, cfg, x.reshape(2, -1, n)


@functools.cache
def init_pieces(jit):
    def pieces(ad, kernel, n_experts):  # Flax layout; works on stacked nodes too
        w_res = ad.res_A @ ad.res_B
        expert = ad.scale * jnp.einsum("...eid,...edo->...eio", ad.A, ad.B)
        return kernel - w_res + jnp.sum(expert, axis=-3) / n_experts, expert, w_res

    return jax.jit(pieces, static_argnums=2) if jit else pieces


@pytest.mark.parametrize("jit", VARIANTS)
@pytest.mark.parametrize("stacked", STACKINGS)
def test_sec8_init_identities(stacked, jit):
    """W − W_res + s·Σ_i (1/E)·B_iA_i == W; s·B_iA_i == U_iΣ_iV_iᵀ/ρ on the §1.2 slices;
    W_res == Σ_i U_iΣ_iV_iᵀ/(Eρ)."""
    _, base, wrapped, cfg, _ = sec8_setup(stacked)
    E, rho = cfg.experts, cfg.rho
    dense = (wrapped["layers"] if stacked else wrapped)["dense"]
    expected_W, expert, w_res = (np64(a) for a in init_pieces(jit)(dense["jgoat"], dense["kernel"], E))
    kernels = np64((base["layers"] if stacked else base)["dense"]["kernel"])
    if not stacked:
        expected_W, expert, w_res, kernels = expected_W[None], expert[None], w_res[None], kernels[None]
    for layer, kernel in enumerate(kernels):
        # W_res is computed two ways (res_B = s/E · B): they cancel up to fp32 rounding of r-term sums.
        assert_close(expected_W[layer], kernel, TOL_FP32, f"layer {layer}: W − W_res + s/E ΣB_iA_i")
        U, S, Vt = np.linalg.svd(kernel.T, full_matrices=False)
        idx = ref_segments(cfg.init, len(S), E, cfg.expert_rank)
        blocks = [((U[:, ix] * S[ix]) @ Vt[ix] / rho).T for ix in idx]  # U_iΣ_iV_iᵀ/ρ, Flax layout
        for i, block in enumerate(blocks):
            assert_close(expert[layer, i], block, TOL_SVD, f"layer {layer}: s·B_{i}A_{i}")
        assert_close(w_res[layer], sum(blocks) / E, TOL_SVD, f"layer {layer}: W_res")


@pytest.mark.parametrize("jit", VARIANTS)
@pytest.mark.parametrize("stacked", STACKINGS)
def test_sec8_scaling_theory_vs_alpha(stacked, jit):
    """Same key: outputs and aux at init are equal under both scalings; ∂L/∂A_i and ∂L/∂B_i scale by √s, i.e.
    grad_theory = √(s_theory/s_alpha)·grad_alpha; router gradients are equal."""
    model, _, w_theory, cfg_t, x = sec8_setup(stacked, scaling="theory")
    _, _, w_alpha, cfg_a, _ = sec8_setup(stacked, scaling="alpha")
    s_t, s_a = cfg_t.scale(x.shape[-1]), cfg_a.scale(x.shape[-1])
    assert adapter_of(w_theory).scale == s_t and adapter_of(w_alpha).scale == s_a and s_t != s_a
    np.testing.assert_array_equal(adapter_of(w_theory).router, adapter_of(w_alpha).router)
    out_shape = jax.eval_shape(forward(model), {"params": w_theory}, x)[0].shape
    G = np.random.default_rng(22).standard_normal(out_shape).astype(np.float32)
    (_, (out_t, aux_t)), g_t = value_and_grad(model, jit)(*jgoat.split(w_theory), x, G, None)
    (_, (out_a, aux_a)), g_a = value_and_grad(model, jit)(*jgoat.split(w_alpha), x, G, None)
    assert_close(out_t, out_a, TOL_FP32, "output theory vs alpha")
    assert_close(aux_t, aux_a, TOL_FP32, "aux theory vs alpha")
    ratio = np.sqrt(s_t / s_a)
    g_t, g_a = adapter_of(g_t), adapter_of(g_a)
    assert_close(g_t.A, ratio * np64(g_a.A), TOL_FP32, "dA ratio")
    assert_close(g_t.B, ratio * np64(g_a.B), TOL_FP32, "dB ratio")
    assert_close(g_t.router, g_a.router, TOL_FP32, "drouter")


@pytest.mark.parametrize("jit", VARIANTS)
@pytest.mark.parametrize("stacked", STACKINGS)
def test_sec8_router_k_gates_sum_to_one(stacked, jit):
    _, _, wrapped, cfg, x = sec8_setup(stacked)
    x_TxI = x.reshape(N_TOKENS, -1)
    for _, ad in layer_slices(wrapped):
        p, gates, idx = (np.asarray(a) for a in route(jit)(ad, x_TxI))
        assert np.all(np.count_nonzero(gates, axis=1) == cfg.top_k)
        np.testing.assert_allclose(gates.sum(axis=1), 1.0, rtol=1e-6)  # k fp32 terms
        assert np.all(margins(p, cfg.top_k) > MARGIN)
        p_ref, _, gates_ref, idx_ref = ref_route(np64(x_TxI), np64(ad.router).T, cfg.top_k)
        np.testing.assert_array_equal(idx, idx_ref)
        assert_close(p, p_ref, TOL_FP32, "p")
        assert_close(gates, gates_ref, TOL_FP32, "gates")


@pytest.mark.parametrize("jit", VARIANTS)
@pytest.mark.parametrize("stacked", STACKINGS)
@pytest.mark.parametrize("aux_form", ["code", "paper"])
def test_sec8_uniform_routing(stacked, jit, aux_form):
    """A zero router gives p ≡ 1/E (an E-way exact tie): experts 0..k−1 are chosen with gates 1/k, and each layer's
    aux is exactly k (code form) or 1 (paper form); the total is the sum over layers (§4)."""
    model, _, wrapped, cfg, x = sec8_setup(stacked)
    ad = adapter_of(wrapped)
    wrapped = with_adapter(wrapped, ad.replace(router=jnp.zeros_like(ad.router), aux_form=aux_form))
    for _, layer in layer_slices(wrapped):
        _, gates, idx = route(jit)(layer, x.reshape(N_TOKENS, -1))
        np.testing.assert_array_equal(idx, np.tile(np.arange(cfg.top_k), (N_TOKENS, 1)))
        np.testing.assert_array_equal(gates[:, : cfg.top_k], 1.0 / cfg.top_k)
        np.testing.assert_array_equal(gates[:, cfg.top_k :], 0.0)
    _, aux = forward(model, jit)({"params": wrapped}, x)
    n_layers = N_LAYERS if stacked else 1
    per_layer = cfg.top_k if aux_form == "code" else 1.0
    # E, k and T are powers of two: every step (1/E, the mean over T, E·Σ f P) is exact in fp32.
    assert float(aux) == n_layers * per_layer


@pytest.mark.parametrize("jit", VARIANTS)
@pytest.mark.parametrize("stacked", STACKINGS)
def test_sec8_sign_flip_invariance(stacked, jit):
    """Flipping a singular pair (u_j, v_j) inside expert i's slice negates column j of A_i and row j of B_i (and the
    same in the frozen res_A/res_B). Every product a·b is then bit-identical, so outputs and aux must be too; the
    float64 reference with those pairs flipped agrees as well."""
    model, base, wrapped, cfg, x = sec8_setup(stacked)
    ad = adapter_of(wrapped)
    d = cfg.expert_rank
    sign = np.ones(cfg.experts * d, np.float32)
    sign[[0, d + 1, 2 * d + 3]] = -1.0  # pairs in experts 0, 1, 2
    lead = (1,) * (ad.A.ndim - 3)  # broadcast over the layer axis of a stacked node
    sign_ExD = sign.reshape(cfg.experts, d)
    flipped = ad.replace(A=ad.A * sign_ExD.reshape(*lead, cfg.experts, 1, d),
                         B=ad.B * sign_ExD.reshape(*lead, cfg.experts, d, 1),
                         res_A=ad.res_A * sign.reshape(*lead, 1, -1), res_B=ad.res_B * sign.reshape(*lead, -1, 1))
    out, aux = forward(model, jit)({"params": wrapped}, x)
    out_f, aux_f = forward(model, jit)({"params": with_adapter(wrapped, flipped)}, x)
    np.testing.assert_array_equal(out_f, out)
    np.testing.assert_array_equal(aux_f, aux)
    if not stacked:
        sh = SHAPES["48x40"]
        W = np64(base["dense"]["kernel"]).T
        idx = ref_segments(cfg.init, min(W.shape), cfg.experts, d).reshape(-1)
        ref = ref_init(W, r=sh["r"], E=sh["E"], flip=idx[sign < 0])
        y_ref, _ = ref_forward(np64(x.reshape(N_TOKENS, -1)), W, np64(base["dense"]["bias"]), ref["A"], ref["B"],
                               np64(ad.router).T, ref["W_res"], ref["s"], cfg.top_k)
        assert_close(out_f.reshape(N_TOKENS, -1), y_ref, TOL_SVD, "output vs flipped reference")


# ----------------------------------------------------------------------------------------------------------------------
# 4. MoLoRA
# ----------------------------------------------------------------------------------------------------------------------


def test_molora_zero_init_is_the_base():
    model, base = single_base("48x40")
    sh = SHAPES["48x40"]
    cfg = jgoat.MoLoraConfig(rank=sh["r"], experts=sh["E"], top_k=sh["k"], alpha=16.0)
    assert cfg.init == "zero" and cfg.scaling == "alpha"
    ad = adapter_of(wrap_cached("48x40", cfg))
    assert ad.scale == 16.0 / (sh["r"] // sh["E"])  # s = α/d
    assert ad.res_A is None and ad.res_B is None  # the base is not changed
    np.testing.assert_array_equal(ad.B, 0.0)
    bound = 1.0 / np.sqrt(sh["n"])  # kaiming-uniform(a=√5) on A: U(±1/√in)
    assert np.all(np.abs(np64(ad.A)) <= bound) and np.abs(np64(ad.A)).max() > 0.8 * bound
    x = np.random.default_rng(31).standard_normal((2, 8, sh["n"])).astype(np.float32)
    out, aux = forward(model)({"params": wrap_cached("48x40", cfg)}, x)
    np.testing.assert_array_equal(out, jax.jit(model.apply)({"params": base}, x))  # B = 0: the delta is exactly 0
    assert float(aux) > 0  # the router and aux loss are live


# ----------------------------------------------------------------------------------------------------------------------
# 5. nn.scan + nn.remat vs the equivalent unrolled model
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["goat", "lora"])
def test_scan_remat_matches_unrolled(method):
    model, base = stacked_base(chained=True, remat=True)
    if method == "goat":
        stacked, cfg = wrapped_stacked()
    else:
        stacked = wrap_cached("stack", jgoat.LoraConfig(rank=8, alpha=16.0, init="pissa"))
    unrolled_model = Unrolled(STACK["m"])
    unrolled = {f"layers_{i}": jax.tree.map(lambda a, i=i: a[i], stacked["layers"]) for i in range(N_LAYERS)}

    rng = np.random.default_rng(41)
    pool = rng.standard_normal((256, STACK["n"])).astype(np.float32)
    if method == "goat":  # keep tokens whose routing margin is large at every layer's (chained) input
        inputs, routers, h = [], [], np64(pool)
        for i in range(N_LAYERS):  # the chain in float64 NumPy (fp32 differs by ~1e-6 ≪ MARGIN)
            dense = unrolled[f"layers_{i}"]["dense"]
            A, B, Wg, W_res = torch_view(dense["jgoat"])
            inputs.append(h)
            routers.append(dense["jgoat"].router)
            y, _ = ref_forward(h, np64(dense["kernel"]).T, np64(dense["bias"]), A, B, Wg, W_res, dense["jgoat"].scale,
                               cfg.top_k)
            h = np.tanh(y)
        pool = pick_tokens(pool, routers, cfg.top_k, inputs=inputs)
    x = pool[:N_TOKENS].reshape(2, -1, STACK["n"])
    G = rng.standard_normal((*x.shape[:-1], STACK["m"])).astype(np.float32)

    (_, (out_s, aux_s)), g_s = value_and_grad(model)(*jgoat.split(stacked), x, G, None)
    (_, (out_u, aux_u)), g_u = value_and_grad(unrolled_model)(*jgoat.split(unrolled), x, G, None)
    # The same fp32 ops up to XLA fusion and scan/remat bookkeeping: differences are a few ulps.
    assert_close(out_s, out_u, TOL_FP32, "output")
    if method == "goat":
        assert float(aux_s) > 0
        assert_close(aux_s, aux_u, TOL_FP32, "aux")
    else:
        assert float(aux_s) == 0.0 and float(aux_u) == 0.0
    n_checked = 0
    for i in range(N_LAYERS):
        sliced = jax.tree.map(lambda a, i=i: a[i], g_s["layers"])
        assert jax.tree.structure(sliced) == jax.tree.structure(g_u[f"layers_{i}"])
        for a, b in zip(jax.tree.leaves(sliced), jax.tree.leaves(g_u[f"layers_{i}"]), strict=True):
            assert_close(a, b, TOL_FP32, f"layer {i} grad")
            n_checked += 1
    assert n_checked == N_LAYERS * (3 if method == "goat" else 2)  # A, B (, router) per layer, nothing else


# ----------------------------------------------------------------------------------------------------------------------
# 6. aux_mask
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stacked", STACKINGS)
def test_aux_mask_excludes_padding(stacked):
    """Padding tokens are left out of f and P exactly as in the reference with a mask; their contents then cannot
    change aux; an all-ones mask equals no mask (the official code's behaviour)."""
    model, _, wrapped, cfg, x = sec8_setup(stacked)
    mask = np.ones(x.shape[:2], np.float32)
    mask[0, -3:] = 0.0
    mask[1, -1:] = 0.0
    fwd = forward(model)
    _, aux = fwd({"params": wrapped}, x, aux_mask=mask)
    _, aux_nomask = fwd({"params": wrapped}, x)
    _, aux_ones = fwd({"params": wrapped}, x, aux_mask=np.ones_like(mask))
    X = np64(x.reshape(N_TOKENS, -1))
    ref, ref_nomask = 0.0, 0.0
    for _, ad in layer_slices(wrapped):
        p, sel, _, _ = ref_route(X, np64(ad.router).T, cfg.top_k)
        ref += ref_aux(p, sel, cfg.top_k, cfg.aux_form, mask.reshape(-1))
        ref_nomask += ref_aux(p, sel, cfg.top_k, cfg.aux_form)
    assert_close(aux, ref, TOL_FP32, "masked aux")
    assert_close(aux_nomask, ref_nomask, TOL_FP32, "unmasked aux")
    assert abs(ref - ref_nomask) > 100 * TOL_FP32 * ref  # the mask matters on this data
    assert_close(aux_ones, aux_nomask, TOL_FP32, "all-ones mask")
    junk = np.where(mask[..., None] > 0, x, 10.0 * np.random.default_rng(51).standard_normal(x.shape))
    _, aux_junk = fwd({"params": wrapped}, junk.astype(np.float32), aux_mask=mask)
    assert_close(aux_junk, aux, TOL_FP32, "aux with junk in the padding")
