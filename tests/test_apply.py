"""The interceptor on every linear-like class: Dense, DenseGeneral, Einsum, and registered user classes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgoat


class EinsumNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Einsum((12, 3, 5), "btd,dnh->btnh", name="proj")(x)


class MyLinear(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        return x @ kernel


class UserNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return MyLinear(6, name="mine")(x)


def lora_reference(x, kernel_IxO, adapter):
    """y = x W + s·x A B on the flattened kernel, in float64."""
    x2 = np.asarray(x, np.float64).reshape(-1, kernel_IxO.shape[0])
    a, b = np.asarray(adapter.A, np.float64), np.asarray(adapter.B, np.float64)
    return x2 @ np.asarray(kernel_IxO, np.float64) + adapter.scale * (x2 @ a) @ b


def randomize_b(tree):
    """Give every LoRA B a non-zero value so the adapter contributes."""
    def fix(node):
        if isinstance(node, jgoat.LoraAdapter):
            return node.replace(B=jax.random.normal(jax.random.key(7), node.B.shape))
        return node
    return jax.tree.map(fix, tree, is_leaf=lambda n: isinstance(n, jgoat.LoraAdapter))


@pytest.mark.parametrize("jit", [False, True], ids=["nojit", "jit"])
def test_einsum_linear(jit):
    model = EinsumNet()
    x = jax.random.normal(jax.random.key(0), (2, 4, 12))
    params = model.init(jax.random.key(1), x)["params"]
    layouts = jgoat.probe(model, params, x)
    assert layouts == {"proj": jgoat.Layout(n_stack=0, n_in=1)}
    wrapped = randomize_b(jgoat.wrap(params, jgoat.LoraConfig(rank=2, targets=["proj"]), key=jax.random.key(2),
                                     layouts=layouts))
    fn = jgoat.apply(model.apply)
    out, aux = (jax.jit(fn) if jit else fn)({"params": wrapped}, x)
    ref = lora_reference(x, params["proj"]["kernel"].reshape(12, 15), wrapped["proj"]["jgoat"])
    # fp32 vs float64 on sums of 12 terms of O(1): rounding ~1e-6; 1e-5 leaves margin, far below any real error.
    np.testing.assert_allclose(np.asarray(out).reshape(-1, 15), ref, atol=1e-5)
    assert float(aux) == 0.0


def test_non_linear_einsum_is_refused():
    class Bad(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Einsum((4, 12), "btd,nd->btn", name="proj")(x)

    model = Bad()
    x = jnp.ones((1, 2, 12))
    params = model.init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match="not linear-like"):
        jgoat.probe(model, params, x)


def test_register_linear_user_class():
    model = UserNet()
    x = jax.random.normal(jax.random.key(0), (3, 8))
    params = model.init(jax.random.key(1), x)["params"]
    wrapped = randomize_b(jgoat.wrap(params, jgoat.LoraConfig(rank=2, targets=["mine"]), key=jax.random.key(2)))
    before, _ = jgoat.apply(model.apply)({"params": wrapped}, x)
    np.testing.assert_array_equal(before, model.apply({"params": params}, x))  # not registered: adapter not applied
    jgoat.register_linear(MyLinear)
    out, _ = jgoat.apply(model.apply)({"params": wrapped}, x)
    ref = lora_reference(x, params["mine"]["kernel"], wrapped["mine"]["jgoat"])
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)  # same rounding argument as above


def test_wrap_is_deterministic_and_pure():
    model = UserNet()
    x = jnp.ones((2, 8))
    params = model.init(jax.random.key(1), x)["params"]
    cfg = jgoat.GoatConfig(rank=4, experts=2, top_k=1, targets=["mine"])
    a = jgoat.wrap(params, cfg, key=jax.random.key(3))
    b = jgoat.wrap(params, cfg, key=jax.random.key(3))
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(u, v)
    assert a["mine"]["kernel"] is params["mine"]["kernel"]  # base arrays are shared, never copied or edited
    assert "jgoat" not in params["mine"]


def test_collect_load_reports_goat_expert_load():
    model = UserNet()
    x = jax.random.normal(jax.random.key(0), (5, 8))
    params = model.init(jax.random.key(1), x)["params"]
    jgoat.register_linear(MyLinear)
    wrapped = jgoat.wrap(params, jgoat.GoatConfig(rank=4, experts=4, top_k=2, targets=["mine"]), key=jax.random.key(2))
    out, aux, load = jgoat.apply(model.apply, collect_load=True)({"params": wrapped}, x)
    _, gates, _ = wrapped["mine"]["jgoat"].route(x)
    expected = np.asarray(gates > 0, np.float64).mean(axis=0) / 2  # share of the 5 tokens' 2 slots per expert
    np.testing.assert_allclose(np.asarray(load["mine"]), expected, rtol=0, atol=1e-7)
    assert abs(float(np.sum(load["mine"])) - 1.0) < 1e-6


def test_all_linear_skips_convolutions_and_heads():
    class ConvNet(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Conv(8, (3, 3), name="patch")(x)
            h = nn.Dense(8, name="proj")(h)
            return nn.Dense(2, name="classifier")(h.mean(axis=(1, 2)))

    model = ConvNet()
    x = jnp.ones((1, 6, 6, 3))
    params = model.init(jax.random.key(0), x)["params"]
    for layouts in (None, jgoat.probe(model, params, x)):
        wrapped = jgoat.wrap(params, jgoat.LoraConfig(rank=2), key=jax.random.key(1), layouts=layouts)
        assert [path for path, _ in jgoat.adapters(wrapped)] == ["proj"]
