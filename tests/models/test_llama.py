"""Parity of jgoat's Llama / Mistral / Qwen2 decoders with transformers' PyTorch implementation.

Tiny random checkpoints are written by transformers (``save_pretrained``, safetensors) and loaded by jgoat's
``from_pretrained`` without torch; torch is only the reference (eval mode, fp32). Covered: logits and per-layer
hidden states (right and left padding), the -100-masked loss, greedy generation against ``generate(do_sample=False)``,
scan + remat gradients against the unrolled model, adapters on the scanned model, loading errors.
"""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jgoat  # noqa: E402  (after the importorskip guards)
from jgoat.models import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    causal_lm_loss,
    from_pretrained,
    generate,
    position_ids_from_mask,
    unstack_layers,
)

TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    vocab_size=128,
)
VARIANTS = {
    # Llama 2 style: rope_theta 10000, plain RoPE.
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    # Llama 3.1 style RoPE; original_max_position_embeddings 16 puts head_dim 8's frequencies in both the smoothed
    # and the divided-by-factor bands.
    "llama3": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
    ),
    # head_dim 16 != hidden / heads (as Mistral-Nemo); a 16-token window, which the tests stay within.
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(head_dim=16, sliding_window=16)),
    # q/k/v bias, tied embeddings.
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
}
# Both sides compute in fp32; what is left is summation-order rounding (matmul blocking, softmax, RMSNorm means):
# measured max |diff| ~1e-6 on logits and hidden states of these tiny models, so 1e-5 leaves headroom yet catches
# any real porting bug (a wrong RoPE frequency, mask or head grouping shows up at 1e-2 and above).
FP32_ATOL = 1e-5


def _torch_model(name: str):
    """A seeded tiny model, every parameter perturbed so that no RMSNorm is the identity and no bias is zero."""
    config_cls, model_cls, extra = VARIANTS[name]
    torch.manual_seed(0)
    model = model_cls(config_cls(**TINY, **extra)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.generation_config.eos_token_id = None  # compare full-length generations unless a test sets one
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{variant: (torch model, folder, (jgoat model, params, config))}."""
    out = {}
    for name in VARIANTS:
        model = _torch_model(name)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (model, folder, from_pretrained(folder))
    return out


def _batch(lengths: list[int], T: int, side: str, seed: int = 0):
    """Padded ids / mask (pad id 0; real ids >= 3, so never the BOS/EOS ids 1/2)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, TINY["vocab_size"], size=(len(lengths), T))
    cols = np.arange(T)[None, :]
    lens = np.array(lengths)[:, None]
    mask = (cols < lens) if side == "right" else (cols >= T - lens)
    return np.where(mask, ids, 0), mask.astype(np.int64)


def _torch_forward(model, ids, mask, **kwargs):
    """HF forward with generate's positions (cumsum of the mask), so left-padded rows start at position 0."""
    pos = np.asarray(position_ids_from_mask(jnp.asarray(mask)))
    with torch.no_grad():
        return model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.tensor(pos, dtype=torch.long),
            **kwargs,
        )


_forward = jax.jit(
    lambda model, p, ids, mask: model.apply({"params": p}, ids, mask, output_hidden_states=True),
    static_argnums=0,
)


PATTERNS = {  # (lengths, T, padding side); every shape costs a compile, so each variant gets a few
    "T1": ([1], 1, "right"),
    "T7-rightpad": ([7, 3, 7], 7, "right"),  # rows 0 and 2 unpadded
    "T9-leftpad": ([9, 4, 1], 9, "left"),
    "T16-leftpad": ([16, 11], 16, "left"),  # key length == Mistral's window
}
CASES = [
    ("llama", "T1"), ("llama", "T7-rightpad"), ("llama", "T9-leftpad"),
    ("llama3", "T9-leftpad"),
    ("mistral", "T7-rightpad"), ("mistral", "T16-leftpad"),
    ("qwen2", "T7-rightpad"), ("qwen2", "T9-leftpad"),
]


@pytest.mark.parametrize("name,pattern", CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_logits_and_hidden_states_match_torch(checkpoints, name, pattern):
    torch_model, _, (model, params, cfg) = checkpoints[name]
    lengths, T, side = PATTERNS[pattern]
    ids, mask = _batch(lengths, T, side)
    want = _torch_forward(torch_model, ids, mask, output_hidden_states=True)
    got = _forward(model, params, jnp.asarray(ids), jnp.asarray(mask))
    assert got.logits.shape == (len(lengths), T, 128) and got.logits.dtype == jnp.float32
    real = mask.astype(bool)  # padded positions hold garbage on both sides: compare real tokens only
    np.testing.assert_allclose(np.asarray(got.logits)[real], want.logits.numpy()[real], atol=FP32_ATOL, rtol=0)
    assert len(got.hidden_states) == len(want.hidden_states) == cfg.num_hidden_layers + 1
    for g, w in zip(got.hidden_states, want.hidden_states, strict=True):
        np.testing.assert_allclose(np.asarray(g)[real], w.numpy()[real], atol=FP32_ATOL, rtol=0)
    assert np.all(np.isfinite(np.asarray(got.logits)))  # fully masked (padding) rows stay finite


def test_config_from_checkpoints(checkpoints):
    """HF config.json (transformers 5 ``rope_parameters``) and transformers 4 spelling give the same config."""
    assert checkpoints["llama"][2][2].rope_parameters == {"rope_type": "default"}
    cfg3 = checkpoints["llama3"][2][2]
    assert cfg3.rope_theta == 500000.0 and cfg3.rope_parameters["rope_type"] == "llama3"
    v4 = dict(model_type="llama", **TINY, rope_theta=500000.0, max_position_embeddings=16,
              rope_scaling=dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0))
    assert LlamaConfig.from_hf_dict(v4).rope_scaling == cfg3.rope_scaling
    mistral, qwen = checkpoints["mistral"][2][2], checkpoints["qwen2"][2][2]
    assert (mistral.head_dim, mistral.sliding_window) == (16, 16)
    assert qwen.qkv_bias and not qwen.o_bias and qwen.tie_word_embeddings and qwen.sliding_window is None


def test_parameter_paths_mirror_hf(checkpoints):
    p = checkpoints["llama"][2][1]
    assert set(p) == {"model", "lm_head"} and p["lm_head"]["kernel"].shape == (32, 128)
    layers = p["model"]["layers"]
    assert layers["self_attn"]["q_proj"]["kernel"].shape == (2, 32, 32)
    assert layers["self_attn"]["k_proj"]["kernel"].shape == (2, 32, 16)  # 2 KV heads of 8
    assert layers["mlp"]["down_proj"]["kernel"].shape == (2, 64, 32)
    assert layers["post_attention_layernorm"]["scale"].shape == (2, 32) and p["model"]["norm"]["scale"].shape == (32,)
    q = checkpoints["qwen2"][2][1]
    assert "lm_head" not in q  # tied to embed_tokens
    assert q["model"]["layers"]["self_attn"]["v_proj"]["bias"].shape == (2, 16)
    assert "bias" not in q["model"]["layers"]["self_attn"]["o_proj"]
    assert checkpoints["mistral"][2][1]["model"]["layers"]["self_attn"]["q_proj"]["kernel"].shape == (2, 32, 64)


def test_masks_are_sized_to_the_sequence(checkpoints):
    """No intermediate of the forward pass is max_position_embeddings (2048) wide: masks are [B, T, S]."""
    _, _, (model, params, cfg) = checkpoints["llama"]
    assert cfg.max_position_embeddings == 2048
    ids, mask = _batch([5, 3], 5, "left")
    text = str(jax.make_jaxpr(lambda p: model.apply({"params": p}, ids, mask).logits)(params))  # scan body too
    assert "2048" not in text
    assert "bool[2,1,1,5,5]" in text  # the [B, 1, 1, T, S] keep-mask


def test_loss_with_prompt_masking_matches_torch(checkpoints):
    torch_model, _, (model, params, _) = checkpoints["qwen2"]
    ids, mask = _batch(*PATTERNS["T7-rightpad"])  # a shape compiled by the parity test
    labels = np.where(mask == 1, ids, -100)
    labels[:, :3] = -100  # a 3-token prompt
    want = _torch_forward(torch_model, ids, mask, labels=torch.from_numpy(labels)).loss.item()
    logits = _forward(model, params, jnp.asarray(ids), jnp.asarray(mask)).logits
    got = causal_lm_loss(logits, jnp.asarray(labels))
    np.testing.assert_allclose(float(got), want, atol=FP32_ATOL, rtol=0)
    # The sum reduction counts the same tokens; all-ignored labels give 0, not NaN.
    n = int(np.sum(labels[:, 1:] != -100))
    np.testing.assert_allclose(float(causal_lm_loss(logits, jnp.asarray(labels), reduction="sum")) / n, want, rtol=1e-6)
    assert float(causal_lm_loss(logits, jnp.full(labels.shape, -100))) == 0.0


def _hf_generate(torch_model, ids, mask, max_new_tokens, **kwargs):
    with torch.no_grad():
        return torch_model.generate(
            torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            **kwargs,
        ).numpy()


def test_greedy_generation_matches_hf(checkpoints):
    torch_model, _, (model, params, _) = checkpoints["llama3"]
    ids, mask = _batch([6, 2, 4], 6, "left", seed=3)  # a left-padded batch of three prompts
    want = _hf_generate(torch_model, ids, mask, 8)
    got = np.asarray(generate(model, params, ids, mask, max_new_tokens=8))
    assert got.shape == (3, 14) and got.dtype == np.int32
    np.testing.assert_array_equal(got, want)

    # EOS: pick a token HF emits mid-way in row 0; rows stop there and are padded, as HF (which stops the loop
    # early once every row is done, hence its shorter output).
    eos = int(want[0, 6 + 3])
    want_eos = _hf_generate(torch_model, ids, mask, 8, eos_token_id=eos, pad_token_id=0)
    got_eos = np.asarray(generate(model, params, ids, mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=0))
    np.testing.assert_array_equal(got_eos[:, : want_eos.shape[1]], want_eos)
    assert np.all(got_eos[:, want_eos.shape[1] :] == 0)
    first = int(np.argmax(got_eos[0, 6:] == eos))  # row 0 emits eos at step 3 at the latest
    assert got_eos[0, 6 + first] == eos and first <= 3 and np.all(got_eos[0, 6 + first + 1 :] == 0)


def test_sampling(checkpoints):
    """Sampling shares the greedy compile (greedy / temperature are traced); top_k is static."""
    _, _, (model, params, _) = checkpoints["llama3"]
    ids, mask = _batch([6, 2, 4], 6, "left", seed=3)  # the shapes of the greedy test
    key = jax.random.key(7)
    greedy = np.asarray(generate(model, params, ids, mask, max_new_tokens=8))
    top1 = generate(model, params, ids, mask, max_new_tokens=8, greedy=False, top_k=1, temperature=0.7, key=key)
    np.testing.assert_array_equal(top1, greedy)  # top-1 sampling is greedy
    hot = dict(max_new_tokens=8, greedy=False, temperature=2.0)
    a = np.asarray(generate(model, params, ids, mask, key=key, **hot))
    np.testing.assert_array_equal(a, generate(model, params, ids, mask, key=key, **hot))  # seeded
    assert not np.array_equal(a, generate(model, params, ids, mask, key=jax.random.key(8), **hot))
    np.testing.assert_array_equal(a[:, :6], ids)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        generate(model, params, ids, mask, max_new_tokens=2, greedy=False)


def test_scan_remat_gradients_match_unrolled(checkpoints):
    """Scanned + rematerialised layers give the unrolled model's loss and gradients (same params, unstacked)."""
    folder = checkpoints["llama"][1]
    scanned, p_scan, _ = from_pretrained(folder, remat_policy="full")
    unrolled, p_unrolled, cfg = from_pretrained(folder, scan_layers=False)
    assert "layers_1" in p_unrolled["model"] and "layers" not in p_unrolled["model"]
    jax.tree.map(np.testing.assert_array_equal, unstack_layers(p_scan, 2), p_unrolled)
    ids, mask = _batch([8, 5], 8, "left", seed=5)
    labels = jnp.asarray(np.where(mask == 1, ids, -100))

    def value_and_grad(model, p):
        loss = lambda p: causal_lm_loss(model.apply({"params": p}, ids, mask).logits, labels)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(p)

    (v, g), (v_s, g_s) = value_and_grad(unrolled, p_unrolled), value_and_grad(scanned, p_scan)
    np.testing.assert_allclose(v_s, v, rtol=1e-6)
    # Same fp32 ops up to XLA fusion and scan/remat bookkeeping: a few ulps.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), unstack_layers(g_s, 2), g)
    assert float(jnp.abs(g["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]).max()) > 0
    # The other policies trace (measured: their gradients match the unrolled model's to ~1e-7 as well).
    for policy in ("dots", "dots_with_no_batch_dims"):
        remat = LlamaForCausalLM(dataclasses.replace(scanned.config, remat_policy=policy))
        loss = lambda p, m=remat: causal_lm_loss(m.apply({"params": p}, ids, mask).logits, labels)  # noqa: E731
        jax.eval_shape(jax.grad(loss), p_scan)


def test_lora_on_scanned_model(checkpoints, key):
    _, _, (model, params, _) = checkpoints["llama"]
    wrapped = jgoat.wrap(params, jgoat.LoraConfig(rank=4, targets=["q_proj", "v_proj"]), key=key)
    assert [p for p, _ in jgoat.adapters(wrapped)] == ["model/layers/self_attn/q_proj", "model/layers/self_attn/v_proj"]
    adapter = dict(jgoat.adapters(wrapped))["model/layers/self_attn/q_proj"]
    assert adapter.A.shape == (2, 32, 4) and adapter.B.shape == (2, 4, 32)  # stacked over the 2 layers
    ids, mask = _batch(*PATTERNS["T7-rightpad"])
    run = jax.jit(lambda p: jgoat.apply(model.apply)({"params": p}, ids, mask)[0].logits)
    base = _forward(model, params, jnp.asarray(ids), jnp.asarray(mask)).logits
    np.testing.assert_allclose(run(wrapped), base, atol=1e-6, rtol=0)  # B = 0: the adapters add exactly zero

    # A non-zero adapter is live under scan and equals its merge into the kernels.
    nonzero = jax.tree.map(lambda x: x, wrapped)
    layers = nonzero["model"]["layers"]["self_attn"]
    for proj in ("q_proj", "v_proj"):
        node = layers[proj]["jgoat"]
        layers[proj] = {**layers[proj], "jgoat": node.replace(B=0.3 * jax.random.normal(key, node.B.shape))}
    live = run(nonzero)
    assert float(jnp.abs(live - base).max()) > 1e-2
    merged = _forward(model, jgoat.merge(nonzero), jnp.asarray(ids), jnp.asarray(mask)).logits
    np.testing.assert_allclose(live, merged, atol=1e-5, rtol=0)


def test_goat_all_linear_excludes_lm_head(checkpoints, key):
    _, _, (model, params, cfg) = checkpoints["llama"]
    wrapped = jgoat.wrap(params, jgoat.GoatConfig(rank=8, experts=4, top_k=2), key=key)
    paths = [p for p, _ in jgoat.adapters(wrapped)]
    assert len(paths) == 7 and not any("lm_head" in p for p in paths)
    assert "model/layers/mlp/down_proj" in paths and "model/layers/self_attn/k_proj" in paths
    ids, mask = _batch([6, 4], 6, "right", seed=6)

    def run(model, p):
        return jax.jit(lambda p: jgoat.apply(model.apply)({"params": p}, ids, mask, aux_mask=mask))(p)

    out, aux = run(model, wrapped)
    assert out.logits.shape == (2, 6, 128) and np.all(np.isfinite(np.asarray(out.logits)))
    # The aux loss flows out of nn.scan ('jgoat_aux' in variable_axes): the same as the unrolled model's sum
    # over its 2 x 7 GOAT modules, each layer routing with its own slice of the stacked adapters.
    unrolled = LlamaForCausalLM(dataclasses.replace(cfg, scan_layers=False))
    out_u, aux_u = run(unrolled, unstack_layers(wrapped, 2))
    assert float(aux) > 0
    np.testing.assert_allclose(aux, aux_u, rtol=1e-5)
    np.testing.assert_allclose(out.logits, out_u.logits, atol=1e-5, rtol=0)


def test_bf16_and_sharded_checkpoints(checkpoints, tmp_path):
    torch_model, folder, (model, params, _) = checkpoints["llama"]
    ids, mask = _batch(*PATTERNS["T7-rightpad"])
    ref = np.asarray(_forward(model, params, jnp.asarray(ids), jnp.asarray(mask)).logits)
    real = mask.astype(bool)

    # bf16 compute with fp32 master params, and all-bf16 params (same compiled function: params are cast).
    mixed, params_m, cfg_m = from_pretrained(folder, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert cfg_m.dtype == jnp.bfloat16 and all(x.dtype == jnp.float32 for x in jax.tree.leaves(params_m))
    _, params16, _ = from_pretrained(folder, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params16))
    for p in (params_m, params16):
        got = mixed.apply({"params": p}, ids, mask).logits
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got, np.float32)[real], ref[real], atol=0.1)  # bf16: ~3 digits

    torch_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    _, sharded, _ = from_pretrained(tmp_path / "sharded")
    jax.tree.map(np.testing.assert_array_equal, sharded, params)


# ---------------------------------------------------------------------------------------------------------------
# Errors


def _copy(folder, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(folder, dst)
    return dst


def test_unsupported_rope_type_is_rejected(checkpoints, tmp_path):
    folder = _copy(checkpoints["llama3"][1], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {**config["rope_parameters"], "rope_type": "yarn"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"Unsupported rope type 'yarn'.*supported: default, linear, llama3"):
        from_pretrained(folder)
    with pytest.raises(ValueError, match="Unsupported rope type 'dynamic'"):
        LlamaConfig(**TINY, rope_scaling={"type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="needs low_freq_factor, high_freq_factor"):
        LlamaConfig(**TINY, rope_scaling={"rope_type": "llama3", "factor": 8.0})


def test_missing_and_mismatched_tensors_are_errors(checkpoints, tmp_path):
    folder = _copy(checkpoints["qwen2"][1], tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    key = "model.layers.0.self_attn.q_proj.bias"
    tensors[key] = tensors[key][:31].copy()
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"qwen2 causal-lm") as err:
        from_pretrained(folder)
    assert "missing: model.layers.1.mlp.up_proj.weight" in str(err.value)
    assert f"shape mismatch: {key}: checkpoint (31,) vs expected (32,)" in str(err.value)

    # An untied model needs lm_head.weight.
    folder = _copy(checkpoints["llama"][1], tmp_path / "untied")
    tensors = load_file(folder / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing: lm_head\.weight"):
        from_pretrained(folder)


def test_sliding_window_and_task_errors(checkpoints):
    _, folder, (model, params, _) = checkpoints["mistral"]
    ids, mask = _batch([17], 17, "right")
    with pytest.raises(ValueError, match=r"sliding_window=16 is not implemented: key length 17"):
        model.apply({"params": params}, ids, mask)
    with pytest.raises(ValueError, match="key length 18"):
        generate(model, params, ids[:, :10], mask[:, :10], max_new_tokens=8)
    with pytest.raises(ValueError, match=r"Unknown task 'sequence-classification' for mistral; supported: causal-lm"):
        from_pretrained(folder, task="sequence-classification")
    with pytest.raises(ValueError, match="remat_policy"):
        from_pretrained(folder, remat_policy="sometimes")
