"""GOAT format (format version 1)
------------------------------
GOAT is not a PEFT type. ``export_goat`` writes into ``out_dir``:

* ``goat_adapter.safetensors``: one tensor per array, named by its '/'-joined path in the wrapped tree:
  ``<module path>/jgoat/A`` [*L, E, in, d], ``.../jgoat/B`` [*L, E, d, out], ``.../jgoat/router`` [*L, in, E], the
  frozen residual offset ``.../jgoat/res_A`` [*L, in, E·d] and ``.../jgoat/res_B`` [*L, E·d, out] (absent for
  ``init="zero"``), and every parameter of each ``modules_to_save`` module (``<module path>/<param path>``).
* ``goat_config.json``: ``{"format": "jgoat-goat", "format_version": 1, "jgoat_version", "base_fingerprint",
  "config_class": "GoatConfig" | "MoLoraConfig", "config": dataclasses.asdict(cfg) (every knob),
  "modules": [{"path", "stack" (layer-stack shape), "in_features", "out_features", "scale"}, ...],
  "modules_to_save": [paths]}``.

The residual offset was derived from one exact base (SVD of its weights), so ``import_goat`` refuses a base whose
fingerprint differs from the recorded one. Both sides compute it with ``jgoat.fingerprint`` over the base weights
minus what the file itself carries (the adapters and the ``modules_to_save`` modules, e.g. a new classifier head).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
import safetensors.flax

from jgoat.adapters import (
    GoatAdapter,
    GoatConfig,
    MoLoraConfig,
)
from jgoat.core import (
    ADAPTER_KEY,
    TrainModule,
    __version__,
    get_at,
    is_module,
    path_str,
    replace_at,
    to_dict,
)
from jgoat.core import fingerprint as base_fingerprint
from jgoat.errors import JgoatError
from jgoat.interop.common import (
    all_adapters,
    check_number,
    is_array,
    module_params,
    one_adapter,
    read_json,
    saved_modules,
)

PyTree = Any

GOAT_CONFIG_FILE = "goat_config.json"
GOAT_WEIGHTS_FILE = "goat_adapter.safetensors"
GOAT_FORMAT = "jgoat-goat"
GOAT_FORMAT_VERSION = 1
_GOAT_FIELDS = ("A", "B", "router", "res_A", "res_B")
_GOAT_CLASSES = {"GoatConfig": GoatConfig, "MoLoraConfig": MoLoraConfig}


def export_goat(tree: PyTree, cfg: GoatConfig, out_dir: str | os.PathLike, *, fingerprint: str | None = None,
                adapter: str | None = None) -> None:
    """Write the GOAT adapters (and modules_to_save) of a wrapped tree in jgoat's GOAT format (module docstring).

    Args:
      tree: a tree wrapped with ``cfg`` (possibly trained).
      cfg: the ``jgoat.GoatConfig`` (or ``MoLoraConfig``) it was wrapped with; every knob is recorded.
      out_dir: folder to create / overwrite ``goat_config.json`` and ``goat_adapter.safetensors`` in.
      fingerprint: optional, kept for compatibility: the base fingerprint is computed from ``tree`` (adapters and
        modules_to_save excluded) and recorded; a value given here must equal it. `import_goat` refuses any other
        base.
      adapter: for a tree of named adapters, the one to export (required there).

    Raises:
      ValueError: no GOAT adapter, non-GOAT adapters in the tree, or adapters whose knobs contradict ``cfg``.

    Example:
      >>> export_goat(wrapped, cfg, "out/goat")
    """
    if not isinstance(cfg, GoatConfig):
        raise ValueError(f"export_goat needs the jgoat.GoatConfig the tree was wrapped with, got {type(cfg).__name__}")
    tree = to_dict(one_adapter(tree, adapter))
    own = base_fingerprint(tree)
    if fingerprint is not None and fingerprint != own:
        raise JgoatError(f"fingerprint={fingerprint!r} is not this tree's base fingerprint ({own!r}); leave it out: "
                         "export_goat computes it (jgoat.fingerprint of the wrapped tree)")
    found = all_adapters(tree)
    other = [path_str(p) for p, a in found if not isinstance(a, GoatAdapter)]
    if other:
        raise ValueError(f"the tree holds non-GOAT adapters at {', '.join(other[:4])}; use export_peft for those")
    if not found:
        raise ValueError("the tree holds no GOAT adapter: wrap it with a jgoat.GoatConfig first")
    tensors: dict[str, Any] = {}
    modules = []
    for path, adapter in found:
        p = path_str(path)
        knobs = dict(top_k=cfg.top_k, dropout=cfg.dropout, dropout_mode=cfg.dropout_mode, aux_form=cfg.aux_form)
        bad = [f"{k}={getattr(adapter, k)!r}" for k, v in knobs.items() if getattr(adapter, k) != v]
        if adapter.router.shape[-1] != cfg.experts or adapter.A.shape[-1] != cfg.expert_rank:
            bad.append(f"experts x rank {adapter.A.shape[-3]} x {adapter.A.shape[-1]}")
        if bad:
            raise ValueError(f"the GOAT adapter at '{p}' does not match cfg ({', '.join(bad)})")
        for field in _GOAT_FIELDS:
            value = getattr(adapter, field)
            if value is not None:
                tensors[f"{p}/{ADAPTER_KEY}/{field}"] = value
        modules.append({
            "path": p,
            "stack": list(adapter.A.shape[: adapter.A.ndim - adapter.layer_ndim]),
            "in_features": int(adapter.A.shape[-2]),
            "out_features": int(adapter.B.shape[-1]),
            "scale": float(adapter.scale),
        })
    saved = []
    for path, module in saved_modules(tree):
        saved.append(path_str(path))
        for sub, value in module_params(module):
            tensors[path_str((*path, *sub))] = value
    config = {
        "format": GOAT_FORMAT,
        "format_version": GOAT_FORMAT_VERSION,
        "jgoat_version": __version__,
        "base_fingerprint": own,
        "config_class": type(cfg).__name__ if type(cfg).__name__ in _GOAT_CLASSES else "GoatConfig",
        "config": dataclasses.asdict(cfg),
        "modules": modules,
        "modules_to_save": saved,
    }
    os.makedirs(out_dir, exist_ok=True)
    safetensors.flax.save_file({k: jnp.asarray(v) for k, v in tensors.items()},
                               os.path.join(out_dir, GOAT_WEIGHTS_FILE),
                               metadata={"format": GOAT_FORMAT, "format_version": str(GOAT_FORMAT_VERSION)})
    with open(os.path.join(out_dir, GOAT_CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)


def import_goat(params: PyTree, in_dir: str | os.PathLike, *,
                fingerprint: str | None = None) -> tuple[dict, GoatConfig]:
    """Rebuild the GOAT adapters saved by `export_goat` onto ``params`` (plain or wrapped; nothing is re-derived).

    Args:
      params: the base params (the same base the adapter was trained on), plain or already wrapped. Its fingerprint
        (the recorded modules_to_save excluded: the file replaces them) must equal the recorded one.
      in_dir: folder with ``goat_config.json`` and ``goat_adapter.safetensors``.
      fingerprint: optional, kept for compatibility: import_goat computes the fingerprint of ``params`` itself; a
        value given here must equal it (it can no longer stand in for the real check).

    Returns:
      (wrapped tree, the recorded config).

    Raises:
      ValueError: fingerprint mismatch, unknown format version, knobs that are not finite numbers (naming the file
        and key), missing modules, shape mismatches, unknown tensors.

    Example:
      >>> wrapped, cfg = import_goat(params, "out/goat")
    """
    file = os.path.join(in_dir, GOAT_CONFIG_FILE)
    meta = read_json(file)
    if not isinstance(meta, dict) or meta.get("format") != GOAT_FORMAT \
            or meta.get("format_version") != GOAT_FORMAT_VERSION:
        got = (meta.get("format"), meta.get("format_version")) if isinstance(meta, dict) else (None, None)
        raise ValueError(f"{in_dir} is not a jgoat GOAT adapter of format version {GOAT_FORMAT_VERSION} "
                         f"(format={got[0]!r}, version={got[1]!r})")
    cfg = _read_config(meta, file)
    tree = to_dict(params)
    own = base_fingerprint(_mark_saved(tree, meta["modules_to_save"]))
    if fingerprint is not None and fingerprint != own:
        raise JgoatError(f"fingerprint={fingerprint!r} is not the fingerprint of these params ({own!r}); leave it "
                         "out: import_goat computes it")
    if meta["base_fingerprint"] != own:
        raise ValueError(
            f"base fingerprint mismatch: the GOAT adapter in {in_dir} was trained on a base with fingerprint "
            f"{meta['base_fingerprint']!r}, these params have {own!r}. Its frozen residual offset was derived "
            "from that exact base (SVD of its weights); load the same base weights")
    tensors = safetensors.flax.load_file(os.path.join(in_dir, GOAT_WEIGHTS_FILE))
    used: set[str] = set()
    errors: list[str] = []
    for entry in meta["modules"]:
        p, stack = entry["path"], tuple(entry["stack"])
        n_in, n_out = entry["in_features"], entry["out_features"]
        path = tuple(p.split("/"))
        try:
            module = get_at(tree, path)
        except (KeyError, TypeError):
            errors.append(f"params have no module '{p}'")
            continue
        kernel = module.get("kernel") if isinstance(module, Mapping) else None
        if not is_array(kernel) or tuple(kernel.shape[: len(stack)]) != stack or \
                int(np.prod(kernel.shape)) != int(np.prod(stack, dtype=int)) * n_in * n_out:
            errors.append(f"'{p}': kernel {None if kernel is None else tuple(kernel.shape)} does not fit the saved "
                          f"adapter (stack {stack}, in {n_in}, out {n_out})")
            continue
        e, d = cfg.experts, cfg.expert_rank
        expected = {"A": (*stack, e, n_in, d), "B": (*stack, e, d, n_out), "router": (*stack, n_in, e),
                    "res_A": (*stack, n_in, e * d), "res_B": (*stack, e * d, n_out)}
        fields = {}
        for field in _GOAT_FIELDS:
            key = f"{p}/{ADAPTER_KEY}/{field}"
            if key not in tensors:
                if field in ("res_A", "res_B"):
                    fields[field] = None
                    continue
                errors.append(f"missing tensor '{key}'")
                continue
            used.add(key)
            if tuple(tensors[key].shape) != expected[field]:
                errors.append(f"'{key}' has shape {tuple(tensors[key].shape)}, expected {expected[field]}")
            fields[field] = tensors[key]
        if (fields.get("res_A") is None) != (fields.get("res_B") is None):
            errors.append(f"'{p}': res_A and res_B must be both present or both absent")
        if len(fields) != len(_GOAT_FIELDS):
            continue
        node = GoatAdapter(**fields, scale=entry["scale"], top_k=cfg.top_k, dropout=cfg.dropout,
                           dropout_mode=cfg.dropout_mode, aux_form=cfg.aux_form, compute_dtype=cfg.compute_dtype)
        tree = replace_at(tree, path, lambda m, n=node: {**m, ADAPTER_KEY: n})
    for p in meta.get("modules_to_save", []):
        path = tuple(p.split("/"))
        try:
            module = get_at(tree, path)
        except (KeyError, TypeError):
            errors.append(f"params have no module '{p}' (modules_to_save)")
            continue
        new = to_dict(module)
        for sub, leaf in module_params(module):
            key = path_str((*path, *sub))
            if key not in tensors:
                errors.append(f"missing tensor '{key}' (modules_to_save)")
                continue
            used.add(key)
            if tuple(tensors[key].shape) != tuple(leaf.shape):
                errors.append(f"'{key}' has shape {tuple(tensors[key].shape)}, params have {tuple(leaf.shape)}")
                continue
            new = replace_at(new, sub[:-1], lambda m, k=sub[-1], v=tensors[key]: {**m, k: v})
        new[ADAPTER_KEY] = TrainModule()
        tree = replace_at(tree, path, lambda m, n=new: n)
    unknown = sorted(set(tensors) - used)
    if unknown:
        errors.append(f"unknown tensors {unknown}")
    if errors:
        raise ValueError(f"cannot import the GOAT adapter in {in_dir}:\n  " + "\n  ".join(errors))
    return tree, cfg


def _read_config(meta: dict, file: str) -> GoatConfig:
    """The GoatConfig of a goat_config.json, after checking every field an import reads (one-line errors naming the
    file and key: a crafted NaN or string scale never reaches an adapter)."""
    if not isinstance(meta.get("base_fingerprint"), str):
        raise JgoatError(f"{file}: base_fingerprint must be a string, got {meta.get('base_fingerprint')!r}")
    cls = _GOAT_CLASSES.get(meta.get("config_class", "GoatConfig"))
    if cls is None:
        raise JgoatError(f"{file}: config_class must be one of {sorted(_GOAT_CLASSES)}, got {meta['config_class']!r}")
    if not isinstance(meta.get("config"), dict):
        raise JgoatError(f"{file}: config must be an object of GoatConfig knobs, got {meta.get('config')!r}")
    try:
        cfg = cls(**meta["config"])
    except (TypeError, ValueError) as e:
        raise JgoatError(f"{file}: config: {e}") from None
    modules, saved = meta.get("modules"), meta.get("modules_to_save", [])
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise JgoatError(f"{file}: modules must be a list of objects, got {modules!r}")
    for i, entry in enumerate(modules):
        if not isinstance(entry.get("path"), str) or not entry["path"]:
            raise JgoatError(f"{file}: modules[{i}].path must be a module path, got {entry.get('path')!r}")
        stack = entry.get("stack")
        if not isinstance(stack, list):
            raise JgoatError(f"{file}: modules[{i}].stack must be a list of layer counts, got {stack!r}")
        for j, n in enumerate(stack):
            check_number(n, file, f"modules[{i}].stack[{j}]", integer=True, positive=True)
        for key in ("in_features", "out_features"):
            check_number(entry.get(key), file, f"modules[{i}].{key}", integer=True, positive=True)
        check_number(entry.get("scale"), file, f"modules[{i}].scale", positive=True)
    if not isinstance(saved, list) or not all(isinstance(p, str) and p for p in saved):
        raise JgoatError(f"{file}: modules_to_save must be a list of module paths, got {saved!r}")
    meta["modules_to_save"] = saved
    return cfg


def _mark_saved(tree: dict, saved: Sequence[str]) -> dict:
    """`tree` with the modules_to_save the file carries marked (so `fingerprint` leaves them out, as at export)."""
    for p in saved:
        path = tuple(p.split("/"))
        try:
            module = get_at(tree, path)
        except (KeyError, TypeError):
            continue  # reported with the other layout errors
        if is_module(module):
            tree = replace_at(tree, path, lambda m: {**m, ADAPTER_KEY: TrainModule()})
    return tree
