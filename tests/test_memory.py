"""estimate_llama_training: abstract compile of a real train step; counts checked against the shapes by hand."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgoat
from jgoat.memory import estimate_llama_training
from jgoat.models.llama import LlamaConfig, LlamaMLP, LlamaMoeMLP

TINY = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   remat_policy="full")
EXPERT_KERNELS = ("gate_proj", "up_proj", "down_proj")


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


MOE = LlamaConfig(**{**TINY.__dict__, "moe_experts": 4, "moe_top_k": 2})


def moe_gates(x_TxD, router_DxE, k):
    """Float64 router: softmax, keep the top k, renormalise (dense [T, E])."""
    logits = np.asarray(x_TxD, np.float64) @ np.asarray(router_DxE, np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    keep = p >= -np.sort(-p, axis=-1)[:, k - 1:k]
    return np.where(keep, p, 0.0) / np.where(keep, p, 0.0).sum(-1, keepdims=True)


def test_moe_mlp_upcycled_from_the_dense_mlp_gives_the_dense_output():
    x = jax.random.normal(jax.random.key(0), (2, 5, TINY.hidden_size), jnp.float32)
    dense = LlamaMLP(TINY).init(jax.random.key(1), x)["params"]
    moe = LlamaMoeMLP(MOE).init(jax.random.key(2), x)["params"]
    experts = {name: jnp.broadcast_to(dense[name]["kernel"], moe[name].shape) for name in EXPERT_KERNELS}
    y_dense = LlamaMLP(TINY).apply({"params": dense}, x)
    y_moe = LlamaMoeMLP(MOE).apply({"params": {**moe, **experts}}, x)
    np.testing.assert_allclose(y_moe, y_dense, rtol=1e-5, atol=1e-7)
    # Expert e's output scaled by c_e: the output is (Σ_e g_e c_e) · dense, g the top-2 renormalised router weights.
    c_E = np.array([1.0, 2.0, 3.0, 5.0], np.float32)
    scaled = {**experts, "down_proj": experts["down_proj"] * c_E[:, None, None]}
    y_scaled = LlamaMoeMLP(MOE).apply({"params": {**moe, **scaled}}, x)
    gain_T = moe_gates(x.reshape(-1, TINY.hidden_size), moe["router"], 2) @ c_E
    np.testing.assert_allclose(y_scaled.reshape(-1, TINY.hidden_size), gain_T[:, None] * y_dense.reshape(10, -1),
                               rtol=1e-5, atol=1e-6)
    assert np.ptp(gain_T) > 0.1  # the tokens do not all pick the same experts


def test_moe_full_ft_plan_holds_params_and_adam_moments():
    moe = estimate_llama_training(MOE, None, batch_size=2, seq_len=16)
    dense = estimate_llama_training(TINY, None, batch_size=2, seq_len=16)
    per_layer_mlp = 3 * 64 * 96
    n = dense.total_params + 2 * (3 * per_layer_mlp + 64 * 4)  # 4 experts instead of 1, plus the [D, E] router
    assert moe.trainable_params == moe.total_params == n
    # fp32 params + AdamW mu + nu, the step and Adam counters (int32), ids/mask/labels [2, 16] int32 (jit drops the
    # unused dropout key).
    assert moe.argument_bytes == 3 * 4 * n + 2 * 4 + 3 * 2 * 16 * 4


def test_estimate_memory_command_plans_every_wrap_method(tmp_path, capsys):
    """`jgoat estimate-memory` on a config.json: the row printed is the Python function's estimate of the same step."""
    import json

    from jgoat import cli

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
                                  "num_hidden_layers": 2, "num_attention_heads": 4}))
    common = ["--config", str(config), "--rank", "4", "--batch-size", "1", "--seq-len", "8", "--dtype", "float32"]
    model_config = LlamaConfig.from_hf_dict(json.loads(config.read_text()), remat_policy="full")
    expected = {  # what the CLI must build: --targets default is every linear but lm_head; ia3 uses peft's Llama set
        "lora": jgoat.LoraConfig(rank=4, alpha=8.0),
        "ia3": jgoat.IA3Config(targets=("k_proj", "v_proj", "down_proj"), feedforward=("down_proj",)),
        "kasa": jgoat.KasaConfig(rank=4, alpha=8.0),
    }
    for method, cfg in expected.items():
        estimate = cli.estimate_memory(cli.build_parser().parse_args(["estimate-memory", "--method", method, *common]))
        want = estimate_llama_training(model_config, cfg, batch_size=1, seq_len=8)
        assert (estimate.trainable_params, estimate.argument_bytes) == (want.trainable_params, want.argument_bytes)
        assert f"| {method} | {want.trainable_params / 1e6:,.1f} M | {want.argument_bytes / 2**30:.2f} |" in \
            capsys.readouterr().out
    lora = cli.estimate_memory(cli.build_parser().parse_args(["estimate-memory", "--method", "lora", *common]))
    qlora = cli.estimate_memory(cli.build_parser().parse_args(["estimate-memory", "--method", "lora", "--quantize",
                                                               "nf4", *common]))
    assert qlora.trainable_params == lora.trainable_params and qlora.argument_bytes < lora.argument_bytes
    with pytest.raises(ValueError, match="needs an adapter"):
        cli.estimate_memory(cli.build_parser().parse_args(["estimate-memory", "--method", "full", "--quantize", "nf4",
                                                           *common]))


def test_an_absurd_config_is_refused_before_compiling(tmp_path):
    """hidden 4,096,000 × 100,000 layers: ~2^63 bytes, where XLA's CPU compiler aborts the process (rc 134)."""
    config = tmp_path / "absurd.json"
    config.write_text(json.dumps({"model_type": "llama", "hidden_size": 4_096_000, "intermediate_size": 11008,
                                  "num_hidden_layers": 100_000, "num_attention_heads": 32, "vocab_size": 32000}))
    proc = subprocess.run([sys.executable, "-m", "jgoat", "estimate-memory", "--config", str(config)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().count("\n") == 0 and "parameters" in proc.stderr and "PiB" in proc.stderr
