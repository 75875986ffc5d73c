"""The adapter dtype policy (``AdapterConfig.compute_dtype``): bf16 activations stay bf16 through adapter matmuls
(float32 accumulation), the router / top-k / aux stay float32, float32 models compute exactly as before.

Per method (every family that multiplies activations, plus (IA)³'s out-side scaling and the bottleneck hook):
  (a) the jaxpr of a bf16 forward: every dot_general accumulates in float32 (``preferred_element_type``), its
      operands are bf16 (GOAT's router too: a three-part split keeps its logits float32-accurate), x is never
      upcast, in the forward and the backward pass; GOAT's logits, softmax, top-k and aux are float32. On a bf16
      Llama the policy adds no float32 dot to the base model's train-step jaxpr, while ``"float32"`` adds the
      adapters' own;
  (b) bf16-policy output vs the float32 policy within a bound derived from bf16 rounding (see `_bound`);
  (c) a float32 model under "auto" and a bf16 model under "float32" equal, bit for bit, the formulas jgoat used
      before the policy existed (transcribed here), jit and no jit, with dropout too;
  (d) on a bf16 Llama, gradients reach the float32 adapter params (float32, finite, non-zero) and an AdamW step
      keeps params and optimizer state float32;
  (e) a bad ``compute_dtype`` is refused in one line naming the field; dtypes are accepted by name.
"""

import dataclasses
import functools
import math

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jgoat
from jgoat.adapters import gora, ia3, init_fn
from jgoat.adapters.base import Context
from jgoat.core import ADAPTER_KEY, map_slots
from jgoat.hooks import bottleneck_delta
from jgoat.models import LlamaConfig, LlamaForCausalLM, causal_lm_loss

T, IN, OUT = 24, 64, 48
BF16, F32 = jnp.bfloat16, jnp.float32
U = 2.0**-8  # bf16 unit roundoff: 8 significand bits (7 stored + the implicit one), round to nearest
U32 = 2.0**-24  # float32 unit roundoff


def _normal(seed, shape, std=1.0):
    return jnp.asarray(std * np.random.default_rng(seed).standard_normal(shape), F32)


def _kernel():
    return (_normal(0, (IN, OUT)) / math.sqrt(IN)).astype(BF16)


def _randomized_b(node, seed=7):
    """A 'trained' node: B random (kaiming / zero inits leave it 0, which would make every check trivial)."""
    return node.replace(B=_normal(seed, node.B.shape, 0.5))


def _make(name: str):
    """An adapter node of method `name` for the bf16 kernel [IN, OUT], policy "auto"."""
    w, key = _kernel(), jax.random.key(3)
    if name == "gora":
        return gora.init(jgoat.GoraConfig(r_ref=8), w, key, grad_IxO=_normal(5, (IN, OUT)), rank=6, r_pad=8)
    if name in ("ia3_ff", "ia3_out"):
        node = ia3.init(ia3.IA3LayerConfig(feedforward=name == "ia3_ff"), w, key)
        return node.replace(l=1.0 + _normal(6, node.l.shape, 0.1))
    if name == "goat_dropout":
        return _make("goat").replace(dropout=0.25)
    cfg = _CONFIGS[name]
    node = init_fn(cfg)(cfg, w, key)
    return node if name == "goat" else _randomized_b(node)  # PiSSA / OLoRA: B moved away from its offset res_B


_CONFIGS = {
    "lora": jgoat.LoraConfig(rank=8, alpha=16),
    "rslora": jgoat.LoraConfig(rank=8, alpha=16, use_rslora=True),
    "pissa": jgoat.LoraConfig(rank=8, alpha=16, init="pissa"),
    "olora": jgoat.LoraConfig(rank=8, alpha=16, init="olora"),
    "dora": jgoat.LoraConfig(rank=8, alpha=16, use_dora=True),
    "goat": jgoat.GoatConfig(rank=16, experts=4, top_k=2),
    "molora": jgoat.MoLoraConfig(rank=16, experts=4, top_k=2),
    "kasa": jgoat.KasaConfig(rank=8),
    "lori": jgoat.LoriConfig(rank=8, alpha=16),
}


METHODS = ("lora", "rslora", "pissa", "olora", "dora", "goat", "molora", "kasa", "lori", "gora", "ia3_ff", "ia3_out")
MATMUL_METHODS = tuple(m for m in METHODS if m != "ia3_out")  # (IA)³ out-side is element-wise only
# GOAT below float32 fuses its contractions unless the expert input is dropped: "goat_dropout" takes the other path
TRACED = (*MATMUL_METHODS, "goat_dropout")


def _inputs(dtype, name=""):
    x = _normal(1, (T, IN)).astype(BF16).astype(dtype)  # bf16 values, so the f32 reference sees the same input
    w = _kernel().astype(dtype)
    y = (x.astype(F32) @ w.astype(F32) + _normal(2, (OUT,), 0.1)[None, :]).astype(dtype)
    rng = jax.random.key(4) if name.endswith("_dropout") else None
    return x, y, Context(kernel_IxO=w, bias_O=_normal(2, (OUT,), 0.1).astype(dtype), rng=rng, token_mask_T=None)


def _eqns(jaxpr):
    """Every equation of a (closed) jaxpr, sub-jaxprs (scan, remat, custom_jvp, pjit) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _eqns(sub)


def _dots(closed):
    return [e for e in _eqns(closed.jaxpr) if e.primitive.name == "dot_general"]


def _activation_dots(closed):
    """The dots on activations (an operand with the token dim T; T is a size no weight has). The others are weight
    maths (DoRA's column norms of W + s·A B), float32 by design."""
    return [d for d in _dots(closed) if any(T in v.aval.shape for v in d.invars)]


def _dtypes(eqn):
    return tuple(jnp.dtype(v.aval.dtype) for v in eqn.invars)


def _low_operands(eqn):
    """The operand dtypes a bf16-policy dot must have: bf16, except a dot with batch dims on CPU (XLA:CPU's runtime
    has none for bf16 x bf16 -> f32, so jgoat.core widens the bf16-rounded operands: see core._dot_f32)."""
    (_, (batch, _)) = eqn.params["dimension_numbers"]
    return (F32, F32) if batch and jax.default_backend() == "cpu" else (BF16, BF16)


# ------------------------------------------------------------------------------------------------- (a) the jaxpr


@pytest.mark.parametrize("name", TRACED)
def test_bf16_forward_matmuls_are_bf16_with_f32_accumulation(name):
    node = _make(name)
    x, y, ctx = _inputs(BF16, name)
    closed = jax.make_jaxpr(lambda n, x, y: n.forward(x, y, ctx))(node, x, y)
    dots = _activation_dots(closed)
    assert dots, "no matmul traced"
    for d in dots:
        assert jnp.dtype(d.params["preferred_element_type"]) == F32 and _dtypes(d) == _low_operands(d), d
    f32_activations = [e for e in _eqns(closed.jaxpr) for v in e.outvars
                       if v.aval.shape == (T, IN) and jnp.dtype(v.aval.dtype) == F32]
    if name == "ia3_ff":  # x ⊙ (l − 1) is element-wise float32 (one rounding to bf16; XLA fuses the chain)
        assert {e.primitive.name for e in f32_activations} == {"convert_element_type", "mul"}
    else:
        assert not f32_activations  # no float32 copy of the activations, GOAT's router included
    if name in ("goat", "molora", "goat_dropout"):
        routing = [e for e in _eqns(closed.jaxpr) if e.primitive.name in ("top_k", "exp", "reduce_max")]
        assert routing and all(jnp.dtype(v.aval.dtype) == F32 for e in routing for v in e.invars)
        assert jnp.dtype(closed.out_avals[1].dtype) == F32  # aux
    # the "float32" policy upcasts: the same forward then multiplies float32 operands only
    closed32 = jax.make_jaxpr(lambda n, x, y: n.forward(x, y, ctx))(node.replace(compute_dtype="float32"), x, y)
    assert all(_dtypes(d) == (F32, F32) for d in _activation_dots(closed32))


@pytest.mark.parametrize("name", TRACED)
def test_bf16_backward_matmuls_are_bf16_with_f32_accumulation(name):
    """The backward pass too: every contraction with the activations (or their cotangents) takes bf16 operands and
    accumulates in float32, and x is never upcast (the custom VJP of ``jgoat.core.einsum``)."""
    node = _make(name)
    x, y, ctx = _inputs(BF16, name)

    def loss(n, x):
        out, aux = n.forward(x, y, ctx)
        return jnp.sum(out.astype(F32) ** 2) + (0.0 if aux is None else aux)

    closed = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1), allow_int=True))(node, x)  # GoRA's int rank leaf
    dots = _activation_dots(closed)
    assert dots
    for d in dots:
        assert jnp.dtype(d.params["preferred_element_type"]) == F32 and _dtypes(d) == _low_operands(d), d
    # float32 [T, in] values: only x's cotangent as accumulated (a dot's float32 result, rounded once to bf16), never
    # an upcast copy of x
    f32_activations = {e.primitive.name for e in _eqns(closed.jaxpr) for v in e.outvars
                       if v.aval.shape == (T, IN) and jnp.dtype(v.aval.dtype) == F32}
    if name == "ia3_ff":  # element-wise x ⊙ (l − 1) and its gradient wrt l, fused by XLA
        assert f32_activations <= {"dot_general", "convert_element_type", "mul"}
    else:
        assert f32_activations == {"dot_general"}
    grads = jax.grad(loss, allow_int=True)(node, x)
    floats = [g for g in jax.tree.leaves(grads) if g.dtype != jax.dtypes.float0]
    assert floats and all(g.dtype == F32 for g in floats)


def test_goat_router_logits_are_f32_accurate_under_bf16():
    """The three-part split reproduces the router weight exactly, so the bf16-policy logits differ from the exact
    (float64) x·W only by float32 accumulation over 3·in products: ≤ (3·in + 2)·2^-24 · |x||W|."""
    node = _make("goat").replace(router=_normal(12, (IN, 4), 3.0))  # a 'trained' router, not U(±1/√in)
    x, _, _ = _inputs(BF16)
    hi = node.router.astype(BF16)
    mid = (node.router - hi.astype(F32)).astype(BF16)
    lo = (node.router - hi.astype(F32) - mid.astype(F32)).astype(BF16)
    np.testing.assert_array_equal(_f64(hi) + _f64(mid) + _f64(lo), _f64(node.router))
    got = node.router_logits(x)
    assert got.dtype == F32
    exact = _f64(x) @ _f64(node.router)
    bound = (3 * IN + 2) * U32 * (np.abs(_f64(x)) @ np.abs(_f64(node.router)))
    assert np.all(np.abs(_f64(got) - exact) <= bound)
    naive = _f64(jnp.matmul(x, node.router.astype(BF16), preferred_element_type=F32))  # a bf16 router: far worse
    assert np.max(np.abs(naive - exact) / bound) > 10


def test_bf16_bottleneck_matmuls_are_bf16():
    node = _bottleneck_node()
    h = _normal(1, (2, T, IN)).astype(BF16)
    closed = jax.make_jaxpr(functools.partial(bottleneck_delta, activation="swish"))(node, h)
    dots = _dots(closed)
    assert len(dots) == 2
    assert all(_dtypes(d) == _low_operands(d) and jnp.dtype(d.params["preferred_element_type"]) == F32 for d in dots)


LLAMA = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, dtype=BF16, param_dtype=BF16, initializer_range=0.2)
EXPERTS = 3


IDS = jnp.asarray(np.random.default_rng(0).integers(0, LLAMA.vocab_size, size=(2, 8)), jnp.int32)
# One wrap per method for all the Llama tests (wrap compiles each module's init): the "float32" variant is the same
# tree with the policy replaced on every node (`_with_policy`).
WRAPS = {"lora": jgoat.LoraConfig(rank=4, init="pissa"), "goat": jgoat.GoatConfig(rank=6, experts=EXPERTS, top_k=2)}


@functools.cache
def _llama_params():
    return jax.jit(LlamaForCausalLM(LLAMA).init)(jax.random.key(0), IDS)["params"]


@functools.cache
def _wrapped(method: str):
    return jgoat.wrap(_llama_params(), WRAPS[method], key=jax.random.key(1))


def _with_policy(tree, compute_dtype: str):
    return map_slots(tree, lambda node: node.replace(compute_dtype=compute_dtype))


def _llama_loss(params):
    out, aux = jgoat.apply(LlamaForCausalLM(LLAMA).apply)({"params": params}, IDS)
    return causal_lm_loss(out.logits, IDS) + 1e-3 * aux


@functools.cache
def _f32_dot_shapes(method: str | None, compute_dtype: str = "auto") -> set:
    """Shapes of the all-float32 dots in the jaxpr of a bf16 Llama's loss and gradient (of every param)."""
    tree = _llama_params() if method is None else _with_policy(_wrapped(method), compute_dtype)
    closed = jax.make_jaxpr(jax.value_and_grad(_llama_loss))(tree)
    return {tuple(v.aval.shape for v in d.invars) for d in _dots(closed) if _dtypes(d) == (F32, F32)}


@pytest.mark.parametrize("method", [pytest.param("lora", marks=pytest.mark.slow), "goat"])  # GOAT: a superset
def test_bf16_llama_step_adds_no_f32_adapter_matmul(method):
    """The float32 dots of a bf16 Llama's loss-and-gradient jaxpr: under "auto" the adapters (GOAT's router
    included) add none to the base model's, under "float32" they add their own (the policy makes the difference)."""
    base = _f32_dot_shapes(None)
    assert _f32_dot_shapes(method, "auto") <= base
    assert _f32_dot_shapes(method, "float32") - base


# ------------------------------------------------------------------------------------------------- (b) numerics


def _f64(a):
    return np.asarray(jnp.asarray(a, F32), np.float64)


def _abs_chain(name, node, x):
    """C: the method's delta with every factor replaced by its absolute value (float64); K: the number of bf16
    roundings a product picks up under the bf16 policy (x itself is already bf16, so exact); and an absolute term
    for what differs before any rounding: GOAT's gates, whose float32-accurate logits (three-part router split) are
    summed in another order than the float32 policy's (|Δgates| times the gated chain)."""
    ax = np.abs(_f64(x))

    def offset():
        if getattr(node, "res_A", None) is None:
            return 0.0
        return (ax @ np.abs(_f64(node.res_A))) @ np.abs(_f64(node.res_B))

    if name in ("lora", "rslora", "pissa", "olora", "lori", "gora", "dora"):
        a = _f64(node.masked_A()) if name == "gora" else _f64(node.A)
        b = _f64(node.effective_B()) if name == "lori" else _f64(node.B)
        scale = np.abs(_f64(node.scale))
        chain = scale * (ax @ np.abs(a)) @ np.abs(b)
        if name == "dora":
            chain = np.abs(_f64(node._gain(_kernel())))[None, :] * chain
        return chain + offset(), 3, 0.0  # A, x·A and B rounded to bf16
    if name in ("goat", "molora"):
        gates = _f64(node.route(x)[1])
        gates_f32 = _f64(node.replace(compute_dtype="float32").route(x)[1])
        xa = np.einsum("ti,eid->ted", ax, np.abs(_f64(node.A))) * node.scale
        chain = np.einsum("ted,edo->to", xa * gates[..., None], np.abs(_f64(node.B))) + offset()
        moved = np.einsum("ted,edo->to", xa * np.abs(gates - gates_f32)[..., None], np.abs(_f64(node.B)))
        return chain, 3, (1 + U) ** 3 * moved  # A, gated x·A_i, B
    if name == "kasa":
        h = (ax @ np.abs(_f64(node.A))) * np.abs(_f64(node.diag))[None, :]
        return node.scale * h @ np.abs(_f64(node.B)) + offset(), 3, 0.0  # A, (x·A)⊙Δ, B
    if name == "ia3_ff":  # the kernel is bf16 already; x ⊙ (l − 1) is rounded once
        return (ax * np.abs(_f64(node.l) - 1.0)[None, :]) @ np.abs(_f64(_kernel())), 1, 0.0
    raise AssertionError(name)


def _bound(chain, k, n):
    """|bf16-policy − float32-policy| per element, for a delta that is a sum of products (chain: the same sum of
    absolute values).

    Each product's factors carry at most k bf16 roundings (relative error ≤ u = 2^-8 each), so a product moves by
    at most ((1 + u)^k − 1)·|product| (first order k·u, the contraction length does not multiply it: the rounding
    errors are per factor, and `chain` already sums |products| over the contraction). Both sides accumulate in
    float32 over at most n terms: ≤ n·2^-24 of the chain each (the classic γ_n bound), hence 2·(n + 2)·2^-24 with
    the final scaling/gating products. A bf16 accumulation instead would add up to n·u·chain (24 for n = 64 here) and
    break this bound; computing everything in float32 would make the difference 0 (also asserted against)."""
    return ((1.0 + U) ** k - 1.0 + 2.0 * (n + 2) * U32) * chain


@pytest.mark.parametrize("name", MATMUL_METHODS)
def test_bf16_policy_within_derived_bound_of_f32(name):
    node = _make(name)
    x, y, ctx = _inputs(BF16)
    y32 = y.astype(F32)  # a float32 output slot: the delta comes back unrounded from both policies
    ctx32 = dataclasses.replace(ctx, kernel_IxO=ctx.kernel_IxO.astype(F32), bias_O=ctx.bias_O.astype(F32))
    got = node.forward(x, y32, ctx)[0]
    want = node.replace(compute_dtype="float32").forward(x, y32, ctx32)[0]
    chain, k, moved = _abs_chain(name, node, x)
    err = np.abs(_f64(got) - _f64(want))
    bound = _bound(chain, k, IN) + moved
    assert np.all(err <= bound), f"max err/bound {np.max(err / bound):.3g}"
    assert np.max(err) > 0, "the bf16 policy computed in float32"


def _bottleneck_node():
    return {"down_kernel": _normal(8, (IN, 16), 0.2), "down_bias": _normal(9, (16,), 0.1),
            "up_kernel": _normal(10, (16, IN), 0.2), "up_bias": _normal(11, (IN,), 0.1)}


@pytest.mark.parametrize("activation", ["swish", "relu"])
def test_bf16_bottleneck_within_derived_bound(activation):
    """a = φ(h D + b_d) U + b_u. Rounding D moves the pre-activation by ≤ u·|h||D|; φ is Lipschitz with L ≤ 1.1
    (swish: max φ' ≈ 1.0998; ReLU 1), and |φ(p)| ≤ |p|; rounding z and U then adds ≤ 2u·|p||U|. So
    |Δa| ≤ u·(L·(|h||D|) + 2·|p|)|U| to first order; ×(1 + 4u) covers second order, plus float32 accumulation."""
    node = _bottleneck_node()
    h = _normal(1, (T, IN)).astype(BF16)
    got = bottleneck_delta(node, h, activation)  # bf16 output: compare before that rounding instead
    assert got.dtype == BF16
    pre_bf = jnp.matmul(h, node["down_kernel"].astype(BF16), preferred_element_type=F32) + node["down_bias"][None, :]
    z = jgoat.hooks.BOTTLENECK_ACTIVATIONS[activation](pre_bf)
    got32 = jnp.matmul(z.astype(BF16), node["up_kernel"].astype(BF16), preferred_element_type=F32)
    got32 = got32 + node["up_bias"][None, :]
    np.testing.assert_array_equal(np.asarray(got32.astype(BF16), np.float32), np.asarray(got, np.float32))
    want = bottleneck_delta(node, h.astype(F32), activation)  # the float32 computation of the same bf16 values
    hd = np.abs(_f64(h)) @ np.abs(_f64(node["down_kernel"]))
    pre = np.abs(_f64(h) @ _f64(node["down_kernel"]) + _f64(node["down_bias"])[None, :])
    chain = (1.1 * hd + 2.0 * pre) @ np.abs(_f64(node["up_kernel"]))
    bound = U * (1 + 4 * U) * chain + 2.0 * (IN + 2) * U32 * (hd + pre) @ np.abs(_f64(node["up_kernel"]))
    err = np.abs(_f64(got32) - _f64(want))
    assert np.all(err <= bound) and np.max(err) > 0


# ------------------------------------------------------------------------------------------------- (c) unchanged


def _dropout(x, rate, rng):
    if rate == 0.0 or rng is None:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _old_forward(name, node, x, y, ctx):
    """jgoat's forward before the dtype policy (float32 adapter maths for every model), transcribed."""
    f32 = jnp.float32

    def low_rank(x, a, b):
        return (x.astype(f32) @ a) @ b

    def offset(x):
        return jnp.zeros((), f32) if node.res_A is None else low_rank(x, node.res_A, node.res_B)

    if name in ("lora", "rslora", "pissa", "olora"):
        x_drop = _dropout(x.astype(f32), node.dropout, ctx.rng)
        delta = node.scale * low_rank(x_drop, node.A, node.B) - offset(x)
    elif name in ("lori", "gora"):
        x_drop = _dropout(x.astype(f32), node.dropout, ctx.rng)
        a = node.masked_A() if name == "gora" else node.A
        delta = node.scale * low_rank(x_drop, a, node.effective_B() if name == "lori" else node.B)
    elif name == "kasa":
        x_drop = _dropout(x.astype(f32), node.dropout, ctx.rng)
        h = (x_drop @ node.A) * node.diag[None, :]
        delta = node.scale * (h @ node.B) - offset(x)
    elif name == "dora":
        g = node._gain(ctx.kernel_IxO)
        x32 = x.astype(f32)
        x_drop = _dropout(x32, node.dropout, ctx.rng)
        if x_drop is x32:
            base = y.astype(f32) - (0.0 if ctx.bias_O is None else ctx.bias_O.astype(f32)[None, :])
        else:
            base = x_drop @ ctx.kernel_IxO.astype(f32)
        delta = (g - 1.0)[None, :] * base + g[None, :] * (node.scale * low_rank(x_drop, node.A, node.B))
    elif name in ("goat", "molora"):
        x32 = x.astype(f32)
        p, gates, idx = node.route(x32)
        if node.dropout == 0.0 or ctx.rng is None or node.dropout_mode == "shared":
            h = jnp.einsum("ti,eid->ted", _dropout(x32, node.dropout, ctx.rng), node.A)
        else:
            xe = jnp.broadcast_to(x32[:, None, :], (x32.shape[0], node.A.shape[0], x32.shape[1]))
            h = jnp.einsum("tei,eid->ted", _dropout(xe, node.dropout, ctx.rng), node.A)
        h = h * (node.scale * gates)[..., None]
        delta = jnp.einsum("ted,edo->to", h, node.B) - offset(x32)
        return y + delta.astype(y.dtype), node.aux_loss(p, idx, ctx.token_mask_T)
    elif name == "ia3_ff":
        xs = x.astype(f32) * (node.l.astype(f32) - 1.0)[None, :]
        delta = xs @ ctx.kernel_IxO.astype(f32)
    elif name == "ia3_out":
        return (y.astype(f32) * node.l.astype(f32)[None, :]).astype(y.dtype), None
    else:
        raise AssertionError(name)
    return y + delta.astype(y.dtype), None


CASES = [(n, d, 0.0) for n in METHODS for d in (F32, BF16)] + [
    (n, d, 0.25) for n in ("lora", "dora", "goat", "kasa") for d in (F32, BF16)]


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize(("name", "dtype", "rate"), CASES)
def test_unchanged_where_the_policy_is_float32(name, dtype, rate, jit):
    """float32 model + "auto" and bf16 model + "float32": the pre-policy formula, bit for bit."""
    node = _make(name)
    if rate:
        node = node.replace(dropout=rate)
    node = node if dtype == F32 else node.replace(compute_dtype="float32")
    x, y, ctx = _inputs(dtype)
    ctx = dataclasses.replace(ctx, rng=jax.random.key(4) if rate else None)
    run = jax.jit if jit else (lambda f: f)
    got = run(lambda n, x, y: n.forward(x, y, ctx))(node, x, y)
    want = run(lambda n, x, y: _old_forward(name, n, x, y, ctx))(node, x, y)
    chex.assert_trees_all_equal(got, want)


def _old_bottleneck(node, h, activation):
    h32 = h.astype(jnp.float32)
    z = jgoat.hooks.BOTTLENECK_ACTIVATIONS[activation](h32 @ node["down_kernel"] + node["down_bias"][None, None, :])
    return (z @ node["up_kernel"] + node["up_bias"][None, None, :]).astype(h.dtype)


@pytest.mark.parametrize("jit", [False, True])
def test_bottleneck_unchanged_for_f32(jit):
    node, h = _bottleneck_node(), _normal(1, (2, T, IN))
    run = jax.jit if jit else (lambda f: f)
    for activation in ("swish", "relu"):
        chex.assert_trees_all_equal(run(functools.partial(bottleneck_delta, activation=activation))(node, h),
                                    run(functools.partial(_old_bottleneck, activation=activation))(node, h))


# ------------------------------------------------------------------------------------------------- (d) gradients


@pytest.mark.parametrize("method", ["goat", pytest.param("lora", marks=pytest.mark.slow)])  # GOAT: a superset
def test_bf16_llama_gradients_reach_f32_params(method):
    wrapped, loss = _wrapped(method), _llama_loss
    assert {node.compute_dtype for _, node in jgoat.adapters(wrapped)} == {"auto"}
    trainable, frozen = jgoat.split(wrapped)
    assert jax.tree.leaves(trainable) and all(leaf.dtype == F32 for leaf in jax.tree.leaves(trainable))
    assert any(leaf.dtype == BF16 for leaf in jax.tree.leaves(frozen))  # the model really is bf16
    tx = optax.adam(1e-3)  # no weight decay: a leaf moves iff its gradient is non-zero (Adam: 0 / (0 + eps) = 0)
    state = jgoat.TrainState.create(trainable, tx)

    def loss_fn(p, batch, rng):
        return loss(p), jnp.zeros((), F32)

    new, metrics = jax.jit(functools.partial(jgoat.train_step, loss_fn=loss_fn, tx=tx, clip_norm=None))(
        state, frozen, None, jax.random.key(0))
    assert bool(jnp.isfinite(metrics["loss"])) and bool(jnp.isfinite(metrics["grad_norm"]))
    for (path, old), leaf in zip(jax.tree_util.tree_leaves_with_path(trainable), jax.tree.leaves(new.trainable),
                                 strict=True):
        assert leaf.dtype == F32 and bool(jnp.all(jnp.isfinite(leaf))), path
        assert bool(jnp.any(leaf != old)), f"no gradient reaches {jax.tree_util.keystr(path)}"
    moments = [leaf for leaf in jax.tree.leaves(new.opt_state) if jnp.issubdtype(leaf.dtype, jnp.floating)]
    assert moments and all(leaf.dtype == F32 for leaf in moments)


# ------------------------------------------------------------------------------------------------- (e) bad values


CONFIGS = [jgoat.LoraConfig, jgoat.GoatConfig, jgoat.MoLoraConfig, jgoat.KasaConfig, jgoat.LoriConfig, jgoat.IA3Config,
           jgoat.GoraConfig, ia3.IA3LayerConfig]


def _build(cls, **kw):
    return cls(feedforward=False, **kw) if cls is ia3.IA3LayerConfig else cls(**kw)


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("bad", ["fp8", "float64", "", jnp.int8, 16, None, True])
def test_bad_compute_dtype_refused_in_one_line(cls, bad):
    with pytest.raises(jgoat.JgoatError) as info:
        _build(cls, compute_dtype=bad)
    message = str(info.value)
    assert message.startswith(f"{cls.__name__}.compute_dtype must be one of 'auto', 'float32', 'bfloat16', 'float16'")
    assert "\n" not in message and repr(bad) in message


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_compute_dtype_given_as_dtype_is_stored_by_name(cls):
    assert _build(cls).compute_dtype == "auto"
    for given, name in ((jnp.bfloat16, "bfloat16"), (np.float32, "float32"), (np.dtype("float16"), "float16"),
                        ("bfloat16", "bfloat16")):
        cfg = _build(cls, compute_dtype=given)
        assert cfg.compute_dtype == name
        hash(cfg)  # configs stay hashable (static args of jitted functions)


@pytest.mark.parametrize("name", METHODS)
def test_init_copies_the_policy_onto_the_node(name):
    for policy in ("float16", "float32"):
        if name in ("ia3_ff", "ia3_out"):
            node = ia3.init(ia3.IA3LayerConfig(feedforward=name == "ia3_ff", compute_dtype=policy), _kernel(), None)
        elif name == "gora":
            node = gora.init(jgoat.GoraConfig(r_ref=8, compute_dtype=policy), _kernel(), jax.random.key(3),
                             grad_IxO=None, rank=6)
        else:
            cfg = dataclasses.replace(_CONFIGS[name], compute_dtype=policy)
            node = init_fn(cfg)(cfg, _kernel(), jax.random.key(3))
        assert node.compute_dtype == policy


def test_wrap_copies_the_policy_onto_every_node():
    """Through wrap (IA³'s per-layer config included) and lori_concat."""
    nodes = jgoat.adapters(jgoat.wrap(_llama_params(), jgoat.IA3Config(compute_dtype="float32"), key=jax.random.key(1)))
    assert nodes and {node.compute_dtype for _, node in nodes} == {"float32"}
    assert {node.compute_dtype for _, node in jgoat.adapters(_wrapped("lora"))} == {"auto"}
    lori = _make("lori").replace(compute_dtype="bfloat16")
    tree = {"dense": {"kernel": _kernel(), ADAPTER_KEY: lori}}
    assert jgoat.lori_concat([tree, tree])["dense"][ADAPTER_KEY].compute_dtype == "bfloat16"
