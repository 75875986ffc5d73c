"""HF PEFT adapter folders: export/import of LoRA, rsLoRA, DoRA, PiSSA / MiLoRA / OLoRA (converted to plain LoRA),
KaSA, GoRA (as LoRA) and IA³.

``export_peft`` writes the two files ``peft.PeftModel.from_pretrained(torch_model, out_dir)`` reads:

* ``adapter_model.safetensors`` with, per adapted torch module ``<name>`` (one per layer for stacked layers):
  ``base_model.model.<name>.lora_A.weight`` = Aᵀ [r, in], ``base_model.model.<name>.lora_B.weight`` = Bᵀ [out, r],
  and for DoRA ``base_model.model.<name>.lora_magnitude_vector`` = m [out]. ``modules_to_save`` modules are stored
  as their own torch parameters, ``base_model.model.<name>.weight`` (= kernelᵀ for a kernel) / ``.bias`` — peft
  saves them without the ``modules_to_save.default`` infix and adds it back when loading.
* ``adapter_config.json``: a ``LoraConfig`` (``peft_type: "LORA"``, ``r``, ``lora_alpha``, ``target_modules`` as
  torch names, ``use_rslora``, ``use_dora``, ``lora_dropout``, ``bias: "none"``, ``init_lora_weights: true``, ...).

Adapters that hold a frozen offset (PiSSA / MiLoRA / OLoRA: y = x W − x res_A res_B + s x A B, base untouched)
are exported as the equivalent plain LoRA on the UNMODIFIED base, as peft's own PiSSA conversion does: with
ΔW = s·A·B − res_A·res_B (Flax layout) and rank r' = r + r_res,

    A' = [A, res_A]  [in, r'],      B' = [(s/s')·B ; −res_B/s']  [r', out],      s'·A'·B' = ΔW,

where s' is the scaling peft derives from the exported ``r'`` and ``lora_alpha'`` (α' = α·r'/r, or α·√(r'/r) with
rsLoRA, so s' = s up to one rounding). Layers whose rank or scaling differs from the config's get entries in
``rank_pattern`` / ``alpha_pattern`` (keys anchored with ``^`` so they match one module exactly).

KaSA (``KasaConfig``) is written as peft's ``LoraConfig(kasa_config={"beta", "gamma"})`` with, per layer, ``lora_A`` /
``lora_B`` as above and ``base_model.model.<name>.lora_diag`` = Δ [r]. Its truncated base is NOT in the file: peft
re-derives it from the torch base when loading (SVD, the r smallest triplets dropped), exactly the part jgoat keeps as
res_A / res_B; a layer whose truncation drops another number of triplets (``truncation="reference"`` with in > out)
is refused, since peft would compute another model.

GoRA (``GoraConfig``) is written as a peft LoRA: per layer the unpadded slices A[:, :r_l], B[:r_l], the rank r_l in
``rank_pattern`` and ``GoraConfig.peft_alpha(r_l)`` in ``alpha_pattern``, so that peft's α'/r_l (α'/√r_l with rsLoRA)
is GoRA's s_l; scalings that are not ``cfg``'s are refused.

IA³ (``IA3Config``) is written as peft's ``IA3Config`` (``peft_type: "IA3"``, ``target_modules``,
``feedforward_modules`` as torch names) with ``base_model.model.<name>.ia3_l`` = l as [out, 1] (out-side) or [1, in]
(feed-forward targets).

``import_peft`` reads such a folder (from peft or from ``export_peft``) into a params tree (plain, or already
wrapped with the same shapes): each adapted module gets a ``LoraAdapter`` / ``DoraAdapter`` / ``KasaAdapter`` /
``IA3Adapter`` (stacked layers are restacked), with the scaling from ``r`` / ``lora_alpha`` / ``use_rslora`` and the
patterns. Stacked layers of different ranks or scalings (and modules of a GoRA template) become a ``GoraAdapter``,
the one jgoat node with per-layer ranks and scalings.

Torch names: ``torch_name(flax_path, index)`` maps a '/'-joined Flax module path and a layer index (``()`` when
the module is not stacked) to the torch module name; the default replaces '/' by '.' and, for stacked layers,
inserts the index after the first path component (``layers/fc1``, (2,) → ``layers.2.fc1``). ``export_peft`` records
the mapping it used in a third file, ``jgoat_torch_names.json`` (``{"format": "jgoat-torch-names",
"format_version": 1, "names": {torch name: {"path": Flax path, "index": [layer index]}}}``; peft ignores it), and
``import_peft`` uses it when no ``torch_name`` is given, so an export (e.g. ``jgoat train``'s, with HF names) reads
back without knowing its mapping.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.flax

from jgoat import hub
from jgoat.adapters import (
    ADAPTER_TYPES,
    DoraAdapter,
    GoatAdapter,
    GoraAdapter,
    GoraConfig,
    IA3Adapter,
    IA3Config,
    KasaAdapter,
    KasaConfig,
    LoraAdapter,
    LoraConfig,
)
from jgoat.core import (
    ADAPTER_KEY,
    Layout,
    TrainModule,
    get_at,
    iter_modules,
    layout_for,
    path_str,
    replace_at,
    to_dict,
)
from jgoat.errors import JgoatError
from jgoat.interop.common import all_adapters, check_number, is_array, one_adapter, read_json, saved_modules
from jgoat.wrap import init_layer

PyTree = Any
TorchName = Callable[[str, tuple[int, ...]], str]

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_NAMES_FILE = "jgoat_torch_names.json"
_NAMES_FORMAT = "jgoat-torch-names"
_PREFIX = "base_model.model."
_LORA_SUFFIXES = ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_magnitude_vector", "m"),
                  (".lora_diag", "diag"))
_IA3_SUFFIXES = ((".ia3_l", "l"),)
_NODE_FIELDS = ("A", "B", "m", "diag", "rank", "l")  # compared when importing onto an already wrapped tree


def default_torch_name(flax_path: str, index: tuple[int, ...]) -> str:
    """'/' → '.'; a stacked layer's index goes after the first component (``layers/fc1``, (i,) → ``layers.i.fc1``)."""
    parts = flax_path.split("/")
    if index:
        parts = [parts[0], *(str(i) for i in index), *parts[1:]]
    return ".".join(parts)




def _np32(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))

def _json_number(x: float) -> int | float:
    x = float(x)
    return int(x) if x.is_integer() else x

def _peft_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """Exactly peft's ``lora_alpha / r`` or ``lora_alpha / math.sqrt(r)``."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank

def _pattern_value(patterns: Mapping[str, Any], name: str, default):
    """peft's ``get_pattern_key``: the first key k with ``re.match(rf"(.*\\.)?({k})$", name)``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return patterns[key]
    return default

def _node_stack(adapter) -> tuple[int, ...]:
    """The layer-stack shape of an adapter node (the leading axes of its reference field)."""
    ref = getattr(adapter, getattr(adapter, "ref_field", "A"))
    return tuple(ref.shape[: ref.ndim - adapter.layer_ndim])

def _module_stack(module: Mapping, path: tuple[str, ...], layouts: Mapping[str, Layout] | None):
    """(stack shape, in_features, out_features) of a module holding a kernel, or None."""
    kernel = module.get("kernel")
    if not is_array(kernel):
        return None
    adapter = module.get(ADAPTER_KEY)
    if isinstance(adapter, ADAPTER_TYPES):
        stack, n_in = _node_stack(adapter), adapter.in_features
        return stack, n_in, int(np.prod(kernel.shape)) // (n_in * int(np.prod(stack, dtype=int)))
    return layout_for(path, kernel, layouts).split(kernel.shape)

def _torch_params(module: Mapping) -> dict[str, tuple[str, bool]]:
    """{torch param name: (flax leaf name, per-layer transpose?)} for a module_to_save (Dense, Embed, LayerNorm...)."""
    mapping = {}
    for name in sorted(module):
        value = module[name]
        if name == ADAPTER_KEY:
            continue
        if not is_array(value):
            raise ValueError(f"modules_to_save module holds a nested module '{name}': name that module instead")
        torch = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}.get(name)
        if torch is None or torch in mapping:
            raise ValueError(f"cannot map the Flax parameter '{name}' of a modules_to_save module to a torch name "
                             "(supported: kernel, embedding, scale, bias)")
        mapping[torch] = (name, name == "kernel")
    return mapping

def _per_layer_to_torch(value, idx: tuple[int, ...], torch_param: str, transpose: bool, n_in: int | None):
    """One layer of a modules_to_save leaf in torch layout: kernel [in, out] -> weight [out, in]; bias flattened."""
    leaf = np.asarray(value[idx] if idx else value)
    if transpose:
        leaf = leaf.reshape(n_in, -1).T
    elif torch_param == "bias":
        leaf = leaf.reshape(-1)
    return np.ascontiguousarray(leaf)

def _restack(per_layer: list, stack: tuple[int, ...]):
    """Per-layer arrays (in np.ndindex order) back to one [*stack, ...] array; the array itself when unstacked."""
    if not stack:
        return per_layer[0]
    return jnp.stack(per_layer).reshape(*stack, *per_layer[0].shape)

def _write_safetensors(tensors: Mapping[str, np.ndarray], path: str, metadata: Mapping[str, str]) -> None:
    safetensors.flax.save_file({k: jnp.asarray(v) for k, v in tensors.items()}, path, metadata=dict(metadata))




_PEFT_CONFIGS = (LoraConfig, KasaConfig, GoraConfig, IA3Config)
# the adapter nodes each peft-exportable config produces
_NODE_TYPES = {LoraConfig: (LoraAdapter, DoraAdapter), KasaConfig: (KasaAdapter,), GoraConfig: (GoraAdapter,),
               IA3Config: (IA3Adapter,)}


def _layer_alpha(cfg: LoraConfig | KasaConfig, rank: int, r_out: int, s: float) -> float:
    """lora_alpha' of a layer of rank r and scaling s exported at rank r_out (> r for a folded-in offset)."""
    if rank == cfg.rank and s == cfg.scale:  # keep the config's own alpha when it describes the layer
        return cfg.alpha * (math.sqrt(r_out / rank) if cfg.use_rslora else r_out / rank)
    return s * (math.sqrt(r_out) if cfg.use_rslora else r_out)


def _lora_layer(adapter, idx: tuple[int, ...], cfg) -> tuple[dict[str, np.ndarray], int, float]:
    """One layer of a LoRA-family node as peft tensors ({key suffix: tensor}), its exported rank and lora_alpha."""
    if isinstance(adapter, GoraAdapter):  # the layer's own rank: the unpadded slices, alpha from the config
        r = int(adapter.rank[idx])
        a, b = _np32(adapter.A[idx])[:, :r], _np32(adapter.B[idx])[:r]
        return {".lora_A.weight": a.T, ".lora_B.weight": b.T}, r, cfg.peft_alpha(r)
    s, rank = float(adapter.scale), int(adapter.A.shape[-1])
    a, b = _np32(adapter.A[idx]), _np32(adapter.B[idx])
    out = {}
    if isinstance(adapter, KasaAdapter):  # peft re-derives the truncated base from the torch base when loading
        out[".lora_diag"] = _np32(adapter.diag[idx])
        return {**out, ".lora_A.weight": a.T, ".lora_B.weight": b.T}, rank, _layer_alpha(cfg, rank, rank, s)
    has_offset = isinstance(adapter, LoraAdapter) and adapter.res_A is not None
    r_out = rank + (int(adapter.res_A.shape[-1]) if has_offset else 0)
    alpha = _layer_alpha(cfg, rank, r_out, s)
    if has_offset:  # A' = [A, res_A], B' = [(s/s')·B ; −res_B/s'] (module docstring)
        s_out = _peft_scaling(alpha, r_out, cfg.use_rslora)
        a = np.concatenate([a, _np32(adapter.res_A[idx])], axis=1)
        b = np.concatenate([b * np.float32(s / s_out) if s != s_out else b,
                            -_np32(adapter.res_B[idx]) / np.float32(s_out)], axis=0)
    if isinstance(adapter, DoraAdapter):
        out[".lora_magnitude_vector"] = _np32(adapter.m[idx])
    return {**out, ".lora_A.weight": a.T, ".lora_B.weight": b.T}, r_out, alpha


def _check_node(adapter, cfg, where: str) -> None:
    """Raise when a node cannot be written exactly under ``cfg`` (the file would describe another function)."""
    if isinstance(adapter, KasaAdapter):
        rank = int(adapter.A.shape[-1])
        dropped = 0 if adapter.res_A is None else int(adapter.res_A.shape[-1])
        if dropped != rank:
            raise ValueError(
                f"the KaSA adapter at '{where}' drops {dropped} singular triplets of its base, but peft's KaSA always "
                f"drops r = {rank} when it loads the adapter (truncation='reference' on a layer with in > out): peft "
                "would truncate another base, so this adapter cannot be exported exactly")
        if (adapter.beta, adapter.gamma) != (cfg.beta, cfg.gamma):
            raise ValueError(f"the KaSA adapter at '{where}' has beta, gamma = {adapter.beta}, {adapter.gamma}; cfg "
                             f"says {cfg.beta}, {cfg.gamma}")
    if isinstance(adapter, GoraAdapter):
        ranks = np.asarray(adapter.rank).reshape(-1).tolist()
        stored = np.asarray(adapter.scale, np.float32).reshape(-1)
        want = np.asarray([cfg.scale_for(int(r)) for r in ranks], np.float32)
        if not np.array_equal(stored, want):
            raise ValueError(f"the GoRA scalings at '{where}' ({stored.tolist()}) are not those of cfg for ranks "
                             f"{ranks} ({want.tolist()}): pass the GoraConfig the tree was built with")


def export_peft(
    tree: PyTree,
    cfg: LoraConfig | KasaConfig | GoraConfig | IA3Config,
    out_dir: str | os.PathLike,
    *,
    torch_name: TorchName | None = None,
    base_model_name_or_path: str | None = None,
    layouts: Mapping[str, Layout] | None = None,
    adapter: str | None = None,
    push_to_hub: str | None = None,
) -> None:
    """Write the adapters of a wrapped tree as an HF PEFT adapter folder (``PeftModel.from_pretrained`` reads it).

    Args:
      tree: a tree wrapped with ``cfg``, possibly trained.
      cfg: the config it was wrapped with: a ``jgoat.LoraConfig`` (LoRA, rsLoRA, DoRA, PiSSA, MiLoRA, OLoRA), a
        ``KasaConfig`` (peft ``LoraConfig(kasa_config=...)``), a ``GoraConfig`` (a peft LoRA with per-layer
        ``rank_pattern`` / ``alpha_pattern``) or an ``IA3Config`` (peft ``IA3Config``); see the module docstring.
      out_dir: folder to create / overwrite ``adapter_config.json`` and ``adapter_model.safetensors`` in.
      torch_name: maps (Flax module path, layer index) to the torch module name; see `default_torch_name`.
      base_model_name_or_path: recorded in the config (peft uses it to find the base model).
      layouts: optional `Layout` per module path, only needed for ``modules_to_save`` kernels that are not
        [*layers, in, out] (adapters carry their own shapes).
      adapter: for a tree of named adapters, the one to export (required there).
      push_to_hub: a Hub repo id (``owner/name``) to upload the written folder to (created if missing; needs a
        network and a token, see :mod:`jgoat.hub`). A failed upload raises after the folder is written, keeping it.

    Raises:
      ValueError: GOAT adapters, no adapter, adapters of another method than ``cfg``, DoRA mixed with LoRA, two
        layers mapping to the same torch name, or an adapter peft cannot represent exactly (a KaSA adapter whose
        truncation is not peft's, GoRA scalings that are not ``cfg``'s).

    Example:
      >>> export_peft(wrapped, cfg, "out/adapter", torch_name=lambda p, i: "model." + default_torch_name(p, i))
      >>> # torch: peft.PeftModel.from_pretrained(torch_model, "out/adapter")
    """
    if not isinstance(cfg, _PEFT_CONFIGS):
        raise ValueError("export_peft needs the jgoat.LoraConfig / KasaConfig / GoraConfig / IA3Config the tree was "
                         f"wrapped with, got {type(cfg).__name__}")
    if push_to_hub is not None:
        hub.check_push_target(push_to_hub)
    torch_name = torch_name or default_torch_name
    tree = to_dict(one_adapter(tree, adapter))
    found = all_adapters(tree)
    goat = [path_str(p) for p, a in found if isinstance(a, GoatAdapter)]
    if goat:
        raise ValueError(f"GOAT adapters are not a PEFT type (at {', '.join(goat[:4])}); use export_goat")
    node_types = _NODE_TYPES[type(cfg)]
    if not found:
        raise ValueError(f"the tree holds no LoRA-family adapter ({' / '.join(t.__name__ for t in node_types)}): "
                         "wrap it first")
    other = [f"{path_str(p)} ({type(a).__name__})" for p, a in found if not isinstance(a, node_types)]
    if other:
        raise ValueError(f"cfg is a {type(cfg).__name__} but the tree holds other adapters at {', '.join(other[:4])}; "
                         "one peft config describes one method")
    kinds = {type(a) for _, a in found}
    if len(kinds) > 1:
        raise ValueError("the tree mixes DoRA and non-DoRA adapters; one peft LoraConfig cannot describe both")
    use_dora = DoraAdapter in kinds
    if isinstance(cfg, LoraConfig) and use_dora != cfg.use_dora:
        raise ValueError(f"cfg.use_dora={cfg.use_dora} but the tree holds {'DoRA' if use_dora else 'LoRA'} adapters")

    tensors: dict[str, np.ndarray] = {}
    layers: dict[str, tuple[int, float]] = {}  # torch name -> (r', alpha'); IA3: (feedforward, 0)
    recorded: dict[str, dict] = {}  # torch name -> {"path", "index"}: the mapping used, for import_peft
    for path, adapter in found:
        _check_node(adapter, cfg, path_str(path))
        stack = _node_stack(adapter)
        for idx in np.ndindex(*stack):
            name = torch_name(path_str(path), tuple(int(i) for i in idx))
            if not isinstance(name, str) or not name:
                raise ValueError(f"torch_name({path_str(path)!r}, {idx}) returned {name!r}, not a module name")
            if name in layers:
                raise ValueError(f"two adapted layers map to the torch module '{name}'; pass a torch_name function")
            recorded[name] = {"path": path_str(path), "index": [int(i) for i in idx]}
            if isinstance(adapter, IA3Adapter):  # peft's ia3_l: [out, 1] out-side, [1, in] feed-forward
                l_n = _np32(adapter.l[idx])
                tensors[f"{_PREFIX}{name}.ia3_l"] = l_n[None, :] if adapter.feedforward else l_n[:, None]
                layers[name] = (int(adapter.feedforward), 0.0)
                continue
            per_layer, r_out, alpha = _lora_layer(adapter, idx, cfg)
            tensors.update({f"{_PREFIX}{name}{suffix}": np.ascontiguousarray(t) for suffix, t in per_layer.items()})
            layers[name] = (r_out, alpha)

    saved_names = []
    for path, module in saved_modules(tree):
        info = _module_stack(module, path, layouts)
        stack, n_in = (info[0], info[1]) if info is not None else ((), None)
        mapping = _torch_params(module)
        for idx in np.ndindex(*stack):
            name = torch_name(path_str(path), tuple(int(i) for i in idx))
            saved_names.append(name)
            recorded[name] = {"path": path_str(path), "index": [int(i) for i in idx]}
            for torch_param, (flax_name, transpose) in mapping.items():
                tensors[f"{_PREFIX}{name}.{torch_param}"] = _per_layer_to_torch(module[flax_name], idx, torch_param,
                                                                                transpose, n_in)
    common = {
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "target_modules": sorted(layers),
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "modules_to_save": sorted(saved_names) or None,
        "inference_mode": True,
    }
    if isinstance(cfg, IA3Config):
        config = {**common, "peft_type": "IA3", "init_ia3_weights": True,
                  "feedforward_modules": sorted(n for n, (ff, _) in layers.items() if ff)}
    else:
        config = {**common, **_lora_config(cfg, layers, use_dora)}
    os.makedirs(out_dir, exist_ok=True)
    _write_safetensors(tensors, os.path.join(out_dir, PEFT_WEIGHTS_FILE), {"format": "pt"})
    with open(os.path.join(out_dir, PEFT_CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    with open(os.path.join(out_dir, PEFT_NAMES_FILE), "w") as f:
        json.dump({"format": _NAMES_FORMAT, "format_version": 1, "names": recorded}, f, indent=2, sort_keys=True)
    if push_to_hub is not None:
        hub.push_folder(out_dir, push_to_hub)


def _recorded_names(in_dir: str | os.PathLike) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]] | None:
    """The torch-name mapping `export_peft` recorded in `in_dir` ({torch name: (Flax path, index)}), or None."""
    file = os.path.join(in_dir, PEFT_NAMES_FILE)
    if not os.path.exists(file):
        return None
    doc = read_json(file)
    if not isinstance(doc, dict) or doc.get("format") != _NAMES_FORMAT or doc.get("format_version") != 1 \
            or not isinstance(doc.get("names"), dict):
        raise JgoatError(f"{file}: not a {_NAMES_FORMAT} file of format version 1")
    out = {}
    for name, entry in doc["names"].items():
        ok = isinstance(entry, dict) and isinstance(entry.get("path"), str) and entry["path"] \
            and isinstance(entry.get("index"), list)
        if not ok:
            raise JgoatError(f"{file}: names[{name!r}] must be {{'path': str, 'index': [int]}}, got {entry!r}")
        for i, n in enumerate(entry["index"]):
            check_number(n, file, f"names[{name!r}].index[{i}]", integer=True, positive=True, allow_zero=True)
        out[name] = (tuple(entry["path"].split("/")), tuple(entry["index"]))
    return out


def _check_lora_knobs(config: Mapping, file: str) -> None:
    """Refuse LoRA knobs that are not what peft writes (a crafted NaN / string rank, alpha, dropout), naming the key."""
    check_number(config.get("r"), file, "r", integer=True, positive=True)
    check_number(config.get("lora_alpha"), file, "lora_alpha")
    for table, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        patterns = config.get(table) or {}
        if not isinstance(patterns, dict):
            raise JgoatError(f"{file}: {table} must be an object {{pattern: value}}, got {patterns!r}")
        for key, value in patterns.items():
            check_number(value, file, f"{table}[{key!r}]", integer=integer, positive=integer)
    dropout = config.get("lora_dropout") or 0.0
    check_number(dropout, file, "lora_dropout", positive=True, allow_zero=True)
    if dropout >= 1:
        raise JgoatError(f"{file}: lora_dropout must be in [0, 1), got {dropout!r}")
    for flag in ("use_rslora", "use_dora"):
        if not isinstance(config.get(flag, False), bool):
            raise JgoatError(f"{file}: {flag} must be true or false, got {config[flag]!r}")
    kasa = config.get("kasa_config")
    if kasa is not None:
        if not isinstance(kasa, dict) or set(kasa) - {"beta", "gamma"}:
            raise JgoatError(f"{file}: kasa_config must be {{'beta': number, 'gamma': number}}, got {kasa!r}")
        for key, value in kasa.items():
            check_number(value, file, f"kasa_config.{key}", positive=True, allow_zero=True)


def _lora_config(cfg, layers: Mapping[str, tuple[int, float]], use_dora: bool) -> dict:
    """The LoraConfig fields: the most common rank / alpha, per-layer patterns for the others, KaSA's sub-config."""
    r_main = Counter(r for r, _ in layers.values()).most_common(1)[0][0]
    alpha_main = Counter(a for _, a in layers.values()).most_common(1)[0][0]
    by_length = sorted(layers, key=lambda n: (-len(n), n))  # peft takes the first matching pattern key
    return {
        "peft_type": "LORA",
        "r": r_main,
        "lora_alpha": _json_number(alpha_main),
        "rank_pattern": {"^" + re.escape(n): layers[n][0] for n in by_length if layers[n][0] != r_main},
        "alpha_pattern": {"^" + re.escape(n): _json_number(layers[n][1]) for n in by_length
                          if layers[n][1] != alpha_main},
        "use_rslora": bool(cfg.use_rslora),
        "use_dora": use_dora,
        "kasa_config": {"beta": cfg.beta, "gamma": cfg.gamma} if isinstance(cfg, KasaConfig) else None,
        "lora_dropout": float(cfg.dropout),
        "bias": "none",
        "lora_bias": False,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def _name_index(tree: Mapping, torch_name: TorchName, layouts) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """torch module name -> (Flax module path, layer index), for every module of the tree."""
    names: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {}
    for path, module in iter_modules(tree):
        if not path:
            continue
        info = _module_stack(module, path, layouts)
        stack = info[0] if info is not None else ()
        for idx in np.ndindex(*stack):
            names.setdefault(torch_name(path_str(path), tuple(int(i) for i in idx)), (path, tuple(int(i) for i in idx)))
    return names


def _ia3_feedforward(spec, name: str) -> bool:
    """peft's ``IA3Model._check_target_module_feedforward``: regex fullmatch, or any list entry the name ends with."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name.endswith(k) for k in spec or ())


def _ia3_node(per_layer: list[tuple[str, dict]], stack, n_in: int, n_out: int, config: Mapping):
    """The IA3Adapter of one (stacked) module from its per-layer ``ia3_l`` tensors, or an error message."""
    sides = {_ia3_feedforward(config.get("feedforward_modules"), name) for name, _ in per_layer}
    if len(sides) != 1:
        return f"the stacked layers {[n for n, _ in per_layer]} mix feed-forward and other IA3 targets"
    feedforward = sides.pop()
    want = (1, n_in) if feedforward else (n_out, 1)
    bad = [f"'{name}' ia3_l {tuple(f['l'].shape)} != {want}" for name, f in per_layer if tuple(f["l"].shape) != want]
    if bad:
        return f"shape mismatch [in {n_in}, out {n_out}, feedforward={feedforward}]: {', '.join(bad)}"
    l_list = [f["l"].reshape(-1).astype(jnp.float32) for _, f in per_layer]
    return IA3Adapter(l=_restack(l_list, stack), feedforward=feedforward, n_in=n_in)


def _gora_node(a_list, b_list, ranks, scales, stack, r_pad: int, dropout: float) -> GoraAdapter:
    """A GoraAdapter holding per-layer ranks / scalings, A and B zero-padded to r_pad columns / rows."""
    a_pad = [jnp.pad(a, ((0, 0), (0, r_pad - a.shape[1]))) for a in a_list]
    b_pad = [jnp.pad(b, ((0, r_pad - b.shape[0]), (0, 0))) for b in b_list]
    rank = jnp.asarray(np.asarray(ranks, np.int32).reshape(stack))
    scale = jnp.asarray(np.asarray(scales, np.float32).reshape(stack))
    return GoraAdapter(A=_restack(a_pad, stack), B=_restack(b_pad, stack), rank=rank, scale=scale, dropout=dropout)


def _lora_node(per_layer: list[tuple[str, dict]], path, module, stack, n_in: int, n_out: int, config: Mapping,
               layouts):
    """The LoRA-family node of one (stacked) module from its per-layer peft tensors, or an error message.

    LoRA / rsLoRA → LoraAdapter, DoRA → DoraAdapter, KaSA → KasaAdapter (the truncated part re-derived from this
    tree's kernel, as peft does at load time); stacked layers of different ranks or scalings (peft's patterns), or a
    tree already holding GoRA there → GoraAdapter.
    """
    use_dora, use_kasa = bool(config.get("use_dora")), config.get("kasa_config") is not None
    use_rslora, dropout = bool(config.get("use_rslora")), float(config.get("lora_dropout") or 0.0)
    want = ("A", "B") + (("m",) if use_dora else ()) + (("diag",) if use_kasa else ())
    a_list, b_list, extra, ranks, scales = [], [], [], [], []
    for name, fields in per_layer:
        if set(fields) != set(want):
            return f"'{name}' has {sorted(fields)}, expected {list(want)} (use_dora={use_dora}, kasa={use_kasa})"
        rank = fields["A"].shape[0] if fields["A"].ndim == 2 else -1
        expected = {"A": (rank, n_in), "B": (n_out, rank), "m": (n_out,), "diag": (rank,)}
        bad = [f"{f} {tuple(fields[f].shape)} != {expected[f]}" for f in want if tuple(fields[f].shape) != expected[f]]
        if bad:
            return f"shape mismatch at '{name}' [in {n_in}, out {n_out}]: {', '.join(bad)}"
        r_cfg = _pattern_value(config.get("rank_pattern") or {}, name, config.get("r"))
        if r_cfg != rank:
            return f"'{name}' has rank {rank} but the config says r={r_cfg}"
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha"))
        ranks.append(rank)
        scales.append(_peft_scaling(alpha, rank, use_rslora))
        a_list.append(fields["A"].T.astype(jnp.float32))
        b_list.append(fields["B"].T.astype(jnp.float32))
        extra.append(fields["m" if use_dora else "diag"].astype(jnp.float32) if use_dora or use_kasa else None)
    existing = module.get(ADAPTER_KEY)
    uniform = len(set(ranks)) == 1 and len(set(scales)) == 1
    if isinstance(existing, GoraAdapter) or (not uniform and not (use_dora or use_kasa)):
        r_pad = existing.A.shape[-1] if isinstance(existing, GoraAdapter) else max(ranks)
        if max(ranks) > r_pad:
            return f"'{path_str(path)}' holds a GoRA adapter padded to rank {r_pad}; the file has rank {max(ranks)}"
        return _gora_node(a_list, b_list, ranks, scales, stack, r_pad, dropout)
    if not uniform:
        return f"the stacked layers of '{path_str(path)}' differ in rank or scaling; jgoat stacks need one"
    kw = dict(A=_restack(a_list, stack), B=_restack(b_list, stack), scale=scales[0], dropout=dropout)
    if use_dora:
        return DoraAdapter(m=_restack(extra, stack), **kw)
    if not use_kasa:
        return LoraAdapter(**kw)
    kasa_cfg = KasaConfig(rank=ranks[0], alpha=1.0, dropout=dropout, **config["kasa_config"])
    try:
        kernel = module["kernel"]
        node = init_layer(kasa_cfg, kernel, layout_for(path, kernel, layouts), jax.random.key(0), path_str(path))
    except ValueError as e:
        return str(e)
    return node.replace(A=kw["A"], B=kw["B"], diag=_restack(extra, stack), scale=kw["scale"])


def _field_shapes(node) -> list[tuple[str, tuple[int, ...]]]:
    return [(f, tuple(getattr(node, f).shape)) for f in _NODE_FIELDS if getattr(node, f, None) is not None]


def import_peft(
    tree: PyTree,
    in_dir: str | os.PathLike,
    *,
    torch_name: TorchName | None = None,
    layouts: Mapping[str, Layout] | None = None,
) -> dict:
    """Read an HF PEFT adapter folder (LoRA / rsLoRA / DoRA / KaSA / per-layer-rank LoRA such as an exported GoRA,
    or IA³) onto a params tree.

    Args:
      tree: a plain Flax params tree, or one already wrapped with adapters of the same shapes (replaced; a GoRA
        template from ``gora_wrap(..., ranks=...)`` receives the file's LoRA layers as GoRA layers).
      in_dir: folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
      torch_name: maps (Flax module path, layer index) to the torch module name; see `default_torch_name`. Default:
        the mapping ``export_peft`` recorded in the folder (``jgoat_torch_names.json``), else `default_torch_name`.
      layouts: optional `Layout` per module path for kernels that are not [*layers, in, out].

    Returns:
      The tree with an adapter beside each adapted kernel (``LoraAdapter``, ``DoraAdapter``, ``KasaAdapter`` with
      its truncation re-derived from this tree's kernels as peft does, ``GoraAdapter`` for stacks whose layers differ
      in rank or scaling, ``IA3Adapter``) and ``modules_to_save`` modules replaced and marked trainable.

    Raises:
      ValueError: not a LoRA / IA3 adapter, unsupported options (fan_in_fan_out, lora bias), keys that name no module
        of the tree, or shapes that do not fit (all listed).

    Example:
      >>> wrapped = import_peft(params, "out/adapter")
    """
    file = os.path.join(in_dir, PEFT_CONFIG_FILE)
    config = read_json(file)
    if not isinstance(config, dict):
        raise JgoatError(f"{file}: not a peft adapter config (a JSON object), got {type(config).__name__}")
    recorded = _recorded_names(in_dir) if torch_name is None else None
    if recorded is not None:
        by_path = {(path_str(p), i): name for name, (p, i) in recorded.items()}

        def torch_name(flax_path, index):
            return by_path.get((flax_path, tuple(index)), default_torch_name(flax_path, index))
    torch_name = torch_name or default_torch_name
    peft_type = config.get("peft_type")
    if peft_type not in ("LORA", "IA3"):
        raise ValueError(f"only peft_type 'LORA' (LoRA, rsLoRA, DoRA, KaSA) and 'IA3' can be imported, got "
                         f"{peft_type!r}")
    knobs = (("fan_in_fan_out", False),) + ((("lora_bias", False), ("bias", "none")) if peft_type == "LORA" else ())
    for knob, ok in knobs:
        if config.get(knob, ok) != ok:
            raise ValueError(f"unsupported peft option {knob}={config[knob]!r} (jgoat imports {knob}={ok!r})")
    if peft_type == "LORA":
        _check_lora_knobs(config, file)
    suffixes = _IA3_SUFFIXES if peft_type == "IA3" else _LORA_SUFFIXES
    tensors = safetensors.flax.load_file(os.path.join(in_dir, PEFT_WEIGHTS_FILE))

    tree = to_dict(tree)
    names = _name_index(tree, torch_name, layouts)
    if recorded is not None:  # the recorded names win over a default name another module may also have
        names.update(recorded)
    errors: list[str] = []
    adapted: dict[tuple[str, ...], dict[tuple[int, ...], dict[str, Any]]] = {}
    saved: dict[tuple[str, ...], dict[tuple[int, ...], dict[str, Any]]] = {}
    for key in sorted(tensors):
        rest = key[len(_PREFIX):] if key.startswith(_PREFIX) else None
        hit = None
        if rest is not None:
            for suffix, field in suffixes:
                if rest.endswith(suffix) and rest[: -len(suffix)] in names:
                    hit = (adapted, rest[: -len(suffix)], field)
                    break
            if hit is None and config.get("modules_to_save") and "." in rest:
                name, param = rest.rsplit(".", 1)
                if name in names:
                    hit = (saved, name, param)
        if hit is None:
            errors.append(f"unknown key '{key}' (no module of the tree has that torch name)")
            continue
        table, name, field = hit
        path, idx = names[name]
        table.setdefault(path, {}).setdefault(idx, {})[field] = (name, tensors[key])

    for path, per_idx in adapted.items():
        module = get_at(tree, path)
        info = _module_stack(module, path, layouts)
        if info is None:
            errors.append(f"'{path_str(path)}' holds no kernel")
            continue
        stack, n_in, n_out = info
        indices = [tuple(int(i) for i in idx) for idx in np.ndindex(*stack)]
        missing = [torch_name(path_str(path), idx) for idx in indices if idx not in per_idx]
        if missing:
            errors.append(f"'{path_str(path)}' is stacked over {stack} but the file lacks layers {missing}")
            continue
        per_layer = [(next(iter(per_idx[idx].values()))[0], {f: t for f, (_, t) in per_idx[idx].items()})
                     for idx in indices]
        if peft_type == "IA3":
            node = _ia3_node(per_layer, stack, n_in, n_out, config)
        else:
            node = _lora_node(per_layer, path, module, stack, n_in, n_out, config, layouts)
        if isinstance(node, str):
            errors.append(node)
            continue
        existing = module.get(ADAPTER_KEY)
        if isinstance(existing, ADAPTER_TYPES):
            old, new = _field_shapes(existing), _field_shapes(node)
            if type(existing) is not type(node) or old != new:
                errors.append(f"'{path_str(path)}' already holds a {type(existing).__name__} {old}; the file gives "
                              f"{type(node).__name__} {new} (import into the plain params instead)")
                continue
        tree = replace_at(tree, path, lambda m, n=node: {**m, ADAPTER_KEY: n})

    for path, per_layer in saved.items():
        module = get_at(tree, path)
        info = _module_stack(module, path, layouts)
        stack, n_in = (info[0], info[1]) if info is not None else ((), None)
        try:
            mapping = _torch_params(module)
        except ValueError as e:
            errors.append(f"'{path_str(path)}': {e}")
            continue
        new = dict(module)
        for torch_param, (flax_name, transpose) in mapping.items():
            leaf = module[flax_name]
            per_shape = leaf.shape[len(stack):]
            values = []
            for idx in np.ndindex(*stack):
                fields = per_layer.get(tuple(int(i) for i in idx), {})
                name = torch_name(path_str(path), tuple(int(i) for i in idx))
                if torch_param not in fields:
                    errors.append(f"modules_to_save '{name}' lacks '{torch_param}'")
                    continue
                value = fields[torch_param][1]
                value = value.T if transpose else value
                if int(np.prod(value.shape)) != int(np.prod(per_shape, dtype=int)):
                    errors.append(f"shape mismatch at '{name}.{torch_param}': {tuple(fields[torch_param][1].shape)} "
                                  f"for Flax '{flax_name}' {per_shape}")
                    continue
                values.append(value.reshape(per_shape).astype(leaf.dtype))
            if len(values) == int(np.prod(stack, dtype=int)):
                new[flax_name] = values[0] if not stack else jnp.stack(values).reshape(leaf.shape)
        extra = {p for fields in per_layer.values() for p in fields} - set(mapping)
        if extra:
            errors.append(f"modules_to_save '{path_str(path)}' has unknown parameters {sorted(extra)}")
        new[ADAPTER_KEY] = TrainModule()
        tree = replace_at(tree, path, lambda m, n=new: n)

    if errors:
        raise ValueError(f"cannot import the peft adapter in {in_dir}:\n  " + "\n  ".join(errors))
    if not adapted:
        raise ValueError(f"{in_dir} holds no {'IA3' if peft_type == 'IA3' else 'LoRA'} weights")
    return tree


