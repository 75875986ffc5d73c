"""Loading straight onto a mesh, run by tests/test_sharded_load.py in ONE subprocess on 8 fake CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python tests/sharded_load_checks.py OUT.json

Tiny checkpoints are written by ``jgoat.models.save_pretrained`` from randomly initialised (and perturbed: no identity
norms) jgoat models, so no torch is needed. Computes, never asserts: for each (checkpoint, load options, mesh) it
records which params differ in any bit from the single-device load, which carry another sharding than
``jgoat.shardings`` assigns them, the largest share of the params' bytes any one device holds, and how many tensor
bytes the load read (each tensor once: the sharded reader fills every local block from one pass over the rows).
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
]


class ReadCounter:
    """Counts the bytes SafetensorsFile reads (whole tensors and row ranges)."""

    def __init__(self):
        self.bytes = 0
        read, read_rows = formats.SafetensorsFile.read, formats.SafetensorsFile.read_rows

        def counted_read(f, key):
            out = read(f, key)
            self.bytes += out.nbytes
            return out

        def counted_rows(f, key, start, stop):
            out = read_rows(f, key, start, stop)
            self.bytes += out.nbytes
            return out

        formats.SafetensorsFile.read, formats.SafetensorsFile.read_rows = counted_read, counted_rows


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
                                          "same_info": tuple(info) == tuple(ref_info)}
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


def main(path: str) -> None:
    assert len(jax.devices()) == 8, jax.devices()
    counter = ReadCounter()
    with tempfile.TemporaryDirectory() as tmp:
        folders = build(Path(tmp))
        report = {"loads": run_loads(folders, counter), "wraps": run_wraps(folders)}
    Path(path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
