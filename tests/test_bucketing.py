"""Length-bucketed classification training (`jgoat train --bucketing`).

(a) the batches (:func:`jgoat.data.bucketed_batch_indices`): each epoch sees exactly the examples of the padded
    order's epoch, once; a batch holds examples of similar length; the batch order is shuffled; a step's batch is a
    pure function of (lengths, seed, step) (so SIGKILL + --resume stays exact);
(b) trimming pad columns is exact on a tiny BERT with LoRA and GOAT: per-example loss, GOAT's aux and expert load
    and the gradients of every trainable leaf equal those of the untrimmed rows in float32 (≤ 1e-6: the trimmed
    columns are keys whose softmax weight is exactly 0 — their additive bias is finfo.min — so the two can differ
    only by the order XLA sums the same non-zero terms in; on XLA:CPU they are bitwise equal), jitted and not;
    under --aux-count-padding the aux is another number (hence the CLI refuses that pair for GOAT);
(c) the CLI: the flag reaches the loop (trimmed batch shapes), and the refusals.
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jgoat
from jgoat import cli, tasks, trainer
from jgoat import data as data_lib
from jgoat.errors import JgoatError
from jgoat.models import from_pretrained

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


# ------------------------------------------------------------------------------------------------ (a) the batches
def _spread(batches, lengths):
    return np.mean([lengths[b].max() - lengths[b].min() for b in batches])


def test_epochs_cover_the_padded_orders_examples_once_with_similar_lengths_in_a_batch():
    rng = np.random.default_rng(0)
    n, b, seed = 1003, 8, 5  # 125 batches an epoch, 3 examples dropped (as the padded order drops them)
    lengths = rng.integers(1, 49, n)
    per_epoch = n // b
    for epoch in range(3):
        steps = range(epoch * per_epoch, (epoch + 1) * per_epoch)
        bucketed = [data_lib.bucketed_batch_indices(lengths, b, seed, s) for s in steps]
        padded = [data_lib.batch_indices(n, b, seed, s) for s in steps]
        assert all(len(x) == b for x in bucketed)
        flat = np.concatenate(bucketed)
        assert len(np.unique(flat)) == len(flat)  # each example at most once
        np.testing.assert_array_equal(np.sort(flat), np.sort(np.concatenate(padded)))  # the same examples
        # similar lengths: a batch of the sorted chunks spans a fraction of what a random batch spans
        assert _spread(bucketed, lengths) < 0.25 * _spread(padded, lengths)
        # the batch order is shuffled, not ascending by length within each chunk
        firsts = [lengths[x].min() for x in bucketed[:50]]
        assert firsts != sorted(firsts)
    # epochs differ, and a step's batch does not depend on which steps were asked for before (pure)
    assert not np.array_equal(data_lib.bucketed_batch_indices(lengths, b, seed, 0),
                              data_lib.bucketed_batch_indices(lengths, b, seed, per_epoch))
    late = data_lib.bucketed_batch_indices(lengths, b, seed, 2 * per_epoch + 7)
    for s in range(5):
        data_lib.bucketed_batch_indices(lengths, b, seed + 1, s)
    np.testing.assert_array_equal(late, data_lib.bucketed_batch_indices(lengths, b, seed, 2 * per_epoch + 7))
    with pytest.raises(ValueError, match="batch_size 9 > number of training examples 8"):
        data_lib.bucketed_batch_indices(lengths[:8], 9, seed, 0)


def test_bucket_lengths_and_row_lengths():
    assert data_lib.bucket_lengths(48) == (16, 32, 48)
    assert data_lib.bucket_lengths(256) == (32, 64, 128, 256)
    assert data_lib.bucket_lengths(16) == (16,)
    assert data_lib.bucket_lengths(10) == (10,)  # never longer than the rows
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(data_lib.row_lengths(mask), [3, 5, 1, 1])


# ------------------------------------------------------------------------------------------ (b) trimming is exact
T = 48


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    transformers.BertForSequenceClassification(config).save_pretrained(path)
    model, params, _ = from_pretrained(str(path), num_labels=3, dtype=jnp.float32)
    return model, params


def _batch(lengths, width=T):
    rng = np.random.default_rng(1)
    ids = np.zeros((len(lengths), T), np.int32)
    mask = np.zeros((len(lengths), T), np.int32)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(1, 100, n)
        mask[i, :n] = 1
    labels = rng.integers(0, 3, len(lengths)).astype(np.int32)
    return {"ids": ids[:, :width], "mask": mask[:, :width], "labels": labels}


def _perturbed(tree, key):
    """Every trainable leaf moved off its init (LoRA's B = 0 would leave A's gradient 0: a weak test)."""
    trainable, frozen = jgoat.split(tree)
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(key, len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, leaves), frozen


def _numbers(model, trainable, frozen, batch, count_padding=False):
    def objective(tr):
        params = jgoat.combine(tr, frozen)
        task_loss, aux = tasks.loss("classify", model, params, batch, None, aux_count_padding=count_padding)
        return task_loss + 1e-2 * (0.0 if aux is None else aux), aux

    grads, aux = jax.grad(objective, has_aux=True)(trainable)
    logits, _, load = tasks.forward("classify", model, jgoat.combine(trainable, frozen), batch, None,
                                    collect_load=True)
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["labels"])
    return {"per_example": per_example, "aux": aux, "load": load, "grads": grads}


@pytest.mark.parametrize("method", ["lora", "goat"])
def test_trimming_pad_columns_gives_the_same_losses_aux_load_and_gradients(tiny_bert, method):
    model, params = tiny_bert
    cfg = (jgoat.LoraConfig(rank=4, alpha=8.0, modules_to_save=("classifier",)) if method == "lora" else
           jgoat.GoatConfig(rank=4, experts=4, top_k=2, modules_to_save=("classifier",)))
    trainable, frozen = _perturbed(jgoat.wrap(params, cfg, key=jax.random.key(0)), jax.random.key(1))
    lengths = [3, 17, 9, 20, 1, 12]
    full = _batch(lengths)
    width = next(w for w in data_lib.bucket_lengths(T) if w >= max(lengths))
    assert width == 32
    jitted = jax.jit(_numbers, static_argnums=(0, 4))
    for trim, fn in ((width, jitted), (max(lengths), jitted), (width, _numbers)):  # the bucket, no padding at all
        ref = fn(model, trainable, frozen, full)
        got = fn(model, trainable, frozen, _batch(lengths, trim))
        np.testing.assert_allclose(got["per_example"], ref["per_example"], rtol=0, atol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), got["grads"],
                     ref["grads"])
        if method == "goat":
            assert ref["load"]
            np.testing.assert_allclose(got["aux"], ref["aux"], rtol=1e-6, atol=1e-7)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), got["load"],
                         ref["load"])
    if method == "goat":  # counting padding (the official aux) makes the trimmed batch another number
        counted = _numbers(model, trainable, frozen, full, count_padding=True)["aux"]
        trimmed = _numbers(model, trainable, frozen, _batch(lengths, width), count_padding=True)["aux"]
        assert abs(float(counted) - float(trimmed)) > 1e-4


# ---------------------------------------------------------------------------------------------------- (c) the CLI
def _task(lengths, labels=None):
    batch = _batch(lengths)
    split = tasks.ArraySplit({k: np.asarray(v) for k, v in batch.items()})
    return tasks.Task("classify", None, None, split, split, ("a", "b", "c"), "test")


def test_train_batches_trim_to_the_bucket_of_the_global_batch_and_keep_the_padded_default():
    lengths = np.random.default_rng(2).integers(1, T + 1, 64)
    task = _task(lengths)
    opts = argparse.Namespace(batch_size=8, seed=3, bucketing=True)
    batches = tasks.train_batches(task, opts)
    widths = set()
    for step in range(20):
        idx = data_lib.bucketed_batch_indices(lengths, 8, 3, step)
        batch = batches(step)
        width = batch["ids"].shape[1]
        widths.add(width)
        assert width in (16, 32, 48) and lengths[idx].max() <= width
        assert width == 16 or lengths[idx].max() > width // 2 or width == 48 and lengths[idx].max() > 32
        full = task.train.batch(idx)
        np.testing.assert_array_equal(batch["ids"], full["ids"][:, :width])
        np.testing.assert_array_equal(batch["labels"], full["labels"])
        assert not full["mask"][:, width:].any()  # only padding was cut
        rows = np.array([1, 5])  # another process's rows: the width is still the global batch's
        part = tasks.train_batches(task, opts, rows)(step)
        np.testing.assert_array_equal(part["ids"], batch["ids"][rows])
    assert len(widths) > 1
    plain = tasks.train_batches(task, argparse.Namespace(batch_size=8, seed=3, bucketing=False))(4)
    np.testing.assert_array_equal(plain["ids"], task.train.batch(data_lib.batch_indices(64, 8, 3, 4))["ids"])


@pytest.mark.parametrize("argv, message", [
    (["--task", "sft"], "--bucketing is for --task classify"),
    (["--aux-count-padding"], "--bucketing drops padding that --aux-count-padding counts"),
    (["--aux-count-padding", "--method", "molora"], "--bucketing drops padding"),
])
def test_refusals(argv, message):
    args = cli.build_parser().parse_args(["train", "--bucketing", *argv])
    with pytest.raises(JgoatError, match=message):
        cli.method_config(args, "bert")
    # the pair is fine where nothing counts padding: LoRA has no aux
    args = cli.build_parser().parse_args(["train", "--bucketing", "--aux-count-padding", "--method", "lora"])
    assert cli.method_config(args, "bert") is not None


class _Widths(trainer.Callback):
    def __init__(self):
        self.widths = []

    def on_step_end(self, loop, step):
        self.widths.append(loop.batch["ids"].shape[1])


def test_a_bucketed_run_trains_on_trimmed_batches(tmp_path):
    from test_cli import write_tiny_bert

    write_tiny_bert(tmp_path / "model", tmp_path / "data.csv", per_label=30, encoding="utf-8")
    seen = _Widths()
    out = tmp_path / "b"
    assert cli.main(["train", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data.csv"), "--steps", "5",
                     "--batch-size", "8", "--max-length", "48", "--test-size", "10", "--method", "lora", "--rank",
                     "4", "--no-baseline", "--bucketing", "--out", str(out)], callbacks=[seen]) == 0
    assert len(seen.widths) == 5 and set(seen.widths) <= {16, 32, 48} and min(seen.widths) < 48
    assert json.loads((out / "lora" / "config.json").read_text())["bucketing"] is True


@pytest.mark.slow
def test_a_bucketed_run_killed_and_resumed_equals_the_uninterrupted_one(tmp_path_factory, tmp_path):
    """SIGKILL at step 7 (after the step-4 checkpoint) + --resume: the same final adapters, bit for bit, as a straight
    run (the batches of the bucketed order are a pure function of (seed, step)); max length 48: three row lengths."""
    from test_cli import final_adapters, run_cli, write_tiny_bert

    root = tmp_path_factory.mktemp("bucket_cli")
    write_tiny_bert(root / "model", root / "data.csv", per_label=100, encoding="latin-1")
    extra = ("--bucketing", "--max-length", "48", "--adapter-dropout", "0")
    straight = run_cli(root, tmp_path / "a", *extra)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = run_cli(root, tmp_path / "b", *extra, kill=(6, "begin"))
    assert killed.returncode == -9
    resumed = run_cli(root, tmp_path / "b", *extra, "--resume")
    assert resumed.returncode == 0 and "resumed from step 4" in resumed.stdout, resumed.stderr[-3000:]
    (step_a, a), (step_b, b) = final_adapters(tmp_path / "a"), final_adapters(tmp_path / "b")
    assert step_a == step_b == 12 and a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
