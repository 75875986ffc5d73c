"""Loads HF ViT / CLIP checkpoint folders into jgoat's vision models, without torch (key map:
:func:`jgoat.models.hf.vision_hf_key`)."""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from jgoat.models.formats import check_config_against_checkpoint
from jgoat.models.hf import (
    VISION_BUFFER_KEYS,
    VISION_PREFIX,
    LoadingInfo,
    canonical_keys,
    checkpoint_files,
    flat_shardings,
    place,
    read_matching,
    vision_from_torch,
    vision_hf_key,
    vision_torch_shape,
)
from jgoat.models.vit.config import VISION_MODEL_TYPES, VISION_TASKS, CLIPVisionConfig, VisionConfig, ViTConfig
from jgoat.models.vit.modules import CLIPForImageClassification, CLIPVisionModel, ViTForImageClassification, ViTModel

logger = logging.getLogger(__name__)


def is_vision_checkpoint(path: str | os.PathLike) -> bool:
    """Whether the folder's ``config.json`` has a model_type in :data:`VISION_MODEL_TYPES`."""
    config = pathlib.Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") in VISION_MODEL_TYPES


def load_vision_model(
    path: str | os.PathLike,
    *,
    task: str | None = None,
    num_labels: int | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    key: jax.Array | None = None,
    output_loading_info: bool = False,
    shardings: Callable[[Any], Any] | None = None,
) -> tuple[nn.Module, dict[str, Any], VisionConfig] | tuple[nn.Module, dict[str, Any], VisionConfig, LoadingInfo]:
    """Builds a jgoat CLIP vision / ViT model and its params from a HF checkpoint folder (no torch).

    ``jgoat.models.from_pretrained`` calls this for model_type ``vit``, ``clip`` and ``clip_vision_model``.
    Tensors are streamed one at a time from ``model.safetensors`` (or a sharded index), transposed to the Flax
    layout and cast to ``param_dtype``. For a full ``clip`` checkpoint (``CLIPModel``) only the ``vision_model.*``
    (and ``classifier.*``) keys are read; the text tower is reported in ``LoadingInfo.unused`` and otherwise
    ignored. Checkpoint keys match with or without the ``vision_model.`` / ``vit.`` prefix.

    Args:
      path: folder with ``config.json`` and ``model.safetensors`` (or ``model.safetensors.index.json``).
      task: ``"image-classification"`` (default: :class:`CLIPForImageClassification` /
        :class:`ViTForImageClassification`, params ``{vision_model|vit, classifier}``) or ``"base"``
        (:class:`CLIPVisionModel` / :class:`ViTModel` with pooler, params without the top level).
      num_labels: classifier size; default from the config (``num_labels``, ``len(id2label)``, else 2).
      dtype: compute dtype, and the dtype parameters are cast to unless ``param_dtype`` is given.
      param_dtype: parameter dtype (default ``dtype``).
      key: PRNG key for head / pooler parameters missing from the checkpoint (default ``jax.random.key(0)``).
      output_loading_info: also return a :class:`~jgoat.models.hf.LoadingInfo` (HF names, without prefix).
      shardings: abstract params tree -> tree of jax Shardings (e.g. ``jgoat.shardings`` on a mesh): each param
        is built straight onto its shards (:func:`jgoat.models.hf.read_leaf`); None: the default device.

    Returns:
      ``(model, params, config)`` (plus ``LoadingInfo`` if asked); run with
      ``model.apply({"params": params}, pixel_values_BxHxWxC)``.

    Raises:
      ValueError: unsupported model_type / task, or tensors missing / of the wrong shape (all are listed; no
        partially loaded model is returned).

    Example::

      model, params, cfg = load_vision_model(folder, num_labels=10)  # new head initialised, reported
      logits_BxL = model.apply({"params": params}, preprocess(images, read_preprocessor_config(folder)))
    """
    folder = pathlib.Path(path)
    hf = json.loads((folder / "config.json").read_text())
    model_type = hf.get("model_type")
    if model_type not in VISION_MODEL_TYPES:
        raise ValueError(f"Unsupported model_type {model_type!r}; supported: {', '.join(VISION_MODEL_TYPES)}")
    check_config_against_checkpoint(hf, folder)  # before anything is built: a lying config fails here
    task = "image-classification" if task is None else task
    if task not in VISION_TASKS:
        raise ValueError(f"Unknown task {task!r} for {model_type}; supported: {', '.join(VISION_TASKS)}")
    param_dtype = dtype if param_dtype is None else param_dtype
    kw = dict(num_labels=num_labels, dtype=dtype, param_dtype=param_dtype)
    config: VisionConfig
    if model_type == "vit":
        config = ViTConfig.from_hf_dict(hf, **kw)
        model = ViTModel(config) if task == "base" else ViTForImageClassification(config)
    else:
        config = CLIPVisionConfig.from_hf_dict(hf, **kw)
        model = CLIPVisionModel(config) if task == "base" else CLIPForImageClassification(config)
    prefix = VISION_PREFIX[model_type]
    dummy = jnp.zeros((1, config.image_size, config.image_size, config.num_channels), dtype)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy))["params"]

    files = checkpoint_files(folder)
    # A full CLIP checkpoint's text tower, projections and logit_scale are ignored.
    ignored = {ck for ck in files if model_type == "clip" and not ck.startswith((prefix + ".", "classifier."))}
    canonical = canonical_keys(files, lambda ck: None if ck in ignored else ck.removeprefix(prefix + "."))

    want_shapes = traverse_util.flatten_dict(shapes)
    placement = flat_shardings(shardings, shapes)
    flat, used, to_init = read_matching(
        files, canonical, want_shapes, lambda p: vision_hf_key(p[1:] if p[0] == prefix else p),
        torch_shape=lambda p, shape: vision_torch_shape(shape, p[-1]),
        from_torch=lambda p, a: vision_from_torch(a, p[-1]),
        param_dtype=param_dtype, shardings=placement,
        what=f"{folder} as {model_type} {task} (HF keys, with or without the '{prefix}.' prefix)")

    key = jax.random.key(0) if key is None else key
    for i, (fpath, name) in enumerate(to_init):
        shape_dtype = want_shapes[fpath]
        if fpath[-1] == "kernel":
            std = config.head_init_std if name.startswith("classifier.") else config.initializer_range
            normal = jax.random.normal(jax.random.fold_in(key, i), shape_dtype.shape, jnp.float32)
            flat[fpath] = (std * normal).astype(shape_dtype.dtype)
        else:
            flat[fpath] = jnp.zeros(shape_dtype.shape, shape_dtype.dtype)
        flat[fpath] = place(flat[fpath], None if placement is None else placement[fpath])
    info = LoadingInfo(newly_initialized=[name for _, name in to_init], unused=sorted(set(files) - used))
    if info.newly_initialized:
        logger.warning("Newly initialised (not in %s): %s", folder, ", ".join(info.newly_initialized))
    unused_weights = [k for k in info.unused
                      if k not in ignored and k.removeprefix(prefix + ".") not in VISION_BUFFER_KEYS]
    if unused_weights:
        logger.warning("Unused checkpoint keys in %s: %s", folder, ", ".join(unused_weights))
    if ignored:
        logger.info(
            "Ignored %d non-vision keys (text tower, projections) of the CLIP checkpoint %s", len(ignored), folder
        )
    params = traverse_util.unflatten_dict(flat)
    return (model, params, config, info) if output_loading_info else (model, params, config)
