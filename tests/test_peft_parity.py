"""Parity of jgoat's LoRA family with HF PEFT (torch, CPU, float32).

One tiny MLP exists twice: torch (fc1 24→40, gelu, fc2 40→16, tanh, head 16→3) and linen (nn.Dense with the same
names and weights). fc1 and fc2 get adapters of rank 4 in both libraries. RNGs never match across libraries, so
peft's random A is injected into jgoat; after init both get the same non-zero random B (and, for DoRA, the same
perturbed magnitude) so that outputs and gradients differ from the base's. SVD / QR signs differ between
libraries: at init only sign-invariant quantities (s·B·A, the modified base, outputs) are compared.

Tolerances (fp32, unit roundoff u ≈ 6e-8). Both sides run the same algebra with different summation orders and
kernels; every compared value is a short chain of dot products of length ≤ 40 over O(1) numbers, whose rounding error
is bounded by ~ n·u·Σ|terms| ≈ 40 · 6e-8 · O(1) ≈ 3e-6 in the worst case (typically ~1e-7). We allow
``ATOL = RTOL = 2e-5`` for outputs, weights and gradients (a few times the worst case). SVD-derived quantities carry
the additional error of two independent fp32 SVDs, ≈ u·σ₁·(σ₁ / spectral gap) per entry (Wedin); for these random
weights σ₁ ≈ 1.5 and the gaps at r = 4 are ≥ 0.05, which stays below the same 2e-5. Measured maxima are printed
with ``pytest -s``.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parity import HID, IN, N_CLS, OUT, Deviations, FlaxMLP, torch_mlp

import jgoat

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

R, ALPHA = 4, 8.0
TARGETS = ("fc1", "fc2")
DEV = Deviations()
_close = DEV.close


MODEL = FlaxMLP()


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    DEV.report("peft")


def _t2n(t) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def _flax_params(model: torch.nn.Module) -> dict:
    return {name: {"kernel": jnp.asarray(_t2n(getattr(model, name).weight).T),
                   "bias": jnp.asarray(_t2n(getattr(model, name).bias))}
            for name in ("fc1", "fc2", "head")}


def _spectral(out_f: int, in_f: int, top, tail_max: float, seed: int) -> np.ndarray:
    """A [out, in] matrix with singular values `top` followed by a tail ≤ tail_max (a clear gap after len(top))."""
    rng = np.random.default_rng(seed)
    h = min(out_f, in_f)
    u, _ = np.linalg.qr(rng.standard_normal((out_f, h)))
    v, _ = np.linalg.qr(rng.standard_normal((in_f, h)))
    s = np.concatenate([np.asarray(top, np.float64), np.linspace(tail_max, tail_max / 10, h - len(top))])
    return ((u * s) @ v.T).astype(np.float32)


def _base(weights: dict[str, np.ndarray] | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch_mlp()
    for name, w in (weights or {}).items():
        with torch.no_grad():
            getattr(model, name).weight.copy_(torch.from_numpy(w))
    return model


def _peft_layer(peft_model, name):
    return getattr(peft_model.base_model.model, name)


def _build(peft_kwargs: dict, jgoat_kwargs: dict, weights=None, dropout: float = 0.0):
    base = _base(weights)
    params = _flax_params(base)
    peft_model = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(TARGETS), lora_dropout=dropout, **peft_kwargs),
    )
    cfg = jgoat.LoraConfig(rank=R, alpha=ALPHA, targets=list(TARGETS), dropout=dropout, **jgoat_kwargs)
    wrapped = jgoat.wrap(params, cfg, key=jax.random.key(0))
    return base, params, peft_model, wrapped


def _check_init(tag: str, params, peft_model, wrapped, *, offset: bool) -> None:
    """Sign-invariant init quantities: s·BA, the (modified) base, and the layer's identity at init."""
    for name in TARGETS:
        layer = _peft_layer(peft_model, name)
        adapter = wrapped[name]["jgoat"]
        assert adapter.scale == pytest.approx(layer.scaling["default"], rel=1e-12)
        if not offset:  # kaiming-uniform A (a=√5): U(±1/√in) in both libraries
            bound = 1.0 / np.sqrt(adapter.A.shape[0])
            assert np.max(np.abs(adapter.A)) <= bound and np.max(np.abs(_t2n(layer.lora_A["default"].weight))) <= bound
            assert np.std(adapter.A) == pytest.approx(bound / np.sqrt(3.0), rel=0.25)
        s = layer.scaling["default"]
        peft_delta = s * (_t2n(layer.lora_B["default"].weight) @ _t2n(layer.lora_A["default"].weight))
        _close(f"{tag}: init s*BA", adapter.scale * (adapter.A @ adapter.B), peft_delta.T)
        modified = params[name]["kernel"]
        if offset:
            modified = modified - adapter.res_A @ adapter.res_B
            # the offset is exactly the initial s·A0·B0, so the adapted layer equals the base at init
            _close(f"{tag}: init offset", adapter.res_A @ adapter.res_B, adapter.scale * (adapter.A @ adapter.B))
        _close(f"{tag}: modified base", modified, _t2n(layer.base_layer.weight).T)


def _sync(peft_model, wrapped, *, perturb_m: bool, seed: int = 1) -> dict:
    """Same trainable values in both: peft's A into jgoat, a fresh random B (and m) into both."""
    rng = np.random.default_rng(seed)
    wrapped = dict(wrapped)
    for name in TARGETS:
        layer = _peft_layer(peft_model, name)
        adapter = wrapped[name]["jgoat"]
        b_rxo = (0.3 * rng.standard_normal(adapter.B.shape)).astype(np.float32)
        with torch.no_grad():
            layer.lora_B["default"].weight.copy_(torch.from_numpy(b_rxo.T.copy()))
        changes = dict(A=jnp.asarray(_t2n(layer.lora_A["default"].weight).T), B=jnp.asarray(b_rxo))
        if perturb_m:
            mag = layer.lora_magnitude_vector["default"].weight
            _close("dora: init magnitude", adapter.m, _t2n(mag))
            m_new = (_t2n(mag) * (1.0 + 0.2 * rng.standard_normal(mag.shape))).astype(np.float32)
            with torch.no_grad():
                mag.copy_(torch.from_numpy(m_new))
            changes["m"] = jnp.asarray(m_new)
        wrapped[name] = {**wrapped[name], "jgoat": adapter.replace(**changes)}
    return wrapped


def _inputs(seed: int = 2):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, IN)).astype(np.float32)
    c = rng.standard_normal((2, 3, N_CLS)).astype(np.float32)
    return x, c


def _jgoat_fns(wrapped, use_jit: bool):
    trainable, frozen = jgoat.split(wrapped)

    def forward(tree, x):
        out, _, state = jgoat.apply(MODEL.apply)({"params": tree}, x, capture_intermediates=True,
                                                 mutable=["intermediates"])
        inter = state["intermediates"]
        return out, {name: inter[name]["__call__"][0] for name in TARGETS}

    def loss(train, x, c):
        out, _ = jgoat.apply(MODEL.apply)({"params": jgoat.combine(train, frozen)}, x)
        return jnp.sum(out * c)

    grad = jax.grad(loss)
    if use_jit:
        forward, grad = jax.jit(forward), jax.jit(grad)
    return forward, lambda x, c: grad(trainable, x, c)


def _compare_run(tag: str, peft_model, wrapped, *, use_jit: bool, dora: bool) -> None:
    x, c = _inputs()
    captured = {}
    hooks = [_peft_layer(peft_model, n).register_forward_hook(
        lambda _m, _i, o, n=n: captured.__setitem__(n, o.detach())) for n in TARGETS]
    xt = torch.from_numpy(x)
    peft_model.zero_grad()
    out_t = peft_model(xt)
    (out_t * torch.from_numpy(c)).sum().backward()
    for h in hooks:
        h.remove()

    forward, grad = _jgoat_fns(wrapped, use_jit)
    out_j, layers_j = forward(wrapped, jnp.asarray(x))
    grads = grad(jnp.asarray(x), jnp.asarray(c))
    _close(f"{tag}: model output", out_j, _t2n(out_t))
    for name in TARGETS:
        _close(f"{tag}: layer output", layers_j[name], _t2n(captured[name]))
        layer = _peft_layer(peft_model, name)
        g = grads[name]["jgoat"]
        _close(f"{tag}: grad A", g.A, _t2n(layer.lora_A["default"].weight.grad).T)
        _close(f"{tag}: grad B", g.B, _t2n(layer.lora_B["default"].weight.grad).T)
        if dora:
            _close(f"{tag}: grad m", g.m, _t2n(layer.lora_magnitude_vector["default"].weight.grad))
    # nothing else receives a gradient
    assert grads["head"]["kernel"] is None and grads["fc1"]["kernel"] is None


def _compare_merge(tag: str, params, peft_model, wrapped, *, unmerge: bool) -> None:
    merged = jgoat.merge(wrapped)
    torch_merged = copy.deepcopy(peft_model).merge_and_unload()
    for name in ("fc1", "fc2", "head"):
        assert "jgoat" not in merged[name]
        _close(f"{tag}: merged kernel", merged[name]["kernel"], _t2n(getattr(torch_merged, name).weight).T)
        _close(f"{tag}: merged bias", merged[name]["bias"], _t2n(getattr(torch_merged, name).bias))
    x, _ = _inputs()
    out = jax.jit(MODEL.apply)({"params": merged}, jnp.asarray(x))
    _close(f"{tag}: merged output", out, _t2n(torch_merged(torch.from_numpy(x))))
    if unmerge:
        back = jgoat.unmerge(merged, wrapped)
        for name in TARGETS:
            # one fp32 add then one subtract of the same delta: at most ~2 ulp of |kernel + delta| ≲ 2 (≈ 5e-7)
            _close(f"{tag}: unmerge round trip", back[name]["kernel"], params[name]["kernel"], atol=1e-6, rtol=0)


METHODS = {
    # tag: (peft kwargs, jgoat kwargs, base modified at init)
    "lora": ({}, {}, False),
    "rslora": ({"use_rslora": True}, {"use_rslora": True}, False),
    "dora": ({"use_dora": True}, {"use_dora": True}, False),
    "pissa": ({"init_lora_weights": "pissa"}, {"init": "pissa"}, True),
    "olora": ({"init_lora_weights": "olora"}, {"init": "olora"}, True),
}


# Every method runs the jgoat side under jax.jit; LoRA and PiSSA (the offset path) also run op by op (eager mode
# compiles each primitive separately, ~5 s per variant, so the remaining methods skip it).
CASES = [(tag, True) for tag in METHODS] + [("lora", False), ("pissa", False)]


@pytest.mark.parametrize(("tag", "use_jit"), CASES, ids=[f"{t}-{'jit' if j else 'nojit'}" for t, j in CASES])
def test_parity_with_peft(tag, use_jit):
    peft_kwargs, jgoat_kwargs, offset = METHODS[tag]
    _, params, peft_model, wrapped = _build(peft_kwargs, jgoat_kwargs)
    _check_init(tag, params, peft_model, wrapped, offset=offset)
    if tag in ("lora", "rslora", "dora"):
        for name in TARGETS:  # the base is untouched by peft too, and B starts at 0
            _close(f"{tag}: base untouched", params[name]["kernel"],
                   _t2n(_peft_layer(peft_model, name).base_layer.weight).T, atol=0, rtol=0)
            assert not np.any(np.asarray(wrapped[name]["jgoat"].B))
    wrapped = _sync(peft_model, wrapped, perturb_m=tag == "dora")
    _compare_run(tag, peft_model, wrapped, use_jit=use_jit, dora=tag == "dora")
    _compare_merge(tag, params, peft_model, wrapped, unmerge=tag in ("lora", "rslora", "pissa", "olora"))


@pytest.mark.parametrize("niter", [2])
def test_pissa_randomised_svd(niter):
    """pissa_niter_K: both libraries' s·BA approach the best rank-r approximation (no shared RNG)."""
    gamma = 0.01  # σ_{r+1} / σ_r
    top = [8.0, 7.0, 6.0, 5.0]
    weights = {"fc1": _spectral(HID, IN, top, top[-1] * gamma, 3), "fc2": _spectral(OUT, HID, top, top[-1] * gamma, 4)}
    init = f"pissa_niter_{niter}"
    _, params, peft_model, wrapped = _build({"init_lora_weights": init}, {"init": init}, weights)
    # Subspace iteration with K power iterations (what both randomised SVDs do, without oversampling) shrinks the
    # largest principal angle θ between the found and the true top-r subspace as tan θ_K ≤ γ^(2K+1)·tan θ_0
    # (Golub & Van Loan §8.2; Halko et al. 2011 §4.5). Then |s·BA − W_r| ≤ ‖QQᵀW − W_r‖₂ ≤ σ₁·sin θ_K. We allow
    # tan θ_0 ≤ 1e4 for the Gaussian start (it exceeds that only if a random r×r block is ~1e-4-singular), twice
    # over, plus fp32 rounding of products of size σ₁ (≈ 2e-6·σ₁).
    tol = 2 * top[0] * (1e4 * gamma ** (2 * niter + 1)) + 2e-6 * top[0]
    for name in TARGETS:
        w = weights[name].astype(np.float64)
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        best = (u[:, :R] * s[:R]) @ vt[:R]
        layer = _peft_layer(peft_model, name)
        adapter = wrapped[name]["jgoat"]
        sc = layer.scaling["default"]
        _close(f"pissa_niter_{niter}: jgoat s*BA vs SVD", (adapter.scale * (adapter.A @ adapter.B)).T, best, atol=tol)
        peft_delta = sc * (_t2n(layer.lora_B["default"].weight) @ _t2n(layer.lora_A["default"].weight))
        _close(f"pissa_niter_{niter}: peft s*BA vs SVD", peft_delta, best, atol=tol)
        _close(f"pissa_niter_{niter}: modified base", params[name]["kernel"] - adapter.res_A @ adapter.res_B,
               _t2n(layer.base_layer.weight).T, atol=2 * tol)
    wrapped = _sync(peft_model, wrapped, perturb_m=False)
    # After syncing A and B the only difference left is the offset (≤ tol apart), propagated through O(1) layers.
    x, _ = _inputs()
    out_j, _ = jax.jit(jgoat.apply(MODEL.apply))({"params": wrapped}, jnp.asarray(x))
    _close(f"pissa_niter_{niter}: model output", out_j, _t2n(peft_model(torch.from_numpy(x))), atol=50 * tol)


@pytest.mark.parametrize("alpha", [float(R), 2.0 * R], ids=["s1", "s2"])
def test_milora_against_spec(alpha):
    """MiLoRA (not in peft): the bottom-r singular triplets, PiSSA's factorisation, base minus that part (numpy)."""
    base = _base()
    params = _flax_params(base)
    cfg = jgoat.LoraConfig(rank=R, alpha=alpha, init="milora", targets=list(TARGETS))
    wrapped = jgoat.wrap(params, cfg, key=jax.random.key(0))
    s = alpha / R
    for name in TARGETS:
        w = _t2n(getattr(base, name).weight).astype(np.float64)  # [out, in]
        u, sv, vt = np.linalg.svd(w, full_matrices=False)
        h = sv.shape[0]
        ub, sb, vtb = u[:, h - R:], sv[h - R:], vt[h - R:]
        w_bottom = (ub * sb) @ vtb
        adapter = wrapped[name]["jgoat"]
        assert adapter.scale == pytest.approx(s)
        _close("milora: s*AB = bottom-r part", (s * (adapter.A @ adapter.B)).T, w_bottom)
        # the balanced split A = V_b·√(S_b/s), B = (U_b·√(S_b/s))ᵀ, checked through sign-invariant Gram matrices
        _close("milora: A Aᵀ", adapter.A @ adapter.A.T, (vtb.T * (sb / s)) @ vtb)
        _close("milora: Bᵀ B", adapter.B.T @ adapter.B, (ub * (sb / s)) @ ub.T)
        _close("milora: offset = s*A0 B0", adapter.res_A @ adapter.res_B, s * (adapter.A @ adapter.B))
        _close("milora: residual base", (params[name]["kernel"] - adapter.res_A @ adapter.res_B).T, w - w_bottom)
    x, _ = _inputs()
    out, _ = jax.jit(jgoat.apply(MODEL.apply))({"params": wrapped}, jnp.asarray(x))
    _close("milora: output at init = base", out, jax.jit(MODEL.apply)({"params": params}, jnp.asarray(x)))
    merged = jgoat.merge(wrapped)
    for name in TARGETS:
        _close("milora: merge at init = base", merged[name]["kernel"], params[name]["kernel"], atol=1e-6)


def test_dora_with_dropout_eval_mode():
    """With lora_dropout > 0 the training-mode masks come from different RNGs; eval mode must match exactly."""
    _, params, peft_model, wrapped = _build({"use_dora": True}, {"use_dora": True}, dropout=0.1)
    assert wrapped["fc1"]["jgoat"].dropout == 0.1
    wrapped = _sync(peft_model, wrapped, perturb_m=True)
    peft_model.eval()
    _compare_run("dora+dropout eval", peft_model, wrapped, use_jit=True, dora=True)
    _compare_merge("dora+dropout eval", params, peft_model, wrapped, unmerge=False)
    # dropout is live in jgoat's training mode (a 'dropout' rng), and only there
    x, _ = _inputs()
    run = jax.jit(jgoat.apply(MODEL.apply))
    out_eval, _ = run({"params": wrapped}, jnp.asarray(x))
    out_train, _ = run({"params": wrapped}, jnp.asarray(x), rngs={"dropout": jax.random.key(5)})
    assert not np.allclose(out_eval, out_train)
