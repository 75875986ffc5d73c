"""jgoat on google-tunix's NNX Llama 3 (a tiny config built here): GOAT trains with nnx.Optimizer, the base stays
bit-identical, optimizer state exists for adapter leaves only; a LoRA-wrapped model survives a checkpoint round trip
and a PEFT export / import with equal outputs.

tunix pins safetensors < 0.8 (and so an older transformers) against the main lock, so it lives in its own
environment: ``bash scripts/setup.sh --tunix`` (requirements/lock-tunix.txt), then
``.venv-tunix/bin/python -m pytest tests/test_tunix.py``. In the main environment the module is skipped.

Tunix's attention projections are its own ``Einsum`` class holding the weight as ``w`` (not ``kernel``): one
``jgoat.nnx.register(llama3.Einsum, n_in=einsum_n_in, kernel="w")`` makes them targets like the MLP's ``nnx.Linear``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jgoat
import jgoat.nnx as jn
from jgoat.apply import einsum_n_in

llama3 = pytest.importorskip(
    "tunix.models.llama3.model",
    reason="google-tunix is not installed here: run `bash scripts/setup.sh --tunix`, then "
           "`.venv-tunix/bin/python -m pytest tests/test_tunix.py`")

CONFIG = llama3.ModelConfig(num_layers=2, vocab_size=64, embed_dim=32, hidden_dim=64, num_heads=4, head_dim=8,
                            num_kv_heads=2, rope_theta=10_000, norm_eps=1e-5)
MLP = ["gate_proj", "up_proj", "down_proj"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", *MLP]
jn.register(llama3.Einsum, n_in=einsum_n_in, kernel="w")
B, T = 4, 12


@pytest.fixture(autouse=True)
def _tunix_numerics():
    """tunix's own code broadcasts ranks implicitly (its attention mask); the suite's conftest forbids that."""
    with jax.numpy_rank_promotion("allow"):
        yield


def make_model(remat=llama3.RematConfig.NONE) -> nnx.Module:
    """tunix's Llama 3 with random weights (its MLP kernels start at zero, like an untrained checkpoint would not)."""
    model = llama3.Llama3(CONFIG if remat is llama3.RematConfig.NONE else
                          llama3.ModelConfig(**{**vars(CONFIG), "remat_config": remat}), rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [0.2 * jax.random.normal(k, x.shape, x.dtype)
                                                   for k, x in zip(keys, leaves, strict=True)]))
    return model


def batch():
    tokens = jax.random.randint(jax.random.key(2), (B, T), 0, CONFIG.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(T)[None], (B, T))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool))[None], (B, T, T))
    return tokens, positions, mask


def logits(model, tokens, positions, mask, **kwargs):
    """(logits [B, T, V], aux) of the wrapped model: tunix's __call__ returns (logits, cache)."""
    (out, _), aux = jn.apply(model, tokens, positions, None, mask, **kwargs)
    return out, aux


def test_goat_trains_tunix_llama():
    tokens, positions, mask = batch()
    model = make_model()
    base = {path: np.asarray(v) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    jn.wrap(model, jgoat.GoatConfig(rank=4, experts=4, top_k=2, targets=TARGETS), key=jax.random.key(3))
    assert sorted(p for p, _ in jgoat.adapters(jn.params(model))) == sorted(
        f"layers/{i}/{'mlp' if m in MLP else 'attn'}/{m}" for i in range(2) for m in TARGETS)
    adapters = jax.tree.leaves(nnx.state(model, jn.Adapter))
    assert len(adapters) == 2 * 7 * 3  # 2 layers x 7 projections x (A, B, router)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=jn.Adapter)
    mu = jax.tree.leaves(optimizer.opt_state[0].mu)
    assert len(mu) == len(adapters) and sum(x.size for x in mu) == sum(x.size for x in adapters)

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            out, aux = logits(model, tokens, positions, mask)
            ce = optax.softmax_cross_entropy_with_integer_labels(out[:, :-1], tokens[:, 1:]).mean()
            return ce + 1e-2 * aux, aux

        (loss, aux), grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, jn.Adapter), has_aux=True)(model)
        optimizer.update(model, grads)
        return loss, aux

    losses, auxes = zip(*[(float(a), float(b)) for a, b in (step(model, optimizer) for _ in range(20))], strict=True)
    assert all(a > 0.0 for a in auxes)  # GOAT's aux loss flows out without tunix's __call__ threading it
    assert losses[-1] < 0.9 * losses[0], losses
    after = {path: np.asarray(v) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) if "jgoat" not in path}
    assert sorted(after) == sorted(base)
    for path in base:
        np.testing.assert_array_equal(after[path], base[path])  # bit-identical base
    plain, _ = model(tokens, positions, None, mask)  # a plain call runs the adapters too
    np.testing.assert_array_equal(plain, logits(model, tokens, positions, mask)[0])


def test_remat_block_equals_plain():
    """tunix's RematConfig.BLOCK runs the MLP under nnx.remat: same logits and aux as without (same program up to
    the remat boundary; tolerance 1e-6 relative, fp32 re-association across the boundary)."""
    tokens, positions, mask = batch()
    cfg = jgoat.GoatConfig(rank=4, experts=4, top_k=2, targets=TARGETS)
    outs = []
    for remat in (llama3.RematConfig.NONE, llama3.RematConfig.BLOCK):
        model = jn.wrap(make_model(remat), cfg, key=jax.random.key(3))
        outs.append(nnx.jit(logits)(model, tokens, positions, mask))
    for got, want in zip(outs[1], outs[0], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * float(jnp.max(jnp.abs(want))))


def test_lora_checkpoint_and_peft_round_trip(tmp_path):
    tokens, positions, mask = batch()
    cfg = jgoat.LoraConfig(rank=4, alpha=8.0, targets=TARGETS)
    model = jn.wrap(make_model(), cfg, key=jax.random.key(3))
    state = nnx.state(model, jn.Adapter)  # B starts at zero: move every adapter off its init
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(4), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape)
                                                   for k, x in zip(keys, leaves, strict=True)]))
    want, _ = logits(model, tokens, positions, mask)
    assert float(jnp.max(jnp.abs(want - make_model()(tokens, positions, None, mask)[0]))) > 1e-2

    jn.save(tmp_path / "ckpt", model, step=7)
    restored = jn.wrap(make_model(), cfg, key=jax.random.key(9))
    record = jn.restore(tmp_path / "ckpt", restored)
    assert record["step"] == 7
    np.testing.assert_array_equal(logits(restored, tokens, positions, mask)[0], want)

    jgoat.export_peft(jn.params(model), cfg, tmp_path / "peft")
    fresh = make_model()
    jn.update(fresh, jgoat.import_peft(jn.params(fresh), tmp_path / "peft", layouts=jn.layouts(fresh)))  # [D, N, H]
    np.testing.assert_array_equal(logits(fresh, tokens, positions, mask)[0], want)
    other = llama3.Llama3(CONFIG, rngs=nnx.Rngs(5))  # another base: the checkpoint is refused
    with pytest.raises(ValueError, match="different base model"):
        jn.restore(tmp_path / "ckpt", jn.wrap(other, cfg, key=jax.random.key(9)))
