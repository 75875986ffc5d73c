"""Checkpoint I/O: ``save_pretrained`` round trips into transformers (torch), ``pytorch_model.bin`` and legacy
``flax_model.msgpack`` loading without torch, and the safety of the torch-pickle reader.

Torch is the reference only: tiny random models are written by transformers, loaded by jgoat, wrapped with LoRA
(random non-zero B, so the adapters change the outputs), saved by jgoat and reloaded by ``transformers.AutoModel*``.
"""

import collections
import io
import json
import pickle
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import flax.serialization  # noqa: E402
from flax import traverse_util  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

import jgoat  # noqa: E402  (after the importorskip guards)
from jgoat.models import (  # noqa: E402
    UnsafeCheckpointError,
    from_pretrained,
    load_flax_msgpack,
    load_torch_bin,
    save_pretrained,
)

t = transformers
TINY_ENC = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                max_position_embeddings=64)
TINY_DEC = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64)
TINY_VIS = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32,
                patch_size=8)
# family -> (torch model factory, transformers auto class that must load the saved folder, input kind)
FAMILIES = {
    "bert": (lambda: t.BertForSequenceClassification(t.BertConfig(**TINY_ENC, num_labels=3)),
             t.AutoModelForSequenceClassification, "text"),
    "roberta": (lambda: t.RobertaForSequenceClassification(t.RobertaConfig(**TINY_ENC, num_labels=3)),
                t.AutoModelForSequenceClassification, "text"),
    "llama": (lambda: t.LlamaForCausalLM(t.LlamaConfig(**TINY_DEC)), t.AutoModelForCausalLM, "decoder"),
    "mistral": (lambda: t.MistralForCausalLM(t.MistralConfig(**TINY_DEC, head_dim=16)), t.AutoModelForCausalLM,
                "decoder"),
    "qwen2": (lambda: t.Qwen2ForCausalLM(t.Qwen2Config(**TINY_DEC, tie_word_embeddings=True)),
              t.AutoModelForCausalLM, "decoder"),
    "vit": (lambda: t.ViTForImageClassification(t.ViTConfig(**TINY_VIS, num_labels=3)),
            t.AutoModelForImageClassification, "image"),
    "clip": (lambda: t.CLIPVisionModel(t.CLIPVisionConfig(**TINY_VIS)), t.AutoModel, "image"),  # bare tower
}
# Both sides compute in fp32 (conftest: matmul precision "highest"). jgoat runs the LoRA update live
# (x W + s x A B) and torch runs the merged kernel (x (W + s A B)): the two differ by fp32 rounding of the merge and
# of the summation order, measured at ~2e-7 on these tiny models' outputs (values of order 1), so 1e-5 leaves
# headroom while any wrong key, transpose, layer order or missing merge shows up at 1e-2 and above (the adapters
# alone move the outputs by more than that, which the tests check).
FP32_ATOL = 1e-5


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{family: (torch model, folder written by transformers)}; every parameter perturbed (no identity norms)."""
    out = {}
    for name, (factory, _, _) in FAMILIES.items():
        torch.manual_seed(0)
        model = factory().eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (model, folder)
    return out


def _inputs(kind: str, family: str):
    """(jgoat args, torch kwargs, real-token mask or None): right-padded text, or channels-last images."""
    rng = np.random.default_rng(0)
    if kind == "image":
        x = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
        return (x,), dict(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy())), None
    vocab = TINY_ENC["vocab_size"] if kind == "text" else TINY_DEC["vocab_size"]
    pad = 1 if family == "roberta" else 0
    mask = (np.arange(7)[None, :] < np.array([[7], [4]])).astype(np.int64)
    ids = np.where(mask == 1, rng.integers(3, vocab, size=(2, 7)), pad)
    return (ids, mask), dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)), mask


def _outputs(kind: str, out) -> list[np.ndarray]:
    """Comparable outputs of jgoat and torch: logits, or (pooler, last hidden state) of the bare CLIP tower."""
    if hasattr(out, "pooler_output"):
        return [np.asarray(out.pooler_output), np.asarray(out.last_hidden_state)]
    return [np.asarray(out.logits if hasattr(out, "logits") else out)]


def _torch_outputs(folder, family):
    _, auto_cls, kind = FAMILIES[family]
    model = auto_cls.from_pretrained(folder).eval()
    _, kwargs, _ = _inputs(kind, family)
    with torch.no_grad():
        return model, _outputs(kind, model(**kwargs))


def _assert_close(got, want, mask, atol=FP32_ATOL):
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        if mask is not None and g.ndim == 3:  # decoder logits: padded positions are garbage on both sides
            g, w = g[mask.astype(bool)], w[mask.astype(bool)]
        np.testing.assert_allclose(g, w, atol=atol, rtol=0)


def _run(model, params, args):
    """jgoat's forward, adapters live (jgoat.apply), jitted (much faster than op-by-op, even run once)."""
    return jax.jit(lambda p, *a: jgoat.apply(model.apply)({"params": p}, *a)[0])(params, *args)


def _random_b(tree, seed):
    """Every LoRA B random (B = 0 at init would make the adapters a no-op); numpy draws, so nothing compiles."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(tree, is_leaf=lambda x: isinstance(x, jgoat.LoraAdapter))
    leaves = [x.replace(B=jnp.asarray(0.2 * rng.standard_normal(x.B.shape), x.B.dtype))
              if isinstance(x, jgoat.LoraAdapter) else x for x in leaves]
    return jax.tree.unflatten(treedef, leaves)


# ---------------------------------------------------------------------------------------------- save_pretrained


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_merged_save_loads_in_transformers(checkpoints, family, tmp_path):
    """load -> wrap with LoRA (non-zero B) -> save_pretrained (merged) -> AutoModel in torch: same outputs."""
    torch_model, folder = checkpoints[family]
    kind = FAMILIES[family][2]
    model, params, cfg = from_pretrained(folder, task="base" if family == "clip" else None)
    # Decoders: a subset (every distinct kernel shape costs an init compile): a [32, 16] GQA projection, a square
    # one and the MLP's [64, 32], all stacked over the scanned layers.
    targets = ["q_proj", "k_proj", "down_proj"] if kind == "decoder" else "all-linear"
    wrapped = _random_b(jgoat.wrap(params, jgoat.LoraConfig(rank=4, targets=targets), key=jax.random.key(0)), 1)
    args, kwargs, mask = _inputs(kind, family)
    got = _outputs(kind, _run(model, wrapped, args))
    with torch.no_grad():
        base = _outputs(kind, torch_model(**kwargs))
    assert max(float(np.abs(g - b).max()) for g, b in zip(got, base, strict=True)) > 1e-2  # adapters matter

    out = save_pretrained(folder, wrapped, tmp_path / "out")  # config.json copied from the source folder
    assert json.loads((out / "config.json").read_text())["architectures"] == [type(checkpoints[family][0]).__name__]
    torch_model, want = _torch_outputs(out, family)
    assert type(torch_model) is type(checkpoints[family][0])
    _assert_close(got, want, mask)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_plain_round_trip_with_regenerated_config(checkpoints, family, tmp_path):
    """No adapters, no source folder (config.json regenerated from the jgoat config): torch gets back exactly the
    state dict it wrote, and jgoat's loader gets back exactly its params."""
    torch_model, folder = checkpoints[family]
    model, params, cfg = from_pretrained(folder, task="base" if family == "clip" else None)
    out = save_pretrained(cfg, params, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    reloaded, _ = _torch_outputs(out, family)
    want = torch_model.state_dict()
    got = reloaded.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)
    _, again, _ = from_pretrained(out, task="base" if family == "clip" else None)
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_unrolled_layers_bf16_and_shards(checkpoints, tmp_path):
    torch_model, folder = checkpoints["llama"]
    model, params, cfg = from_pretrained(folder, scan_layers=False)
    assert "layers_1" in params["model"]
    out = save_pretrained(model, params, tmp_path / "out", source_folder=folder, dtype=jnp.bfloat16,
                          max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (out / "model.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    shard = load_file(out / "model-00001-of-{:05d}.safetensors".format(len(set(index["weight_map"].values()))))
    assert all(v.dtype == np.dtype(jnp.bfloat16) for v in shard.values())
    reloaded = t.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.dtype == torch.bfloat16
    for k, v in torch_model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[k], v.to(torch.bfloat16), rtol=0, atol=0, msg=k)
    # Saving again into the same folder as one file removes the shards and the index.
    save_pretrained(cfg, params, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


def test_goat_and_mismatched_params_are_refused(checkpoints, tmp_path):
    _, folder = checkpoints["llama"]
    _, params, cfg = from_pretrained(folder)
    goat = jgoat.wrap(params, jgoat.GoatConfig(rank=4, experts=2, top_k=1, targets=["q_proj"]), key=jax.random.key(0))
    with pytest.raises(ValueError, match="GOAT is never merged"):
        save_pretrained(cfg, goat, tmp_path / "goat")
    assert not (tmp_path / "goat").exists()
    hooked = {**params, "model": {**params["model"], "jgoat_prompt": jnp.zeros((4, 32))}}  # prompt-tuning hook
    with pytest.raises(ValueError, match="hook parameters"):
        save_pretrained(cfg, hooked, tmp_path / "hooked")
    _, bert, _ = from_pretrained(checkpoints["bert"][1])
    with pytest.raises(ValueError, match="do not match"):
        save_pretrained(cfg, bert, tmp_path / "mismatch")


# ---------------------------------------------------------------------------------------------- pytorch_model.bin


def _bin_folder(torch_model, folder, shards: int = 1):
    """What transformers<5 wrote with safe_serialization=False: torch.save of the state dict (sharded: plain dicts
    per shard + pytorch_model.bin.index.json), and config.json."""
    folder.mkdir()
    torch_model.config.save_pretrained(folder)
    state = torch_model.state_dict()
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return folder
    keys = list(state)
    weight_map = {}
    for i, part in enumerate(np.array_split(np.arange(len(keys)), shards), 1):
        name = f"pytorch_model-{i:05d}-of-{shards:05d}.bin"
        torch.save({keys[j]: state[keys[j]] for j in part}, folder / name)
        weight_map.update({keys[j]: name for j in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_pytorch_bin_folders_load(checkpoints, family, tmp_path):
    torch_model, folder = checkpoints[family]
    _, params, _ = from_pretrained(folder)
    single = _bin_folder(torch_model, tmp_path / "single")
    model, from_bin, _ = from_pretrained(single)
    jax.tree.map(np.testing.assert_array_equal, from_bin, params)
    _, from_shards, _ = from_pretrained(_bin_folder(torch_model, tmp_path / "sharded", shards=3))
    jax.tree.map(np.testing.assert_array_equal, from_shards, params)
    kind = FAMILIES[family][2]
    args, kwargs, mask = _inputs(kind, family)
    with torch.no_grad():
        want = _outputs(kind, torch_model(**kwargs))
    _assert_close(_outputs(kind, _run(model, from_bin, args)), want, mask)


def test_torch_bin_views_and_dtypes(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = collections.OrderedDict(
        matrix=base,
        transposed=base.t(),  # strides (1, 6)
        row=base[2],  # storage offset 12, shares base's storage
        columns=base[:, 1:5:2],  # offset 1, strides (6, 2)
        bf16=torch.linspace(-2, 2, 7).to(torch.bfloat16),
        half=torch.tensor([1.5, -0.25], dtype=torch.float16),
        long=torch.tensor([[1, -2], [3, 2**40]]),
        flags=torch.tensor([True, False, True]),
        scalar=torch.tensor(3.5),
        empty=torch.zeros(0, 3),
    )
    torch.save(state, tmp_path / "x.bin")
    got = load_torch_bin(tmp_path / "x.bin")
    assert list(got) == list(state)
    for k, v in state.items():
        want = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
        assert got[k].shape == want.shape and got[k].flags.c_contiguous, k
        np.testing.assert_array_equal(np.asarray(got[k], want.dtype), want, err_msg=k)
    assert got["bf16"].dtype == np.dtype(jnp.bfloat16)


def test_torch_bin_reader_never_imports_torch(checkpoints, tmp_path):
    torch_model, _ = checkpoints["bert"]
    torch.save(torch_model.state_dict(), tmp_path / "w.bin")
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises
        "from jgoat.models.formats import load_torch_bin\n"
        "state = load_torch_bin(sys.argv[1])\n"
        "assert 'torch' not in [m for m, v in sys.modules.items() if v is not None]\n"
        "print(sum(float(abs(v.astype('float64')).sum()) for v in state.values()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "w.bin")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    want = sum(float(v.double().abs().sum()) for v in torch_model.state_dict().values())
    assert float(out.stdout) == pytest.approx(want, rel=1e-12)


_CALLED = []


def _side_effect(*args):  # what a malicious pickle would run; must never be reached
    _CALLED.append(args)


class _Exploit:
    def __reduce__(self):
        return _side_effect, ("pwned",)


def _zip_pickle(path, obj):
    """A zip laid out like torch.save's (archive/data.pkl), holding an arbitrary pickle."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(obj, protocol=2))
        z.writestr("archive/version", "3\n")


def test_torch_bin_refuses_foreign_globals(tmp_path):
    _zip_pickle(tmp_path / "evil.bin", {"weight": _Exploit()})
    with pytest.raises(UnsafeCheckpointError, match="_side_effect"):
        load_torch_bin(tmp_path / "evil.bin")
    assert not _CALLED
    torch.save({"layer": torch.nn.Linear(2, 2)}, tmp_path / "module.bin")  # a pickled nn.Module, not a state dict
    with pytest.raises(UnsafeCheckpointError, match="torch.nn.modules.linear.Linear"):
        load_torch_bin(tmp_path / "module.bin")
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buffer, _use_new_zipfile_serialization=False)
    (tmp_path / "legacy.bin").write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match="legacy"):
        load_torch_bin(tmp_path / "legacy.bin")


# ---------------------------------------------------------------------------------------------- flax_model.msgpack


def _to_hf_flax(torch_model) -> dict:
    """A torch state dict in transformers 4.x's Flax naming, as FlaxBert* / FlaxRoberta* / FlaxLlamaForCausalLM
    stored it in flax_model.msgpack (transformers<5; the inverse of its convert_flax_state_dict_to_pt).

    ASSUMPTION (from transformers 4.x modeling_flax_bert.py / modeling_flax_roberta.py / modeling_flax_llama.py, which
    mirror the torch module tree, and modeling_flax_pytorch_utils.py): the path is the torch key split on "." with
    layer indices as their own level (``bert/encoder/layer/0/attention/self/query``,
    ``model/layers/0/self_attn/q_proj``); ``nn.Dense`` holds ``kernel`` = torch weight transposed ([in, out]) and
    ``bias``; ``nn.LayerNorm`` holds ``scale`` / ``bias``; ``nn.Embed`` holds ``embedding``; Llama's RMSNorm keeps
    its torch name ``weight``; no ``params`` level at the top.
    """
    modules = dict(torch_model.named_modules())
    tree: dict = {}
    for key, value in torch_model.state_dict().items():
        module_name, _, leaf = key.rpartition(".")
        module, array = modules[module_name], value.numpy()
        if leaf == "weight" and isinstance(module, torch.nn.Linear):
            leaf, array = "kernel", array.T
        elif leaf == "weight" and isinstance(module, torch.nn.LayerNorm):
            leaf = "scale"
        elif leaf == "weight" and isinstance(module, torch.nn.Embedding):
            leaf = "embedding"
        node = tree
        for part in module_name.split("."):
            node = node.setdefault(part, {})
        node[leaf] = np.ascontiguousarray(array)
    return tree


@pytest.mark.parametrize("family", ["bert", "roberta", "llama"])
def test_legacy_flax_msgpack_loads(checkpoints, family, tmp_path):
    torch_model, _ = checkpoints[family]
    tree = _to_hf_flax(torch_model)
    if family == "bert":  # a few names checked against the documented Flax layout
        layer = tree["bert"]["encoder"]["layer"]["0"]
        assert layer["attention"]["self"]["query"]["kernel"].shape == (32, 32)
        assert set(layer["output"]["LayerNorm"]) == {"scale", "bias"}
        assert set(tree["bert"]["embeddings"]["word_embeddings"]) == {"embedding"}
    if family == "llama":
        assert set(tree["model"]["layers"]["1"]["input_layernorm"]) == {"weight"}
        assert tree["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"].shape == (32, 64)
    folder = tmp_path / "flax"
    folder.mkdir()
    torch_model.config.save_pretrained(folder)
    (folder / "flax_model.msgpack").write_bytes(flax.serialization.msgpack_serialize(tree))
    model, params, _ = from_pretrained(folder)
    kind = FAMILIES[family][2]
    args, kwargs, mask = _inputs(kind, family)
    with torch.no_grad():
        want = _outputs(kind, torch_model(**kwargs))
    _assert_close(_outputs(kind, _run(model, params, args)), want, mask)

    state = load_flax_msgpack(folder / "flax_model.msgpack")
    for k, v in torch_model.state_dict().items():
        np.testing.assert_array_equal(state[k], v.numpy(), err_msg=k)


def test_sharded_flax_msgpack(checkpoints, tmp_path):
    """transformers 4.x's sharded Flax format: flat '/'-joined keys per shard + flax_model.msgpack.index.json."""
    torch_model, folder = checkpoints["bert"]
    _, params, _ = from_pretrained(folder)
    flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(_to_hf_flax(torch_model)).items()}
    keys = sorted(flat)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    torch_model.config.save_pretrained(sharded)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :]), 1):
        name = f"flax_model-{i:05d}-of-00002.msgpack"
        (sharded / name).write_bytes(flax.serialization.msgpack_serialize({k: flat[k] for k in part}))
        weight_map.update(dict.fromkeys(part, name))
    (sharded / "flax_model.msgpack.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _, from_shards, _ = from_pretrained(sharded)
    jax.tree.map(np.testing.assert_array_equal, from_shards, params)


def test_no_weights_is_a_clear_error(tmp_path, checkpoints):
    (tmp_path / "config.json").write_text((checkpoints["bert"][1] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        from_pretrained(tmp_path)
