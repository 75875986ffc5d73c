"""estimate_llama_training: abstract compile of a real train step; counts checked against the shapes by hand."""

import jax.numpy as jnp

import jgoat
from jgoat.memory import estimate_llama_training
from jgoat.models.llama import LlamaConfig

TINY = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   remat_policy="full")


def test_goat_estimate_counts_and_memory():
    goat = estimate_llama_training(TINY, jgoat.GoatConfig(rank=8, experts=4, top_k=2, targets=["q_proj", "up_proj"]),
                                   batch_size=2, seq_len=16)
    # Per layer: q_proj 64->64 and up_proj 64->96, each A [E, in, d] + B [E, d, out] + router [in, E], d = 2.
    per_layer = (4 * 64 * 2 + 4 * 2 * 64 + 64 * 4) + (4 * 64 * 2 + 4 * 2 * 96 + 64 * 4)
    assert goat.trainable_params == 2 * per_layer
    full = estimate_llama_training(TINY, None, batch_size=2, seq_len=16)
    base = 128 * 64 * 2 + 64 + 2 * (4 * 64 * 64 + 3 * 64 * 96 + 2 * 64)  # embed, lm_head, norm, 2 layers
    assert full.trainable_params == full.total_params == base
    # fp32 params are arguments: full FT carries params + two Adam moments (3x), GOAT only the params (+ adapters).
    assert full.argument_bytes >= 3 * 4 * base
    assert goat.argument_bytes < 2 * 4 * base
    assert goat.peak_bytes > goat.argument_bytes and goat.flops > 0


def test_bf16_params_halve_the_weight_arguments():
    lora = jgoat.LoraConfig(rank=4, targets=["q_proj"])
    fp32 = estimate_llama_training(TINY, lora, batch_size=1, seq_len=8)
    bf16 = estimate_llama_training(LlamaConfig(**{**TINY.__dict__, "dtype": jnp.bfloat16,
                                                  "param_dtype": jnp.bfloat16}), lora, batch_size=1, seq_len=8)
    assert bf16.argument_bytes < 0.6 * fp32.argument_bytes
