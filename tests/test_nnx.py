"""jgoat on Flax NNX: NNX twins of linen models (same module paths, same weights) give the linen path's outputs, aux
losses and adapter gradients; base params stay bit-identical under nnx.Optimizer; the tree machinery round-trips.

Tolerance: every comparison with the linen path is a relative error ‖nnx − linen‖₂ ≤ 1e-6 · ‖linen‖₂ per leaf (fp32;
both paths run the same adapter code on the same arrays, so the differences are only XLA's fusion / summation order
when the two programs are compiled apart: measured ≤ 4e-7; single elements differ by up to ~1e-6 of the leaf's max).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from toys import ScannedMLP

import jgoat
import jgoat.nnx as jn
from jgoat.apply import einsum_n_in
from jgoat.models.llama import LlamaConfig, LlamaForCausalLM
from jgoat.models.llama.modules import apply_rope, rope_cos_sin

RTOL = 1e-6
LLAMA_RTOL = 5e-6


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(8, name="down")(jax.nn.gelu(nn.Dense(32, name="up")(x)))


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(16, 32, rngs=rngs)
        self.down = nnx.Linear(32, 8, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


class LinenAttn(nn.Module):
    """DenseGeneral with multi-dim outputs and inputs, and an Einsum: kernels that are not [in, out]."""

    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((2, 8), name="q")(x)
        o = nn.DenseGeneral(16, axis=(-2, -1), name="o")(jax.nn.gelu(q))
        return nn.Einsum((16, 8), "btd,df->btf", use_bias=False, name="e")(o)


class NnxAttn(nnx.Module):
    def __init__(self, rngs):
        self.q = nnx.LinearGeneral(16, (2, 8), rngs=rngs)
        self.o = nnx.LinearGeneral((2, 8), 16, axis=(-2, -1), rngs=rngs)
        self.e = nnx.Einsum("btd,df->btf", (16, 8), rngs=rngs)

    def __call__(self, x):
        return self.e(self.o(jax.nn.gelu(self.q(x))))


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(16, 32, rngs=rngs)
        self.down = nnx.Linear(32, 16, rngs=rngs)

    def __call__(self, x):
        return x + self.down(jax.nn.gelu(self.up(x)))


class NnxScanned(nnx.Module):
    """toys.ScannedMLP in NNX: 3 blocks built by nnx.vmap (kernels [3, in, out]), run by nnx.scan, and a head."""

    def __init__(self, rngs, remat=False):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=0, out_axes=0)
        def make(rngs):
            return NnxBlock(rngs)

        self.layers = make(rngs)
        self.head = nnx.Linear(16, 16, rngs=rngs)
        self.remat = remat

    def __call__(self, x):
        def body(x, block):
            return block(x)

        body = nnx.remat(body) if self.remat else body
        x = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, self.layers)
        return self.head(x)


LLAMA = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, scan_layers=False, initializer_range=0.2)


class NnxRMSNorm(nnx.Module):
    def __init__(self, d):
        self.scale = nnx.Param(jnp.ones((d,)))

    def __call__(self, x):
        var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        return self.scale[...][None, None, :] * (x * jax.lax.rsqrt(var + LLAMA.rms_norm_eps))


class NnxLlamaAttention(nnx.Module):
    def __init__(self, rngs):
        d, n, k, h = LLAMA.hidden_size, LLAMA.num_attention_heads, LLAMA.num_key_value_heads, LLAMA.head_dim
        self.q_proj = nnx.Linear(d, n * h, use_bias=False, rngs=rngs)
        self.k_proj = nnx.Linear(d, k * h, use_bias=False, rngs=rngs)
        self.v_proj = nnx.Linear(d, k * h, use_bias=False, rngs=rngs)
        self.o_proj = nnx.Linear(n * h, d, use_bias=False, rngs=rngs)

    def __call__(self, x, keep, cos, sin):
        (b, t, _), n, k, h = x.shape, LLAMA.num_attention_heads, LLAMA.num_key_value_heads, LLAMA.head_dim
        q = apply_rope(self.q_proj(x).reshape(b, t, n, h), cos, sin).reshape(b, t, k, n // k, h)
        key = apply_rope(self.k_proj(x).reshape(b, t, k, h), cos, sin)
        value = self.v_proj(x).reshape(b, t, k, h)
        scores = jnp.einsum("btkgh,bskh->bkgts", q, key, preferred_element_type=jnp.float32) * (h**-0.5)
        probs = jax.nn.softmax(jnp.where(keep, scores, jnp.finfo(jnp.float32).min), axis=-1)
        return self.o_proj(jnp.einsum("bkgts,bskh->btkgh", probs, value).reshape(b, t, n * h))


class NnxLlamaMLP(nnx.Module):
    def __init__(self, rngs):
        d, f = LLAMA.hidden_size, LLAMA.intermediate_size
        self.gate_proj = nnx.Linear(d, f, use_bias=False, rngs=rngs)
        self.up_proj = nnx.Linear(d, f, use_bias=False, rngs=rngs)
        self.down_proj = nnx.Linear(f, d, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class NnxLlamaLayer(nnx.Module):
    def __init__(self, rngs):
        self.input_layernorm = NnxRMSNorm(LLAMA.hidden_size)
        self.self_attn = NnxLlamaAttention(rngs)
        self.post_attention_layernorm = NnxRMSNorm(LLAMA.hidden_size)
        self.mlp = NnxLlamaMLP(rngs)

    def __call__(self, x, keep, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), keep, cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class NnxLlamaModel(nnx.Module):
    def __init__(self, rngs):
        self.embed_tokens = nnx.Embed(LLAMA.vocab_size, LLAMA.hidden_size, rngs=rngs)
        for i in range(LLAMA.num_hidden_layers):
            setattr(self, f"layers_{i}", NnxLlamaLayer(rngs))
        self.norm = NnxRMSNorm(LLAMA.hidden_size)

    def __call__(self, ids):
        b, t = ids.shape
        causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
        keep = jnp.broadcast_to(causal[None, None, None], (b, 1, 1, t, t))
        cos, sin = rope_cos_sin(jnp.broadcast_to(jnp.arange(t)[None], (b, t)), LLAMA)
        x = self.embed_tokens(ids)
        for i in range(LLAMA.num_hidden_layers):
            x = getattr(self, f"layers_{i}")(x, keep, cos, sin)
        return self.norm(x)


class NnxLlama(nnx.Module):
    """jgoat.models' LlamaForCausalLM (unrolled layers, no padding) written in NNX, with the same param paths."""

    def __init__(self, rngs):
        self.model = NnxLlamaModel(rngs)
        self.lm_head = nnx.Linear(LLAMA.hidden_size, LLAMA.vocab_size, use_bias=False, rngs=rngs)

    def __call__(self, ids):
        return self.lm_head(self.model(ids))


def llama_logits(variables, ids, **kwargs):
    """LlamaForCausalLM's apply returning the logits (what jgoat.apply wraps)."""
    out, state = LlamaForCausalLM(LLAMA).apply(variables, ids, **kwargs)
    return out.logits, state


def _x(shape=(2, 5, 16), seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


def _twin(linen_model, nnx_cls, x, **kwargs):
    """(linen params, NNX model holding the same weights)."""
    params = linen_model.init(jax.random.key(1), x)["params"]
    model = nnx_cls(nnx.Rngs(0), **kwargs)
    jn.update(model, params)
    return params, model


def _flat(tree) -> dict:
    """{'a/b/c': array} of a linen tree or an nnx.State (Variables' 'value' dropped), None leaves left out."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = {}
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        out[name.removesuffix("/value")] = leaf
    return out


def _assert_close(got, want, rtol=RTOL):
    got, want = _flat(got), _flat(want)
    assert sorted(got) == sorted(want)
    for name in want:
        g, w = np.asarray(got[name]), np.asarray(want[name])
        assert g.shape == w.shape, name
        err, scale = float(np.linalg.norm(g - w)), float(np.linalg.norm(w))
        assert err <= rtol * scale, (name, err, scale)


def _linen_run(apply_fn, wrapped, x):
    """(out, aux, adapter grads) on linen: jgoat.apply(apply_fn) over the split trainable tree."""
    trainable, frozen = jgoat.split(wrapped)

    def loss(trainable):
        out, aux = jgoat.apply(apply_fn)({"params": jgoat.combine(trainable, frozen)}, x)
        return jnp.mean(out**2) + 0.1 * aux, (out, aux)

    (_, (out, aux)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)
    return out, aux, grads


def _nnx_run(model, x, jit):
    def step(model, x):
        def loss(model):
            out, aux = jn.apply(model, x)
            return jnp.mean(out**2) + 0.1 * aux, (out, aux)

        (_, (out, aux)), grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, jn.Adapter), has_aux=True)(model)
        return out, aux, grads

    return (nnx.jit(step) if jit else step)(model, x)


CONFIGS = {
    "goat": jgoat.GoatConfig(rank=8, experts=4, top_k=2, targets=["up", "down"]),
    "lora": jgoat.LoraConfig(rank=4, targets=["up", "down"]),
    "dora": jgoat.LoraConfig(rank=4, use_dora=True, targets=["up", "down"]),
    "ia3": jgoat.IA3Config(targets=["up", "down"], feedforward=["down"]),
    "pissa": jgoat.LoraConfig(rank=4, init="pissa", targets=["up"]),
    "kasa": jgoat.KasaConfig(rank=4, targets=["up", "down"]),
    "lori": jgoat.LoriConfig(rank=4, targets=["up", "down"]),
    "molora": jgoat.MoLoraConfig(rank=8, experts=4, top_k=1, targets=["up"]),
}


def _nonzero_b(wrapped):
    """LoRA-like B starts at zero: perturb every trainable leaf so gradients of A (and the outputs) are non-trivial."""
    trainable, frozen = jgoat.split(wrapped)
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jgoat.combine(jax.tree.unflatten(treedef, leaves), frozen)


@pytest.mark.parametrize(("method", "jit"), [(m, True) for m in CONFIGS] + [("goat", False), ("lora", False)])
def test_mlp_equals_linen(method, jit):
    x = _x()
    params, model = _twin(LinenMLP(), NnxMLP, x)
    wrapped = jgoat.wrap(params, CONFIGS[method], key=jax.random.key(2))
    jn.wrap(model, CONFIGS[method], key=jax.random.key(2))
    _assert_close(jn.params(model), wrapped)  # same key, same paths: the same adapters
    wrapped = _nonzero_b(wrapped)
    jn.update(model, wrapped)
    out, aux, grads = _nnx_run(model, x, jit)
    want_out, want_aux, want_grads = _linen_run(LinenMLP().apply, wrapped, x)
    _assert_close(out, want_out)
    _assert_close(aux, want_aux)
    _assert_close(grads, want_grads)
    if method in ("goat", "molora"):
        assert float(aux) > 0.0


LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]
LLAMA_CONFIGS = {
    "goat": jgoat.GoatConfig(rank=8, experts=4, top_k=2, targets=LLAMA_TARGETS),
    "lora": jgoat.LoraConfig(rank=4, targets=LLAMA_TARGETS),
    "dora": jgoat.LoraConfig(rank=4, use_dora=True, targets=LLAMA_TARGETS),
    "ia3": jgoat.IA3Config(targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"]),
    "qlora": jgoat.LoraConfig(rank=4, targets=LLAMA_TARGETS),
}


@pytest.mark.parametrize("method", ["goat", *(pytest.param(m, marks=pytest.mark.slow)
                                       for m in ("qlora", "lora", "dora", "ia3"))])
def test_tiny_llama_equals_linen(method):
    """jgoat.models' linen Llama and its NNX twin (same weights): logits, aux and adapter gradients.

    Tolerance LLAMA_RTOL: here the two models are separately written programs (not only the injection paths), and
    the adapter gradients of layer 0 come back through two attention layers (softmax backward): measured ≤ 2.1e-6.
    """
    ids = jax.random.randint(jax.random.key(0), (2, 6), 0, LLAMA.vocab_size)
    model = NnxLlama(nnx.Rngs(0))
    params = LlamaForCausalLM(LLAMA).init(jax.random.key(1), ids)["params"]
    jn.update(model, params)
    cfg = LLAMA_CONFIGS[method]
    if method == "qlora":
        params = jgoat.quantize_nf4(params, targets=LLAMA_TARGETS)
        jn.quantize_nf4(model, targets=LLAMA_TARGETS)
    _assert_close(model(ids), LlamaForCausalLM(LLAMA).apply({"params": jgoat.dequantize_tree(params)}, ids).logits)
    wrapped = _nonzero_b(jgoat.wrap(params, cfg, key=jax.random.key(2)))
    jn.wrap(model, cfg, key=jax.random.key(2))
    jn.update(model, wrapped)
    out, aux, grads = _nnx_run(model, ids, jit=True)
    want_out, want_aux, want_grads = _linen_run(llama_logits, wrapped, ids)
    _assert_close(out, want_out)
    _assert_close(aux, want_aux)
    _assert_close(grads, want_grads, rtol=LLAMA_RTOL)


@pytest.mark.parametrize("method", ["goat", "lora"])
def test_qlora_equals_linen(method):
    x = _x()
    params, model = _twin(LinenMLP(), NnxMLP, x)
    qparams = jgoat.quantize_nf4(params, targets=["up", "down"])
    jn.quantize_nf4(model, targets=["up", "down"])
    assert isinstance(model.up.kernel.get_raw_value(), jgoat.NF4Kernel)
    base_out = model(x)  # NF4 base without adapters runs too
    _assert_close(base_out, LinenMLP().apply({"params": jgoat.dequantize_tree(qparams)}, x))
    wrapped = _nonzero_b(jgoat.wrap(qparams, CONFIGS[method], key=jax.random.key(2)))
    jn.wrap(model, CONFIGS[method], key=jax.random.key(2))
    jn.update(model, wrapped)
    out, aux, grads = _nnx_run(model, x, jit=True)
    want_out, want_aux, want_grads = _linen_run(LinenMLP().apply, wrapped, x)
    _assert_close(out, want_out)
    _assert_close(aux, want_aux)
    _assert_close(grads, want_grads)


@pytest.mark.parametrize("method", ["goat", pytest.param("lora", marks=pytest.mark.slow)])
def test_linear_general_and_einsum_equal_linen(method):
    x = _x()
    params, model = _twin(LinenAttn(), NnxAttn, x)
    cfg = {"goat": jgoat.GoatConfig(rank=4, experts=2, top_k=1), "lora": jgoat.LoraConfig(rank=4)}[method]
    wrapped = _nonzero_b(jgoat.wrap(params, cfg, key=jax.random.key(2), layouts=jgoat.probe(LinenAttn(), params, x)))
    jn.wrap(model, cfg, key=jax.random.key(2))
    assert jn.layouts(model) == jgoat.probe(LinenAttn(), params, x)
    jn.update(model, wrapped)
    out, aux, grads = _nnx_run(model, x, jit=True)
    want_out, want_aux, want_grads = _linen_run(LinenAttn().apply, wrapped, x)
    _assert_close(out, want_out)
    _assert_close(aux, want_aux)
    _assert_close(grads, want_grads)


@pytest.mark.parametrize(("remat", "jit", "nf4"), [(False, False, False), (True, True, False),
                                             pytest.param(False, True, True, marks=pytest.mark.slow)],
                         ids=["plain-eager", "remat-jit", "qlora-jit"])
def test_scanned_layers_equal_linen(remat, jit, nf4):
    """nnx.vmap-built layers (kernels [3, in, out]) run by nnx.scan (and nnx.remat) vs linen's nn.scan; with nf4 the
    stacked kernels are NF4 and each scan step dequantises its own layer."""
    x = _x((2, 5, 16))
    linen = ScannedMLP(width=16, hidden=32, layers=3, remat=remat)
    params, model = _twin(linen, NnxScanned, x, remat=remat)
    if nf4:
        params = jgoat.quantize_nf4(params, targets=["up", "down"])
        jn.quantize_nf4(model, targets=["up", "down"])
    cfg = jgoat.GoatConfig(rank=8, experts=4, top_k=2, targets=["up", "down"])
    wrapped = jgoat.wrap(params, cfg, key=jax.random.key(2))
    jn.wrap(model, cfg, key=jax.random.key(2))
    assert model.layers.up.jgoat.A.get_value().shape == (3, 4, 16, 2)
    out, aux, grads = _nnx_run(model, x, jit)
    want_out, want_aux, want_grads = _linen_run(linen.apply, wrapped, x)
    _assert_close(out, want_out)
    _assert_close(aux, want_aux)
    _assert_close(grads, want_grads)
    assert float(aux) > 0.0
    _, aux_again = jn.apply(model, x)  # the accumulators are zeroed around each call: no stale aux
    _assert_close(aux_again, want_aux)


def test_aux_mask_and_expert_load_equal_linen():
    x = _x()
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    params, model = _twin(LinenMLP(), NnxMLP, x)
    wrapped = jgoat.wrap(params, CONFIGS["goat"], key=jax.random.key(2))
    jn.wrap(model, CONFIGS["goat"], key=jax.random.key(2))
    _, aux, load = jn.apply(model, x, aux_mask=mask, collect_load=True)
    _, want_aux, want_load = jgoat.apply(LinenMLP().apply, collect_load=True)({"params": wrapped}, x, aux_mask=mask)
    _assert_close(aux, want_aux)
    _assert_close(load, want_load)
    _, unmasked = jn.apply(model, x)
    assert abs(float(unmasked) - float(aux)) > 1e-4  # the mask changes the loss


def test_optimizer_trains_adapters_only():
    x, y = _x(), _x((2, 5, 8), seed=3)
    model = NnxMLP(nnx.Rngs(0))
    base = {k: np.asarray(v) for k, v in _flat(nnx.state(model, nnx.Param)).items()}
    jn.wrap(model, CONFIGS["goat"], key=jax.random.key(2))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=jn.Adapter)
    n_adapter = len(jax.tree.leaves(nnx.state(model, jn.Adapter)))
    assert n_adapter == 6  # A, B, router for up and down
    mu = jax.tree.leaves(optimizer.opt_state[0].mu)
    assert len(mu) == n_adapter
    assert sum(x.size for x in mu) == sum(x.size for x in jax.tree.leaves(nnx.state(model, jn.Adapter)))

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            out, aux = jn.apply(model, x)
            return jnp.mean((out - y) ** 2) + 0.01 * aux

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, jn.Adapter))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, x, y)) for _ in range(10)]
    assert losses[-1] < losses[0]
    after = {k: np.asarray(v) for k, v in _flat(nnx.state(model, nnx.Param)).items() if "/jgoat/" not in k}
    assert sorted(after) == sorted(base)
    for k in base:
        np.testing.assert_array_equal(after[k], base[k])  # bit-identical base
    assert all(isinstance(v, jn.AdapterConst) for _, v in nnx.to_flat_state(nnx.state(model, jn.AdapterConst)))


def test_merge_unmerge_round_trip():
    x = _x()
    params, model = _twin(LinenMLP(), NnxMLP, x)
    jn.wrap(model, CONFIGS["lora"], key=jax.random.key(2))
    jn.update(model, _nonzero_b(jn.params(model)))
    merged = jn.merge(model)
    assert not hasattr(merged.up, "jgoat") and hasattr(model.up, "jgoat")
    out, _ = jn.apply(model, x)
    _assert_close(merged(x), out)
    _assert_close(jn.params(merged), jgoat.merge(jn.params(model)))
    back = jn.unmerge(merged, model)
    np.testing.assert_allclose(back.up.kernel.get_value(), params["up"]["kernel"], atol=1e-6)
    with pytest.raises(ValueError, match="GOAT is never merged"):
        jn.merge(jn.wrap(NnxMLP(nnx.Rngs(0)), CONFIGS["goat"], key=jax.random.key(2)))


def test_save_restore_round_trip(tmp_path):
    x = _x()
    model = jn.wrap(NnxMLP(nnx.Rngs(0)), CONFIGS["goat"], key=jax.random.key(2))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=jn.Adapter)
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2), argnums=nnx.DiffState(0, jn.Adapter))(model)
    optimizer.update(model, grads)
    jn.save(tmp_path, model, step=1, optimizer=optimizer, metadata={"data_position": 5})
    fresh = jn.wrap(NnxMLP(nnx.Rngs(0)), CONFIGS["goat"], key=jax.random.key(9))
    fresh_opt = nnx.Optimizer(fresh, optax.adam(1e-2), wrt=jn.Adapter)
    record = jn.restore(tmp_path, fresh, optimizer=fresh_opt)
    assert record["metadata"] == {"data_position": 5}
    _assert_close(nnx.state(fresh, jn.Adapter), nnx.state(model, jn.Adapter))
    _assert_close(nnx.state(fresh_opt, nnx.OptState), nnx.state(optimizer, nnx.OptState))
    _assert_close(fresh(x), model(x))
    other = jn.wrap(NnxMLP(nnx.Rngs(1)), CONFIGS["goat"], key=jax.random.key(2))  # another base
    with pytest.raises(ValueError, match="different base model"):
        jn.restore(tmp_path, other)


def test_summary_and_tree_functions():
    model = jn.wrap(NnxMLP(nnx.Rngs(0)), CONFIGS["lora"], key=jax.random.key(2))
    assert jn.summary(model) == jgoat.summary(jn.params(model))
    assert "lora" in jn.summary(model)
    assert [p for p, _ in jgoat.adapters(jn.params(model))] == ["down", "up"]
    x = _x()
    graphdef, adapters, rest = nnx.split(model, jn.Adapter, ...)
    assert sorted(_flat(adapters)) == ["down/jgoat/A", "down/jgoat/B", "up/jgoat/A", "up/jgoat/B"]
    assert sorted(_flat(rest)) == ["down/bias", "down/jgoat/aux", "down/kernel", "up/bias", "up/jgoat/aux", "up/kernel"]
    np.testing.assert_array_equal(nnx.merge(graphdef, adapters, rest)(x), model(x))


def test_dropout_follows_train_and_eval():
    x = _x()
    cfg = jgoat.LoraConfig(rank=4, targets=["up"], dropout=0.5)
    with pytest.raises(ValueError, match="rngs=nnx.Rngs"):
        jn.wrap(NnxMLP(nnx.Rngs(0)), cfg, key=jax.random.key(2))
    model = jn.wrap(NnxMLP(nnx.Rngs(0)), cfg, key=jax.random.key(2), rngs=nnx.Rngs(dropout=3))
    jn.update(model, _nonzero_b(jn.params(model)))
    a, b = model(x), model(x)
    assert not np.allclose(a, b)  # a fresh mask per call
    model.eval()
    c, d = model(x), model(x)
    np.testing.assert_array_equal(c, d)
    _assert_close(c, jgoat.apply(LinenMLP().apply)({"params": jn.params(model)}, x)[0])


class Conv(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(16, 16, kernel_size=(3,), rngs=rngs)
        self.up = nnx.Linear(16, 16, rngs=rngs)

    def __call__(self, x):
        return self.up(self.conv(x))


class MyLinear(nnx.Module):
    def __init__(self, rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (16, 8)))

    def __call__(self, x):
        return x @ self.kernel[...]


class Custom(nnx.Module):
    def __init__(self, rngs):
        self.mine = MyLinear(rngs)

    def __call__(self, x):
        return self.mine(x)


def test_bad_input_errors():
    model = jn.wrap(NnxMLP(nnx.Rngs(0)), CONFIGS["lora"], key=jax.random.key(2))
    with pytest.raises(ValueError, match="already holds jgoat adapters .*'down'"):
        jn.wrap(model, CONFIGS["lora"], key=jax.random.key(2))
    with pytest.raises(ValueError, match="'qkv' matches no linear module; some real module paths: 'down', 'up'"):
        jn.wrap(NnxMLP(nnx.Rngs(0)), jgoat.LoraConfig(rank=4, targets=["qkv"]), key=jax.random.key(2))
    with pytest.raises(ValueError, match="module 'conv' is a Conv, which jgoat cannot intercept"):
        jn.wrap(Conv(nnx.Rngs(0)), jgoat.LoraConfig(rank=4, targets=["conv", "up"]), key=jax.random.key(2))
    assert [p for p, _ in jgoat.adapters(jn.params(jn.wrap(Conv(nnx.Rngs(0)), jgoat.LoraConfig(rank=4),
                                                           key=jax.random.key(2))))] == ["up"]  # all-linear
    with pytest.raises(ValueError, match="module 'mine' is a MyLinear, which jgoat cannot intercept"):
        jn.wrap(Custom(nnx.Rngs(0)), jgoat.LoraConfig(rank=4, targets=["mine"]), key=jax.random.key(2))
    with pytest.raises(TypeError, match="need the hook points of jgoat's own"):
        jn.wrap(NnxMLP(nnx.Rngs(0)), jgoat.PromptTuningConfig(num_virtual_tokens=2), key=jax.random.key(2))
    with pytest.raises(ValueError, match="modules_to_save rule 'head' matches no module"):
        jn.wrap(NnxMLP(nnx.Rngs(0)), jgoat.LoraConfig(rank=4, targets=["up"], modules_to_save=["head"]),
                key=jax.random.key(2))
    with pytest.raises(TypeError, match="takes an nnx.Module"):
        jn.wrap({"up": {"kernel": jnp.ones((2, 2))}}, CONFIGS["lora"], key=jax.random.key(2))


def test_registered_user_class():
    x = _x()
    jgoat.register_linear(MyLinear)
    model = Custom(nnx.Rngs(0))
    base = model(x)
    jn.wrap(model, jgoat.LoraConfig(rank=4, targets=["mine"]), key=jax.random.key(2))
    np.testing.assert_array_equal(model(x), base)  # B = 0 at init
    jn.update(model, _nonzero_b(jn.params(model)))
    adapter = model.mine.jgoat.node()
    want = base + adapter.scale * (x @ adapter.A) @ adapter.B
    _assert_close(model(x), want)


@pytest.mark.parametrize(("stacked", "jit"), [(False, False), (True, True)], ids=["unstacked-eager", "stacked-jit"])
def test_goat_properties_on_nnx(stacked, jit):
    """GOAT.md §8 through the NNX path: the output at init does not depend on `scaling`; every token has exactly k
    gates (each layer's load sums to 1); with a zero router (uniform routing) the code-form aux is k per layer."""
    x = _x()
    make = (lambda: NnxScanned(nnx.Rngs(0))) if stacked else (lambda: NnxMLP(nnx.Rngs(0)))
    run = nnx.jit(lambda m, x: jn.apply(m, x, collect_load=True)) if jit else (
        lambda m, x: jn.apply(m, x, collect_load=True))
    outs = {}
    for scaling in ("theory", "alpha"):
        model = jn.wrap(make(), jgoat.GoatConfig(rank=8, experts=4, top_k=2, scaling=scaling, targets=["up", "down"]),
                        key=jax.random.key(2))
        outs[scaling], aux, load = run(model, x)
    _assert_close(outs["alpha"], outs["theory"])
    n_layers = 2 * (3 if stacked else 1)
    assert len(load) == 2 and all(v.shape == ((3, 4) if stacked else (4,)) for v in load.values())
    np.testing.assert_allclose(np.concatenate([np.reshape(v, (-1, 4)) for v in load.values()]).sum(-1),
                               np.ones(n_layers), rtol=1e-6)
    state = nnx.state(model, jn.Adapter)
    for path, var in nnx.to_flat_state(state):
        if path[-1] == "router":
            var.set_value(jnp.zeros_like(var.get_value()))
    nnx.update(model, state)
    _, aux, _ = run(model, x)
    np.testing.assert_allclose(aux, 2.0 * n_layers, rtol=1e-6)


def test_peft_export_import_round_trip(tmp_path):
    """export_peft on params(model), import_peft into a fresh (unwrapped) model of the same base through update."""
    x = _x()
    cfg = jgoat.LoraConfig(rank=4, targets=["up", "down"])
    model = jn.wrap(NnxMLP(nnx.Rngs(0)), cfg, key=jax.random.key(2))
    jn.update(model, _nonzero_b(jn.params(model)))
    jgoat.export_peft(jn.params(model), cfg, tmp_path)
    fresh = NnxMLP(nnx.Rngs(0))
    jn.update(fresh, jgoat.import_peft(jn.params(fresh), tmp_path))
    assert isinstance(fresh.up.jgoat, jn.AdapterSlot)
    np.testing.assert_array_equal(fresh(x), model(x))
    _assert_close(nnx.state(fresh, jn.Adapter), nnx.state(model, jn.Adapter))


NAMED = {"a": jgoat.LoraConfig(rank=4, alpha=8.0, targets=["up", "down"]),
         "b": jgoat.LoraConfig(rank=4, alpha=8.0, init="gaussian", targets=["up"]),
         "g": jgoat.GoatConfig(rank=8, experts=4, top_k=2, targets=["down"])}


def _named_twin(x):
    """(linen tree, NNX model) holding the same three named adapters (B moved off zero) on the same base."""
    params, model = _twin(LinenMLP(), NnxMLP, x)
    tree = params
    for i, (name, cfg) in enumerate(NAMED.items()):
        tree = jgoat.wrap(tree, cfg, key=jax.random.key(10 + i), name=name)
        jn.wrap(model, cfg, key=jax.random.key(10 + i), name=name)
    _assert_close(jn.params(model), tree)  # the same arrays at the same paths: up/jgoat/a/A ...
    def move_b(node):
        if isinstance(node, jgoat.LoraAdapter | jgoat.GoatAdapter):
            return node.replace(B=node.B + 0.3 * jax.random.normal(jax.random.key(node.B.size), node.B.shape))
        return node

    tree = jax.tree.map(move_b, tree, is_leaf=lambda n: isinstance(n, jgoat.LoraAdapter | jgoat.GoatAdapter))
    jn.update(model, tree)
    return tree, model


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
def test_named_adapters_equal_linen(jit):
    """One named adapter per call, and one per example (adapter_ids; the LoRA pair at 'up' is gathered, GOAT at
    'down' selected), against jgoat.apply on the same tree: outputs, aux, expert loads and the gradients of the
    adapter trained by trainable(name) (linen: split(tree, adapter=name))."""
    x = _x((4, 5, 16))
    tree, model = _named_twin(x)
    assert jgoat.adapter_names(jn.params(model)) == ("a", "b", "g")
    assert sorted(model.up.jgoat.slots()) == ["a", "b"] and sorted(model.down.jgoat.slots()) == ["a", "g"]
    maybe_jit = nnx.jit if jit else (lambda f: f)
    for name in NAMED:
        got = maybe_jit(lambda m, x, n=name: jn.apply(m, x, adapter=n))(model, x)
        want = jgoat.apply(LinenMLP().apply, adapter=name)({"params": tree}, x)
        _assert_close(got, want)
    choice, ids = ("g", None, "a", "b"), jnp.array([2, 0, 3, 1])
    out, aux, load = maybe_jit(lambda m, x, i: jn.apply(m, x, adapter=choice, adapter_ids=i, collect_load=True))(
        model, x, ids)
    want_out, want_aux, want_load = jgoat.apply(LinenMLP().apply, adapter=choice, collect_load=True)(
        {"params": tree}, x, adapter_ids=ids)
    assert sorted(load) == sorted(want_load) == ["down:g"]
    _assert_close((out, aux, load), (want_out, want_aux, want_load))
    assert float(aux) > 0.0
    for name in ("a", "g"):
        def nnx_loss(m, n=name):
            out, aux = jn.apply(m, x, adapter=n)
            return jnp.mean(out**2) + 0.1 * aux

        grads = maybe_jit(lambda m, n=name: nnx.grad(nnx_loss, argnums=nnx.DiffState(0, jn.trainable(n)))(m))(model)
        trainable, frozen = jgoat.split(tree, adapter=name)

        def linen_loss(t, n=name, frozen=frozen):
            out, aux = jgoat.apply(LinenMLP().apply, adapter=n)({"params": jgoat.combine(t, frozen)}, x)
            return jnp.mean(out**2) + 0.1 * aux

        _assert_close(grads, jax.grad(linen_loss)(trainable))


def test_named_adapter_training_and_errors():
    x, y = _x(), _x((2, 5, 8), seed=3)
    tree, model = _named_twin(x)
    base = {k: np.asarray(v) for k, v in _flat(nnx.state(model, nnx.Param)).items() if "/jgoat/" not in k}
    other = {k: np.asarray(v) for k, v in _flat(nnx.state(model, jn.Adapter)).items() if "/jgoat/a/" not in k}
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=jn.trainable("a"))
    assert len(jax.tree.leaves(optimizer.opt_state[0].mu)) == 4  # A, B of up and down: "a" only

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            return jnp.mean((jn.apply(model, x, adapter="a")[0] - y) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, jn.trainable("a")))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(8)]
    assert losses[-1] < losses[0]
    now = _flat(nnx.state(model, nnx.Param))
    for k, v in {**base, **other}.items():
        np.testing.assert_array_equal(now[k], v)  # the base and the other named adapters: bit-identical
    graphdef, train, frozen = jn.split(model, adapter="g")
    assert sorted(_flat(train)) == ["down/jgoat/g/A", "down/jgoat/g/B", "down/jgoat/g/router"]
    _assert_close(jn.apply(jn.combine(graphdef, train, frozen), x, adapter="g"), jn.apply(model, x, adapter="g"))
    merged = jn.merge(model, adapter="a")  # the trained "a" folded in: the plain model gives a's output
    _assert_close(merged(x), jn.apply(model, x, adapter="a")[0])
    jn.update(model, jgoat.delete_adapter(jn.params(model), "b"))
    assert sorted(model.up.jgoat.slots()) == ["a"]
    with pytest.raises(ValueError, match="module 'up' holds named adapters \\['a'\\]: run the model with"):
        model(x)
    with pytest.raises(ValueError, match="params hold named adapters \\('a', 'g'\\): run one with"):
        jn.apply(model, x)
    with pytest.raises(ValueError, match="unknown adapter 'zz'"):
        jn.apply(model, x, adapter="zz")
    with pytest.raises(ValueError, match="choose the one to train with adapter="):
        jn.split(model)
    with pytest.raises(ValueError, match="an adapter named 'a' already exists"):
        jn.wrap(model, NAMED["a"], key=jax.random.key(0), name="a")
    with pytest.raises(ValueError, match="named and unnamed adapters do not mix"):
        jn.wrap(jn.wrap(NnxMLP(nnx.Rngs(0)), NAMED["a"], key=jax.random.key(0)), NAMED["b"], key=jax.random.key(0),
                name="b")
    with pytest.raises(ValueError, match="adapter name 'aux' is reserved on NNX"):
        jn.wrap(NnxMLP(nnx.Rngs(0)), NAMED["a"], key=jax.random.key(0), name="aux")


def test_named_adapters_save_restore_and_peft_export(tmp_path):
    x = _x()
    tree, model = _named_twin(x)
    assert jn.summary(model) == jgoat.summary(tree) and "g (goat)" in jn.summary(model)
    jn.save(tmp_path / "ckpt", model, step=3)
    fresh = _twin(LinenMLP(), NnxMLP, x)[1]
    for i, (name, cfg) in enumerate(NAMED.items()):
        jn.wrap(fresh, cfg, key=jax.random.key(50 + i), name=name)
    jn.restore(tmp_path / "ckpt", fresh)
    _assert_close(nnx.state(fresh, jn.Adapter), nnx.state(model, jn.Adapter))
    jgoat.export_peft(jgoat.select_adapter(jn.params(model), "a"), NAMED["a"], tmp_path / "peft")
    plain = _twin(LinenMLP(), NnxMLP, x)[1]
    jn.update(plain, jgoat.add_adapter(jn.params(plain), jgoat.import_peft(jn.params(plain), tmp_path / "peft"),
                                       name="a"))
    np.testing.assert_array_equal(jn.apply(plain, x, adapter="a")[0], jn.apply(model, x, adapter="a")[0])


def test_modules_to_save_equals_linen(tmp_path):
    """modules_to_save=['down']: its params become SavedParam (trained by wrt=Adapter, saved, merged back to Param);
    gradients equal linen's over split(tree) (adapter leaves and down's kernel and bias)."""
    x = _x()
    cfg = jgoat.LoraConfig(rank=4, targets=["up"], modules_to_save=["down"])
    params, model = _twin(LinenMLP(), NnxMLP, x)
    wrapped = _nonzero_b(jgoat.wrap(params, cfg, key=jax.random.key(2)))
    jn.wrap(model, cfg, key=jax.random.key(2))
    assert isinstance(model.down.kernel, jn.SavedParam) and isinstance(model.down.jgoat, jn.SaveMarker)
    assert type(model.up.kernel) is nnx.Param
    _assert_close(jn.params(model), jax.tree.map(lambda v: v, jgoat.wrap(params, cfg, key=jax.random.key(2))))
    jn.update(model, wrapped)
    out, aux, grads = _nnx_run(model, x, jit=True)
    want_out, want_aux, want_grads = _linen_run(LinenMLP().apply, wrapped, x)
    _assert_close(out, want_out)
    _assert_close(grads, want_grads)
    assert sorted(_flat(grads)) == ["down/bias", "down/kernel", "up/jgoat/A", "up/jgoat/B"]
    assert jn.summary(model) == jgoat.summary(wrapped)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=jn.Adapter)
    assert len(jax.tree.leaves(optimizer.opt_state[0].mu)) == 4
    optimizer.update(model, grads)
    jn.save(tmp_path, model, step=1, optimizer=optimizer)
    fresh = jn.wrap(_twin(LinenMLP(), NnxMLP, x)[1], cfg, key=jax.random.key(9))
    fresh_opt = nnx.Optimizer(fresh, optax.adam(1e-2), wrt=jn.Adapter)
    jn.restore(tmp_path, fresh, optimizer=fresh_opt)
    _assert_close(nnx.state(fresh, jn.Adapter), nnx.state(model, jn.Adapter))  # down's trained params too
    _assert_close(nnx.state(fresh_opt, nnx.OptState), nnx.state(optimizer, nnx.OptState))
    merged = jn.merge(model)
    assert type(merged.down.kernel) is nnx.Param and not hasattr(merged.down, "jgoat")
    _assert_close(merged(x), model(x))


def test_wrap_split_graphdef_and_state():
    """jgoat.nnx.wrap on nnx.split's (graphdef, state) gives the (graphdef, state) of the wrapped model; a bare
    nnx.State is refused (it does not say which modules are linear)."""
    x = _x()
    graphdef, state = nnx.split(NnxMLP(nnx.Rngs(0)))
    graphdef2, state2 = jn.wrap((graphdef, state), CONFIGS["goat"], key=jax.random.key(2))
    reference = jn.wrap(NnxMLP(nnx.Rngs(0)), CONFIGS["goat"], key=jax.random.key(2))
    _assert_close(jn.params(nnx.merge(graphdef2, state2)), jn.params(reference))
    _assert_close(jn.apply(nnx.merge(graphdef2, state2), x), jn.apply(reference, x))
    graphdef3, *states = jn.wrap(nnx.split(NnxMLP(nnx.Rngs(0)), nnx.Param, ...), CONFIGS["lora"],
                                 key=jax.random.key(2))
    assert sorted(_flat(nnx.state(nnx.merge(graphdef3, *states), jn.Adapter))) == [
        "down/jgoat/A", "down/jgoat/B", "up/jgoat/A", "up/jgoat/B"]
    with pytest.raises(TypeError, match="an nnx.State alone"):
        jn.wrap(state, CONFIGS["lora"], key=jax.random.key(2))


def test_split_combine_match_trainable_mask():
    """jgoat.nnx.split's trainable state holds exactly the leaves jgoat.trainable_mask marks on params(model)."""
    x = _x()
    cfg = jgoat.GoatConfig(rank=8, experts=4, top_k=2, targets=["up"], modules_to_save=["down"])
    model = jn.wrap(NnxMLP(nnx.Rngs(0)), cfg, key=jax.random.key(2))
    graphdef, train, frozen = jn.split(model)
    mask = _flat(jgoat.trainable_mask(jn.params(model)))
    assert sorted(_flat(train)) == sorted(k for k, m in mask.items() if m)
    _assert_close(jn.apply(jn.combine(graphdef, train, frozen), x), jn.apply(model, x))


def test_goat_export_import_round_trip(tmp_path):
    x = _x()
    cfg = CONFIGS["goat"]
    model = jn.wrap(NnxMLP(nnx.Rngs(0)), cfg, key=jax.random.key(2))
    jn.update(model, _nonzero_b(jn.params(model)))
    jgoat.export_goat(jn.params(model), cfg, tmp_path)
    fresh = NnxMLP(nnx.Rngs(0))
    tree, got_cfg = jgoat.import_goat(jn.params(fresh), tmp_path)
    jn.update(fresh, tree)
    assert got_cfg == cfg
    _assert_close(nnx.state(fresh, jn.Adapter), nnx.state(model, jn.Adapter))
    np.testing.assert_array_equal(jn.apply(fresh, x)[0], jn.apply(model, x)[0])


def test_bridge_model_error_and_linen_path():
    """A linen model converted with nnx.bridge.ToNNX runs its layers as linen code, which the NNX hooks never see:
    jgoat.nnx refuses it naming the module, and the documented alternative — jgoat.wrap / jgoat.apply on the
    bridge's own linen params — gives the outputs and adapter gradients of the NNX path on an NNX model holding the
    same weights (RTOL)."""
    x = _x()
    bridged = nnx.bridge.ToNNX(LinenMLP(), rngs=nnx.Rngs(0))
    nnx.bridge.lazy_init(bridged, x)
    with pytest.raises(ValueError, match="module '\\(root\\)' is a linen module converted with nnx.bridge.ToNNX"):
        jn.wrap(bridged, CONFIGS["goat"], key=jax.random.key(2))

    class Holder(nnx.Module):
        def __init__(self):
            self.inner = bridged

    with pytest.raises(ValueError, match="module 'inner' is a linen module converted"):
        jn.wrap(Holder(), CONFIGS["goat"], key=jax.random.key(2))
    params = nnx.state(bridged, nnx.Param).to_pure_dict()
    np.testing.assert_array_equal(LinenMLP().apply({"params": params}, x), bridged(x))  # the bridge's weights
    wrapped = _nonzero_b(jgoat.wrap(params, CONFIGS["goat"], key=jax.random.key(2)))
    twin = NnxMLP(nnx.Rngs(5))
    jn.wrap(twin, CONFIGS["goat"], key=jax.random.key(2))
    jn.update(twin, wrapped)
    out, aux, grads = _nnx_run(twin, x, jit=True)
    want_out, want_aux, want_grads = _linen_run(LinenMLP().apply, wrapped, x)
    _assert_close(out, want_out)
    _assert_close(aux, want_aux)
    _assert_close(grads, want_grads)


def test_named_adapters_on_scanned_layers_equal_linen():
    """Named adapters on nnx.vmap-built layers run by nnx.scan (stacked slots [3, ...]), one per example, against
    jgoat.apply on linen's nn.scan twin: outputs, aux and loads."""
    x = _x((3, 5, 16))
    linen = ScannedMLP(width=16, hidden=32, layers=3)
    params, model = _twin(linen, NnxScanned, x)
    tree = params
    for i, (name, cfg) in enumerate(NAMED.items()):
        tree = jgoat.wrap(tree, cfg, key=jax.random.key(10 + i), name=name)
        jn.wrap(model, cfg, key=jax.random.key(10 + i), name=name)
    tree = jax.tree.map(lambda n: n.replace(B=n.B + 0.3) if isinstance(n, jgoat.LoraAdapter | jgoat.GoatAdapter)
                        else n, tree, is_leaf=lambda n: isinstance(n, jgoat.LoraAdapter | jgoat.GoatAdapter))
    jn.update(model, tree)
    slots = model.layers.down.jgoat
    assert slots.g.A.get_value().shape[0] == 3 and slots.aux.get_value().shape == (3,)
    choice, ids = ("a", "g", None), jnp.array([1, 0, 2])
    got = nnx.jit(lambda m, x, i: jn.apply(m, x, adapter=choice, adapter_ids=i, collect_load=True))(model, x, ids)
    want = jgoat.apply(linen.apply, adapter=choice)({"params": tree}, x, adapter_ids=ids)
    _assert_close(got[:2], want)
    assert float(got[1]) > 0.0
    # linen's toy scan does not carry 'jgoat_load'; here each layer's load of g (its own rows) sums to 1
    assert sorted(got[2]) == ["layers/down:g"]
    np.testing.assert_allclose(got[2]["layers/down:g"].sum(-1), np.ones(3), rtol=1e-6)


class WEinsum(nnx.Module):
    """An einsum layer of the tunix kind: its own class, weight `w` (not `kernel`), no bias."""

    def __init__(self, einsum_str, shape, rngs):
        self.einsum_str = einsum_str
        self.w = nnx.Param(jax.random.normal(rngs.params(), shape))

    def __call__(self, x):
        return jnp.einsum(self.einsum_str, x, self.w[...])


class WAttn(nnx.Module):
    def __init__(self, rngs):
        self.q = WEinsum("btd,dnh->btnh", (16, 2, 8), rngs)
        self.o = WEinsum("btnh,nhd->btd", (2, 8, 16), rngs)

    def __call__(self, x):
        return self.o(jax.nn.gelu(self.q(x)))


class LinenWAttn(nn.Module):
    @nn.compact
    def __call__(self, x):
        q = nn.Einsum((16, 2, 8), "btd,dnh->btnh", use_bias=False, name="q")(x)
        return nn.Einsum((2, 8, 16), "btnh,nhd->btd", use_bias=False, name="o")(jax.nn.gelu(q))


def test_registered_weight_attribute_equals_linen():
    """jgoat.nnx.register(cls, n_in=einsum_n_in, kernel="w"): a class whose weight is `w` (tunix's Einsum) is adapted
    like linen's nn.Einsum with the same weights: layouts, outputs, aux and adapter gradients (RTOL)."""
    x = _x()
    with pytest.raises(ValueError, match="module 'q' is a WEinsum, which jgoat cannot intercept"):
        jn.wrap(WAttn(nnx.Rngs(0)), jgoat.LoraConfig(rank=4, targets=["q"]), key=jax.random.key(2))
    jn.register(WEinsum, n_in=einsum_n_in, kernel="w")
    params = LinenWAttn().init(jax.random.key(1), x)["params"]
    model = WAttn(nnx.Rngs(0))
    jn.update(model, params)
    np.testing.assert_array_equal(model.o.w.get_value(), params["o"]["kernel"])
    assert jn.layouts(model) == jgoat.probe(LinenWAttn(), params, x)
    cfg = jgoat.GoatConfig(rank=4, experts=2, top_k=1)
    wrapped = _nonzero_b(jgoat.wrap(params, cfg, key=jax.random.key(2), layouts=jgoat.probe(LinenWAttn(), params, x)))
    jn.wrap(model, cfg, key=jax.random.key(2))
    jn.update(model, wrapped)
    assert sorted(jn.params(model)["q"]) == ["jgoat", "kernel"]
    out, aux, grads = _nnx_run(model, x, jit=True)
    want_out, want_aux, want_grads = _linen_run(LinenWAttn().apply, wrapped, x)
    _assert_close(out, want_out)
    _assert_close(aux, want_aux)
    _assert_close(grads, want_grads)
