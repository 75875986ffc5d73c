"""``save_pretrained``: jgoat params -> a Hugging Face checkpoint folder that transformers (torch) loads.

The inverse of :func:`jgoat.models.from_pretrained`, driven by the same per-family key maps
(:func:`jgoat.models.hf.hf_key`, :func:`jgoat.models.hf.decoder_hf_key`, :func:`jgoat.models.hf.vision_hf_key`), so the
two directions cannot drift apart: Dense kernels are transposed back to torch's ``[out, in]``, conv kernels to
``[out, in, P, P]`` (the inverse of the loader's permutation), scanned decoder layers are unstacked to
``model.layers.{i}``, and each tensor is streamed to ``model.safetensors`` (or shards + index) one at a time.
LoRA-family adapters are merged first (:func:`jgoat.merge`); GOAT is never merged.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jgoat.adapters import GoatAdapter
from jgoat.core import ADAPTER_KEY, iter_modules, path_str, to_dict
from jgoat.models import formats, hf, llama, vit
from jgoat.models.auto import read_config
from jgoat.models.bert import BertConfig, BertForSequenceClassification, BertModel
from jgoat.models.llama import LlamaConfig, LlamaForCausalLM
from jgoat.models.vit import (
    CLIPForImageClassification,
    CLIPVisionConfig,
    CLIPVisionModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)
from jgoat.wrap import merge

ModelConfig = BertConfig | LlamaConfig | ViTConfig | CLIPVisionConfig

# Non-weight files of a checkpoint folder worth carrying over (tokenizer, generation and image-processor settings).
_AUX_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
    "chat_template.json", "generation_config.json", "preprocessor_config.json",
)
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_DECODER_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


# ---------------------------------------------------------------------------------------------- config.json


def _labels(n: int, hf_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``id2label`` / ``label2id`` for ``n`` classes: the source's when it has exactly ``n``, else LABEL_i."""
    id2label = dict((hf_config or {}).get("id2label") or {})
    if len(id2label) != n:
        id2label = {str(i): f"LABEL_{i}" for i in range(n)}
    return {"id2label": id2label, "label2id": {v: int(k) for k, v in id2label.items()}}


def _bert_hf_dict(cfg: BertConfig) -> dict[str, Any]:
    names = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id",
             "hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "initializer_range")
    return {"model_type": cfg.model_type, **{n: getattr(cfg, n) for n in names},
            "position_embedding_type": "absolute"}


def _decoder_hf_dict(cfg: LlamaConfig) -> dict[str, Any]:
    names = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
             "tie_word_embeddings", "attention_dropout", "initializer_range")
    out = {"model_type": cfg.model_type, **{n: getattr(cfg, n) for n in names}}
    mt, biases = cfg.model_type, (cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias)
    if mt == "llama":
        if cfg.qkv_bias != cfg.o_bias:
            raise ValueError("HF Llama has one attention_bias flag for q/k/v/o; this config has "
                             f"qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias}")
        if cfg.sliding_window is not None:
            raise ValueError("HF Llama has no sliding window; this config sets sliding_window")
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    elif mt == "mistral":
        if any(biases):
            raise ValueError(f"HF Mistral has no biases; this config has (qkv, o, mlp) bias = {biases}")
        out["sliding_window"] = cfg.sliding_window
    else:  # qwen2: q/k/v bias always, nothing else
        if biases != (True, False, False):
            raise ValueError(f"HF Qwen2 has q/k/v bias only; this config has (qkv, o, mlp) bias = {biases}")
        window = cfg.sliding_window is not None
        out.update(use_sliding_window=window, sliding_window=cfg.sliding_window, max_window_layers=0)
    rope = cfg.rope_parameters
    # transformers 5 reads rope_parameters; transformers<5 reads rope_theta + rope_scaling.
    out.update(rope_theta=cfg.rope_theta, rope_parameters={"rope_theta": cfg.rope_theta, **rope},
               rope_scaling=None if rope["rope_type"] == "default" else dict(rope))
    return out


def _vision_arch_dict(cfg: ViTConfig | CLIPVisionConfig) -> dict[str, Any]:
    if isinstance(cfg, ViTConfig):
        names = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
                 "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range", "layer_norm_eps",
                 "image_size", "patch_size", "num_channels", "qkv_bias", "pooler_output_size", "pooler_act")
        return {"model_type": "vit", **{n: getattr(cfg, n) for n in names}}
    names = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
             "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout", "initializer_range",
             "initializer_factor")
    return {"model_type": "clip_vision_model", **{n: getattr(cfg, n) for n in names}}


# ------------------------------------------------------------------------------------------------ families


@dataclasses.dataclass(frozen=True)
class _Plan:
    """How one family's params map to a HF checkpoint."""

    architecture: str  # HF class name, for config.json "architectures"
    model: nn.Module  # jgoat model the params belong to, rebuilt from the written config.json to check shapes
    tensors: Callable[[], list[tuple[str, tuple[int, ...], Any, Callable[[], np.ndarray]]]]  # (HF key, shape,
    # dtype, read); called once the params are known to match the model


def _head_size(flat: Mapping[tuple[str, ...], Any]) -> int | None:
    """Classes of a ``classifier`` head: ``classifier/kernel`` or RoBERTa's ``classifier/out_proj/kernel``."""
    for path in (("classifier", "kernel"), ("classifier", "out_proj", "kernel")):
        if path in flat:
            return int(flat[path].shape[-1])
    return None


def _producer(x: Any, index: int | None, perm: tuple[int, ...] | None) -> Callable[[], np.ndarray]:
    def produce() -> np.ndarray:
        array = np.asarray(x if index is None else x[index])  # one device -> host transfer per tensor
        return array if perm is None else array.transpose(perm)

    return produce


def _torch_perm_of_vision(leaf: str, ndim: int) -> tuple[int, ...] | None:
    """The permutation undoing :func:`jgoat.models.hf.vision_from_torch` (read off a tiny array whose axes differ in
    size, so the loader stays the one definition of the layout)."""
    probe = np.empty(tuple(range(2, ndim + 2)), np.int8)
    to_flax = [probe.shape.index(n) for n in hf.vision_from_torch(probe, leaf).shape]
    inverse = tuple(int(i) for i in np.argsort(to_flax))
    return None if inverse == tuple(range(ndim)) else inverse


def _hf_shape(shape: tuple[int, ...], perm: tuple[int, ...] | None) -> tuple[int, ...]:
    return shape if perm is None else tuple(shape[p] for p in perm)


def _encoder_plan(cfg: BertConfig, flat, written: Mapping[str, Any]) -> _Plan:
    prefix = cfg.base_model_prefix
    has_head = prefix in {p[0] for p in flat}
    num_labels = _head_size(flat) if has_head else None
    jcfg = BertConfig.from_hf_dict(written, num_labels=num_labels, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    model = BertForSequenceClassification(jcfg) if has_head else BertModel(jcfg)

    def tensors():
        out = []
        for fpath, x in flat.items():
            inner = fpath[1:] if fpath[0] == prefix else fpath
            key, transpose = hf.hf_key(inner)
            key = f"{prefix}.{key}" if fpath[0] == prefix else key
            perm = (1, 0) if transpose else None
            out.append((key, _hf_shape(x.shape, perm), x.dtype, _producer(x, None, perm)))
        return out

    family = "Bert" if cfg.model_type == "bert" else "Roberta"
    arch = f"{family}ForSequenceClassification" if has_head else f"{family}Model"
    return _Plan(arch, model, tensors)


def _decoder_plan(cfg: LlamaConfig, flat, written: Mapping[str, Any]) -> _Plan:
    scanned = any(p[:2] == ("model", "layers") for p in flat)
    jcfg = LlamaConfig.from_hf_dict(written, dtype=cfg.dtype, param_dtype=cfg.param_dtype, scan_layers=scanned)

    def tensors():
        out = []
        for fpath, x in flat.items():
            template, transpose, stacked = hf.decoder_hf_key(fpath)
            perm = (1, 0) if transpose else None
            per_layer = x.shape[1:] if stacked else x.shape
            for i in range(x.shape[0]) if stacked else [None]:
                key = template.format(i=i) if stacked else template
                out.append((key, _hf_shape(per_layer, perm), x.dtype, _producer(x, i, perm)))
        return out

    return _Plan(_DECODER_ARCH[cfg.model_type], LlamaForCausalLM(jcfg), tensors)


def _vision_plan(cfg: ViTConfig | CLIPVisionConfig, flat, written: Mapping[str, Any]) -> _Plan:
    is_vit = isinstance(cfg, ViTConfig)
    prefix = hf.VISION_PREFIX["vit" if is_vit else "clip"]
    has_head = prefix in {p[0] for p in flat}
    num_labels = _head_size(flat) if has_head else None
    config_cls = ViTConfig if is_vit else CLIPVisionConfig
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    jcfg = config_cls.from_hf_dict(written, **({"num_labels": num_labels} if has_head else {}), **kw)
    if is_vit:
        model_cls = ViTForImageClassification if has_head else ViTModel
    else:
        model_cls = CLIPForImageClassification if has_head else CLIPVisionModel
    model, arch = model_cls(jcfg), model_cls.__name__  # jgoat's vision classes carry HF's class names

    def tensors():
        out = []
        for fpath, x in flat.items():
            if fpath[0] == prefix:
                key = f"{prefix}.{hf.vision_hf_key(fpath[1:])}"
            elif fpath[0] == "classifier" or is_vit:
                key = hf.vision_hf_key(fpath)
            else:  # HF's bare CLIPVisionModel keeps its vision_model level
                key = f"{prefix}.{hf.vision_hf_key(fpath)}"
            perm = _torch_perm_of_vision(fpath[-1], x.ndim)
            out.append((key, _hf_shape(x.shape, perm), x.dtype, _producer(x, None, perm)))
        return out

    return _Plan(arch, model, tensors)


def _written_config(cfg: ModelConfig, flat, source: Mapping[str, Any] | None) -> dict[str, Any]:
    """config.json content: the source's (adapted to what is saved) or one regenerated from ``cfg``."""
    if isinstance(cfg, BertConfig):
        out = dict(source) if source is not None else _bert_hf_dict(cfg)
        head = _head_size(flat) if cfg.base_model_prefix in {p[0] for p in flat} else None
    elif isinstance(cfg, LlamaConfig):
        out = dict(source) if source is not None else _decoder_hf_dict(cfg)
        head = None
    else:
        is_vit = isinstance(cfg, ViTConfig)
        has_head = hf.VISION_PREFIX["vit" if is_vit else "clip"] in {p[0] for p in flat}
        head = _head_size(flat) if has_head else None
        if source is not None and not is_vit:
            vision = dict(source.get("vision_config") or {}) if source.get("model_type") == "clip" else dict(source)
            vision["model_type"] = "clip_vision_model"
        else:
            vision = dict(source) if source is not None else _vision_arch_dict(cfg)
        if is_vit:
            out = vision
        elif has_head:  # HF's CLIPForImageClassification takes a full CLIP config
            keep = {k: v for k, v in (source or {}).items() if k not in ("vision_config", "model_type")}
            out = {**keep, "model_type": "clip", "vision_config": vision}
            out.setdefault("text_config", {})
        else:
            out = vision
    if head is not None:
        out.pop("num_labels", None)
        out.update(_labels(head, out))
    return out


# ------------------------------------------------------------------------------------------------ public API


def _parse_size(size: int | str | None) -> int | None:
    if size is None or isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B)\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size must be bytes or like '5GB' / '500MiB', got {size!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _plain_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Params without adapters: LoRA-family adapters merged, GOAT refused, modules_to_save markers dropped."""
    params = to_dict(params)
    if set(params) == {"params"}:
        params = params["params"]
    goat = [path_str(p) for p, m in iter_modules(params) if isinstance(m.get(ADAPTER_KEY), GoatAdapter)]
    if goat:
        raise ValueError(
            f"GOAT adapters at {goat[:3]}{' ...' if len(goat) > 3 else ''}: GOAT is never merged into a checkpoint "
            "(its routing depends on the input). Save the base params without adapters with save_pretrained and the "
            "adapters with jgoat.export_goat."
        )
    if any(ADAPTER_KEY in m for _, m in iter_modules(params)):
        params = merge(params)
    left = [path_str(p) for p, m in iter_modules(params) if ADAPTER_KEY in m]
    if left:
        raise ValueError(f"Adapters that cannot be merged remain at {left[:3]}; save them separately")
    hooks = ["/".join(p) for p in traverse_util.flatten_dict(params) if any(k.startswith(ADAPTER_KEY) for k in p)]
    if hooks:  # e.g. model/jgoat_prompt, model/jgoat_prefix: they change the graph, no HF model has them
        raise ValueError(f"{hooks[:3]} are jgoat hook parameters (prompt / prefix tuning), which no Hugging Face "
                         "checkpoint can hold; remove them and save them separately")
    return params


def _config_of(model_config_or_folder: Any) -> tuple[ModelConfig, pathlib.Path | None]:
    obj = model_config_or_folder
    if isinstance(obj, nn.Module):
        obj = obj.config
    if isinstance(obj, ModelConfig):
        return obj, None
    folder = pathlib.Path(obj)
    if vit.is_vision_checkpoint(folder):
        raw = json.loads((folder / "config.json").read_text())
        cls = ViTConfig if raw["model_type"] == "vit" else CLIPVisionConfig
        return cls.from_hf_dict(raw), folder
    raw = read_config(folder)
    cls = LlamaConfig if raw["model_type"] in llama.DECODER_MODEL_TYPES else BertConfig
    return cls.from_hf_dict(raw), folder


def save_pretrained(
    model_config_or_folder: ModelConfig | nn.Module | str | os.PathLike,
    params: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    source_folder: str | os.PathLike | None = None,
    dtype: Any = None,
    max_shard_size: int | str | None = None,
) -> pathlib.Path:
    """Writes jgoat params as a Hugging Face checkpoint that ``transformers`` loads (``AutoModelFor...``).

    Supported: BERT / RoBERTa (sequence classification or bare encoder), Llama / Mistral / Qwen2 causal LMs
    (scanned or unrolled layers), ViT and CLIP vision (image classification or bare tower). Keys come from the
    loader's own key maps, so ``from_pretrained(save_pretrained(...))`` returns the same params.

    Args:
      model_config_or_folder: the jgoat config (``cfg`` of ``from_pretrained``), a jgoat model (its ``config``),
        or the HF folder the params were loaded from (its config.json is then copied).
      params: the params tree (or ``{"params": ...}``). LoRA-family adapters (LoRA, DoRA, IA3, ...) are merged
        first with :func:`jgoat.merge` (fp32); ``modules_to_save`` heads are saved as they are.
      out_dir: folder to write (created; earlier ``model*.safetensors`` / index files in it are replaced).
      source_folder: HF folder whose ``config.json`` is copied (and adapted: ``architectures``, ``dtype``, label
        count) together with tokenizer / generation / preprocessor files; without one, config.json is regenerated
        from the jgoat config.
      dtype: dtype of the written tensors (default: each param's own, e.g. float32 or bfloat16).
      max_shard_size: bytes (or "5GB", "500MiB") per file; above it, ``model-0000i-of-0000N.safetensors`` +
        ``model.safetensors.index.json``. None: one ``model.safetensors``.

    Returns:
      ``out_dir`` as a path.

    Raises:
      ValueError: the tree holds GOAT (never merged) or unmergeable adapters, the params do not match the
        (written) config, or the config cannot be expressed as a HF config of its family.

    Example::

      model, params, cfg = jgoat.models.from_pretrained(folder)
      wrapped = jgoat.wrap(params, jgoat.LoraConfig(rank=8, targets="all-linear"), key=key)
      ...  # train
      save_pretrained(cfg, wrapped, "out", source_folder=folder)  # merged; torch: AutoModel...from_pretrained("out")
    """
    cfg, folder = _config_of(model_config_or_folder)
    source_folder = pathlib.Path(source_folder) if source_folder is not None else folder
    params = _plain_params(params)
    flat = traverse_util.flatten_dict(params)
    source = None
    if source_folder is not None and (source_folder / "config.json").is_file():
        source = json.loads((source_folder / "config.json").read_text())
    written = _written_config(cfg, flat, source)
    if isinstance(cfg, BertConfig):
        plan = _encoder_plan(cfg, flat, written)
    elif isinstance(cfg, LlamaConfig):
        plan = _decoder_plan(cfg, flat, written)
    else:
        plan = _vision_plan(cfg, flat, written)
    _check_shapes(plan.model, params)
    tensors = plan.tensors()
    if dtype is not None:  # cast tensor by tensor while writing (no second copy of the model)
        tensors = [(k, s, np.dtype(dtype) if jnp.issubdtype(d, jnp.floating) else d, f) for k, s, d, f in tensors]

    floats = [np.dtype(t[2]) for t in tensors if jnp.issubdtype(t[2], jnp.floating)]
    written["architectures"] = [plan.architecture]
    written["dtype"] = str(max(set(floats), key=floats.count)) if floats else "float32"
    if "torch_dtype" in written:
        written["torch_dtype"] = written["dtype"]

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():  # stale weights of an earlier save would shadow (index) or confuse the new ones
        if f.name in (formats.SAFE_WEIGHTS_NAME, formats.SAFE_WEIGHTS_INDEX_NAME) or _SHARD.fullmatch(f.name):
            f.unlink()
    _write_weights(out, tensors, _parse_size(max_shard_size))
    (out / "config.json").write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    if source_folder is not None and source_folder.resolve() != out.resolve():
        for name in _AUX_FILES:
            if (source_folder / name).is_file():
                shutil.copyfile(source_folder / name, out / name)
    return out


def _check_shapes(model: nn.Module, params: Mapping[str, Any]) -> None:
    """The params must be exactly those of the model the written config.json describes."""
    if isinstance(model, LlamaForCausalLM):
        dummy = (jnp.zeros((1, 1), jnp.int32),)
    elif isinstance(model, BertModel | BertForSequenceClassification):
        dummy = (jnp.zeros((1, 1), jnp.int32),)
    else:
        c = model.config
        dummy = (jnp.zeros((1, c.image_size, c.image_size, c.num_channels), jnp.float32),)
    want = traverse_util.flatten_dict(jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy))["params"])
    got = traverse_util.flatten_dict(params)
    problems = [f"missing {'/'.join(k)} {v.shape}" for k, v in want.items() if k not in got]
    problems += [f"unexpected {'/'.join(k)}" for k in got if k not in want]
    problems += [f"{'/'.join(k)}: {tuple(got[k].shape)} vs {v.shape}" for k, v in want.items()
                 if k in got and tuple(got[k].shape) != v.shape]
    if problems:
        raise ValueError(f"params do not match the config being written ({type(model).__name__}):\n  "
                         + "\n  ".join(problems[:20]))


def _write_weights(out: pathlib.Path, tensors, max_shard_size: int | None) -> None:
    def nbytes(t):
        return int(np.prod(t[1], dtype=np.int64)) * np.dtype(t[2]).itemsize

    shards: list[list] = [[]]
    size = 0
    for t in tensors:
        if max_shard_size is not None and shards[-1] and size + nbytes(t) > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes(t)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        formats.write_safetensors(out / formats.SAFE_WEIGHTS_NAME, tensors, metadata)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        total += formats.write_safetensors(out / name, shard, metadata)
        weight_map.update({t[0]: name for t in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / formats.SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
