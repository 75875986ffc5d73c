"""Several named adapters on one base: selection, per-example selection, training one, merge, checkpoints, errors.

Every reference is a tree wrapped with one unnamed adapter: a named adapter must behave exactly like it.
Tolerances: the active-adapter forward and merges run the same ops on the same arrays as the unnamed tree, so they
are compared bit-for-bit. Per-example runs compare rows of a batch against the same rows run alone (batch 1) or
through a batched (vmapped) matmul; XLA may block a dot product of ≤ 24 fp32 terms differently for another batch
shape: ≤ 24 · eps32 · |terms| ≈ 1e-5 at these magnitudes (measured: 0), while a wrong adapter moves outputs by O(0.1).
"""

import functools
import importlib
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toys import ScannedMLP

import jgoat

apply_module = importlib.import_module("jgoat.apply")  # `jgoat.apply` is the function

TOL = 1e-5
VARIANTS = [pytest.param(True, id="jit"), pytest.param(False, id="nojit")]
MODEL = ScannedMLP(width=16, hidden=24, layers=2)
X = jax.random.normal(jax.random.key(0), (4, 5, 16))
PARAMS = MODEL.init(jax.random.key(1), X)["params"]
CONFIGS = {  # a and b: same LoRA signature at "up" (gathered); "down" holds a (LoRA) and g (GOAT): run and selected
    "a": jgoat.LoraConfig(rank=4, alpha=8.0, targets=["up", "down"]),
    "b": jgoat.LoraConfig(rank=4, alpha=8.0, init="gaussian", targets=["up"]),
    "g": jgoat.GoatConfig(rank=8, experts=4, top_k=2, targets=["down"]),
}
KEYS = {"a": 2, "b": 3, "g": 4}
NODES = (jgoat.LoraAdapter, jgoat.GoatAdapter)


def perturb(tree, seed):
    """Move every adapter's B off its init so each adapter visibly changes the output (B = 0 for LoRA at init)."""
    def fix(node):
        if isinstance(node, NODES):
            return node.replace(B=node.B + 0.3 * jax.random.normal(jax.random.key(seed), node.B.shape))
        return node
    return jax.tree.map(fix, tree, is_leaf=lambda n: isinstance(n, NODES))


@functools.cache
def single(name):
    """The reference: the base wrapped with only this adapter, unnamed, perturbed."""
    return perturb(jgoat.wrap(PARAMS, CONFIGS[name], key=jax.random.key(KEYS[name])), KEYS[name])


@functools.cache
def multi():
    """The same three adapters, named, on one base."""
    tree = PARAMS
    for name in CONFIGS:
        tree = jgoat.add_adapter(tree, single(name), name=name)
    return tree


def run(fn, jit, *args, **kwargs):
    return (jax.jit(fn) if jit else fn)(*args, **kwargs)


run_single = jax.jit(jgoat.apply(MODEL.apply))  # references: one adapter, unnamed
run_base = jax.jit(MODEL.apply)


def test_wrap_name_inits_exactly_as_unnamed_wrap():
    tree = PARAMS
    for name, cfg in CONFIGS.items():
        tree = jgoat.wrap(tree, cfg, key=jax.random.key(KEYS[name]), name=name)
    assert jgoat.adapter_names(tree) == ("a", "b", "g")
    assert set(tree["layers"]["up"]["jgoat"]) == {"a", "b"} and set(tree["layers"]["down"]["jgoat"]) == {"a", "g"}
    assert tree["layers"]["up"]["kernel"] is PARAMS["layers"]["up"]["kernel"]  # the base is shared, never copied
    for name, cfg in CONFIGS.items():
        unnamed = jgoat.wrap(PARAMS, cfg, key=jax.random.key(KEYS[name]))
        chex.assert_trees_all_equal(jgoat.select_adapter(tree, name), unnamed)  # same key: bit-equal, statics too
    added = PARAMS
    for name, cfg in CONFIGS.items():
        added = jgoat.add_adapter(added, jgoat.wrap(PARAMS, cfg, key=jax.random.key(KEYS[name])), name=name)
    chex.assert_trees_all_equal(added, tree)
    assert jgoat.adapter_names(jgoat.delete_adapter(tree, "b")) == ("a", "g")
    assert "jgoat" not in jgoat.delete_adapter(jgoat.delete_adapter(tree, "b"), "a")["layers"]["up"]


@pytest.mark.parametrize("jit", VARIANTS)
@pytest.mark.parametrize("name", ["a", "b", "g"])
def test_active_adapter_equals_single_adapter_tree(jit, name):
    out, aux = run(jgoat.apply(MODEL.apply, adapter=name), jit, {"params": multi()}, X)
    ref, ref_aux = run(jgoat.apply(MODEL.apply), jit, {"params": single(name)}, X)  # same jit-ness: bit-equal
    chex.assert_trees_all_equal((out, aux), (ref, ref_aux))
    assert float(jnp.max(jnp.abs(out - MODEL.apply({"params": PARAMS}, X)))) > 0.05  # the adapter matters


def reference_rows(choice, x):
    """Each choice's output on the whole batch, run through its own single-adapter tree (None: the base)."""
    return [run_base({"params": PARAMS}, x) if n is None else run_single({"params": single(n)}, x)[0] for n in choice]


@pytest.mark.parametrize("jit", VARIANTS)
def test_per_example_selection_equals_each_example_alone(jit, monkeypatch):
    calls = {"gather": 0, "select": 0}
    for path, name in (("gather", "_gather_forward"), ("select", "_select_forward")):
        original = getattr(apply_module, name)

        def counted(*args, _original=original, _path=path):
            calls[_path] += 1
            return _original(*args)
        monkeypatch.setattr(apply_module, name, counted)
    choice = ("g", None, "a", "b")
    ids = jnp.array([2, 0, 3, 1])
    out, aux = run(jgoat.apply(MODEL.apply, adapter=choice), jit, {"params": multi()}, X, adapter_ids=ids)
    for i, k in enumerate(ids.tolist()):
        name = choice[k]
        alone = reference_rows([name], X[i:i + 1])[0]
        chex.assert_trees_all_close(out[i:i + 1], alone, atol=TOL, rtol=0)
    assert calls["gather"] > 0 and calls["select"] > 0  # "up" holds a, b (same signature), "down" holds a and GOAT
    assert float(aux) > 0  # GOAT's aux loss over the one example that chose it


@pytest.mark.parametrize("jit", VARIANTS)
def test_per_token_selection(jit):
    choice = ("a", "b", "g", None)
    ids_BxS = jax.random.randint(jax.random.key(5), X.shape[:2], 0, len(choice))
    out, _ = run(jgoat.apply(MODEL.apply, adapter=choice), jit, {"params": multi()}, X, adapter_ids=ids_BxS)
    refs = jnp.stack(reference_rows(choice, X))  # [K, B, S, W]; the toy model is token-wise
    want = jnp.take_along_axis(refs, ids_BxS[None, :, :, None], axis=0)[0]
    chex.assert_trees_all_close(out, want, atol=TOL, rtol=0)


class OneDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(12, name="proj")(x)


@pytest.mark.parametrize("jit", VARIANTS)
def test_per_example_goat_aux_and_load_count_each_adapter_over_its_rows(jit):
    model = OneDense()
    x = jax.random.normal(jax.random.key(0), (4, 6, 16))
    params = model.init(jax.random.key(1), x)["params"]
    cfg = jgoat.GoatConfig(rank=8, experts=4, top_k=2, targets=["proj"])
    singles = {n: jgoat.wrap(params, cfg, key=jax.random.key(k)) for n, k in (("g1", 1), ("g2", 2))}
    tree = params
    for n, s in singles.items():
        tree = jgoat.add_adapter(tree, s, name=n)
    ids = jnp.array([0, 1, 1, 0])
    out, aux, load = run(jgoat.apply(model.apply, adapter=("g1", "g2"), collect_load=True), jit, {"params": tree}, x,
                         adapter_ids=ids)
    want_aux = 0.0
    for k, n in enumerate(singles):
        rows = np.flatnonzero(np.asarray(ids) == k)
        ref, ref_aux, ref_load = jax.jit(jgoat.apply(model.apply, collect_load=True))({"params": singles[n]}, x[rows])
        chex.assert_trees_all_close(out[rows], ref, atol=TOL, rtol=0)
        chex.assert_trees_all_close(load[f"proj:{n}"], ref_load["proj"], atol=1e-7, rtol=0)  # counts / 48: exact-ish
        want_aux += float(ref_aux)
    assert set(load) == {"proj:g1", "proj:g2"}
    np.testing.assert_allclose(float(aux), want_aux, rtol=1e-6)  # two fp32 sums of ≤ 4 products of O(1)


def test_gathered_dropout_runs_per_example():
    cfg = jgoat.LoraConfig(rank=4, alpha=8.0, dropout=0.5, targets=["up"])
    tree = PARAMS
    for name, seed in (("p", 1), ("q", 2)):
        tree = jgoat.add_adapter(tree, perturb(jgoat.wrap(PARAMS, cfg, key=jax.random.key(seed)), seed), name=name)
    fn = jax.jit(jgoat.apply(MODEL.apply, adapter=("p", "q")))
    ids = jnp.array([0, 1, 1, 0])
    train, _ = fn({"params": tree}, X, adapter_ids=ids, rngs={"dropout": jax.random.key(0)})
    evaluation, _ = fn({"params": tree}, X, adapter_ids=ids)
    assert bool(jnp.all(jnp.isfinite(train))) and float(jnp.max(jnp.abs(train - evaluation))) > 1e-3


def test_training_one_named_adapter_leaves_the_others_bit_identical():
    tree = multi()
    trainable, frozen = jgoat.split(tree, adapter="a")
    trained_leaves = jax.tree.leaves(trainable)
    assert len(trained_leaves) == 4  # A and B of "a" at up and down
    assert sum(x.size for x in trained_leaves) == sum(
        x.size for _, node in jgoat.adapters(tree, adapter="a") for x in (node.A, node.B))
    fn = jgoat.apply(MODEL.apply, adapter="a")

    def loss(tr):
        out, _ = fn({"params": jgoat.combine(tr, frozen)}, X)
        return jnp.mean(out ** 2)

    grads = jax.jit(jax.grad(loss))(trainable)
    new = jgoat.combine(jax.tree.map(lambda p, g: p - 0.1 * g, trainable, grads), frozen)
    for name in ("b", "g"):
        chex.assert_trees_all_equal(jgoat.select_adapter(new, name), jgoat.select_adapter(tree, name))
    before, after = jgoat.select_adapter(tree, "a"), jgoat.select_adapter(new, "a")
    assert not np.array_equal(after["layers"]["up"]["jgoat"].A, before["layers"]["up"]["jgoat"].A)
    assert not np.array_equal(after["layers"]["down"]["jgoat"].B, before["layers"]["down"]["jgoat"].B)
    goat_mask = jgoat.trainable_mask(tree, adapter="g")["layers"]["down"]["jgoat"]
    assert goat_mask["g"].router and not goat_mask["g"].res_A and not goat_mask["a"].A


def test_merge_named_equals_single_merge():
    tree = multi()
    merged = jgoat.merge(tree, adapter="a")
    chex.assert_trees_all_equal(merged, jgoat.merge(single("a")))
    chex.assert_trees_all_equal(jgoat.unmerge(merged, tree, adapter="a"), jgoat.unmerge(merged, single("a")))
    with pytest.raises(ValueError, match="GOAT is never merged"):
        jgoat.merge(tree, adapter="g")
    with pytest.raises(ValueError, match="choose one with adapter="):
        jgoat.merge(tree)


def test_checkpoint_round_trip(tmp_path):
    tree = multi()
    trainable, frozen = jgoat.split(tree, adapter="a")
    trained = jgoat.combine(jax.tree.map(lambda v: v * 1.5, trainable), frozen)  # as after training "a"
    jgoat.save(tmp_path, trained, step=3, metadata={"names": list(jgoat.adapter_names(trained))})
    restored, _, record = jgoat.restore(tmp_path, tree)
    chex.assert_trees_all_equal(restored, trained)
    assert "layers/up/jgoat/b/A" in record["adapter_paths"] and record["metadata"]["names"] == ["a", "b", "g"]
    with pytest.raises(ValueError, match="layout differs"):
        jgoat.restore(tmp_path, jgoat.delete_adapter(tree, "b"))


def test_export_named_adapter_equals_single_export(tmp_path):
    import safetensors.numpy

    def same_folders(a, b):
        for f in a.iterdir():
            if f.suffix == ".safetensors":
                chex.assert_trees_all_equal(safetensors.numpy.load_file(f), safetensors.numpy.load_file(b / f.name))
            else:
                assert f.read_text() == (b / f.name).read_text(), f.name

    tree = multi()
    jgoat.export_peft(tree, CONFIGS["a"], tmp_path / "named", adapter="a")
    jgoat.export_peft(single("a"), CONFIGS["a"], tmp_path / "single")
    same_folders(tmp_path / "named", tmp_path / "single")
    jgoat.export_goat(tree, CONFIGS["g"], tmp_path / "goat", adapter="g")
    jgoat.export_goat(single("g"), CONFIGS["g"], tmp_path / "goat1")
    same_folders(tmp_path / "goat", tmp_path / "goat1")
    with pytest.raises(ValueError, match="pass adapter=<name>"):
        jgoat.export_peft(tree, CONFIGS["a"], tmp_path / "x")


def test_summary_lists_adapters_by_name():
    text = jgoat.summary(multi())
    rows = {line.split(")")[0] + ")": line for line in text.splitlines() if "(" in line}
    assert set(rows) == {"a (lora)", "b (lora)", "g (goat)"}
    a_size = 2 * (16 * 4 + 4 * 24) + 2 * (24 * 4 + 4 * 16)  # two layers of up [16->24] and down [24->16], rank 4
    assert rows["a (lora)"].split()[2:4] == ["2", f"{a_size:,}"]


def test_errors():
    tree = multi()
    names = "'a', 'b', 'g'"
    with pytest.raises(ValueError, match=r"named adapters \('a', 'b', 'g'\): run one with"):
        jgoat.apply(MODEL.apply)({"params": tree}, X)
    with pytest.raises(ValueError, match=f"unknown adapter 'zz'; named adapters in this tree: {names}"):
        jgoat.apply(MODEL.apply, adapter="zz")({"params": tree}, X)
    with pytest.raises(ValueError, match="unknown adapter 'zz'"):
        jgoat.apply(MODEL.apply, adapter=("a", "zz"))({"params": tree}, X, adapter_ids=jnp.zeros(4, jnp.int32))
    with pytest.raises(ValueError, match="unknown adapter 'zz'"):
        jgoat.split(tree, adapter="zz")
    with pytest.raises(ValueError, match="choose the one to train"):
        jgoat.split(tree)
    with pytest.raises(ValueError, match="already exists"):
        jgoat.wrap(tree, CONFIGS["a"], key=jax.random.key(0), name="a")
    with pytest.raises(ValueError, match="add another with name="):
        jgoat.wrap(tree, CONFIGS["a"], key=jax.random.key(0))
    with pytest.raises(ValueError, match="unnamed adapter"):
        jgoat.wrap(single("a"), CONFIGS["b"], key=jax.random.key(0), name="b")
    with pytest.raises(ValueError, match="modules_to_save"):
        jgoat.wrap(PARAMS, jgoat.LoraConfig(targets=["up"], modules_to_save=["head"]), key=jax.random.key(0), name="m")
    with pytest.raises(ValueError, match="non-empty string without '/'"):
        jgoat.wrap(PARAMS, CONFIGS["a"], key=jax.random.key(0), name="x/y")
    with pytest.raises(TypeError, match="add_prompt"):
        jgoat.wrap(PARAMS, jgoat.PromptTuningConfig(num_virtual_tokens=4), key=jax.random.key(0), name="p")
    other_base = jax.tree.map(lambda v: v + 1.0, PARAMS)
    with pytest.raises(ValueError, match="different base"):
        jgoat.add_adapter(tree, jgoat.wrap(other_base, CONFIGS["a"], key=jax.random.key(0)), name="c")
    with pytest.raises(ValueError, match="no named adapters|tree holds no named"):
        jgoat.apply(MODEL.apply, adapter="a")({"params": single("a")}, X)

    per_example = jgoat.apply(MODEL.apply, adapter=("a", "b"))
    with pytest.raises(ValueError, match=r"must be in \[0, 2\).*got \[2\]"):
        per_example({"params": tree}, X, adapter_ids=jnp.array([0, 2, 1, 0]))
    with pytest.raises(ValueError, match=r"adapter_ids of shape \(3,\) do not match the leading dims \(4, 5\)"):
        per_example({"params": tree}, X, adapter_ids=jnp.array([0, 1, 1]))
    with pytest.raises(ValueError, match="integer array"):
        per_example({"params": tree}, X, adapter_ids=jnp.zeros(4))
    with pytest.raises(ValueError, match="pass adapter_ids"):
        per_example({"params": tree}, X)
    with pytest.raises(ValueError, match="is one name"):
        jgoat.apply(MODEL.apply, adapter="a")({"params": tree}, X, adapter_ids=jnp.zeros(4, jnp.int32))
    with pytest.raises(ValueError, match="a name or a sequence of names"):
        jgoat.apply(MODEL.apply, adapter=(None,))

    out, _ = jax.jit(per_example)({"params": tree}, X, adapter_ids=jnp.array([0, 7, 1, -1]))  # traced: cannot raise
    bad = np.asarray(jnp.isnan(out).all(axis=(1, 2)))
    assert bad.tolist() == [False, True, False, True] and not np.isnan(np.asarray(out)[[0, 2]]).any()
    assert math.isfinite(float(jnp.sum(out[0])))
