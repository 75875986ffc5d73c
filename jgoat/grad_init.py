"""Gradient-driven initialisation: GoRA's accumulated gradients, per-layer rank allocation and wrap (steps 1–3 of
:mod:`jgoat.adapters.gora`, whose docstring states the formulas).

These steps need a loss, the whole params tree, target selection and checkpoints, so they live at the level of
:mod:`jgoat.wrap` (above the per-layer methods in :mod:`jgoat.adapters`, which never import them).
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jgoat.adapters.gora import GoraAdapter, GoraConfig, allocate_ranks, stacked_nodes
from jgoat.checkpoint import read_adapters
from jgoat.core import (
    ADAPTER_KEY,
    AdapterConfig,
    get_at,
    iter_modules,
    layout_for,
    module_key,
    path_str,
    replace_at,
    select_targets,
    to_dict,
)
from jgoat.wrap import mark_trainable

PyTree = Any
Array = jax.Array


# --------------------------------------------------------------------------------------------------- gradients


def _select(params: Mapping, targets, layouts) -> tuple[dict, list[tuple[str, ...]]]:
    cfg = targets if isinstance(targets, AdapterConfig) else AdapterConfig(targets=targets)
    params = to_dict(params)
    return params, select_targets(params, cfg, layouts)


def _geometry(params: Mapping, paths, layouts) -> dict[str, tuple[tuple[int, ...], int, int]]:
    out = {}
    for p in paths:
        kernel = get_at(params, p)["kernel"]
        out[path_str(p)] = layout_for(p, kernel, layouts).split(kernel.shape)
    return out


def _kernel_sharding(kernel, shape: tuple[int, ...]) -> jax.sharding.NamedSharding | None:
    """The kernel's sharding for its fp32 gradient accumulator when the kernel lies on a mesh and has the
    accumulator's shape [*stack, in, out]; else None (jax's default placement)."""
    sharding = getattr(kernel, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding) and tuple(kernel.shape) == shape:
        return sharding
    return None


def _loss_value(out):
    return out[0] if isinstance(out, tuple | list) else out


def _accumulate(acc: dict, params: dict, batch, *, paths, geometry, loss_fn):
    """acc + ∂loss/∂(targeted kernels) in fp32; all other params are constants of the differentiated function."""
    names = [path_str(p) for p in paths]

    def loss_of(kernels):
        full = params
        for p, name in zip(paths, names, strict=True):
            full = replace_at(full, p, lambda m, k=kernels[name]: {**m, "kernel": k})
        return _loss_value(loss_fn(full, batch))

    kernels = {name: get_at(params, p)["kernel"] for p, name in zip(paths, names, strict=True)}
    loss, grads = jax.value_and_grad(loss_of)(kernels)
    new = {}
    for name in names:
        stack, n_in, n_out = geometry[name]
        new[name] = acc[name] + grads[name].astype(jnp.float32).reshape(*stack, n_in, n_out)
    return new, loss


def gora_gradients(params: PyTree, loss_fn, batches: Iterable, *, targets, layouts=None,
                   n_batches: int | None = None, progress: bool = True) -> dict[str, Array]:
    """Ḡ: the gradient of the loss w.r.t. each targeted kernel, averaged over batches (GoRA step 1).

    Only the targeted kernels are differentiated (a tree holding just them; every other weight is a constant of the
    differentiated function, so no other gradient is formed). The sum lives in ONE fp32 accumulator the size of the
    targeted kernels, updated in place by a jitted step that donates it; the params are passed in, never copied.

    Args:
      params: the base ``params`` collection (no adapters needed).
      loss_fn: ``loss_fn(params, batch) -> loss`` (a tuple's first element is used, e.g. (loss, aux)).
      batches: an iterable of batches (the scripts use N = 32).
      targets: a config (``GoraConfig``; its targets/exclude are used) or a targets rule (regex, list of names,
        "all-linear").
      layouts: optional ``jgoat.probe`` layouts for DenseGeneral/Einsum kernels.
      n_batches: stop after this many batches (default: all of `batches`).
      progress: show a tqdm bar over the batches.

    Returns:
      {module path: Ḡ float32 [*stack, in, out]}, exactly the targeted modules.
    """
    params, paths = _select(params, targets, layouts)
    geometry = _geometry(params, paths, layouts)
    # on a mesh, each kernel's accumulator takes the kernel's sharding (no device holds the whole Ḡ)
    placed = {path_str(p): _kernel_sharding(get_at(params, p)["kernel"], (*stack, n_in, n_out))
              for p, (stack, n_in, n_out) in zip(paths, geometry.values(), strict=True)}
    acc = {name: jnp.zeros((*stack, n_in, n_out), jnp.float32, device=placed[name])
           for name, (stack, n_in, n_out) in geometry.items()}
    out_shardings = None if None in placed.values() else (placed, None)
    step = jax.jit(functools.partial(_accumulate, paths=tuple(paths), geometry=geometry, loss_fn=loss_fn),
                   donate_argnums=0, out_shardings=out_shardings)
    total = len(batches) if hasattr(batches, "__len__") else None
    total = n_batches if total is None else (total if n_batches is None else min(total, n_batches))
    count = 0
    source = batches if n_batches is None else itertools.islice(batches, n_batches)
    bar = tqdm(source, total=total, desc="GoRA gradients", disable=not progress, dynamic_ncols=True)
    for batch in bar:
        acc, loss = step(acc, params, batch)
        count += 1
        if progress:
            bar.set_postfix(loss=f"{float(loss):.4g}")
    bar.close()
    if count == 0:
        raise ValueError("gora_gradients got no batch: pass at least one (the GoRA scripts use 32)")
    return {name: g / np.float32(count) for name, g in acc.items()}


# --------------------------------------------------------------------------------------------------- ranks


def gora_importance(params: PyTree, grads: Mapping[str, Array]) -> dict[str, np.ndarray]:
    """I_l = mean(|W_l ⊙ Ḡ_l|) in fp32 for every layer: {path: float32 [*stack]} (stacked layers separately)."""
    out = {}
    for name, g in grads.items():
        kernel = get_at(params, tuple(name.split("/")))["kernel"]
        g = jnp.asarray(g, jnp.float32)
        w = jnp.reshape(kernel, g.shape).astype(jnp.float32)
        out[name] = np.asarray(jnp.mean(jnp.abs(w * g), axis=(-2, -1)))
    return out


def gora_allocate(params: PyTree, cfg: GoraConfig, grads: Mapping[str, Array]) -> dict[str, np.ndarray]:
    """GoRA step 2: {path: int64 ranks [*stack]} from the accumulated gradients (``gora_gradients``)."""
    shapes = {name: tuple(int(d) for d in np.shape(g)[-2:]) for name, g in grads.items()}
    return allocate_ranks(gora_importance(params, grads), shapes, cfg)


# --------------------------------------------------------------------------------------------------- wrap / ranks


def _check_keys(given: Mapping, names: list[str], what: str) -> None:
    missing, extra = sorted(set(names) - set(given)), sorted(set(given) - set(names))
    if missing or extra:
        raise ValueError(f"{what} do not match the targeted modules: missing {missing[:4]}, unknown {extra[:4]} "
                         "(use the same targets as for gora_gradients)")


def gora_wrap(params: PyTree, cfg: GoraConfig, grads: Mapping[str, Array] | None = None, *, key: jax.Array,
              ranks: Mapping[str, Any] | None = None, layouts=None) -> dict:
    """Add a GoRA adapter beside every targeted kernel (GoRA steps 2–3); the base is unchanged.

    Args:
      params: the base ``params`` collection.
      cfg: a ``GoraConfig``.
      grads: {path: Ḡ [*stack, in, out]} from ``gora_gradients`` with the same targets. None builds a shape template
        (A kaiming, B = 0) for ``jgoat.restore`` and then requires `ranks`.
      key: PRNG key for A (per module ``fold_in(key, crc32(path))``, split over stacked layers, as ``jgoat.wrap``).
      ranks: {path: int ranks [*stack]} to use instead of allocating them from `grads`, e.g. ``gora_ranks(ckpt_dir)``.
      layouts: optional ``jgoat.probe`` layouts.

    Returns:
      The wrapped tree: ``.../kernel`` plus ``jgoat: GoraAdapter(A [*L, in, r_pad], B [*L, r_pad, out], rank [*L],
      scale [*L])``, r_pad = the module's largest rank.

    Example:
      >>> wrapped = jgoat.gora_wrap(params, cfg, jgoat.gora_gradients(params, loss_fn, batches, targets=cfg), key=key)
      >>> template = jgoat.gora_wrap(params, cfg, key=key, ranks=jgoat.gora_ranks(ckpt_dir))   # reload
      >>> tree, _, _ = jgoat.restore(ckpt_dir, template)
    """
    if not isinstance(cfg, GoraConfig):
        raise TypeError(f"gora_wrap needs a jgoat.GoraConfig, got {type(cfg).__name__}")
    if grads is None and ranks is None:
        raise ValueError("gora_wrap needs the accumulated gradients (jgoat.gora_gradients) or, to rebuild a "
                         "checkpoint's shapes, ranks=jgoat.gora_ranks(checkpoint_dir)")
    params, paths = _select(params, cfg, layouts)
    geometry = _geometry(params, paths, layouts)
    names = list(geometry)
    if grads is not None:
        _check_keys(grads, names, "grads")
        for name, (stack, n_in, n_out) in geometry.items():
            if tuple(np.shape(grads[name])) != (*stack, n_in, n_out):
                raise ValueError(f"grads['{name}'] has shape {tuple(np.shape(grads[name]))}, expected "
                                 f"{(*stack, n_in, n_out)} ([*stack, in, out])")
    if ranks is None:
        ranks = gora_allocate(params, cfg, grads)
    _check_keys(ranks, names, "ranks")
    for p, name in zip(paths, names, strict=True):
        stack, n_in, n_out = geometry[name]
        r = np.asarray(ranks[name])
        if r.shape != stack or not np.issubdtype(r.dtype, np.integer):
            raise ValueError(f"ranks['{name}'] must be integers of shape {stack} (one per stacked layer), got "
                             f"{r.dtype} {r.shape}")
        if r.min() < 1 or r.max() > min(n_in, n_out):
            raise ValueError(f"ranks['{name}'] must lie in [1, min(in, out) = {min(n_in, n_out)}], got "
                             f"[{r.min()}, {r.max()}]")
        r_pad = int(r.max())
        n_layers = int(np.prod(stack, dtype=int))
        mod_key = module_key(key, p)
        keys = jax.random.split(mod_key, n_layers) if stack else mod_key[None]
        g = None if grads is None else jnp.reshape(jnp.asarray(grads[name], jnp.float32), (n_layers, n_in, n_out))
        node = stacked_nodes(cfg, g, keys, r.reshape(-1).tolist(), n_in, n_out, r_pad)
        node = jax.tree.map(lambda x, s=stack: x.reshape(*s, *x.shape[1:]), node)
        params = replace_at(params, p, lambda m, a=node: {**m, ADAPTER_KEY: a})
    return mark_trainable(params, cfg.modules_to_save) if cfg.modules_to_save else params


def gora_ranks(source: PyTree | str | os.PathLike, *, step: int | None = None) -> dict[str, np.ndarray]:
    """The recorded per-layer ranks {path: int64 [*stack]} of a GoRA tree, or of a checkpoint directory.

    A directory is read without any template (only its adapter arrays are loaded): pass the result as
    ``gora_wrap(params, cfg, key=key, ranks=...)`` to rebuild the shapes ``jgoat.restore`` needs. ``.tolist()`` of
    each value is JSON-ready.
    """
    if isinstance(source, str | os.PathLike):
        return _checkpoint_ranks(source, step)
    found = {path_str(p): np.asarray(m[ADAPTER_KEY].rank).astype(np.int64) for p, m in iter_modules(source)
             if isinstance(m.get(ADAPTER_KEY), GoraAdapter)}
    if not found:
        raise ValueError("the tree holds no GoRA adapter: build it with jgoat.gora_wrap")
    return found


def _checkpoint_ranks(directory: str | os.PathLike, step: int | None) -> dict[str, np.ndarray]:
    record, arrays = read_adapters(directory, step=step)
    suffix = f"/{ADAPTER_KEY}/rank"
    found = {path[: -len(suffix)]: a.astype(np.int64) for path, a in arrays.items() if path.endswith(suffix)}
    if not found:
        raise ValueError(f"checkpoint {directory} (step {record['step']}) holds no GoRA adapter (no '*{suffix}' leaf)")
    return found


__all__ = ["gora_allocate", "gora_gradients", "gora_importance", "gora_ranks", "gora_wrap"]
