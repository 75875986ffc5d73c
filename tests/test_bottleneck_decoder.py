"""Bottleneck adapters (Houlsby / Pfeiffer) on jgoat's decoder (Llama / Mistral / Qwen2 hook points).

The decoder is pre-norm, so an adapter acts on a sub-layer's output h before the residual add: ``x + h + a(h)``
(see jgoat/adapters/bottleneck.py). Checked here: a zero Up is an exact identity (jit / no jit, scanned / unrolled,
MoE MLP); one decoder layer equals a NumPy transcription of that definition; scanned = unrolled; the KV-cache path
equals the no-cache forward; training (remat) moves only the adapters and beats the frozen base; checkpoints and
split / combine round-trip; models without the hook points are refused.
"""

import dataclasses
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jgoat
from jgoat.adapters.bottleneck import BOTTLENECK_KEY
from jgoat.models import (
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    causal_lm_loss,
    generate,
    init_cache,
    stack_layers,
    unstack_layers,
)
from jgoat.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP, rope_cos_sin

# initializer_range 0.2: sub-layer outputs of order 1, so a misplaced adapter moves the logits visibly.
CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, initializer_range=0.2)
R = 4  # reduction factor: r = 8
ACT = {"houlsby": "swish", "pfeiffer": "relu"}
SITES = {"houlsby": ("self_attn", "mlp"), "pfeiffer": ("mlp",)}
# fp32 on both sides of every close (not bit-equal) comparison; what remains is summation order (matmul blocking,
# XLA's fused vs NumPy's exp in swish, scan vs unrolled fusion, cached vs full attention), measured at 2.5-4 ulp of the
# largest output (|out| up to ~15 here, float32 ulp = 2^-23 relative). The tolerance is 32 ulp of that magnitude, ~8x
# headroom; an adapter on the wrong input (x + h instead of h), after the residual add, at the wrong site or with
# the wrong φ moves these outputs by 1e-1 and more (asserted below where it matters).
ULPS = 32


def _assert_fp32_close(got, want):
    want = np.asarray(want)
    atol = ULPS * np.finfo(np.float32).eps * max(1.0, float(np.max(np.abs(want))))
    np.testing.assert_allclose(np.asarray(got), want, atol=atol, rtol=0)


@functools.cache
def _model(scan: bool = True, remat: str | None = None, moe: int = 0) -> LlamaForCausalLM:
    return LlamaForCausalLM(dataclasses.replace(CFG, scan_layers=scan, remat_policy=remat, moe_experts=moe))


@functools.cache
def _jit_apply(scan: bool = True, remat: str | None = None, moe: int = 0):
    return jax.jit(_model(scan, remat, moe).apply)


@pytest.fixture(scope="module")
def base():
    """(params, ids [4, 8]): ids are a toy task, each row counts up by 5 (mod V) from its own start."""
    starts_Bx1 = np.random.default_rng(0).integers(0, CFG.vocab_size, size=(4, 1))
    ids = jnp.asarray((starts_Bx1 + 5 * np.arange(8)[None, :]) % CFG.vocab_size)
    return jax.jit(_model().init)(jax.random.key(0), ids)["params"], ids


def _add(params, placement, key=1):
    return jgoat.add_bottleneck(params, CFG, jgoat.BottleneckConfig(R, placement), key=jax.random.key(key))


def _map_nodes(tree, fn):
    """``tree`` with every adapter node ({down_kernel, ...}) replaced by fn(node)."""
    if not isinstance(tree, dict):
        return tree
    if "down_kernel" in tree:
        return fn(tree)
    return {k: _map_nodes(v, fn) for k, v in tree.items()}


def _randomized(tree, seed, scale=0.5):
    """Every adapter leaf N(0, scale²): an adapter with a(h) of the order of h (a 'trained' one)."""
    rng = np.random.default_rng(seed)
    return _map_nodes(tree, lambda node: {k: (jnp.asarray(scale * rng.standard_normal(v.shape), jnp.float32)
                                              if hasattr(v, "shape") else v) for k, v in node.items()})


def _zero_up(tree):
    return _map_nodes(tree, lambda node: {**node, "up_kernel": jnp.zeros_like(node["up_kernel"]),
                                          "up_bias": jnp.zeros_like(node["up_bias"])})


def _without_adapters(tree):
    if not isinstance(tree, dict):
        return tree
    return {k: _without_adapters(v) for k, v in tree.items() if k != BOTTLENECK_KEY}


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_sites_init_and_layouts(base, placement):
    params, _ = base
    wrapped = jgoat.add_bottleneck(params, CFG, jgoat.BottleneckConfig(R, placement), key=jax.random.key(1),
                                   model=_model())
    layers = wrapped["model"]["layers"]
    L, D, r = CFG.num_hidden_layers, CFG.hidden_size, CFG.hidden_size // R
    for site in ("self_attn", "mlp"):
        assert (BOTTLENECK_KEY in layers[site]) == (site in SITES[placement])
    for site in SITES[placement]:
        (act, node), = layers[site][BOTTLENECK_KEY].items()
        assert act == ACT[placement]
        assert node["down_kernel"].shape == (L, D, r) and node["up_kernel"].shape == (L, r, D)
        assert node["down_bias"].shape == (L, r) and node["up_bias"].shape == (L, D)
        for name in ("down_kernel", "up_kernel"):  # trunc-normal(std 1e-2) cut at ±2σ, not a constant
            w = np.asarray(node[name])
            assert np.abs(w).max() <= 2e-2 and 0.5e-2 < w.std() < 1.5e-2
            assert not np.array_equal(w[0], w[1])  # each layer its own draw
        assert not np.any(node["down_bias"]) and not np.any(node["up_bias"])
    for path, trainable in jax.tree_util.tree_flatten_with_path(jgoat.trainable_mask(wrapped))[0]:
        assert trainable == any(getattr(k, "key", None) == BOTTLENECK_KEY for k in path), path
    # Unrolled params get the same values (layer i, site j: fold_in(key, 2i + j)).
    unrolled = _add(unstack_layers(params, L), placement)
    chex.assert_trees_all_equal(unrolled, unstack_layers(wrapped, L))
    chex.assert_trees_all_equal(stack_layers(unrolled, L), wrapped)


def _moe_params(params, seed, E=2):
    """The base's params with each MLP replaced by E perturbed copies of it and a random router (LlamaMoeMLP)."""
    rng = np.random.default_rng(seed)
    mlp = params["model"]["layers"]["mlp"]

    def experts(w_LxIxO):
        return jnp.stack([w_LxIxO * (1 + 0.2 * e) for e in range(E)], axis=1)

    L, D = CFG.num_hidden_layers, CFG.hidden_size
    moe = {name: experts(mlp[name]["kernel"]) for name in ("gate_proj", "up_proj", "down_proj")}
    moe["router"] = jnp.asarray(rng.standard_normal((L, D, E)), jnp.float32)
    layers = {**params["model"]["layers"], "mlp": moe}
    return {**params, "model": {**params["model"], "layers": layers}}


def test_zero_up_is_exact_identity(base):
    """Up = 0 (kernel and bias) with a large Down: logits bit-equal to the base model, without jit (scanned) and
    with jit (scanned, unrolled, the MoE MLP); the same adapters with a non-zero Up change them."""
    params, ids = base
    adapted = {p: _randomized(_add(params, p), seed=2) for p in ("houlsby", "pfeiffer")}
    zero = {p: _zero_up(tree) for p, tree in adapted.items()}
    model = _model()
    np.testing.assert_array_equal(model.apply({"params": zero["houlsby"]}, ids).logits,
                                  model.apply({"params": params}, ids).logits)
    run = _jit_apply()
    base_logits = run({"params": params}, ids).logits
    for placement in ("houlsby", "pfeiffer"):
        np.testing.assert_array_equal(run({"params": zero[placement]}, ids).logits, base_logits)
        assert float(jnp.max(jnp.abs(run({"params": adapted[placement]}, ids).logits - base_logits))) > 1e-1
    L, unrolled = CFG.num_hidden_layers, _jit_apply(scan=False)
    np.testing.assert_array_equal(unrolled({"params": unstack_layers(zero["houlsby"], L)}, ids).logits,
                                  unrolled({"params": unstack_layers(params, L)}, ids).logits)

    moe_run = _jit_apply(moe=2)
    moe_params = _moe_params(params, seed=3)
    moe_adapted = _randomized(_add(moe_params, "houlsby"), seed=4)
    moe_base = moe_run({"params": moe_params}, ids).logits
    np.testing.assert_array_equal(moe_run({"params": _zero_up(moe_adapted)}, ids).logits, moe_base)
    assert float(jnp.max(jnp.abs(moe_run({"params": moe_adapted}, ids).logits - moe_base))) > 1e-1


def _np_rms(x, scale):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + CFG.rms_norm_eps) * np.asarray(scale)[None, None]


def _np_adapter(node, h, act):
    z = h @ np.asarray(node["down_kernel"]) + np.asarray(node["down_bias"])
    phi = z / (1 + np.exp(-z)) if act == "swish" else np.maximum(z, 0)
    return phi @ np.asarray(node["up_kernel"]) + np.asarray(node["up_bias"])


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_one_layer_matches_numpy_definition(base, placement):
    """``x1 = x + h_a + a_attn(h_a)``, ``out = x1 + h_m + a_mlp(h_m)`` (Pfeiffer: no a_attn), with
    ``h_a = self_attn(rms(x))`` and ``h_m = mlp(rms(x1))`` from the base sub-layers (checked against torch in
    tests/models/test_llama.py) and norms and adapters in NumPy."""
    params, _ = base
    cfg = dataclasses.replace(CFG, scan_layers=False)
    layer = _randomized(_add(unstack_layers(params, CFG.num_hidden_layers), placement), seed=5)["model"]["layers_0"]
    rng = np.random.default_rng(6)
    B, T = 2, 5
    x = rng.standard_normal((B, T, CFG.hidden_size)).astype(np.float32)
    keep = jnp.tril(jnp.ones((T, T), bool))[None, None, None]
    cos, sin = rope_cos_sin(jnp.broadcast_to(jnp.arange(T)[None], (B, T)), cfg)
    args = (keep, cos, sin, jnp.zeros((), jnp.int32))
    out, _ = LlamaDecoderLayer(cfg).apply({"params": layer}, jnp.asarray(x), *args)

    act = ACT[placement]
    strip = _without_adapters(layer)
    h_a = np.asarray(LlamaAttention(cfg).apply({"params": strip["self_attn"]},
                                               jnp.asarray(_np_rms(x, layer["input_layernorm"]["scale"])), *args))
    x1 = x + h_a + (_np_adapter(layer["self_attn"][BOTTLENECK_KEY][act], h_a, act) if placement == "houlsby" else 0)
    h_m = np.asarray(LlamaMLP(cfg).apply({"params": strip["mlp"]},
                                         jnp.asarray(_np_rms(x1, layer["post_attention_layernorm"]["scale"]))))
    ref = x1 + h_m + _np_adapter(layer["mlp"][BOTTLENECK_KEY][act], h_m, act)
    _assert_fp32_close(out, ref)
    # The adapters matter at this tolerance: the same layer without them is far off.
    no_adapter, _ = LlamaDecoderLayer(cfg).apply({"params": strip}, jnp.asarray(x), *args)
    assert np.max(np.abs(np.asarray(no_adapter) - ref)) > 1e-1


def test_scanned_unrolled_and_kv_cache(base):
    """With live (random) Houlsby adapters: greedy ``generate`` (KV cache) = argmax of the no-cache forward over the
    generated sequence; step-by-step decoding with the cache gives that forward's logits; scanned = unrolled."""
    params, ids = base
    adapted = _randomized(_add(params, "houlsby"), seed=7, scale=0.3)
    model, L = _model(), CFG.num_hidden_layers
    B, T = ids.shape
    T0 = T - 3  # prompt length; 3 new tokens fill the batch's shape (the compiled forwards are shared)
    gen = generate(model, adapted, ids[:, :T0], max_new_tokens=T - T0)
    full = _jit_apply()({"params": adapted}, gen).logits
    np.testing.assert_array_equal(np.asarray(jnp.argmax(full[:, T0 - 1:-1], -1)), np.asarray(gen[:, T0:]))
    unrolled = _jit_apply(scan=False)({"params": unstack_layers(adapted, L)}, gen).logits
    _assert_fp32_close(unrolled, full)

    step = jax.jit(functools.partial(model.apply, decode=True, mutable=["cache"]))
    mask = jnp.ones((B, T), jnp.int32)
    out, state = step({"params": adapted, "cache": init_cache(model, B, T)}, gen[:, :T0], mask)
    logits = [out.logits]
    for t in range(T0, T):
        out, state = step({"params": adapted, **state}, gen[:, t:t + 1], mask)
        logits.append(out.logits)
    _assert_fp32_close(jnp.concatenate(logits, axis=1), full)


def test_training_beats_the_frozen_base(base):
    """50 jgoat.train_step steps (scanned layers, full remat) on the successor task: the loss falls well below the
    frozen base's; every base leaf is bit-identical afterwards and every adapter kernel moved."""
    params, ids = base
    model = _model(remat="full")

    def loss_fn(p, batch, rng):
        return causal_lm_loss(model.apply({"params": p}, batch).logits, batch), jnp.zeros(())

    def loss(p):
        return float(causal_lm_loss(_jit_apply()({"params": p}, ids).logits, ids))

    wrapped = _add(params, "houlsby")
    trainable, frozen = jgoat.split(wrapped)
    tx = optax.adam(3e-2)
    step = jax.jit(functools.partial(jgoat.train_step, loss_fn=loss_fn, tx=tx))
    state = jgoat.TrainState.create(trainable, tx)
    for i in range(50):
        state, _ = step(state, frozen, ids, jax.random.key(i))
    trained = jgoat.combine(state.trainable, frozen)
    base_loss, final = loss(params), loss(trained)
    assert final < 0.5 * base_loss, (final, base_loss)
    chex.assert_trees_all_equal(_without_adapters(trained), _without_adapters(wrapped))
    before = dict(jax.tree_util.tree_flatten_with_path(wrapped)[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(trained)[0]:
        if any(getattr(k, "key", None) == BOTTLENECK_KEY for k in path) and "kernel" in str(path[-1]):
            assert bool(jnp.any(leaf != before[path])), path


def test_checkpoint_round_trip_and_split_combine(base, tmp_path):
    params, ids = base
    trained = _randomized(_add(params, "pfeiffer", key=1), seed=9, scale=0.3)
    trainable, frozen = jgoat.split(trained)
    chex.assert_trees_all_equal(jgoat.combine(trainable, frozen), trained)
    trainable_paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(trainable)[0]]
    assert len(trainable_paths) == 4 and all(path[:3] == (jax.tree_util.DictKey("model"),
                                                          jax.tree_util.DictKey("layers"),
                                                          jax.tree_util.DictKey("mlp")) for path in trainable_paths)

    jgoat.save(tmp_path, trained, step=3, metadata={"method": "bottleneck"})
    template = _add(params, "pfeiffer", key=2)  # same shapes, other values
    forward = _jit_apply()
    assert float(jnp.max(jnp.abs(forward({"params": template}, ids).logits
                                 - forward({"params": trained}, ids).logits))) > 1e-2
    restored, _, record = jgoat.restore(tmp_path, template)
    assert record["step"] == 3 and all(BOTTLENECK_KEY in p.split("/") for p in record["adapter_paths"])
    assert len(record["adapter_paths"]) == 4  # the mlp site's 4 stacked leaves
    chex.assert_trees_all_equal(restored, trained)
    np.testing.assert_array_equal(forward({"params": restored}, ids).logits, forward({"params": trained}, ids).logits)


def test_errors(base):
    params, _ = base
    dense = nn.Dense(4)
    foreign = dense.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    cfg = jgoat.BottleneckConfig(R)
    with pytest.raises(ValueError, match="no 'bottleneck' hook point"):
        jgoat.add_bottleneck(foreign, CFG, cfg, key=jax.random.key(0), model=dense)
    with pytest.raises(ValueError, match="hook points of jgoat.models' LlamaForCausalLM"):
        jgoat.add_bottleneck(foreign, CFG, cfg, key=jax.random.key(0))
    with pytest.raises(ValueError, match="BertConfig or LlamaConfig"):
        jgoat.add_bottleneck(params, ViTConfig(), cfg, key=jax.random.key(0))
    with pytest.raises(ValueError, match="num_hidden_layers=3"):
        jgoat.add_bottleneck(params, dataclasses.replace(CFG, num_hidden_layers=3), cfg, key=jax.random.key(0))
    with pytest.raises(ValueError, match="'model/layers/mlp' already holds a bottleneck adapter"):
        jgoat.add_bottleneck(_add(params, "pfeiffer"), CFG, cfg, key=jax.random.key(0))
