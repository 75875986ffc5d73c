"""Multi-device checks for jgoat.sharding, run by tests/test_sharding.py in ONE subprocess on 8 fake CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python tests/sharding_checks.py OUT.json

Computes, never asserts: every measured number (relative errors of the sharded step against the single-device step,
leaves whose sharding differs from the expected one, per-device bytes, checkpoint round trips) goes to OUT.json and
the pytest side asserts on it, one test per property.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

import jgoat
from jgoat.core import ADAPTER_KEY
from jgoat.models import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM, causal_lm_loss

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")

MESHES = {"8,1,1": (8, 1, 1), "2,4,1": (2, 4, 1), "1,4,2": (1, 4, 2), "1,1,8": (1, 1, 8)}
BATCH, SEQ = 8, 8
# intermediate 36: tensor=8 does not divide it (replicated fallback), 2 does
LLAMA = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=36, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2)
BERT = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=36,
                  max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)

# Independent statement of the partitioning the default rules must give these two models: (input, output) mesh
# axis of each kernel by module name (fsdp on the hidden dim; Megatron tensor split), before divisibility.
KERNEL_AXES = {
    "q_proj": ("fsdp", "tensor"), "k_proj": ("fsdp", "tensor"), "v_proj": ("fsdp", "tensor"),
    "gate_proj": ("fsdp", "tensor"), "up_proj": ("fsdp", "tensor"),
    "o_proj": ("tensor", "fsdp"), "down_proj": ("tensor", "fsdp"), "lm_head": ("fsdp", "tensor"),
    "query": ("fsdp", "tensor"), "key": ("fsdp", "tensor"), "value": ("fsdp", "tensor"),
    "attention/output/dense": ("tensor", "fsdp"), "intermediate/dense": ("fsdp", "tensor"),
    "output/dense": ("tensor", "fsdp"), "pooler/dense": ("fsdp", None), "classifier": ("fsdp", None),
    "fc1": ("fsdp", "tensor"), "fc2": ("tensor", "fsdp"), "out_proj": ("tensor", "fsdp"),
    "classifier/dense": ("fsdp", None), "classifier/out_proj": ("fsdp", None),
}


# One tree per model holding every method on its own modules (QLoRA: LoRA on an NF4-quantised kernel), so one
# compiled step per mesh covers them all; each method's adapters are then compared separately.
MIXED = {
    "llama": {"nf4": ["gate_proj"], "methods": [
        ("lora", jgoat.LoraConfig(rank=4, alpha=8.0, targets=["q_proj"]), ("q_proj",)),
        ("qlora", jgoat.LoraConfig(rank=4, alpha=8.0, targets=["gate_proj"]), ("gate_proj",)),
        ("goat", jgoat.GoatConfig(rank=8, experts=4, top_k=2, targets=["v_proj", "o_proj"]), ("v_proj", "o_proj")),
        ("dora", jgoat.LoraConfig(rank=4, alpha=8.0, use_dora=True, targets=["k_proj"]), ("k_proj",)),
        ("ia3", jgoat.IA3Config(targets=["up_proj", "down_proj"], feedforward=["down_proj"]),
         ("up_proj", "down_proj"))]},
    "bert": {"nf4": ["intermediate/dense"], "methods": [
        ("lora", jgoat.LoraConfig(rank=4, alpha=8.0, targets=["query"], modules_to_save=["classifier"]),
         ("query",)),
        ("qlora", jgoat.LoraConfig(rank=4, alpha=8.0, targets=["intermediate/dense"]), ("intermediate/dense",)),
        ("goat", jgoat.GoatConfig(rank=8, experts=4, top_k=2, targets=["value", "attention/output/dense"]),
         ("value", "attention/output/dense")),
        ("dora", jgoat.LoraConfig(rank=4, alpha=8.0, use_dora=True, targets=["key", "pooler/dense"]),
         ("key", "pooler/dense")),
        ("ia3", jgoat.IA3Config(targets=["layer_0/output/dense"], feedforward=["layer_0/output/dense"]),
         ("layer_0/output/dense",))]},
}


def wrapped_tree(model: str, params) -> dict:
    """Each method wrapped on the (partly NF4) base alone, then every method's adapter slots grafted into one tree
    (``jgoat.wrap`` refuses a second unnamed wrap; apply and split act module by module)."""
    base = jgoat.quantize_nf4(params, targets=MIXED[model]["nf4"])
    tree = base
    for i, (_, cfg, _) in enumerate(MIXED[model]["methods"]):
        tree = _graft(tree, jgoat.wrap(base, cfg, key=jax.random.key(10 + i)))
    return tree


def _graft(tree: dict, source: dict) -> dict:
    """`tree` with every adapter slot of `source` (same base) added at its module."""
    out = dict(tree)
    for name, child in source.items():
        if name == ADAPTER_KEY:
            out[name] = child
        elif isinstance(child, dict):
            out[name] = _graft(tree[name], child)
    return out


def method_leaves(tree, model: str, method: str) -> list:
    """The arrays of `method`'s adapters in `tree` (the trainable half, or an optimizer moment of it)."""
    modules = next(m for name, _, m in MIXED[model]["methods"] if name == method)
    return jax.tree.leaves([node for path, node in jgoat.adapters(tree) if path.endswith(modules)])


def setup(model_name: str, llama: LlamaConfig = LLAMA):
    key = jax.random.key(0)
    ids = jax.random.randint(jax.random.key(1), (BATCH, SEQ), 0, 64)
    mask = jnp.ones((BATCH, SEQ), jnp.int32).at[:2, -3:].set(0)
    if model_name == "llama":
        model = LlamaForCausalLM(llama)
        params = model.init(key, ids)["params"]

        def loss_fn(p, batch, rng):
            out, aux = jgoat.apply(model.apply)({"params": p}, batch["ids"], batch["mask"], aux_mask=batch["mask"])
            labels = jnp.where(batch["mask"] > 0, batch["ids"], -100)
            return causal_lm_loss(out.logits, labels), aux

        def load_fn(p, batch):
            _, _, loads = jgoat.apply(model.apply, collect_load=True)({"params": p}, batch["ids"], batch["mask"],
                                                                      aux_mask=batch["mask"])
            return loads

        batch = {"ids": ids, "mask": mask}
    else:
        model = BertForSequenceClassification(BERT)
        params = model.init(key, ids, mask)["params"]

        def loss_fn(p, batch, rng):
            logits, aux = jgoat.apply(model.apply)({"params": p}, batch["ids"], batch["mask"],
                                                   aux_mask=batch["mask"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean(), aux

        def load_fn(p, batch):
            _, _, loads = jgoat.apply(model.apply, collect_load=True)({"params": p}, batch["ids"], batch["mask"],
                                                                      aux_mask=batch["mask"])
            return loads

        batch = {"ids": ids, "mask": mask, "labels": jax.random.randint(jax.random.key(2), (BATCH,), 0, 3)}
    return params, loss_fn, load_fn, batch


def path_of(p) -> str:
    return jax.tree_util.keystr(p, simple=True, separator="/")


def kernel_axes(module: str) -> tuple[str | None, str | None]:
    return next(v for k, v in sorted(KERNEL_AXES.items(), key=lambda kv: -len(kv[0]))
                if module == k or module.endswith("/" + k))


def fit(shape, axes, mesh) -> list[tuple[str, ...]]:
    """Per dim: its wanted mesh axes if their product divides the dim and none was used by an earlier dim."""
    used, out = set(), []
    for size, want in zip(shape, axes, strict=True):
        want = tuple(a for a in ((want,) if isinstance(want, str) else want or ()) if mesh.shape[a] > 1)
        ok = want and not used & set(want) and size % math.prod(mesh.shape[a] for a in want) == 0
        out.append(want if ok else ())
        used |= set(want) if ok else set()
    return out


def as_spec(dims) -> P:
    return P(*(None if not d else d[0] if len(d) == 1 else d for d in dims))


ADAPTER_ROLES = {"A": ("in", None), "B": (None, "out"), "res_A": ("in", None), "res_B": (None, "out"),
                 "m": ("out",), "router": ("in", None)}


def adapter_spec(path, shape, mesh, method) -> P:
    """LoRA-family A follows the kernel's input axis, B its output axis, rank replicated; GOAT A/B have a leading
    expert dim (replicated: expert=1 here); IA³'s vector follows the output (input for feed-forward layers); then a
    leaf with no fsdp axis gets fsdp on its largest in/out dim where the product divides."""
    module, field = path.split("/jgoat/")
    ax_in, ax_out = kernel_axes(module)
    if field == "l":
        roles = ("in",) if module.endswith(("down_proj", "output/dense")) else ("out",)
    elif method == "GoatAdapter" and field in ("A", "B"):
        roles = (None, *ADAPTER_ROLES[field])
    else:
        roles = ADAPTER_ROLES[field]
    roles = (None,) * (len(shape) - len(roles)) + roles
    dims = fit(shape, [{"in": ax_in, "out": ax_out}.get(r) for r in roles], mesh)
    if mesh.shape["fsdp"] > 1 and not any("fsdp" in d for d in dims):
        for i in sorted((i for i, r in enumerate(roles) if r), key=lambda i: (-shape[i], i)):
            if shape[i] % (math.prod(mesh.shape[a] for a in dims[i]) * mesh.shape["fsdp"]) == 0:
                dims[i] = (*dims[i], "fsdp")
                break
    return as_spec(dims)


def base_spec(path, shape, mesh) -> P:
    parts = path.split("/")
    name = parts[-1]
    lead = [None] * (len(shape) - 2)
    if name == "kernel" and parts[-2] in ("patch_embedding", "projection"):  # conv [h, w, c, D]
        return as_spec(fit(shape, [None, None, None, "fsdp"], mesh))
    if name == "kernel":
        return as_spec(fit(shape, [*lead, *kernel_axes("/".join(parts[:-1]))], mesh))
    if parts[-2] == "mlp" and name in ("gate_proj", "up_proj", "down_proj", "router"):  # MoE [L, E, D, F], [L, D, E]
        axes = {"gate_proj": ["expert", "fsdp", "tensor"], "up_proj": ["expert", "fsdp", "tensor"],
                "down_proj": ["expert", "tensor", "fsdp"], "router": ["fsdp", None]}[name]
        return as_spec(fit(shape, [None] * (len(shape) - len(axes)) + axes, mesh))
    if name == "embedding" and parts[-2] in ("embed_tokens", "word_embeddings"):
        return as_spec(fit(shape, ["tensor", "fsdp"], mesh))
    if name == "embedding":  # position / token type tables
        return as_spec(fit(shape, [None, "fsdp"], mesh))
    if name == "bias" and (parts[-2] in ("q_proj", "k_proj", "v_proj", "query", "key", "value", "gate_proj",
                                         "up_proj", "fc1") or path.endswith("intermediate/dense/bias")):
        return as_spec(fit(shape, [None] * (len(shape) - 1) + ["tensor"], mesh))
    return P(*([None] * len(shape)))


def nf4_spec(module, codes_len, absmax_len, mesh, n_lead) -> P:
    """Codes and absmax: the flat dim over the kernel's (output, input) axes, else one of them, when both divide."""
    ax_in, ax_out = kernel_axes(module)
    for axes in ((ax_out, ax_in), (ax_out,), (ax_in,)):
        axes = tuple(a for a in axes if a is not None and mesh.shape[a] > 1)
        n = math.prod(mesh.shape[a] for a in axes)
        if axes and codes_len % n == 0 and absmax_len % n == 0:
            return P(*([None] * n_lead), axes[0] if len(axes) == 1 else axes)
    return P(*([None] * (n_lead + 1)))


def spec_mismatches(tree, mesh) -> list[str]:
    """Leaves of an on-mesh tree whose sharding is not the expected one."""
    bad = []
    flat = dict((path_of(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0])
    adapters_at = dict(jgoat.adapters(tree))
    for path, x in flat.items():
        parts = path.split("/")
        if "jgoat" in parts:
            want = adapter_spec(path, x.shape, mesh, type(adapters_at[path.split('/jgoat/')[0]]).__name__)
        elif "kernel" in parts[:-1] and parts[-1] in ("codes", "absmax"):
            base = "/".join(parts[:-1])
            want = nf4_spec("/".join(parts[:-2]), flat[base + "/codes"].shape[-1], flat[base + "/absmax"].shape[-1],
                            mesh, x.ndim - 1)
        elif "kernel" in parts[:-1]:  # absmax2, offset
            want = P(*([None] * x.ndim))
        else:
            want = base_spec(path, x.shape, mesh)
        got = x.sharding.spec
        if _norm(got, x.ndim) != _norm(want, x.ndim):
            bad.append(f"{path}: got {got}, want {want}")
    return bad


def _norm(spec, ndim):
    return tuple(spec) + (None,) * (ndim - len(spec))


def rel_err(a, b) -> float:
    """max |a − b| / max |b| over a pytree (0 for identical trees, incl. all-zero leaves)."""
    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        scale = max(np.max(np.abs(y)) if y.size else 0.0, 1e-30)
        worst = max(worst, float(np.max(np.abs(x - y)) / scale) if x.size else 0.0)
    return worst


def step_fn(loss_fn, tx):
    return functools.partial(jgoat.train_step, loss_fn=loss_fn, tx=tx)


def run_equivalence(report):
    # Adam's update m/(√v + ε) is a sign function of gradients far below ε: with ε = 1e-8 an entry that is zero up to
    # rounding (1e-12 here, 3e-12 there) moves by the full lr on one side only. ε = 1e-3 keeps the update Lipschitz in
    # the gradient, so rounding-level gradient differences stay rounding-level in the updated adapters.
    tx = optax.adamw(1e-2, eps=1e-3, weight_decay=0.01)
    rng = jax.random.key(7)
    for model_name in ("llama", "bert"):
        params, loss_fn, load_fn, batch = setup(model_name)
        loads_jit = jax.jit(load_fn)
        wrapped = wrapped_tree(model_name, params)
        trainable, frozen = jgoat.split(wrapped)
        ref_state = jgoat.TrainState.create(trainable, tx)
        ref_step = jax.jit(step_fn(loss_fn, tx))
        ref_metrics = []
        for i in range(2):
            ref_state, m = ref_step(ref_state, frozen, batch, jax.random.fold_in(rng, i))
            ref_metrics.append(m)
        ref_loads = loads_jit(jgoat.combine(ref_state.trainable, frozen), batch)
        for mesh_name, (d, f, t) in MESHES.items():
            mesh = jgoat.mesh(data=d, fsdp=f, tensor=t)
            t_sh, f_sh = jgoat.split(jgoat.shardings(wrapped, mesh))
            state_sh = jgoat.state_shardings(tx, trainable, t_sh, mesh)
            state = jgoat.create_state(trainable, tx, state_sh)
            frozen_m = jax.device_put(frozen, f_sh)
            step = jgoat.sharded_step(step_fn(loss_fn, tx), mesh, state_sh, f_sh)
            metrics = []
            for i in range(2):
                state, m = step(state, frozen_m, batch, jax.random.fold_in(rng, i))
                metrics.append(m)
            adam, ref_adam = state.opt_state[0], ref_state.opt_state[0]
            tuned = jgoat.combine(state.trainable, frozen_m)
            common = {name: rel_err([m[name] for m in metrics], [m[name] for m in ref_metrics])
                      for name in ("loss", "aux", "grad_norm")}
            common["aux_value"] = float(ref_metrics[0]["aux"])
            common["loads"] = rel_err(loads_jit(tuned, jax.device_put(batch, jgoat.batch_sharding(mesh))), ref_loads)
            common["all_trainable"] = rel_err(state.trainable, ref_state.trainable)
            common["mismatched_specs"] = spec_mismatches(tuned, mesh) + opt_mismatches(state)
            for method, _, _ in MIXED[model_name]["methods"]:
                leaves = functools.partial(method_leaves, model=model_name, method=method)
                report["equivalence"][f"{model_name}/{method}/{mesh_name}"] = {
                    **common,
                    "adapters": rel_err(leaves(state.trainable), leaves(ref_state.trainable)),
                    "adam_moments": rel_err([leaves(adam.mu), leaves(adam.nu)],
                                            [leaves(ref_adam.mu), leaves(ref_adam.nu)]),
                    "n_adapter_leaves": len(leaves(state.trainable)),
                    "nf4_kernels": sum(isinstance(node.get("kernel"), jgoat.NF4Kernel) for path, node in
                                       _modules(tuned) if path.endswith(next(
                                           m for n, _, m in MIXED[model_name]["methods"] if n == method))),
                }
            print(f"{model_name}/{mesh_name} done", file=sys.stderr, flush=True)


def _modules(tree, prefix=""):
    for name, child in tree.items():
        if isinstance(child, dict):
            yield f"{prefix}{name}", child
            yield from _modules(child, f"{prefix}{name}/")


def opt_mismatches(state) -> list[str]:
    """Adam's mu and nu must carry exactly their param's sharding; the step count is replicated."""
    bad = []
    want = {path_of(p): x.sharding.spec for p, x in jax.tree_util.tree_flatten_with_path(state.trainable)[0]}
    adam = state.opt_state[0] if isinstance(state.opt_state, tuple) else state.opt_state
    for name in ("mu", "nu"):
        for p, x in jax.tree_util.tree_flatten_with_path(getattr(adam, name))[0]:
            if _norm(x.sharding.spec, x.ndim) != _norm(want[path_of(p)], x.ndim):
                bad.append(f"opt {name}/{path_of(p)}: got {x.sharding.spec}, want {want[path_of(p)]}")
    if _norm(adam.count.sharding.spec, 0) != ():
        bad.append(f"opt count: {adam.count.sharding.spec}")
    return bad


def run_memory(report):
    """Per-device bytes of params + optimizer state on fsdp=8, for GOAT and for full fine-tuning of the tiny Llama."""
    params, _, _, _ = setup("llama", dataclasses.replace(LLAMA, intermediate_size=48))  # every dim divisible
    mesh = jgoat.mesh(data=1, fsdp=8)
    tx = optax.adamw(1e-3)
    for name, tree in (("goat", jgoat.wrap(params, jgoat.GoatConfig(rank=8, experts=4, targets="all-linear"),
                                           key=jax.random.key(3))),
                       ("full", jgoat.mark_trainable(params, ["model", "lm_head"]))):
        trainable, frozen = jgoat.split(tree)
        t_sh, f_sh = jgoat.split(jgoat.shardings(tree, mesh))
        state_sh = jgoat.state_shardings(tx, trainable, t_sh, mesh)
        state = jgoat.create_state(trainable, tx, state_sh)
        placed = [state, jax.device_put(frozen, f_sh)]
        total = per_device = replicated = 0
        replicated_ndims = set()
        for x in jax.tree.leaves(placed):
            total += x.nbytes
            shard = x.addressable_shards[0].data
            per_device += shard.nbytes
            if shard.shape == x.shape:
                replicated += x.nbytes
                replicated_ndims.add(x.ndim)
        report["memory"][name] = {"total": total, "per_device": per_device, "replicated": replicated,
                                  "replicated_ndims": sorted(replicated_ndims), "devices": 8}


def run_checkpoint(report):
    """Save a trained GOAT state on mesh (2,4,1); restore on (1,8,1), (1,2,4) and one device; compare bits."""
    params, loss_fn, _, batch = setup("llama")
    tx = optax.adamw(1e-2)
    wrapped = jgoat.wrap(params, jgoat.GoatConfig(rank=8, experts=4, targets="all-linear"), key=jax.random.key(3))
    trainable, frozen = jgoat.split(wrapped)
    mesh = jgoat.mesh(data=2, fsdp=4)
    t_sh, f_sh = jgoat.split(jgoat.shardings(wrapped, mesh))
    state_sh = jgoat.state_shardings(tx, trainable, t_sh, mesh)
    state = jgoat.create_state(trainable, tx, state_sh)
    frozen_m = jax.device_put(frozen, f_sh)
    step = jgoat.sharded_step(step_fn(loss_fn, tx), mesh, state_sh, f_sh)
    state, _ = step(state, frozen_m, batch, jax.random.key(0))
    saved_tree = jgoat.combine(state.trainable, frozen_m)
    saved = [np.asarray(x) for x in jax.tree.leaves(jgoat.adapter_leaves(saved_tree))]
    saved_opt = [np.asarray(x) for x in jax.tree.leaves(state.opt_state)]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        jgoat.save(tmp, saved_tree, step=1, opt_state=state.opt_state, metadata={"mesh": "2,4"})
        template_opt = jgoat.TrainState.create(trainable, tx).opt_state
        for name, target in (("1,8,1", jgoat.mesh(data=1, fsdp=8)), ("1,2,4", jgoat.mesh(data=1, fsdp=2, tensor=4)),
                             ("one_device", None)):
            if target is None:
                tree_t, opt_t = jax.device_put((wrapped, template_opt), jax.devices()[0])
                want = None
            else:
                t2_sh, _ = jgoat.split(jgoat.shardings(wrapped, target))
                st2_sh = jgoat.state_shardings(tx, trainable, t2_sh, target)
                tree_t = jgoat.shard(wrapped, target)
                opt_t = jax.device_put(template_opt, st2_sh.opt_state)
                want = target
            tree_r, opt_r, record = jgoat.restore(tmp, tree_t, opt_state=opt_t)
            got = [np.asarray(x) for x in jax.tree.leaves(jgoat.adapter_leaves(tree_r))]
            got_opt = [np.asarray(x) for x in jax.tree.leaves(opt_r)]
            leaves = jax.tree.leaves(jgoat.adapter_leaves(tree_r)) + jax.tree.leaves(opt_r)
            templates = jax.tree.leaves(jgoat.adapter_leaves(tree_t)) + jax.tree.leaves(opt_t)
            out[name] = {
                "bit_identical": all(np.array_equal(a, b) and a.dtype == b.dtype
                                     for a, b in zip(got + got_opt, saved + saved_opt, strict=True)),
                "same_sharding_as_template": all(x.sharding == t.sharding for x, t in zip(leaves, templates,
                                                                                          strict=True)),
                "on_target_devices": all(set(x.sharding.device_set) == (set(want.devices.flat) if want is not None
                                                                         else {jax.devices()[0]}) for x in leaves),
                "metadata": record["metadata"],
                "n_leaves": len(leaves),
            }
        # a template with no mesh (the wrapped tree as built) reads the sharded checkpoint too
        tree_p, _, _ = jgoat.restore(tmp, wrapped)
        out["jgoat.restore"] = {"bit_identical": all(
            np.array_equal(np.asarray(a), b) for a, b in zip(jax.tree.leaves(jgoat.adapter_leaves(tree_p)), saved,
                                                              strict=True))}
    report["checkpoint"] = out
    # the base fingerprint of a sharded tree equals the single-device one
    report["fingerprint_equal"] = jgoat.fingerprint(saved_tree) == jgoat.fingerprint(wrapped)


def run_errors(report):
    def message(fn):
        try:
            fn()
        except ValueError as err:
            return str(err)
        return None

    params, loss_fn, _, batch = setup("llama")
    wrapped = jgoat.wrap(params, jgoat.LoraConfig(rank=4, targets="all-linear"), key=jax.random.key(3))
    trainable, frozen = jgoat.split(wrapped)
    tx = optax.sgd(1e-2)
    mesh = jgoat.mesh(data=1, fsdp=8)
    t_sh, f_sh = jgoat.split(jgoat.shardings(wrapped, mesh))
    state_sh = jgoat.state_shardings(tx, trainable, t_sh, mesh)
    step = jgoat.sharded_step(step_fn(loss_fn, tx), mesh, state_sh, f_sh)
    odd = {k: v[:6] for k, v in batch.items()}
    report["errors"] = {
        "mesh_not_dividing": message(lambda: jgoat.mesh(fsdp=3)),
        "mesh_product": message(lambda: jgoat.mesh(data=2, fsdp=2)),
        "batch_not_divisible": message(lambda: step(jgoat.create_state(trainable, tx, state_sh), frozen, odd,
                                                    jax.random.key(0))),
        "trainable_half": message(lambda: jgoat.shardings(trainable, mesh)),
        "default_mesh": dict(jgoat.mesh().shape),
    }


def run_user_rules(report):
    """A user's own linen model: the FSDP-on-largest-dim default, and rules / logical overrides."""
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(16, name="down")(nn.relu(nn.Dense(64, name="up")(x)))

    params = MLP().init(jax.random.key(0), jnp.ones((2, 24)))["params"]
    wrapped = jgoat.wrap(params, jgoat.LoraConfig(rank=4, targets=["up", "down"]), key=jax.random.key(1))
    mesh = jgoat.mesh(data=1, fsdp=8)
    default = jgoat.shardings(wrapped, mesh)
    ruled = jgoat.shardings(wrapped, jgoat.mesh(data=1, fsdp=4, tensor=2),
                            rules=[(r"up/kernel", ("embed", "mlp")), (r"down/kernel", ("mlp", "embed"))])
    relabelled = jgoat.shardings(wrapped, jgoat.mesh(data=1, fsdp=4, tensor=2),
                                 rules=[(r"up/kernel", ("embed", "mlp"))], logical={"mlp": None})
    spec = {"default": default, "ruled": ruled, "relabelled": relabelled}
    report["user_rules"] = {name: {path_of(p): str(tuple(s.spec)) for p, s in
                                   jax.tree_util.tree_flatten_with_path(tree)[0]} for name, tree in spec.items()}


def run_accumulate(report):
    """jgoat.accumulate_step on mesh (2,4,1) with micro_batches=True (leaves [A, B, ...], B split over data×fsdp)
    equals the single-device accumulate_step."""
    params, loss_fn, _, batch = setup("llama")
    wrapped = wrapped_tree("llama", params)
    trainable, frozen = jgoat.split(wrapped)
    tx = optax.adamw(1e-2, eps=1e-3)
    micro = jax.tree.map(lambda x: jnp.stack([x, jnp.roll(x, 1, axis=0)]), batch)  # [2, 8, ...]
    fn = functools.partial(jgoat.accumulate_step, loss_fn=loss_fn, tx=tx,
                           weight_fn=lambda b: jnp.sum(b["mask"][:, 1:]))
    ref_state, ref_m = jax.jit(fn)(jgoat.TrainState.create(trainable, tx), frozen, micro, jax.random.key(0))
    mesh = jgoat.mesh(data=2, fsdp=4)
    t_sh, f_sh = jgoat.split(jgoat.shardings(wrapped, mesh))
    state_sh = jgoat.state_shardings(tx, trainable, t_sh, mesh)
    step = jgoat.sharded_step(fn, mesh, state_sh, f_sh, micro_batches=True)
    state, m = step(jgoat.create_state(trainable, tx, state_sh), jax.device_put(frozen, f_sh), micro,
                    jax.random.key(0))
    report["accumulate"] = {name: rel_err(m[name], ref_m[name]) for name in ("loss", "aux", "grad_norm")}
    report["accumulate"]["trainable"] = rel_err(state.trainable, ref_state.trainable)
    report["accumulate"]["batch_spec"] = str(jgoat.batch_sharding(mesh, leading=1).spec)


def run_families(report):
    """The default rules on every other jgoat.models family (abstract shapes, LoRA on all-linear, mesh (1,4,2))."""
    from jgoat.models import CLIPForImageClassification, CLIPVisionConfig, ViTConfig, ViTForImageClassification

    ids, img = jnp.zeros((2, 8), jnp.int32), jnp.zeros((1, 32, 32, 3))
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                  patch_size=8)
    families = {
        "llama_unrolled": (LlamaForCausalLM(dataclasses.replace(LLAMA, scan_layers=False)), ids),
        "llama_moe_tied": (LlamaForCausalLM(dataclasses.replace(LLAMA, moe_experts=4, tie_word_embeddings=True)),
                           ids),
        "roberta": (BertForSequenceClassification(dataclasses.replace(BERT, model_type="roberta")), ids),
        "clip": (CLIPForImageClassification(CLIPVisionConfig(**vision)), img),
        "vit": (ViTForImageClassification(ViTConfig(**vision)), img),
    }
    mesh = jgoat.mesh(data=1, fsdp=4, tensor=2, expert=1)
    out = {}
    for name, (model, x) in families.items():
        params = jax.eval_shape(lambda m=model, x=x: m.init(jax.random.key(0), x)["params"])
        wrapped = jax.eval_shape(lambda p: jgoat.wrap(p, jgoat.LoraConfig(rank=4), key=jax.random.key(1)), params)
        sh = jgoat.shardings(wrapped, mesh)
        placed = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), wrapped, sh)
        out[name] = {"mismatched_specs": spec_mismatches(placed, mesh),
                     "sharded_leaves": sum(any(s.spec) for s in jax.tree.leaves(sh)),
                     "leaves": len(jax.tree.leaves(sh))}
    report["families"] = out


def run_estimate(report):
    """jgoat.memory's plan of the sharded step on fsdp=8 against the one-device plan (tiny Llama, every dim divisible
    by 8): XLA's per-device argument bytes, and the same bytes counted here from each argument's shard shape."""
    from jgoat.memory import estimate_llama_training

    llama = dataclasses.replace(LLAMA, intermediate_size=48)
    mesh = jgoat.mesh(data=1, fsdp=8)
    tx = optax.adamw(1e-4)
    out = {}
    for name, adapter in (("goat", jgoat.GoatConfig(rank=8, experts=4, top_k=2, targets="all-linear")),
                          ("full", None)):
        one = estimate_llama_training(llama, adapter, batch_size=BATCH, seq_len=SEQ)
        eight = estimate_llama_training(llama, adapter, batch_size=BATCH, seq_len=SEQ, mesh=mesh)
        model = LlamaForCausalLM(llama)
        params = jax.eval_shape(functools.partial(model.init, jax.random.key(0)), jnp.zeros((BATCH, SEQ), jnp.int32))
        params = params["params"]
        wrapped = jax.eval_shape(functools.partial(jgoat.mark_trainable, modules=sorted(params)) if adapter is None
                                 else functools.partial(jgoat.wrap, cfg=adapter, key=jax.random.key(0)), params)
        trainable, frozen = jgoat.split(wrapped)
        t_sh, f_sh = jgoat.split(jgoat.shardings(wrapped, mesh))
        state = jax.eval_shape(functools.partial(jgoat.TrainState.create, tx=tx), trainable)
        state_sh = jgoat.state_shardings(tx, trainable, t_sh, mesh)

        def shard_bytes(tree, shardings):
            return sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
                       for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True))

        batch = 3 * BATCH * SEQ * 4 // 8 + 8  # ids, mask, labels int32 split over 8; the replicated rng key
        full_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((state, frozen)))
        eight_bytes = shard_bytes(state, state_sh) + shard_bytes(frozen, f_sh)
        out[name] = {"one_argument": one.argument_bytes, "eight_argument": eight.argument_bytes,
                     "counted_one": full_bytes + 3 * BATCH * SEQ * 4 + 8, "counted_eight": eight_bytes + batch,
                     "one_peak": one.peak_bytes, "eight_peak": eight.peak_bytes,
                     "trainable": [one.trainable_params, eight.trainable_params]}
    report["estimate"] = out


def main(out_path: str, parts: list[str]):
    assert jax.device_count() == 8, jax.devices()
    report = {"equivalence": {}, "memory": {}}
    for part in parts:
        globals()[f"run_{part}"](report)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(",") if len(sys.argv) > 2 else
         ["equivalence", "memory", "checkpoint", "errors", "user_rules", "families", "accumulate", "estimate"])
