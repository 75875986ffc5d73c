"""jgoat on a legacy ``transformers<5`` Flax model: ``wrap`` + ``apply`` work on ``FlaxBertModel``'s params.

transformers 5 removed its Flax models, so this module skips there; it runs where transformers 4.x (with flax) is
installed. Loading ``flax_model.msgpack`` checkpoints into jgoat's own models needs no transformers Flax class and
is tested in ``test_io.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
modeling_flax_bert = pytest.importorskip(
    "transformers.models.bert.modeling_flax_bert", reason="transformers>=5 has no Flax models (FlaxBertModel)"
)

import jgoat  # noqa: E402  (after the importorskip guards)


@pytest.fixture(autouse=True)
def _allow_rank_promotion():
    """HF's Flax code broadcasts implicitly; conftest makes that an error for jgoat's own code."""
    with jax.numpy_rank_promotion("allow"):
        yield


def test_lora_on_flax_bert_model():
    config = transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
    )
    model = modeling_flax_bert.FlaxBertModel(config, seed=0)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 99, size=(2, 7)), jnp.int32)
    mask = jnp.ones_like(ids).at[1, 4:].set(0)
    inputs = dict(
        input_ids=ids,
        attention_mask=mask,
        token_type_ids=jnp.zeros_like(ids),
        position_ids=jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape),
        head_mask=jnp.ones((config.num_hidden_layers, config.num_attention_heads)),
    )
    base = model(ids, attention_mask=mask).last_hidden_state

    wrapped = jgoat.wrap(model.params, jgoat.LoraConfig(rank=4, targets=["query", "value"]), key=jax.random.key(0))
    paths = [p for p, _ in jgoat.adapters(wrapped)]
    assert len(paths) == 4 and all(p.endswith(("query", "value")) for p in paths)

    def run(params):
        return jgoat.apply(model.module.apply)({"params": params}, **inputs)[0].last_hidden_state

    np.testing.assert_allclose(run(wrapped), base, atol=1e-6, rtol=0)  # B = 0 at init: outputs unchanged

    live = jax.tree.map(
        lambda x: x.replace(B=0.3 * jnp.ones_like(x.B)) if isinstance(x, jgoat.LoraAdapter) else x,
        wrapped,
        is_leaf=lambda x: isinstance(x, jgoat.LoraAdapter),
    )
    out = run(live)
    assert float(jnp.abs(out - base).max()) > 1e-2
    merged = model(ids, attention_mask=mask, params=jgoat.merge(live)).last_hidden_state
    np.testing.assert_allclose(out, merged, atol=1e-5, rtol=0)


def _perturbed(params, seed):
    """Every leaf moved (random init leaves LayerNorm at identity and biases at zero, hiding swapped tensors)."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    moved = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, moved)


def test_flax_checkpoints_written_by_transformers_4_load_into_jgoat(tmp_path):
    """Real ``flax_model.msgpack`` files (FlaxBertForSequenceClassification / FlaxLlamaForCausalLM.save_pretrained)
    load into jgoat's models with the same outputs (test_io.py checks the same names against a hand-built file)."""
    from jgoat.models import from_pretrained

    modeling_flax_llama = pytest.importorskip("transformers.models.llama.modeling_flax_llama")
    ids = jnp.asarray(np.random.default_rng(1).integers(3, 99, size=(2, 7)), jnp.int32)
    mask = jnp.ones_like(ids)

    bert_config = transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, num_labels=3
    )
    bert = modeling_flax_bert.FlaxBertForSequenceClassification(bert_config, seed=0)
    bert.params = _perturbed(bert.params, 0)
    bert.save_pretrained(tmp_path / "bert")
    assert (tmp_path / "bert" / "flax_model.msgpack").is_file()
    model, params, _ = from_pretrained(tmp_path / "bert")
    np.testing.assert_allclose(model.apply({"params": params}, ids, mask), bert(ids, mask).logits, atol=1e-5, rtol=0)

    llama_config = transformers.LlamaConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64,
    )
    llama = modeling_flax_llama.FlaxLlamaForCausalLM(llama_config, seed=0)
    llama.params = _perturbed(llama.params, 1)
    llama.save_pretrained(tmp_path / "llama")
    model, params, _ = from_pretrained(tmp_path / "llama")
    np.testing.assert_allclose(
        model.apply({"params": params}, ids, mask).logits, llama(ids, mask).logits, atol=1e-5, rtol=0
    )
