"""QLoRA: NF4 storage bit-exact with bitsandbytes' definition, dequantised per matmul, adapters train on top.

The reference quantiser below is written from METHODS.md ("QLoRA's NF4") alone, in numpy, without jgoat's code:
torch layout [out, in] flattened row-major, blocks of 64, absmax per block, x · (1/absmax) in float32 (bitsandbytes
multiplies by the reciprocal) clamped to [−1, 1], nearest code with an exact midpoint going to the lower code, two
codes per byte with the first element in the high nibble; double quantisation with offset = mean(absmax) and the signed
8-bit dynamic map over blocks of 256. When ``bitsandbytes`` imports (CPU is enough) its own ``quantize_4bit`` output
is compared too: packed bytes and absmax bit-exactly. Two documented, value-level differences are asserted precisely
rather than ignored: the fp32 mean for the offset (torch's reduction order vs jgoat's fixed pairwise tree: ≤ 2 ulp)
and bitsandbytes' CPU 8-bit quantiser, which looks codes up in a 65536-entry table and is then not always the nearest
code (jgoat's code is never farther than bitsandbytes').
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from toys import ScannedMLP, low_rank_teacher

import jgoat
from jgoat import quant
from jgoat.core import get_at

# METHODS.md, "QLoRA's NF4": the 16 code values.
NF4_METHODS = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
               -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
               0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
               0.7229568362236023, 1.0]


def reference_dynamic_map_torch():
    """bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8), verbatim with torch."""
    torch = pytest.importorskip("torch")
    data = []
    for i in range(7):
        fraction_items = int(2 ** (i + 7 - 7) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(7 - 1) + i)) * means).tolist()
        data += (-(10 ** (-(7 - 1) + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    data.sort()
    return np.asarray(torch.tensor(data, dtype=torch.float32).numpy())


def ref_blockwise(x, block, code):
    """Nearest-code blockwise absmax quantisation of a flat float32 array (METHODS.md), numpy, no searchsorted."""
    code = np.asarray(code, np.float32)
    n = x.size
    nb = -(-n // block)
    xb = np.zeros(nb * block, np.float32)
    xb[:n] = x
    xb = xb.reshape(nb, block)
    absmax = np.abs(xb).max(axis=1)
    with np.errstate(divide="ignore"):
        inv = np.where(absmax > 0, np.float32(1.0) / absmax, np.float32(0.0)).astype(np.float32)
    scaled = np.clip(xb * inv[:, None], -1.0, 1.0)
    mid = ((code[:-1] + code[1:]) / np.float32(2.0)).astype(np.float32)  # midpoints of neighbouring codes
    q = (scaled[..., None] > mid).sum(-1)  # strictly above a midpoint -> the upper code; on it -> the lower
    return q.reshape(-1)[:n].astype(np.uint8), absmax


def ref_quantize(kernel_IxO, double_quant):
    w = np.ascontiguousarray(np.asarray(kernel_IxO, np.float32).T).reshape(-1)  # torch layout, row-major
    q, absmax = ref_blockwise(w, 64, NF4_METHODS)
    if q.size % 2:
        q = np.append(q, np.uint8(7))  # bitsandbytes pads with 0.0, whose code is 7
    packed = (q[0::2] << 4) | q[1::2]
    if not double_quant:
        return packed, absmax, None, None
    offset = np.float32(np.mean(absmax, dtype=np.float64))
    q2, absmax2 = ref_blockwise((absmax - offset).astype(np.float32), 256, quant.DYNAMIC_MAP)
    return packed, q2, absmax2, offset


def ulps(a, b):
    return int(np.max(np.abs(np.asarray(a, np.float32).view(np.int32).astype(np.int64)
                             - np.asarray(b, np.float32).view(np.int32).astype(np.int64))))


SHAPES = [(257, 33), (64, 1000), (33, 31)]  # odd rows; a partial 256-block of statistics; odd n (partial 64-block)


def kernel_of(shape, seed=0, scale=0.02):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


# ---------------------------------------------------------------------------------------------------- codebooks
def test_codebooks():
    np.testing.assert_array_equal(quant.NF4_CODE, np.asarray(NF4_METHODS, np.float32))
    dyn = quant.create_dynamic_map(signed=True)
    np.testing.assert_array_equal(dyn, reference_dynamic_map_torch())  # bit-exact with torch's linspace
    assert dyn.shape == (256,) and len(np.unique(dyn)) == 256 and dyn[-1] == 1.0 and 0.0 in dyn
    assert np.all(np.diff(dyn) > 0) and dyn[0] == -dyn[-2]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_matches_reference(shape, double_quant):
    k = kernel_of(shape, seed=shape[0])
    node = quant.quantize(jnp.asarray(k), double_quant=double_quant)
    packed, absmax, absmax2, offset = ref_quantize(k, double_quant)
    assert node.codes.dtype == jnp.uint8 and node.codes.shape == (-(-k.size // 2),)
    np.testing.assert_array_equal(np.asarray(node.codes), packed)
    if not double_quant:
        np.testing.assert_array_equal(np.asarray(node.absmax), absmax)
        return
    assert ulps(node.offset, offset) <= 2  # pairwise fp32 mean vs the correctly rounded one
    ref_q2, ref_absmax2 = ref_blockwise((ref_quantize(k, False)[1] - np.asarray(node.offset)).astype(np.float32),
                                        256, quant.DYNAMIC_MAP)  # same offset: then every bit must agree
    np.testing.assert_array_equal(np.asarray(node.absmax), ref_q2)
    np.testing.assert_array_equal(np.asarray(node.absmax2), ref_absmax2)


def test_midpoint_goes_to_the_lower_code():
    bounds = quant.NF4_BOUNDS
    # absmax 1 exactly (a 1.0 in the block), so x · (1/absmax) = x: each value sits exactly on a midpoint.
    on = np.concatenate([[1.0], bounds, np.nextafter(bounds, np.float32(2)), np.zeros(64 - 1 - 2 * 15)])
    k = on.astype(np.float32).reshape(64, 1)  # [in=64, out=1]: torch layout is the same flat order
    codes = np.asarray(quant.quantize(jnp.asarray(k), double_quant=False).codes)
    q = np.stack([codes >> 4, codes & 15], -1).reshape(-1)
    assert q[0] == 15
    np.testing.assert_array_equal(q[1:16], np.arange(15))  # on the midpoint between i and i+1 -> i
    np.testing.assert_array_equal(q[16:31], np.arange(1, 16))  # one ulp above -> i + 1
    np.testing.assert_array_equal(q[31:], 7)  # zeros
    assert np.all(bounds == ((quant.NF4_CODE[:-1] + quant.NF4_CODE[1:]) / np.float32(2)))


def test_dequantisation_error_within_the_nf4_bound():
    k = kernel_of((256, 192), seed=3)
    k[:, 5] *= 40.0  # outliers: blocks with very different absmax
    w = k.T.reshape(-1, 64)  # torch layout blocks
    absmax = np.abs(w).max(1, keepdims=True)
    half_gap = np.max(np.diff(quant.NF4_CODE)) / 2  # (1 − 0.7229568) / 2
    dyn_half_gap = np.max(np.diff(quant.DYNAMIC_MAP)) / 2
    for double_quant in (False, True):
        node = quant.quantize(jnp.asarray(k), double_quant=double_quant)
        deq = np.asarray(jgoat.dequantize(node))
        assert deq.shape == k.shape and deq.dtype == np.float32
        err = np.abs(deq.T.reshape(-1, 64) - w)
        absmax_err = np.abs(np.asarray(quant.dequantize_absmax(node))[:, None] - absmax)
        bound = absmax * half_gap + absmax_err + 1e-6 * absmax
        assert np.all(err <= bound)
        if double_quant:  # the 8-bit statistics: at most half a dynamic-map step of the 256-block's range
            absmax2 = np.repeat(np.asarray(node.absmax2), 256)[: absmax.shape[0], None]
            assert np.all(absmax_err <= absmax2 * dyn_half_gap + 1e-7 * absmax)
            assert 0 < absmax_err.max() < 0.01 * absmax.max()
        else:
            assert absmax_err.max() == 0
        np.testing.assert_array_equal(quant.dequantize_torch(node), deq.T)


def test_storage_is_4_127_bits_per_weight():
    node = jax.eval_shape(quant.quantize, jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16))
    bits = 8 * node.nbytes / (4096 * 4096)
    assert abs(bits - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-4  # 0.127 bit/param of statistics
    plain = jax.eval_shape(functools.partial(quant.quantize, double_quant=False),
                           jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16))
    assert abs(8 * plain.nbytes / 4096**2 - 4.5) < 1e-6
    assert node.shape == (4096, 4096) and node.dtype == jnp.bfloat16


# ---------------------------------------------------------------------------------------------- bitsandbytes
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2]])
def test_bitsandbytes_bit_exact(shape):
    torch = pytest.importorskip("torch")
    try:
        import bitsandbytes.functional as bnbf

        bnbf.quantize_4bit(torch.zeros(64, 64), quant_type="nf4")
    except Exception as e:  # not installed, or no usable backend on this machine
        pytest.skip(f"bitsandbytes unavailable: {e!r}")
    k = kernel_of(shape, seed=shape[0] + 1)
    t = torch.from_numpy(np.ascontiguousarray(k.T))  # torch Linear weight [out, in]
    np.testing.assert_array_equal(quant.create_dynamic_map(), bnbf.create_dynamic_map(signed=True).numpy())
    np.testing.assert_array_equal(quant.NF4_CODE, bnbf.get_4bit_type("nf4", device="cpu").numpy())

    packed, state = bnbf.quantize_4bit(t, quant_type="nf4", compress_statistics=False, blocksize=64)
    node = quant.quantize(jnp.asarray(k), double_quant=False)
    np.testing.assert_array_equal(np.asarray(node.codes), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(node.absmax), state.absmax.numpy())
    np.testing.assert_array_equal(np.asarray(jgoat.dequantize(node)), bnbf.dequantize_4bit(packed, state).numpy().T)

    packed, state = bnbf.quantize_4bit(t, quant_type="nf4", compress_statistics=True, blocksize=64)
    node = quant.quantize(jnp.asarray(k), double_quant=True)
    np.testing.assert_array_equal(np.asarray(node.codes), packed.numpy().reshape(-1))
    assert state.state2.blocksize == 256 and state.absmax.dtype == torch.uint8
    assert ulps(node.offset, state.offset.numpy()) <= 2
    np.testing.assert_allclose(np.asarray(node.absmax2), state.state2.absmax.numpy(), rtol=1e-6)
    # 8-bit codes of the statistics: jgoat's is the nearest code; where bitsandbytes' table picks another one, it is
    # never nearer (ties within a float32 rounding of the 1-ulp offset difference allowed).
    ours, theirs = np.asarray(node.absmax).astype(int), state.absmax.numpy().astype(int)
    x = ref_quantize(k, False)[1] - np.asarray(node.offset)
    x = x / np.repeat(np.asarray(node.absmax2), 256)[: x.shape[0]]
    dyn = quant.DYNAMIC_MAP.astype(np.float64)
    assert np.all(np.abs(x - dyn[ours]) <= np.abs(x - dyn[theirs]) + 1e-6)
    assert np.mean(ours != theirs) < 0.02
    # where the statistics' codes differ, by at most one dynamic-map step of absmax2 (times |NF4 code| <= 1)
    step = np.max(np.diff(quant.DYNAMIC_MAP)) * np.max(np.asarray(node.absmax2))
    deq = np.asarray(jgoat.dequantize(node))
    np.testing.assert_allclose(deq, bnbf.dequantize_4bit(packed, state).numpy().T, rtol=0, atol=1.001 * step)


# ---------------------------------------------------------------------------------------------------- models
D, H, L = 32, 64, 3


def Net():
    return ScannedMLP(width=D, hidden=H, layers=L)


class Heads(nn.Module):
    """DenseGeneral over 2 input dims and an Einsum, as attention projections are often written."""

    @nn.compact
    def __call__(self, x):
        h = nn.DenseGeneral((4, 8), name="qkv")(x)  # [B, T, 4, 8]
        y = nn.DenseGeneral(D, axis=(-2, -1), name="out")(jax.nn.gelu(h))
        return nn.Einsum((D, D), "btd,de->bte", name="mix")(y)


MODEL = Net()


@jax.jit
def _toy_arrays():
    k = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(k[0], (8, 8, D))
    base = MODEL.init(k[1], x)["params"]
    teacher = low_rank_teacher(base, (k[2], k[3]), rank=4, strength=0.5)
    return x, base, teacher


@functools.cache
def toy():
    """A base, its NF4 version and a teacher = base + a rank-4 change of every block kernel; MSE regression."""
    x, base, teacher = _toy_arrays()
    return x, base, jgoat.quantize_nf4(base), teacher


forward = jax.jit(lambda tree, x: jgoat.apply(MODEL.apply)({"params": tree}, x)[0])
plain_forward = jax.jit(lambda tree, x: MODEL.apply({"params": tree}, x))  # the unmodified model, no interceptor


def test_quantize_nf4_selects_all_linear_and_scan_slices_layers():
    x, base, q, _ = toy()
    for name in ("up", "down"):
        node = q["layers"][name]["kernel"]
        assert isinstance(node, jgoat.NF4Kernel) and node.shape == base["layers"][name]["kernel"].shape
        assert node.stack_shape == (L,) and node.codes.shape == (L, D * H // 2) and node.offset.shape == (L,)
        assert node.layout == jgoat.Layout(n_stack=1, n_in=1)
    # per layer (lax.map over the stack) = quantising that layer alone
    alone = quant.quantize(base["layers"]["up"]["kernel"][1])
    for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(jax.tree.map(lambda a: a[1], q["layers"]["up"]["kernel"])),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert not isinstance(q["head"]["kernel"], jgoat.NF4Kernel)  # output heads stay in full precision
    np.testing.assert_array_equal(q["layers"]["up"]["bias"], base["layers"]["up"]["bias"])
    with pytest.raises(ValueError, match="quantise the base first"):
        jgoat.quantize_nf4(jgoat.mark_trainable(base, ["head"]))
    with pytest.raises(ValueError, match="NF4-quantised kernel, which cannot be trained"):
        jgoat.mark_trainable(q, ["up"])


def test_quantised_without_adapter_equals_dequantised_model():
    x, _, q, _ = toy()
    np.testing.assert_array_equal(forward(q, x), plain_forward(jgoat.dequantize_tree(q), x))


def test_dense_general_and_einsum_on_nf4():
    model = Heads()
    x = jax.random.normal(jax.random.key(0), (2, 5, D))
    params = model.init(jax.random.key(1), x)["params"]
    layouts = jgoat.probe(model, params, x)
    q = jgoat.quantize_nf4(params, targets=["qkv", "out", "mix"], layouts=layouts)
    assert q["out"]["kernel"].layout == jgoat.Layout(n_stack=0, n_in=2)
    assert q["qkv"]["kernel"].shape == (D, 4, 8)
    run = jax.jit(lambda t: jgoat.apply(model.apply)({"params": t}, x)[0])
    for tree in (q, jgoat.wrap(q, jgoat.LoraConfig(rank=4, init="pissa"), key=jax.random.key(2))):
        np.testing.assert_array_equal(run(tree), run(jgoat.dequantize_tree(tree)))


CONFIGS = {
    "lora": jgoat.LoraConfig(rank=4, alpha=8),
    "pissa": jgoat.LoraConfig(rank=4, alpha=8, init="pissa"),
    "dora": jgoat.LoraConfig(rank=4, alpha=8, use_dora=True),
    "goat": jgoat.GoatConfig(rank=8, experts=4, top_k=2),
}


@pytest.mark.parametrize("name", ["pissa", "dora", "goat"])  # plain LoRA: the training test below
def test_adapters_on_nf4_equal_the_dequantised_model(name):
    x, _, q, _ = toy()
    cfg = CONFIGS[name]
    wrapped = jgoat.wrap(q, cfg, key=jax.random.key(1))
    # SVD inits (PiSSA, GOAT) and DoRA's magnitude read the dequantised kernel: same adapters as on the fp32 copy.
    on_dequantised = jgoat.wrap(jgoat.dequantize_tree(q), cfg, key=jax.random.key(1))
    for a, b in zip(jax.tree.leaves(jgoat.adapters(wrapped)), jax.tree.leaves(jgoat.adapters(on_dequantised)),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    # a non-zero adapter, so that the adapter path matters
    wrapped = jax.tree.map(lambda a: a, wrapped)
    for path, adapter in jgoat.adapters(wrapped):
        node = get_at(wrapped, path.split("/"))
        node["jgoat"] = adapter.replace(B=adapter.B + 0.05 * jax.random.normal(jax.random.key(7), adapter.B.shape))
    out = forward(wrapped, x)
    np.testing.assert_array_equal(out, forward(jgoat.dequantize_tree(wrapped), x))
    assert not np.allclose(out, forward(q, x), atol=1e-3)


@functools.cache
def train(cfg, steps=50, lr=1e-2):
    x, _, q, teacher = toy()
    wrapped = jgoat.wrap(q, cfg, key=jax.random.key(1))
    trainable, frozen = jgoat.split(wrapped)
    tx = optax.adam(lr)
    state = jgoat.TrainState.create(trainable, tx)

    def loss_fn(params, batch, rng):
        xb, yb = batch
        out, aux = jgoat.apply(MODEL.apply)({"params": params}, xb)
        return jnp.mean((out - yb) ** 2), aux

    step = jax.jit(functools.partial(jgoat.train_step, loss_fn=loss_fn, tx=tx))
    keys = jax.random.split(jax.random.key(5), steps + 1)
    teach = functools.partial(plain_forward, teacher)
    for i in range(steps):
        xb = jax.random.normal(keys[i], (16, 8, D))
        state, _ = step(state, frozen, (xb, teach(xb)), keys[i])
    x_eval = jax.random.normal(keys[-1], (64, 8, D))
    y_eval = teach(x_eval)
    trained = jgoat.combine(state.trainable, frozen)
    return (float(jnp.mean((forward(trained, x_eval) - y_eval) ** 2)),
            float(jnp.mean((forward(q, x_eval) - y_eval) ** 2)), wrapped, trained)


@pytest.mark.parametrize("name", ["lora", "goat"])
def test_training_on_nf4_beats_the_frozen_quantised_base(name):
    x, _, q, _ = toy()
    trained_loss, frozen_loss, wrapped, trained = train(CONFIGS[name])
    assert trained_loss < 0.5 * frozen_loss
    if name == "lora":  # trained (non-zero) LoRA on NF4 = the same adapters on the dequantised base, exactly
        np.testing.assert_array_equal(forward(trained, x), forward(jgoat.dequantize_tree(trained), x))
    assert "base" in jgoat.summary(wrapped)
    # only adapters changed; the NF4 leaves are the same arrays
    for (pa, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(wrapped)[0],
                               jax.tree_util.tree_flatten_with_path(trained)[0], strict=True):
        if "jgoat" not in jax.tree_util.keystr(pa):
            assert a is b
    # the differentiated half is the adapters only (the frozen half holds every NF4 leaf), and all of it trained
    trainable, frozen = jgoat.split(wrapped)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(trainable)[0]]
    assert paths and all("jgoat" in p for p in paths)
    for before, after in zip(jax.tree.leaves(trainable), jax.tree.leaves(jgoat.split(trained)[0]), strict=True):
        assert np.all(np.isfinite(after)) and not np.array_equal(before, after)
    nf4_leaves = [x for x in jax.tree.leaves(frozen) if x.dtype == jnp.uint8]
    assert len(nf4_leaves) == 4  # codes and 8-bit absmax of up and down


def test_scanned_stack_dequantises_one_layer_at_a_time():
    """XLA's memory plan of a train step: temporaries far below the full fp32 weight size (16 layers)."""
    n_layers, width, hidden = 16, 128, 512

    class Wide(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return x + nn.Dense(width, name="down")(jax.nn.gelu(nn.Dense(hidden, name="up")(x))), None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(nn.remat(Wide), variable_axes={"params": 0, "jgoat_aux": 0}, split_rngs={"params": True},
                           length=n_layers)
            return scan(name="layers")(x, None)[0]

    model, x = Stack(), jax.ShapeDtypeStruct((2, 4, width), jnp.float32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape))["params"])
    full_fp32 = n_layers * 2 * width * hidden * 4
    tx = optax.adam(1e-3)

    def plan(params):
        wrapped = jax.eval_shape(lambda p: jgoat.wrap(p, jgoat.LoraConfig(rank=4), key=jax.random.key(1)), params)
        trainable, frozen = jgoat.split(wrapped)
        state = jax.eval_shape(functools.partial(jgoat.TrainState.create, tx=tx), trainable)

        def loss_fn(p, batch, rng):
            out, aux = jgoat.apply(model.apply)({"params": p}, batch)
            return jnp.mean(out**2), aux

        step = jax.jit(functools.partial(jgoat.train_step, loss_fn=loss_fn, tx=tx))
        return step.lower(state, frozen, x, jax.ShapeDtypeStruct((2,), jnp.uint32)).compile().memory_analysis()

    nf4 = plan(jax.eval_shape(jgoat.quantize_nf4, params))
    assert nf4.temp_size_in_bytes < 0.25 * full_fp32  # ~2 layers' fp32 kernels, never all 16
    assert nf4.argument_size_in_bytes < 0.3 * full_fp32  # the base is held as 4.1 bits per weight


def test_merge_raises_and_dequantised_merge_works():
    x, _, q, _ = toy()
    wrapped = jgoat.wrap(q, CONFIGS["lora"], key=jax.random.key(1))
    with pytest.raises(ValueError, match=r"NF4.*inexact.*dequantize_tree"):
        jgoat.merge(wrapped)
    merged = jgoat.merge(jgoat.dequantize_tree(wrapped))
    np.testing.assert_allclose(plain_forward(merged, x), forward(wrapped, x), atol=1e-5)


def test_checkpoint_round_trip_on_nf4_base(tmp_path):
    _, base, q, _ = toy()
    _, _, wrapped, trained = train(CONFIGS["lora"])
    fp = jgoat.fingerprint(q)
    assert fp == jgoat.fingerprint(trained) == jgoat.fingerprint(jgoat.quantize_nf4(base))  # deterministic
    assert fp != jgoat.fingerprint(jgoat.dequantize_tree(q))
    assert fp != jgoat.fingerprint(jgoat.quantize_nf4(base, double_quant=False))
    jgoat.save(tmp_path / "ckpt", trained, step=50)
    restored, _, record = jgoat.restore(tmp_path / "ckpt", wrapped)
    assert record["step"] == 50
    for a, b in zip(jax.tree.leaves(jgoat.adapter_leaves(restored)), jax.tree.leaves(jgoat.adapter_leaves(trained)),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    other = jgoat.wrap(jgoat.quantize_nf4(base, double_quant=False), CONFIGS["lora"], key=jax.random.key(1))
    with pytest.raises(ValueError, match="different base"):
        jgoat.restore(tmp_path / "ckpt", other)


def test_bf16_base_dequantises_in_the_stored_dtype():
    x, base, _, _ = toy()
    q = jgoat.quantize_nf4(jax.tree.map(lambda a: a.astype(jnp.bfloat16), base))
    node = q["layers"]["up"]["kernel"]
    assert node.dtype == jnp.bfloat16 and jgoat.dequantize(node).dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(jgoat.dequantize(node, jnp.float32).astype(jnp.bfloat16), np.float32),
        np.asarray(jgoat.dequantize(node), np.float32))
    out = forward(q, x)
    np.testing.assert_array_equal(out, plain_forward(jgoat.dequantize_tree(q), x))
