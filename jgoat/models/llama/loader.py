"""Loads HF Llama / Mistral / Qwen2 checkpoint folders into :class:`~jgoat.models.llama.LlamaForCausalLM` (key map:
:func:`jgoat.models.hf.decoder_hf_key`)."""

from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jgoat.models.hf import (
    DECODER_BUFFER_SUFFIXES,
    LoadingInfo,
    TensorReader,
    canonical_decoder_key,
    canonical_keys,
    checkpoint_files,
    decoder_hf_key,
    flat_shardings,
    read_leaf,
)
from jgoat.models.llama.config import DECODER_TASKS, LlamaConfig
from jgoat.models.llama.modules import LlamaForCausalLM

logger = logging.getLogger(__name__)


def load_causal_lm(
    folder: str | os.PathLike,
    hf_config: dict[str, Any],
    *,
    task: str = "causal-lm",
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    scan_layers: bool = True,
    remat_policy: str | None = None,
    output_loading_info: bool = False,
    shardings: Callable[[Any], Any] | None = None,
):
    """Builds :class:`LlamaForCausalLM` and its params from a HF checkpoint folder (``jgoat.models.from_pretrained``
    calls it).

    Tensors are streamed one at a time (:func:`jgoat.models.hf.read_leaf`): each param's device blocks are host
    buffers filled layer by layer for a stacked (scanned) param (linears transposed from torch's ``[out, in]``), then
    handed to their devices. ``shardings`` maps the abstract params tree to a tree of jax Shardings (e.g.
    ``jgoat.shardings`` on a mesh): each param is then built straight onto its shards.
    """
    folder = pathlib.Path(folder)
    if task not in DECODER_TASKS:
        raise ValueError(f"Unknown task {task!r} for {hf_config.get('model_type')}; supported: "
                         f"{', '.join(DECODER_TASKS)}")
    param_dtype = dtype if param_dtype is None else param_dtype
    config = LlamaConfig.from_hf_dict(
        hf_config, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers, remat_policy=remat_policy
    )
    model = LlamaForCausalLM(config)
    dummy_1x1 = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy_1x1))["params"]
    placement = flat_shardings(shardings, shapes)

    files = checkpoint_files(folder)
    canonical = canonical_keys(files, canonical_decoder_key)
    reader = TensorReader()
    np_dtype = np.dtype(param_dtype)
    flat: dict[tuple[str, ...], jax.Array] = {}
    used: set[str] = set()
    missing, mismatched = [], []
    for fpath, want in traverse_util.flatten_dict(shapes).items():
        template, transpose, stacked = decoder_hf_key(fpath)
        names = [template.format(i=i) for i in range(want.shape[0])] if stacked else [template]
        per_layer = want.shape[1:] if stacked else want.shape
        expected = per_layer[::-1] if transpose else per_layer
        ok = True
        for name in names:
            ck = canonical.get(name)
            if ck is None:
                missing.append(name)
                ok = False
                continue
            used.add(ck)
            shape = reader.shape(files[ck], ck)
            if shape != tuple(expected):  # both in the checkpoint's (torch) layout
                mismatched.append(f"{ck}: checkpoint {shape} vs expected {tuple(expected)}")
                ok = False
        if not ok or missing or mismatched:
            continue  # keep checking, load nothing more
        flat[fpath] = read_leaf(reader, [(files[canonical[n]], canonical[n]) for n in names], want.shape, np_dtype,
                                perm=tuple(reversed(range(len(per_layer)))) if transpose else None, stacked=stacked,
                                sharding=None if placement is None else placement[fpath])
    if missing or mismatched:
        lines = [f"missing: {name}" for name in missing] + [f"shape mismatch: {m}" for m in mismatched]
        raise ValueError(f"Cannot load {folder} as {config.model_type} {task} (HF keys):\n  " + "\n  ".join(lines))

    info = LoadingInfo(newly_initialized=[], unused=sorted(set(files) - used))
    unused_weights = [k for k in info.unused if not k.endswith(DECODER_BUFFER_SUFFIXES)]
    if unused_weights:
        logger.warning("Unused checkpoint keys in %s: %s", folder, ", ".join(unused_weights))
    params = traverse_util.unflatten_dict(flat)
    return (model, params, config, info) if output_loading_info else (model, params, config)
