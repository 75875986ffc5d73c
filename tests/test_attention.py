"""jgoat.models.attention (jax.nn.dot_product_attention) equals the einsum attention the models used before, under
every mask kind the models build, in float32.

Tolerance: both paths accumulate q·k in float32 and take a float32 softmax, but XLA may order the reductions
differently (the fused path scales inside a vmapped core), so they agree to float32 rounding, not bit for bit:
1e-6 relative to the output's scale (|out| <= max |v| ~ 3 here, so a few float32 ulps of the largest value).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jgoat.models.attention import check_attention_impl, dot_product_attention, resolve_attention_impl
from jgoat.models.bert import BertConfig
from jgoat.models.llama import LlamaConfig
from jgoat.models.vit import ViTConfig

B, T, N, K, H = 3, 9, 4, 2, 8  # GQA: 2 query heads per key/value head
RTOL = 1e-6


def reference_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, keep_Bx1xTxS, bias_Bx1xTxS=None):
    """The models' attention before jax.nn.dot_product_attention (llama/modules.py at a1cddb5): fp32 scores,
    ``where(keep, s, finfo.min)``, fp32 softmax, probabilities in the compute dtype."""
    Bq, Tq, Nq, Hq = q_BxTxNxH.shape
    Kk = k_BxSxKxH.shape[2]
    q_BxTxKxGxH = q_BxTxNxH.reshape(Bq, Tq, Kk, Nq // Kk, Hq)
    scores = jnp.einsum("btkgh,bskh->bkgts", q_BxTxKxGxH, k_BxSxKxH, preferred_element_type=jnp.float32)
    scores = scores.astype(jnp.float32) * (Hq**-0.5)
    if bias_Bx1xTxS is not None:
        scores = scores + bias_Bx1xTxS[:, :, None].astype(jnp.float32)
    if keep_Bx1xTxS is not None:
        scores = jnp.where(keep_Bx1xTxS[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q_BxTxNxH.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v_BxSxKxH).reshape(Bq, Tq, Nq, Hq)


def _qkv(S, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (B, T, N, H)) * 2, jax.random.normal(kk, (B, S, K, H)) * 2,
            jax.random.normal(kv, (B, S, K, H)))


def _padding(lengths, S, side):
    cols = np.arange(S)[None, :]
    L = np.asarray(lengths)[:, None]
    return jnp.asarray(cols < L if side == "right" else cols >= S - L)


def _mask(kind):
    """``keep [B, 1, T, S]`` as LlamaModel / LlamaAttention build it for each kind, and S."""
    causal_TxS = np.arange(T)[None, :] <= np.arange(T)[:, None]
    if kind == "none":
        return None, T
    if kind == "causal":
        return jnp.broadcast_to(jnp.asarray(causal_TxS), (B, 1, T, T)), T
    if kind in ("left", "right"):  # causal & key padding (fully masked query rows included, as left padding gives)
        pad_BxS = _padding([9, 5, 2], T, kind)
        return (jnp.asarray(causal_TxS)[None] & pad_BxS[:, None, :])[:, None], T
    if kind == "window":  # causal within the last W keys (a sliding window)
        W = 3
        window_TxS = causal_TxS & (np.arange(T)[None, :] > np.arange(T)[:, None] - W)
        return jnp.broadcast_to(jnp.asarray(window_TxS), (B, 1, T, T)), T
    if kind == "prefix":  # P prefix keys always kept, then causal & left padding
        P = 4
        keep = (jnp.asarray(causal_TxS)[None] & _padding([9, 5, 2], T, "left")[:, None, :])[:, None]
        return jnp.concatenate([jnp.ones((B, 1, T, P), bool), keep], axis=-1), T + P
    if kind == "decode":  # one new token at cache slot 6 of a 12-slot cache, left-padded prompts
        S = 12
        keep_BxS = _padding([7, 4, 1], 7, "left")
        keep_BxS = jnp.concatenate([keep_BxS, jnp.ones((B, 5), bool)], axis=1) & (jnp.arange(S) <= 6)[None]
        return jnp.broadcast_to(keep_BxS[:, None, None, :], (B, 1, T, S)), S
    raise ValueError(kind)


def _close(actual, expected):
    scale = float(jnp.max(jnp.abs(expected)))
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=0, atol=RTOL * scale)


@pytest.mark.parametrize("kind", ["none", "causal", "left", "right", "window", "prefix", "decode"])
@pytest.mark.parametrize("jit", [False, True])
def test_equals_the_einsum_path_under_every_mask(kind, jit):
    keep, S = _mask(kind)
    q, k, v = _qkv(S)
    new = functools.partial(dot_product_attention, dtype=jnp.float32, impl="xla")
    if jit:
        new = jax.jit(new)
    _close(new(q, k, v, keep), reference_attention(q, k, v, keep))


@pytest.mark.parametrize("kind", ["causal", "prefix"])
def test_gradients_equal_the_einsum_path(kind):
    keep, S = _mask(kind)
    q, k, v = _qkv(S, seed=1)
    w = jax.random.normal(jax.random.key(2), (B, T, N, H))

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v, keep) * w)

    new = functools.partial(dot_product_attention, dtype=jnp.float32)
    g_new = jax.jit(jax.grad(functools.partial(loss, new), argnums=(0, 1, 2)))(q, k, v)
    g_ref = jax.grad(functools.partial(loss, reference_attention), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_new, g_ref, strict=True):
        _close(a, b)


def test_bert_bias_and_the_explicit_dropout_path():
    """BERT's additive padding bias; the explicit path (taken with attention dropout) with an identity dropout is
    the fused one."""
    q, k, v = (x[:, :, :, :] for x in _qkv(T))
    k, v = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)  # BERT: K == N
    pad_BxS = _padding([9, 5, 2], T, "right")
    bias = jnp.where(pad_BxS, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
    ref = reference_attention(q, k, v, None, bias)
    _close(dot_product_attention(q, k, v, None, bias_Bx1xTxS=bias, dtype=jnp.float32), ref)
    _close(dot_product_attention(q, k, v, None, bias_Bx1xTxS=bias, dtype=jnp.float32, dropout=lambda p: p), ref)
    keep, S = _mask("left")
    q, k, v = _qkv(S)
    _close(dot_product_attention(q, k, v, keep, dtype=jnp.float32, dropout=lambda p: p),
           reference_attention(q, k, v, keep))


def test_implementation_choice_and_errors():
    assert resolve_attention_impl("cudnn", jnp.float32, 64) == "cudnn"  # an explicit choice is kept
    auto = resolve_attention_impl(None, jnp.bfloat16, 64)
    assert auto == ("cudnn" if jax.default_backend() == "gpu" else "xla")
    assert resolve_attention_impl(None, jnp.float32, 64) == "xla"
    assert resolve_attention_impl(None, jnp.bfloat16, 256) == "xla"  # head size cuDNN does not take
    check_attention_impl(None)
    for make in (lambda i: LlamaConfig(attention_impl=i), lambda i: BertConfig(attention_impl=i),
                 lambda i: ViTConfig(attention_impl=i)):
        assert make("xla").attention_impl == "xla"
        with pytest.raises(ValueError, match=r"attention_impl must be None \(auto\) or one of xla, cudnn, got 'flash'"):
            make("flash")
    # An HF config.json cannot pick the kernel (it is a jgoat runtime choice): only overrides set it.
    assert LlamaConfig.from_hf_dict({"attention_impl": "cudnn"}).attention_impl is None
    assert LlamaConfig.from_hf_dict({}, attention_impl="xla").attention_impl == "xla"


def _model_outputs(monkeypatch, attention_fn, run):
    monkeypatch.setattr("jgoat.models.attention.dot_product_attention", attention_fn)
    return run()


def _reference_with_signature(q, k, v, keep, *, bias_Bx1xTxS=None, dtype, impl=None, dropout=None):
    del impl, dropout  # deterministic models only
    _reference_with_signature.calls += 1
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    return reference_attention(q, k, v, keep, bias_Bx1xTxS)


def test_models_equal_the_einsum_path(monkeypatch):
    """Whole models (not jitted, so the patched function is traced): Llama with GQA, left and right padding, a
    prefix (prefix tuning) and a KV-cache decode step; BERT with padding; ViT."""
    import jgoat
    from jgoat.models.bert import BertForSequenceClassification
    from jgoat.models.llama import LlamaForCausalLM, init_cache
    from jgoat.models.vit import ViTForImageClassification

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)
    llama = LlamaForCausalLM(cfg)
    ids = jax.random.randint(jax.random.key(0), (B, T), 0, cfg.vocab_size)
    params = llama.init(jax.random.key(1), ids)["params"]
    prefixed = jgoat.add_prefix(params, cfg, jgoat.PrefixTuningConfig(3), key=jax.random.key(2))
    left, right = (_padding([9, 5, 2], T, side).astype(jnp.int32) for side in ("left", "right"))

    def run_llama():
        outs = [llama.apply({"params": p}, ids, m).logits for p in (params, prefixed) for m in (left, right)]
        cache = init_cache(llama, B, T + 2)
        mask_S = jnp.concatenate([left, jnp.ones((B, 2), jnp.int32)], axis=1)
        _, state = llama.apply({"params": prefixed, "cache": cache}, ids, mask_S, decode=True, mutable=["cache"])
        step = llama.apply({"params": prefixed, "cache": state["cache"]}, ids[:, :1], mask_S, decode=True,
                           mutable=["cache"])[0].logits
        return [*outs, step]

    bcfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                      max_position_embeddings=16)
    bert = BertForSequenceClassification(bcfg)
    bparams = bert.init(jax.random.key(3), ids)["params"]
    vcfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=8,
                     patch_size=4)
    vit = ViTForImageClassification(vcfg)
    pixels = jax.random.normal(jax.random.key(4), (2, 8, 8, 3))
    vparams = vit.init(jax.random.key(5), pixels)["params"]

    def run_all():
        return [*run_llama(), bert.apply({"params": bparams}, ids, right), vit.apply({"params": vparams}, pixels)]

    new = run_all()
    _reference_with_signature.calls = 0
    old = _model_outputs(monkeypatch, _reference_with_signature, run_all)
    # The models did run the reference: Llama (scanned) at least once per apply (6), BERT and ViT once per layer.
    assert _reference_with_signature.calls >= 6 + 2 + 2
    for a, b in zip(new, old, strict=True):
        _close(a, b)
