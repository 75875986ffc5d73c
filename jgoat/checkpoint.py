"""Adapter-only checkpoints with orbax-checkpoint, bound to the base they were trained on.

A checkpoint holds the adapter leaves (every array inside a ``jgoat`` entry, trainable or not, plus
`modules_to_save` params), optionally the optimizer state and a JSON record: step, the base fingerprint, the
adapter leaf paths/shapes and any user metadata (e.g. the data position). The base is never saved. Orbax writes each
step to a temporary directory and renames it when complete, so a process killed mid-save never replaces the last
good checkpoint.
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from jgoat.core import adapter_leaves, fingerprint, is_adapter_path, saved_prefixes
from jgoat.errors import JgoatError

PyTree = Any
__all__ = ["adapter_leaves", "fingerprint", "latest_step", "read_adapters", "restore", "save", "verify"]


def _manager(directory: str | os.PathLike, max_to_keep: int | None, *, create: bool = False) -> ocp.CheckpointManager:
    """Orbax's manager for `directory`; only `save` creates it, readers refuse a missing one (never create it)."""
    if not create and not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {os.fspath(directory)!r} does not exist")
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create, enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _check_metadata(metadata: Any) -> dict:
    """A JSON-serialisable copy of `metadata` (a ValueError names the first key that is not), checked before any
    write so that a refused save leaves nothing on disk."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise JgoatError(f"metadata must be a mapping of JSON-serialisable values, got {type(metadata).__name__}")
    for key, value in metadata.items():
        try:
            json.dumps({key: value})
        except (TypeError, ValueError) as e:
            raise JgoatError(f"metadata[{key!r}] is not JSON-serialisable ({e}); nothing was saved") from None
    return dict(metadata)


def _storable(x: Any) -> Any:
    """A leaf as orbax writes it: a jax array as it is (sharded ones shard by shard, no gather), else numpy."""
    return x if isinstance(x, jax.Array) else np.asarray(x)


def _here() -> jax.sharding.Sharding:
    """This process's first device: where a leaf with no sharding of its own is restored (orbax would otherwise use
    the saving mesh's sharding, which fails on a process with other devices, e.g. one device after 8)."""
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _target(x: Any) -> jax.ShapeDtypeStruct:
    """Where a restored leaf goes: onto the template leaf's sharding when it is a jax array (any device or mesh,
    whatever mesh saved it), else onto this process's first device."""
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=_here())


def save(
    directory: str | os.PathLike,
    tree: PyTree,
    *,
    step: int,
    opt_state: PyTree = None,
    metadata: Mapping[str, Any] | None = None,
    max_to_keep: int | None = 3,
) -> None:
    """Save the adapters of `tree` (full wrapped tree or the trainable half) at `step` under `directory`.

    Arrays on a device mesh are written shard by shard by each process (no gather to one host); a process killed
    mid-save never replaces the last good step.

    Args:
      directory: checkpoint root; each step is a subdirectory managed by orbax.
      tree: the full wrapped tree (needed for the base fingerprint).
      step: training step (the subdirectory name).
      opt_state: optional optimizer state (saved leaf by leaf; restore needs a template of the same structure).
      metadata: JSON-serialisable extras, e.g. {"data_position": 1234, "config": {...}}.
      max_to_keep: keep only the newest N steps (None keeps all).
    """
    if isinstance(step, bool) or not hasattr(step, "__index__") or operator.index(step) < 0:
        raise JgoatError(f"step must be an integer >= 0, got {step!r}")
    extras = _check_metadata(metadata)
    leaves = adapter_leaves(tree)
    if not leaves:
        raise ValueError("tree holds no adapters: wrap it with jgoat.wrap before saving")
    arrays = {f"a{i:05d}": _storable(x) for i, x in enumerate(leaves.values())}
    opt_leaves = {f"o{i:05d}": _storable(x) for i, x in enumerate(jax.tree.leaves(opt_state))}
    record = {
        "step": int(step),
        "fingerprint": fingerprint(tree),
        "adapter_paths": list(leaves),
        "adapter_shapes": [list(x.shape) for x in leaves.values()],
        "opt_leaves": len(opt_leaves),
        "metadata": extras,
    }
    with _manager(directory, max_to_keep, create=True) as mngr:
        items = {"adapter": ocp.args.StandardSave(arrays), "record": ocp.args.JsonSave(record)}
        if opt_leaves:
            items["opt"] = ocp.args.StandardSave(opt_leaves)
        mngr.save(int(step), args=ocp.args.Composite(**items), force=True)
        mngr.wait_until_finished()


def read_adapters(directory: str | os.PathLike, *, step: int | None = None) -> tuple[dict[str, Any], dict]:
    """(the JSON record, {adapter leaf path: numpy array}) of a checkpoint, read without any template tree.

    For rebuilding a template whose shapes depend on saved values, e.g. GoRA's per-layer ranks
    (``jgoat.gora_ranks(directory)``). `step` defaults to the latest.
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {os.fspath(directory)!r} does not exist")
    options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
    handlers = {"adapter": ocp.StandardCheckpointHandler(), "record": ocp.JsonCheckpointHandler()}
    with ocp.CheckpointManager(os.path.abspath(directory), options=options, item_handlers=handlers) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {directory}")
        record = mngr.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))["record"]
        # the saved shapes and dtypes as targets on this process's device, whatever mesh wrote them
        targets = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=_here())
                   for k, v in mngr.item_metadata(step)["adapter"].items()}
        arrays = mngr.restore(step, args=ocp.args.Composite(adapter=ocp.args.StandardRestore(targets)))["adapter"]
    return record, {path: np.asarray(arrays[f"a{i:05d}"]) for i, path in enumerate(record["adapter_paths"])}


def latest_step(directory: str | os.PathLike) -> int | None:
    """The newest complete step under `directory`, or None."""
    if not os.path.isdir(directory):
        return None
    with _manager(directory, None) as mngr:
        return mngr.latest_step()


def verify(directory: str | os.PathLike, step: int) -> None:
    """Read every stored value of `step` once, synchronously, checking the checksums orbax's storage (OCDBT) keeps.

    Raises JgoatError naming the damaged file. `restore` calls it first: orbax's own reader, when a file is damaged,
    raises while other reads are still in flight, and their completions then print hundreds of "Event loop is
    closed" tracebacks into a closed asyncio loop. Reading key by key here fails cleanly, before orbax reads anything.
    """
    root = os.path.join(os.path.abspath(directory), str(step))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"checkpoint step {root!r} does not exist")
    for item in sorted(os.listdir(root)):
        if not os.path.isfile(os.path.join(root, item, "manifest.ocdbt")):
            continue  # JSON items (the record) are parsed, hence checked, when read
        spec = {"driver": "ocdbt", "base": f"file://{os.path.join(root, item)}/"}
        try:
            store = ts.KvStore.open(spec).result()
            for key in store.list().result():
                store.read(key).result()
        except ValueError as err:  # tensorstore reports DATA_LOSS / NOT_FOUND / decode errors as ValueError
            first = str(err).strip().splitlines()[0][:300]
            raise JgoatError(f"checkpoint {root} is damaged ({item}: {first})") from None


def restore(
    directory: str | os.PathLike,
    tree: PyTree,
    *,
    step: int | None = None,
    opt_state: PyTree = None,
) -> tuple[PyTree, PyTree, dict[str, Any]]:
    """Put saved adapters into `tree` (a wrapped tree on the same base, e.g. from the same ``jgoat.wrap`` call).

    Each restored leaf lands with the sharding of the `tree` / `opt_state` leaf it replaces, read shard by shard: a
    checkpoint saved on one mesh restores onto another mesh shape or onto one device (``jgoat.shard`` the templates
    first). Refuses (ValueError) when the base fingerprint differs from the one recorded at save time, or when the
    adapter layout (paths, shapes) differs.

    Args:
      directory: checkpoint root.
      tree: wrapped tree whose adapter leaves are replaced.
      step: which step (default: the latest).
      opt_state: a template optimizer state (e.g. ``tx.init(trainable)``) to restore into, or None.

    Returns:
      (tree with restored adapters, restored opt_state or None, the JSON record incl. step and metadata).
    """
    with _manager(directory, None) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {directory}")
        verify(directory, step)
        record = mngr.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))["record"]
        leaves = adapter_leaves(tree)
        if record["fingerprint"] != fingerprint(tree):
            raise ValueError(f"checkpoint {directory} (step {step}) was trained on a different base model: its "
                             "base fingerprint does not match these params (GOAT/PiSSA residuals and the adapters "
                             "only make sense on the exact base they were derived from)")
        shapes = [list(x.shape) for x in leaves.values()]
        if record["adapter_paths"] != list(leaves) or record["adapter_shapes"] != shapes:
            diff = sorted(set(record["adapter_paths"]) ^ set(leaves))[:8]
            raise ValueError(f"checkpoint adapter layout differs from the tree's (differing paths: {diff}); wrap "
                             "the base with the same config as at save time")
        opt_template = jax.tree.leaves(opt_state)
        if opt_state is not None and len(opt_template) != record["opt_leaves"]:
            raise ValueError(f"optimizer state template has {len(opt_template)} leaves, checkpoint has "
                             f"{record['opt_leaves']}: build it with the same optimizer and trainable tree")
        items = {"adapter": ocp.args.StandardRestore({f"a{i:05d}": _target(x) for i, x in enumerate(leaves.values())})}
        if opt_template:
            items["opt"] = ocp.args.StandardRestore({f"o{i:05d}": _target(x) for i, x in enumerate(opt_template)})
        restored = mngr.restore(step, args=ocp.args.Composite(**items))
    # orbax hands back host numpy arrays for unsharded targets: make them jax arrays like the tree they came from
    values = iter(jnp.asarray(restored["adapter"][f"a{i:05d}"]) for i in range(len(leaves)))
    saved = saved_prefixes(tree)
    paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    new_leaves = [next(values) if is_adapter_path(jax.tree_util.keystr(p, simple=True, separator="/"), saved)
                  else x for p, x in paths]
    new_tree = jax.tree_util.tree_unflatten(treedef, new_leaves)
    new_opt = opt_state
    if opt_template:
        opt_values = [jnp.asarray(restored["opt"][f"o{i:05d}"]) for i in range(len(opt_template))]
        new_opt = jax.tree_util.tree_unflatten(jax.tree.structure(opt_state), opt_values)
    return new_tree, new_opt, record
