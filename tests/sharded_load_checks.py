"""Loading straight onto a mesh, run by tests/test_sharded_load.py in ONE subprocess on 8 fake CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python tests/sharded_load_checks.py OUT.json

Tiny checkpoints are written by ``jgoat.models.save_pretrained`` from randomly initialised (and perturbed: no identity
norms) jgoat models, and rewritten as ``pytorch_model.bin`` (torch.save of the same tensors, as transformers<5 wrote
with safe_serialization=False) and as legacy ``flax_model.msgpack`` (transformers 4.x's Flax naming and layout).
Computes, never asserts: for each (checkpoint, load options, mesh) it records which params differ in any bit from the
single-device load (and, for .bin / .msgpack, from the single-device load of the safetensors they were written
from), which carry another sharding than ``jgoat.shardings`` assigns them, the largest share of the params' bytes
any one device holds, and how many tensor bytes the load read (each tensor once: the sharded reader fills every local
block from one pass over the rows; .bin and .msgpack tensors are read whole, once).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

import jgoat
from jgoat.models import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
    causal_lm_loss,
    formats,
    from_pretrained,
    hf,
    save_pretrained,
)

SMALL_CHUNK = 1000  # bytes: 3 rows of a 64-wide fp32 tensor per read
MESHES = {"8,1,1": (8, 1, 1), "1,8,1": (1, 8, 1), "1,4,2": (1, 4, 2), "2,2,2": (2, 2, 2)}
LLAMA = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, tie_word_embeddings=False)
BERT = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  max_position_embeddings=32, num_labels=3)
VIT = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=16,
                patch_size=4, num_labels=3)
CLIP = CLIPVisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        image_size=16, patch_size=4)


def _perturbed(model, dummy, seed):
    params = model.init(jax.random.key(seed), dummy)["params"]
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
                                        for x, k in zip(leaves, keys, strict=True)])


def build(root: Path) -> dict[str, Path]:
    """{name: checkpoint folder}: Llama fp32 (one file and a sharded index), Llama bf16, BERT with and without its
    classifier head (the head is then initialised), ViT, CLIP vision (4-D conv kernel, permuted)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    pixels = jnp.zeros((1, 16, 16, 3), jnp.float32)
    llama = _perturbed(LlamaForCausalLM(LLAMA), ids, 0)
    bert = _perturbed(BertForSequenceClassification(BERT), ids, 2)
    out = {
        "llama": save_pretrained(LLAMA, llama, root / "llama"),
        "llama_index": save_pretrained(LLAMA, llama, root / "llama_index", max_shard_size=40_000),
        "llama_bf16": save_pretrained(LLAMA, llama, root / "llama_bf16", dtype=jnp.bfloat16),
        "bert": save_pretrained(BERT, bert, root / "bert"),
        "bert_base": save_pretrained(BERT, _perturbed(BertModel(BERT), ids, 4), root / "bert_base"),
        "vit": save_pretrained(VIT, _perturbed(ViTForImageClassification(VIT), pixels, 6), root / "vit"),
        "clip": save_pretrained(CLIP, _perturbed(CLIPVisionModel(CLIP), pixels, 8), root / "clip"),
    }
    assert (out["llama_index"] / formats.SAFE_WEIGHTS_INDEX_NAME).is_file()
    for name in ("llama", "bert"):
        out[f"{name}_bin"] = as_torch_bin(out[name], root / f"{name}_bin")
    for name in ("llama", "bert", "clip"):
        out[f"{name}_msgpack"] = as_flax_msgpack(out[name], root / f"{name}_msgpack", rms_norm=name == "llama")
    return out


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    with formats.SafetensorsFile(folder / "model.safetensors") as f:
        return {k: f.read(k) for k in f.keys()}


def _copy_config(folder: Path, out: Path) -> Path:
    out.mkdir()
    (out / "config.json").write_text((folder / "config.json").read_text())
    return out


def as_torch_bin(folder: Path, out: Path) -> Path:
    """The safetensors folder's tensors as one ``pytorch_model.bin`` (torch.save of a state dict)."""
    import torch

    _copy_config(folder, out)
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in _tensors(folder).items()}, out / "pytorch_model.bin")
    return out


def as_flax_msgpack(folder: Path, out: Path, *, rms_norm: bool) -> Path:
    """The safetensors folder's tensors as a transformers 4.x ``flax_model.msgpack``: the torch key split on '.',
    linear weights as ``kernel`` [in, out], conv weights as ``kernel`` [kh, kw, C, D], embeddings as ``embedding``,
    LayerNorm weights as ``scale`` (RMSNorm keeps ``weight``); the inverse of
    :func:`jgoat.models.formats.flax_to_torch_key`."""
    from flax import serialization

    tree: dict = {}
    for key, array in _tensors(folder).items():
        *modules, leaf = key.split(".")
        if leaf == "weight" and array.ndim == 2:
            embedding = "embed" in modules[-1]
            leaf, array = ("embedding", array) if embedding else ("kernel", array.T)
        elif leaf == "weight" and array.ndim == 4:
            leaf, array = "kernel", array.transpose(2, 3, 1, 0)
        elif leaf == "weight" and not rms_norm:
            leaf = "scale"
        node = tree
        for m in modules:
            node = node.setdefault(m, {})
        node[leaf] = np.ascontiguousarray(array)
    _copy_config(folder, out)
    (out / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))
    return out


# (case name, checkpoint, from_pretrained keyword arguments)
CASES = [
    ("llama/scan", "llama", {}),
    ("llama/unrolled", "llama", {"scan_layers": False}),
    ("llama/index", "llama_index", {}),
    ("llama/bf16_as_fp32", "llama_bf16", {}),
    ("llama/fp32_as_bf16", "llama", {"dtype": jnp.bfloat16}),
    ("llama/layers_on_data", "llama", {"logical": {"layers": "data"}}),
    ("llama/user_rule", "llama", {"rules": [(r".*mlp/up_proj/kernel", (None, "embed"))]}),
    ("bert/cls", "bert", {}),
    ("bert/new_head", "bert_base", {"num_labels": 5}),
    ("vit/cls", "vit", {}),
    ("clip/base", "clip", {"task": "base"}),
    ("llama/bin", "llama_bin", {}),
    ("bert/bin", "bert_bin", {}),
    ("llama/msgpack_unrolled", "llama_msgpack", {"scan_layers": False}),
    ("bert/msgpack", "bert_msgpack", {}),
    ("clip/msgpack", "clip_msgpack", {"task": "base"}),
]


class ReadCounter:
    """Counts the bytes the checkpoint readers read: SafetensorsFile (whole tensors and row ranges), TorchBinFile and
    FlaxMsgpackFile (whole tensors)."""

    def __init__(self):
        self.bytes = 0
        for cls, name in ((formats.SafetensorsFile, "read"), (formats.SafetensorsFile, "read_rows"),
                          (formats.TorchBinFile, "read"), (formats.FlaxMsgpackFile, "read")):
            setattr(cls, name, self._counted(getattr(cls, name)))

    def _counted(self, read):
        def counted(f, *args):
            out = read(f, *args)
            self.bytes += out.nbytes
            return out

        return counted


def _bits(x) -> np.ndarray:
    a = np.asarray(x)
    return a.view(np.dtype(f"u{a.dtype.itemsize}")) if a.dtype.itemsize > 1 else a


def compare(ref, got, expected_sh) -> dict:
    flat_ref, flat_got = traverse_util.flatten_dict(ref), traverse_util.flatten_dict(got)
    flat_sh = traverse_util.flatten_dict(expected_sh)
    differ = sorted("/".join(p) for p in flat_ref if p not in flat_got or flat_ref[p].dtype != flat_got[p].dtype
                    or flat_ref[p].shape != flat_got[p].shape
                    or not np.array_equal(_bits(flat_ref[p]), _bits(flat_got[p])))
    differ += sorted("/".join(p) for p in flat_got if p not in flat_ref)
    wrong_sh = sorted("/".join(p) for p, x in flat_got.items()
                      if not x.sharding.is_equivalent_to(flat_sh[p], x.ndim))
    per_device: dict = {}
    for x in flat_got.values():
        for s in x.addressable_shards:
            per_device[s.device] = per_device.get(s.device, 0) + s.data.nbytes
    total = sum(x.nbytes for x in flat_ref.values())
    sharded = sum(not x.sharding.is_fully_replicated for x in flat_got.values())
    return {"differ": differ, "wrong_sharding": wrong_sh, "n_leaves": len(flat_ref), "n_sharded": sharded,
            "max_device_fraction": max(per_device.values()) / total, "n_devices": len(per_device)}


def run_loads(folders: dict[str, Path], counter: ReadCounter) -> dict:
    out, chunk = {}, hf.READ_CHUNK_BYTES
    for name, ckpt, options in CASES if "--wraps-only" not in sys.argv else ():
        kwargs = dict(options)
        rules = {k: kwargs.pop(k) for k in ("rules", "logical") if k in kwargs}
        counter.bytes = 0
        _, ref, _, ref_info = from_pretrained(folders[ckpt], output_loading_info=True, **kwargs)
        ref_read = counter.bytes
        source = ckpt.removesuffix("_bin").removesuffix("_msgpack")  # the safetensors folder .bin / .msgpack copy
        safetensors = ref if source == ckpt else from_pretrained(folders[source], **kwargs)[1]
        for mesh_name, (data, fsdp, tensor) in MESHES.items():
            mesh = jgoat.mesh(data=data, fsdp=fsdp, tensor=tensor)
            counter.bytes = 0
            hf.READ_CHUNK_BYTES = SMALL_CHUNK  # many row pieces per tensor (the reference read each in one)
            try:
                _, got, _, info = from_pretrained(folders[ckpt], mesh=mesh, output_loading_info=True, **kwargs, **rules)
            finally:
                hf.READ_CHUNK_BYTES = chunk
            read = counter.bytes
            expected = jgoat.shardings(jax.eval_shape(lambda r=ref: r), mesh, **rules)
            out[f"{name}/{mesh_name}"] = {**compare(ref, got, expected), "read_bytes": read, "ref_read_bytes": ref_read,
                                          "same_info": tuple(info) == tuple(ref_info),
                                          "differ_from_safetensors": compare(safetensors, got, expected)["differ"]}
    return out


# (name, config, checkpoint): SVD inits (PiSSA, MiLoRA, GOAT's SVD segments, KaSA) and the others; Llama's layers
# are stacked (scan, the layer-split SVD path), BERT's are unrolled.
WRAPS = [
    ("pissa", lambda: jgoat.LoraConfig(rank=4, init="pissa", targets="all-linear"), "llama", ("1,8,1", "1,4,2")),
    ("goat", lambda: jgoat.GoatConfig(rank=8, experts=4, top_k=2, targets="all-linear"), "llama", ("1,8,1", "1,4,2")),
    ("milora", lambda: jgoat.LoraConfig(rank=4, init="milora", targets=["down_proj"]), "llama", ("1,4,2",)),
    ("dora", lambda: jgoat.LoraConfig(rank=4, use_dora=True, targets=["v_proj", "up_proj"]), "llama", ("1,4,2",)),
    ("kasa", lambda: jgoat.KasaConfig(rank=4, targets=["o_proj", "gate_proj"]), "llama", ("1,4,2",)),
    ("goat", lambda: jgoat.GoatConfig(rank=8, experts=4, top_k=2, targets=["query", "value"]), "bert", ("1,4,2",)),
]


def run_wraps(folders: dict[str, Path]) -> dict:
    """Single-device wrap vs wrap of the mesh-loaded params with ``shardings=jgoat.shardings`` on the mesh."""
    out = {}
    key = jax.random.key(3)
    for ckpt in ("llama", "bert"):
        _, ref_params, _ = from_pretrained(folders[ckpt])
        for mesh_name in MESHES:
            mesh = jgoat.mesh(**dict(zip(("data", "fsdp", "tensor"), MESHES[mesh_name], strict=True)))
            runs = [(method, make) for method, make, which, meshes in WRAPS if which == ckpt and mesh_name in meshes]
            if not runs:
                continue
            _, params, _ = from_pretrained(folders[ckpt], mesh=mesh)
            for method, make in runs:
                cfg = make()
                ref = jgoat.split(jgoat.wrap(ref_params, cfg, key=key))[0]
                wrapped = jgoat.wrap(params, cfg, key=key,
                                     shardings=lambda tree, m=mesh: jgoat.shardings(tree, m))
                got = jgoat.split(wrapped)[0]
                expected = jgoat.split(jgoat.shardings(jax.eval_shape(lambda w=wrapped: w), mesh))[0]
                ref_leaves = jax.tree.leaves_with_path(ref)
                got_leaves = jax.tree.leaves(got)
                sh_leaves = jax.tree.leaves(expected, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
                rel = [float(jnp.max(jnp.abs(np.asarray(g, np.float64) - np.asarray(r, np.float64)))
                             / max(float(jnp.max(jnp.abs(np.asarray(r, np.float64)))), 1e-30))
                       for (_, r), g in zip(ref_leaves, got_leaves, strict=True)]
                wrong = [jax.tree_util.keystr(p) for (p, _), g, e in zip(ref_leaves, got_leaves, sh_leaves, strict=True)
                         if not g.sharding.is_equivalent_to(e, g.ndim)]
                pairs = list(zip(ref_leaves, got_leaves, strict=True))
                equal = all(np.array_equal(_bits(g), _bits(r)) for (_, r), g in pairs)
                out[f"{ckpt}/{method}/{mesh_name}"] = {
                    "n_leaves": len(ref_leaves), "max_rel_diff": max(rel), "bit_equal": equal, "wrong_sharding": wrong,
                    "n_sharded": sum(not g.sharding.is_fully_replicated for g in got_leaves)}
    return out


QUANTIZE_MESHES = {"llama": ("1,8,1", "1,4,2", "2,2,2"), "bert": ("1,4,2",)}


def run_quantize(folders: dict[str, Path]) -> dict:
    """``jgoat.quantize_nf4`` of the mesh-loaded params with ``shardings=`` vs of the single-device params: the NF4
    codes, absmax and double-quantisation statistics bit for bit, and their shardings."""
    out = {}
    for ckpt, meshes in QUANTIZE_MESHES.items():
        ref = jgoat.quantize_nf4(from_pretrained(folders[ckpt])[1])
        for mesh_name in meshes:
            mesh = jgoat.mesh(**dict(zip(("data", "fsdp", "tensor"), MESHES[mesh_name], strict=True)))
            got = jgoat.quantize_nf4(from_pretrained(folders[ckpt], mesh=mesh)[1],
                                     shardings=lambda tree, m=mesh: jgoat.shardings(tree, m))
            expected = jgoat.shardings(jax.eval_shape(lambda g=got: g), mesh)
            pairs = list(zip(jax.tree.leaves_with_path(ref), jax.tree.leaves(got),
                             jax.tree.leaves(expected, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)),
                             strict=True))
            nf4 = [(p, r, g, e) for (p, r), g, e in pairs if "codes" in jax.tree_util.keystr(p)]
            out[f"{ckpt}/{mesh_name}"] = {
                "n_nf4": len(nf4),
                "differ": [jax.tree_util.keystr(p) for (p, r), g, _ in pairs if not np.array_equal(_bits(r), _bits(g))],
                "wrong_sharding": [jax.tree_util.keystr(p) for (p, _), g, e in pairs
                                   if not g.sharding.is_equivalent_to(e, g.ndim)],
                "codes_sharded": sum(not g.sharding.is_fully_replicated for _, _, g, _ in nf4)}
    return out


def run_gora(folders: dict[str, Path]) -> dict:
    """``jgoat.gora_gradients`` (GoRA's Ḡ, every linear of the Llama, 3 batches) of the mesh-loaded params vs of
    the single-device params: the largest difference relative to each kernel's largest |Ḡ|, and whether each
    accumulator carries its kernel's sharding."""
    model, ref, _ = from_pretrained(folders["llama"])
    mesh = jgoat.mesh(**dict(zip(("data", "fsdp", "tensor"), MESHES["1,4,2"], strict=True)))
    _, params, _ = from_pretrained(folders["llama"], mesh=mesh)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, LLAMA.vocab_size, (8, 16)).astype(np.int32) for _ in range(3)]

    def loss(p, ids):
        return causal_lm_loss(model.apply({"params": p}, ids, jnp.ones_like(ids)).logits, ids)

    cfg = jgoat.GoraConfig(targets="all-linear")
    want = jgoat.gora_gradients(ref, loss, batches, targets=cfg, progress=False)
    got = jgoat.gora_gradients(params, loss, batches, targets=cfg, progress=False)
    kernels = {"/".join(p[:-1]): x for p, x in traverse_util.flatten_dict(params).items() if p[-1] == "kernel"}
    return {name: {"rel_diff": float(np.max(np.abs(np.asarray(got[name]) - np.asarray(g))) / np.max(np.abs(g))),
                   "kernel_sharding": got[name].sharding.is_equivalent_to(kernels[name].sharding, g.ndim)}
            for name, g in want.items()}


def main(path: str) -> None:
    assert len(jax.devices()) == 8, jax.devices()
    counter = ReadCounter()
    with tempfile.TemporaryDirectory() as tmp:
        folders = build(Path(tmp))
        report = {"loads": run_loads(folders, counter), "wraps": run_wraps(folders), "nf4": run_quantize(folders),
                  "gora": run_gora(folders)}
    Path(path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
