"""``from_pretrained``: any supported HF checkpoint folder (or Llama ``.gguf`` file) into the jgoat model of its
family, dispatched on ``config.json``'s ``model_type`` to the family loaders (``jgoat.models.<family>.loader``); with
a mesh, straight onto it (partition rules of :mod:`jgoat.sharding`, so this module sits above it)."""

from __future__ import annotations

import functools
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jgoat import sharding
from jgoat.models.bert import SUPPORTED_MODEL_TYPES, load_encoder
from jgoat.models.formats import check_config_against_checkpoint
from jgoat.models.hf import LoadingInfo, model_folder
from jgoat.models.llama import DECODER_MODEL_TYPES, load_causal_lm
from jgoat.models.vit import is_vision_checkpoint, load_vision_model


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
    mesh: Mesh | None = None,
    rules: Sequence[tuple[str, Sequence[str | None]]] = (),
    logical: Mapping[str, sharding.MeshAxes] | None = None,
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
      mesh: load straight onto this device mesh (``jgoat.mesh(...)``): each param gets the sharding
        ``jgoat.shardings(abstract_params, mesh, rules=rules, logical=logical)`` assigns it (computed on
        ``jax.eval_shape`` shapes, nothing materialised) and is built from its checkpoint tensor(s) block by block,
        each process filling only its own devices' blocks (:func:`jgoat.models.hf.read_leaf`): no device and no host
        holds the whole model. Equal, bit for bit, to the load without a mesh. None: everything on the default device.
      rules, logical: partition rules tried before :data:`jgoat.sharding.PARAM_RULES` and logical-axis overrides
        (see :func:`jgoat.shardings`); only with ``mesh``.

    Returns:
      ``(model, params, config)`` (plus ``LoadingInfo`` if asked); run with
      ``model.apply({"params": params}, input_ids_BxT, attention_mask_BxT)``.

    Raises:
      ValueError: unsupported ``model_type`` or ``task``, or encoder tensors missing / of the wrong shape (all
        are listed; no partially loaded model is returned); ``rules`` / ``logical`` without a ``mesh``.
      TypeError: ``mesh`` is not a ``jax.sharding.Mesh``.

    Example::

      model, params, cfg = from_pretrained(minilm_path(), task="base")
      hidden_BxTxD = model.apply({"params": params}, ids_BxT, mask_BxT).last_hidden_state

      lm, lm_params, lm_cfg = from_pretrained(qwen_folder, dtype=jnp.bfloat16, remat_policy="dots")
      logits_BxTxV = lm.apply({"params": lm_params}, ids_BxT, mask_BxT).logits

      lm, sharded, _ = from_pretrained(llama_folder, mesh=jgoat.mesh(fsdp=8))  # each device holds 1/8 of a kernel
    """
    if mesh is not None and not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (e.g. jgoat.mesh(fsdp=8)), got {type(mesh).__name__}")
    if mesh is None and (rules or logical):
        raise ValueError("rules / logical are partition rules for a mesh: pass mesh=jgoat.mesh(...) with them")
    place = None if mesh is None else functools.partial(sharding.shardings, mesh=mesh, rules=rules, logical=logical)
    folder = model_folder(path)
    if is_vision_checkpoint(folder):  # model_type vit / clip / clip_vision_model
        return load_vision_model(
            folder,
            task=task,
            num_labels=num_labels,
            dtype=dtype,
            param_dtype=param_dtype,
            key=key,
            output_loading_info=output_loading_info,
            shardings=place,
        )
    hf_config = read_config(folder)
    check_config_against_checkpoint(hf_config, folder)  # before anything is built: a lying config fails here
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
            shardings=place,
        )
    return load_encoder(folder, hf_config, task=task, num_labels=num_labels, dtype=dtype, param_dtype=param_dtype,
                        key=key, output_loading_info=output_loading_info, shardings=place)
