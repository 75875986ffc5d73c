"""Loads HF BERT / RoBERTa checkpoint folders into jgoat's encoders, without torch (key map:
:func:`jgoat.models.hf.hf_key`); checkpoint keys match with or without the ``bert.`` / ``roberta.`` prefix, so task
checkpoints and bare encoders (e.g. sentence-transformers' MiniLM, whose keys start at ``embeddings.``) both load into
either model."""

from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from jgoat.models.bert.config import BertConfig
from jgoat.models.bert.modules import BertForSequenceClassification, BertModel
from jgoat.models.hf import (
    BERT_BUFFER_KEYS,
    LoadingInfo,
    canonical_key,
    canonical_keys,
    checkpoint_files,
    flat_shardings,
    hf_key,
    init_head_leaf,
    place,
    read_matching,
)

logger = logging.getLogger(__name__)

TASKS = ("sequence-classification", "base")


def load_encoder(
    folder: str | os.PathLike,
    hf_config: dict[str, Any],
    *,
    task: str | None = None,
    num_labels: int | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    key: jax.Array | None = None,
    output_loading_info: bool = False,
    shardings: Callable[[Any], Any] | None = None,
) -> tuple[nn.Module, dict[str, Any], BertConfig] | tuple[nn.Module, dict[str, Any], BertConfig, LoadingInfo]:
    """Builds :class:`BertForSequenceClassification` (task ``"sequence-classification"``, the default) or
    :class:`BertModel` (``"base"``) and its params from a HF checkpoint folder (``jgoat.models.from_pretrained``
    calls it; see there for the arguments). Head / pooler parameters absent from the checkpoint are initialised as HF
    does, from `key`, and reported. ``shardings`` (abstract params tree -> tree of jax Shardings) builds each param
    straight onto its shards."""
    folder = pathlib.Path(folder)
    task = "sequence-classification" if task is None else task
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; supported: {', '.join(TASKS)}")
    param_dtype = dtype if param_dtype is None else param_dtype
    config = BertConfig.from_hf_dict(hf_config, num_labels=num_labels, dtype=dtype, param_dtype=param_dtype)
    prefix = config.base_model_prefix
    model = BertModel(config) if task == "base" else BertForSequenceClassification(config)
    dummy_1x1 = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy_1x1))["params"]

    files = checkpoint_files(folder)
    canonical = canonical_keys(files, lambda ck: canonical_key(ck, prefix))

    want_shapes = traverse_util.flatten_dict(shapes)
    placement = flat_shardings(shardings, shapes)

    def hf_name_transposed(fpath: tuple[str, ...]) -> tuple[str, bool]:
        return hf_key(fpath[1:] if fpath[0] == prefix else fpath)

    flat, used, to_init = read_matching(
        files, canonical, want_shapes, lambda p: hf_name_transposed(p)[0],
        torch_shape=lambda p, shape: shape[::-1] if hf_name_transposed(p)[1] else shape,
        from_torch=lambda p, a: a.T if hf_name_transposed(p)[1] else a,
        param_dtype=param_dtype, shardings=placement,
        what=f"{folder} as {config.model_type} {task} (HF keys, with or without the '{prefix}.' prefix)")

    key = jax.random.key(0) if key is None else key
    for i, (fpath, _) in enumerate(to_init):
        leaf_key = jax.random.fold_in(key, i)
        flat[fpath] = place(init_head_leaf(leaf_key, fpath[-1], want_shapes[fpath], config.initializer_range),
                            None if placement is None else placement[fpath])
    info = LoadingInfo(newly_initialized=[name for _, name in to_init], unused=sorted(set(files) - used))
    if info.newly_initialized:
        logger.warning("Newly initialised (not in %s): %s", folder, ", ".join(info.newly_initialized))
    unused_weights = [k for k in info.unused if canonical_key(k, prefix) not in BERT_BUFFER_KEYS]
    if unused_weights:
        logger.warning("Unused checkpoint keys in %s: %s", folder, ", ".join(unused_weights))
    params = traverse_util.unflatten_dict(flat)
    return (model, params, config, info) if output_loading_info else (model, params, config)
