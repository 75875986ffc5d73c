"""Parity of jgoat's CLIP vision tower / ViT with transformers' PyTorch models, checkpoint-loading errors, LoRA on
the vision models, and image preprocessing against HF's image processors.

Tiny random checkpoints are written by transformers (``save_pretrained``, safetensors) and loaded by jgoat without
torch; torch is only the reference. jgoat's vision models are channels-last: torch gets ``x.transpose(0, 3, 1, 2)``.
"""

import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jgoat  # noqa: E402  (after the importorskip guards)
from jgoat.models.vit import (  # noqa: E402
    CLIPVisionConfig,
    ViTConfig,
    load_vision_model,
    preprocess,
    processor_settings,
    read_preprocessor_config,
)

TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32, patch_size=8
)
TINY_TEXT = dict(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=4,
    intermediate_size=37,
    vocab_size=99,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
# Both sides compute in fp32 (conftest sets matmul precision "highest"); what is left is summation-order rounding
# (conv vs unfold-matmul, softmax and LayerNorm reductions): measured max |diff| ~4e-7 on logits and ~3e-6 on the
# hidden states of these tiny models (values of order 1-5), so 1e-5 leaves headroom yet catches any porting bug
# (a swapped tensor, a wrong transpose or activation shows up at 1e-2 and above).
FP32_ATOL = 1e-5
B = 3


@pytest.fixture(autouse=True)
def _strict_rank_promotion():
    with jax.numpy_rank_promotion("raise"):
        yield


def _perturbed(model):
    """Eval mode, every parameter perturbed so that no LayerNorm is the identity and no bias is zero."""
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _torch_models():
    torch.manual_seed(0)
    t = transformers
    clip_full = t.CLIPConfig(vision_config=TINY, text_config=TINY_TEXT, num_labels=3)
    return {
        ("clip", "cls"): t.CLIPForImageClassification(clip_full),
        ("clip", "base"): t.CLIPVisionModel(t.CLIPVisionConfig(**TINY)),
        ("clip", "full"): t.CLIPModel(clip_full),
        ("vit", "cls"): t.ViTForImageClassification(t.ViTConfig(**TINY, num_labels=3)),
        # No qkv bias and a pooler narrower than the model: both code paths get checked.
        ("vit", "base"): t.ViTModel(t.ViTConfig(**TINY, qkv_bias=False, pooler_output_size=24)),
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{(family, kind): (torch model, folder)}."""
    out = {}
    for (family, kind), model in _torch_models().items():
        folder = tmp_path_factory.mktemp(f"{family}_{kind}")
        _perturbed(model).save_pretrained(folder)
        out[family, kind] = (model, folder)
    return out


def _pixels(seed=0):
    """Random normalised pixels, channels last [B, 32, 32, 3], and the same as torch NCHW."""
    x = np.random.default_rng(seed).normal(size=(B, 32, 32, 3)).astype(np.float32)
    return x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def _run(model, params, x):
    return jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)


@pytest.mark.parametrize("family", ["clip", "vit"])
def test_image_classification_logits_match_torch(checkpoints, family):
    torch_model, folder = checkpoints[family, "cls"]
    model, params, cfg = load_vision_model(folder)
    assert cfg.num_labels == 3 and cfg.model_type == family
    x, x_torch = _pixels()
    with torch.no_grad():
        want = torch_model(pixel_values=x_torch).logits.numpy()
    got = _run(model, params, x)
    assert got.shape == (B, 3) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("family", ["clip", "vit"])
def test_base_model_hidden_states_match_torch(checkpoints, family):
    torch_model, folder = checkpoints[family, "base"]
    model, params, _ = load_vision_model(folder, task="base")
    x, x_torch = _pixels(seed=1)
    with torch.no_grad():
        want = torch_model(pixel_values=x_torch)
    got = _run(model, params, x)
    assert got.last_hidden_state.shape == (B, 1 + 16, 32)
    want_hidden = want.last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(got.last_hidden_state[:, 0]), want_hidden[:, 0], atol=FP32_ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(got.last_hidden_state), want_hidden, atol=FP32_ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(got.pooler_output), want.pooler_output.numpy(), atol=FP32_ATOL, rtol=0)


def test_full_clip_checkpoint_loads_the_vision_tower(checkpoints):
    """A full CLIPModel: only vision_model.* is read (text tower reported unused), hidden states match."""
    torch_model, folder = checkpoints["clip", "full"]
    model, params, cfg, info = load_vision_model(folder, task="base", output_loading_info=True)
    assert isinstance(cfg, CLIPVisionConfig) and info.newly_initialized == []
    assert any(k.startswith("text_model.") for k in info.unused) and "visual_projection.weight" in info.unused
    assert not any(k.startswith("vision_model.") for k in info.unused)
    x, x_torch = _pixels(seed=2)
    with torch.no_grad():
        want = torch_model.vision_model(pixel_values=x_torch)
    got = _run(model, params, x)
    np.testing.assert_allclose(
        np.asarray(got.last_hidden_state), want.last_hidden_state.numpy(), atol=FP32_ATOL, rtol=0
    )


def test_parameter_paths_mirror_hf_and_linears_are_dense(checkpoints):
    _, clip, _ = load_vision_model(checkpoints["clip", "cls"][1])
    model, vit, _ = load_vision_model(checkpoints["vit", "cls"][1])
    assert set(clip) == {"vision_model", "classifier"} and set(vit) == {"vit", "classifier"}
    emb = clip["vision_model"]["embeddings"]
    assert emb["patch_embedding"]["kernel"].shape == (8, 8, 3, 32) and "bias" not in emb["patch_embedding"]
    assert emb["class_embedding"].shape == (32,) and emb["position_embedding"]["embedding"].shape == (17, 32)
    assert clip["vision_model"]["encoder"]["layers_1"]["mlp"]["fc1"]["kernel"].shape == (32, 37)
    assert set(clip["vision_model"]) == {"embeddings", "pre_layrnorm", "encoder", "post_layernorm"}
    vemb = vit["vit"]["embeddings"]
    assert vemb["cls_token"].shape == (1, 1, 32) and vemb["position_embeddings"].shape == (1, 17, 32)
    assert vemb["patch_embeddings"]["projection"]["bias"].shape == (32,)
    layer = vit["vit"]["encoder"]["layer_1"]
    assert set(layer) == {"attention", "intermediate", "output", "layernorm_before", "layernorm_after"}
    assert layer["attention"]["attention"]["value"]["kernel"].shape == (32, 32)

    dense_paths = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            dense_paths.append("/".join(context.module.path))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):  # tracing is enough
        jax.eval_shape(lambda p: model.apply({"params": p}, jnp.zeros((1, 32, 32, 3))), vit)
    assert len(dense_paths) == 2 * 6 + 1 and dense_paths[-1] == "classifier"
    assert "vit/encoder/layer_0/attention/output/dense" in dense_paths
    assert not any("patch" in p for p in dense_paths)  # the patch embedding is a conv


@pytest.mark.parametrize("family", ["clip", "vit"])
def test_lora_all_linear_wraps_every_linear_but_the_head(checkpoints, family):
    model, params, _ = load_vision_model(checkpoints[family, "cls"][1])
    wrapped = jgoat.wrap(params, jgoat.LoraConfig(rank=4, targets="all-linear"), key=jax.random.key(1))
    paths = [p for p, _ in jgoat.adapters(wrapped)]
    names = {"clip": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"), "vit": ("query", "key", "value")}
    assert len(paths) == 2 * 6 and all("classifier" not in p and "patch" not in p for p in paths)
    assert all(any(p.endswith(n) for p in paths) for n in names[family])

    x, _ = _pixels(seed=3)
    run = jax.jit(lambda p, x: jgoat.apply(model.apply)({"params": p}, x)[0])
    base = _run(model, params, x)
    np.testing.assert_allclose(run(wrapped, x), base, atol=1e-6)  # B = 0 at init: the base model exactly

    def randomise(tree):
        """Give every adapter a nonzero B, so the adapters change the output."""
        out = dict(tree)
        for k, v in tree.items():
            if isinstance(v, dict):
                out[k] = randomise(v)
            elif isinstance(v, jgoat.LoraAdapter):
                out[k] = v.replace(B=0.1 * jax.random.normal(jax.random.key(len(k)), v.B.shape))
        return out

    live = randomise(wrapped)
    adapted = run(live, x)
    assert np.abs(np.asarray(adapted) - np.asarray(base)).max() > 1e-3
    # The interceptor's output equals the merged kernels run without adapters: the layout is right.
    np.testing.assert_allclose(_run(model, jgoat.merge(live), x), adapted, atol=1e-5)


def test_cross_loading_reports_new_heads(checkpoints):
    folder = checkpoints["clip", "base"][1]  # a CLIPVisionModel (keys without prefix) as a classifier
    _, p1, cfg, info = load_vision_model(folder, num_labels=5, key=jax.random.key(3), output_loading_info=True)
    _, p2, _ = load_vision_model(folder, num_labels=5, key=jax.random.key(3))
    assert info.newly_initialized == ["classifier.bias", "classifier.weight"] and info.unused == []
    assert p1["classifier"]["kernel"].shape == (32, 5) and np.all(p1["classifier"]["bias"] == 0)
    np.testing.assert_array_equal(p1["classifier"]["kernel"], p2["classifier"]["kernel"])
    assert 0.1 < float(p1["classifier"]["kernel"].std()) < 0.3  # HF: hidden_size**-0.5 = 0.18

    _, _, _, info = load_vision_model(checkpoints["vit", "cls"][1], task="base", output_loading_info=True)
    assert info.newly_initialized == ["pooler.dense.bias", "pooler.dense.weight"]
    assert info.unused == ["classifier.bias", "classifier.weight"]


def test_from_pretrained_dispatches_vision_types(checkpoints):
    model, params, cfg = jgoat.models.from_pretrained(checkpoints["vit", "cls"][1])
    assert isinstance(cfg, ViTConfig) and set(params) == {"vit", "classifier"}
    _, params16, cfg16 = jgoat.models.from_pretrained(checkpoints["clip", "cls"][1], dtype=jnp.bfloat16)
    assert cfg16.dtype == jnp.bfloat16 and all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params16))


def _copy(folder, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(folder, dst)
    return dst


def test_missing_tensor_is_an_error(checkpoints, tmp_path):
    folder = _copy(checkpoints["clip", "cls"][1], tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["vision_model.encoder.layers.1.mlp.fc1.weight"]
    del tensors["vision_model.embeddings.class_embedding"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"(?s)missing: embeddings\.class_embedding.*missing: encoder\.layers\.1\.mlp"):
        load_vision_model(folder)


def test_shape_mismatch_is_an_error(checkpoints, tmp_path):
    folder = _copy(checkpoints["vit", "cls"][1], tmp_path)
    tensors = load_file(folder / "model.safetensors")
    key = "vit.encoder.layer.0.attention.attention.query.weight"
    tensors[key] = tensors[key][:, :31].copy()
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=rf"shape mismatch: {key}: checkpoint \(32, 31\) vs expected \(32, 32\)"):
        load_vision_model(folder)
    with pytest.raises(ValueError, match=r"shape mismatch: classifier\.weight: checkpoint \(3, 32\) vs expected"):
        load_vision_model(checkpoints["vit", "cls"][1], num_labels=7)
    with pytest.raises(ValueError, match="Unknown task 'causal-lm'"):
        load_vision_model(checkpoints["vit", "cls"][1], task="causal-lm")


def test_bad_pixel_layout_is_an_error(checkpoints):
    model, params, _ = load_vision_model(checkpoints["clip", "base"][1], task="base")
    with pytest.raises(ValueError, match="channels-last"):
        model.apply({"params": params}, jnp.zeros((1, 3, 32, 32)))  # NCHW by mistake
    with pytest.raises(ValueError, match=r"Input image size \(64\*64\) doesn't match model \(32\*32\)"):
        model.apply({"params": params}, jnp.zeros((1, 64, 64, 3)))


# ----------------------------------------------------------------------------------------------- preprocessing

# Odd sizes, portrait and landscape; (12, 14) ends smaller than crop 24 (HF zero-pads); none has 3 or 4 as a first
# dim (HF would then guess channels-first).
SIZES = [(23, 37), (41, 19), (20, 20), (12, 14), (57, 58)]


def _images(seed=0, sizes=SIZES):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in sizes]


def _hf_pixels(processor, images):
    return processor(images=images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)


# The pipeline is the same code path as HF's PIL backend (PIL resize on uint8, float64 rescale cast to float32,
# float32 normalise), so the results are bit-identical: compared exactly.
@pytest.mark.parametrize("crop", [16, 24], ids=["crop16", "crop24-pads"])
def test_clip_preprocessing_matches_hf(crop):
    processor = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 20}, crop_size={"height": crop, "width": crop}
    )
    images = _images()
    want = _hf_pixels(processor, images)
    got = preprocess(images, processor.to_dict())
    assert got.shape == (len(images), crop, crop, 3) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    # The legacy spelling of old hub configs (openai/clip-vit-base-patch32): ints and feature_extractor_type.
    legacy = {"feature_extractor_type": "CLIPFeatureExtractor", "size": 20, "crop_size": crop, "resample": 3}
    np.testing.assert_array_equal(preprocess(np.stack(_images(sizes=[(23, 37)] * 2)), legacy)[0], want[0])


def test_vit_preprocessing_matches_hf(tmp_path):
    processor = transformers.ViTImageProcessorPil(size={"height": 16, "width": 24})
    processor.save_pretrained(tmp_path)
    config = read_preprocessor_config(tmp_path)
    assert config["image_processor_type"] == "ViTImageProcessor"
    images = _images(seed=1)
    np.testing.assert_array_equal(preprocess(images, config), _hf_pixels(processor, images))
    s = processor_settings({"image_processor_type": "ViTImageProcessor", "size": 224})
    assert s["size"] == {"height": 224, "width": 224} and s["resample"] == 2 and not s["do_center_crop"]


def test_preprocessing_errors():
    clip = {"image_processor_type": "CLIPImageProcessor"}
    with pytest.raises(ValueError, match="Unsupported image processor 'SiglipImageProcessor'"):
        preprocess(_images(), {"image_processor_type": "SiglipImageProcessor"})
    with pytest.raises(ValueError, match="uint8"):
        preprocess([np.zeros((8, 8, 3), np.float32)], clip)
    with pytest.raises(ValueError, match="differ in size"):  # no crop, shortest edge only: sizes differ
        preprocess(_images(sizes=[(10, 20), (20, 10)]), {**clip, "do_center_crop": False, "size": 8})
    with pytest.raises(ValueError, match="max_height"):
        preprocess(_images(), {**clip, "size": {"max_height": 8, "max_width": 8}})
