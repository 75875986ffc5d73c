"""The input pipeline: jgoat.fit's prefetching thread (same batches, same order, same params as the synchronous loop;
exact resume; producer errors raised at their step; no thread left behind; the data wait measured) and the on-disk,
memory-mapped token arrays of jgoat.data (equal to the in-memory ones, read back without the tokenizer)."""

import functools
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_packing
from toys import ScannedMLP

import jgoat
from jgoat import data as data_lib
from jgoat import tasks
from jgoat.errors import NonFiniteError

D, STEPS = 8, 10
Counting = test_packing.Counting
word_tokenizer = test_packing.tokenizer  # the word-level tokenizer with a chat template, a fixture of this name


@functools.cache
def toy():
    """A LoRA-wrapped toy MLP (dropout on: the step's rng matters), its loss, inputs and targets (built once: fit
    trains a copy of the trainable tree)."""
    model = ScannedMLP(width=D, hidden=16, layers=2)
    k = jax.random.split(jax.random.key(0), 3)
    base = model.init(k[0], jnp.zeros((1, 4, D)))["params"]
    xs = np.asarray(jax.random.normal(k[1], (STEPS, 4, 4, D)))
    ys = np.asarray(jax.random.normal(k[2], (STEPS, 4, 4, D)))
    wrapped = jgoat.wrap(base, jgoat.LoraConfig(rank=4, targets=["up", "down"], dropout=0.1), key=jax.random.key(1))

    def loss_fn(params, batch, rng):
        out, aux = jgoat.apply(model.apply)({"params": params}, batch[0], rngs={"dropout": rng})
        return jnp.mean((out - batch[1]) ** 2), aux

    return wrapped, loss_fn, xs, ys


def problem(bad=None):
    """The toy, and a batch source that records the steps it was asked for; batch `bad` holds a NaN target."""
    wrapped, loss_fn, xs, ys = toy()
    if bad is not None:
        ys = ys.copy()
        ys[bad, 0, 0, 0] = np.nan
    asked = []

    def batches(step):
        asked.append(step)
        return xs[step], ys[step]

    return wrapped, loss_fn, batches, asked


def run(prefetch, steps=STEPS, state=None, **kw):
    wrapped, loss_fn, batches, asked = problem(kw.pop("bad", None))
    source = kw.pop("source", batches)
    result = jgoat.fit(wrapped, loss_fn, source, tx=jgoat.adamw_cosine(1e-2, STEPS), steps=steps,
                       key=jax.random.key(3), log_every=3, prefetch=prefetch, state=state, **kw)
    return result, asked


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "jgoat-prefetch"]


def assert_same_trainable(a, b):
    for x, y in zip(jax.tree.leaves(jgoat.split(a)[0]), jax.tree.leaves(jgoat.split(b)[0]), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_prefetched_fit_is_bit_identical_to_the_synchronous_loop():
    sync, asked_sync = run(0)
    for depth in (1, 3):
        ahead, asked = run(depth)
        assert asked == asked_sync == list(range(STEPS))  # each step's batch once, in step order
        assert ahead.history == sync.history
        assert_same_trainable(ahead.params, sync.params)
        assert len(ahead.data_wait_s) == STEPS and all(w >= 0 for w in ahead.data_wait_s)
    # an iterable of batches is read in order too
    _, _, batches, _ = problem()
    it, _ = run(2, source=(batches(s) for s in range(STEPS)))
    assert it.history == sync.history
    assert not prefetch_threads()


def test_resume_with_prefetch_equals_an_uninterrupted_run():
    whole, _ = run(2)
    first, asked_first = run(2, steps=4)
    assert asked_first == [0, 1, 2, 3]  # never reads past the last step
    resumed, asked = run(2, state=first.state)
    assert asked == list(range(4, STEPS))  # prefetching starts at the resume step
    assert_same_trainable(resumed.params, whole.params)
    assert first.history + resumed.history == whole.history


@pytest.mark.parametrize("prefetch", [0, 2])
def test_a_producer_error_is_raised_at_its_step_with_its_message(prefetch):
    done = []

    class Steps(jgoat.Callback):
        def on_step_end(self, loop, step):
            done.append(step)

    def source(step):
        if step == 4:
            raise ValueError("cat.png: cannot identify image file")
        return batches(step)

    _, _, batches, _ = problem()
    with pytest.raises(ValueError, match="cat.png: cannot identify image file"):
        run(prefetch, source=source, callbacks=[Steps()])
    assert done == [1, 2, 3, 4]  # steps 0..3 trained, step 4 raised
    assert not prefetch_threads()


@pytest.mark.parametrize("prefetch", [1, 3])
def test_no_thread_is_left_after_fit_returns_or_raises(prefetch):
    run(prefetch)
    assert not prefetch_threads()

    class Interrupt(jgoat.Callback):  # Ctrl-C while the producer is blocked on a full queue
        def on_step_end(self, loop, step):
            if step == 2:
                time.sleep(0.2)
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(prefetch, callbacks=[Interrupt()])
    assert not prefetch_threads()
    with pytest.raises(NonFiniteError, match="step 3"):
        run(prefetch, bad=2)
    assert not prefetch_threads()
    with pytest.raises(jgoat.errors.JgoatError, match="prefetch must be >= 0"):
        run(-1)


def test_the_data_wait_is_measured_and_hidden_behind_a_slow_step():
    """Producing a batch takes 50 ms; the "step" (a callback) 150 ms. Unprefetched, every step waits >= 50 ms; with
    prefetching only the first does (sleeps need no CPU, so a loaded machine does not blur the comparison)."""
    produce_s, step_s = 0.05, 0.15
    _, _, batches, _ = problem()

    def slow(step):
        time.sleep(produce_s)
        return batches(step)

    class SlowStep(jgoat.Callback):
        def on_step_end(self, loop, step):
            time.sleep(step_s)

    sync, _ = run(0, source=slow, callbacks=[SlowStep()], steps=6)
    ahead, _ = run(2, source=slow, callbacks=[SlowStep()], steps=6)
    assert min(sync.data_wait_s) >= produce_s
    assert ahead.data_wait_s[0] >= produce_s * 0.5  # nothing to overlap with before the first step
    assert max(ahead.data_wait_s[1:]) < produce_s / 2
    assert ahead.history == sync.history


# ---------------------------------------------------------------------------------------------------------------
# The token cache: memory-mapped arrays, written and read in chunks


def _sft_table(n=23):
    """Chats of mixed lengths; row 3 has no assistant turn, row 7's response lies beyond max_length 12."""
    import datasets

    rows = []
    for i in range(n):
        user = " ".join("abcde"[(i + j) % 5] for j in range(1 + i % 4))
        reply = " ".join("edcba"[(i * j) % 5] for j in range(1 + i % 7))
        chat = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        rows.append({"messages": chat[:1] if i == 3 else
                     [{"role": "user", "content": "a " * 12}, chat[1]] if i == 7 else chat})
    return datasets.Dataset.from_list(rows)


@pytest.mark.parametrize("packing", [False, True])
def test_cached_sft_arrays_are_memory_mapped_and_equal_the_in_memory_ones(word_tokenizer, tmp_path, monkeypatch,
                                                                          packing):
    monkeypatch.setattr(data_lib, "_CHUNK", 5)  # several chunks, boundaries inside the data
    table = _sft_table()
    with pytest.warns(data_lib.DataWarning) as want_warning:
        want = data_lib.sft_arrays(word_tokenizer, table, max_length=12, packing=packing)
    assert "rows 3)" in str(want_warning[0].message) and "rows 7)" in str(want_warning[0].message)
    for run in range(2):
        counting = Counting(word_tokenizer)
        with pytest.warns(data_lib.DataWarning) as warned:  # a cache hit reports the dropped rows as well
            got = data_lib.sft_arrays(counting, table, max_length=12, packing=packing, cache_dir=tmp_path)
        assert [str(w.message) for w in warned] == [str(w.message) for w in want_warning]
        assert (counting.calls > 0) == (run == 0)  # the second run never calls the tokenizer
        assert got.keys() == want.keys()
        for k in want:
            assert isinstance(got[k].base, np.memmap) and got[k].dtype == want[k].dtype
            np.testing.assert_array_equal(got[k], want[k])
    split = tasks.ArraySplit(got)
    idx = np.array([4, 0, 2])
    for k, v in split.batch(idx).items():
        assert type(v) is np.ndarray and not isinstance(v.base, np.memmap)  # rows copied out of the mapping
        np.testing.assert_array_equal(v, want[k][idx])


def test_cached_classification_tokens_are_read_back_without_the_tokenizer(word_tokenizer, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(data_lib, "_CHUNK", 4)
    table = datasets.Dataset.from_list([{"s1": " ".join("abcde"[(i + j) % 5] for j in range(1 + i % 9)),
                                         "s2": "e " * (i % 3 + 1), "label": i % 2} for i in range(11)])
    for pair in (None, "s2"):
        want = word_tokenizer(list(table["s1"]), list(table["s2"]) if pair else None, padding="max_length",
                         truncation=True, max_length=7, return_tensors="np")
        for run in range(2):
            counting = Counting(word_tokenizer)
            got = data_lib.pair_arrays(counting, table, text_column="s1", pair_column=pair, max_length=7,
                                       cache_dir=tmp_path)
            assert (counting.calls > 0) == (run == 0)
            assert isinstance(got["ids"].base, np.memmap)
            np.testing.assert_array_equal(got["ids"], want["input_ids"])
            np.testing.assert_array_equal(got["mask"], want["attention_mask"])
    assert len(list((tmp_path / "classify").glob("*.npz"))) == 2
    bad = datasets.Dataset.from_list([{"s1": "a", "s2": None if i == 9 else "b"} for i in range(11)])
    with pytest.raises(data_lib.DataError, match="text column 's2', row 9: NoneType"):  # row counted across chunks
        data_lib.pair_arrays(word_tokenizer, bad, text_column="s1", pair_column="s2", max_length=7, cache_dir=tmp_path)
    # an unreadable entry is rebuilt, not trusted
    for entry in (tmp_path / "classify").glob("*.npz"):
        entry.write_bytes(entry.read_bytes()[:100])
    counting = Counting(word_tokenizer)
    got = data_lib.pair_arrays(counting, table, text_column="s1", pair_column=None, max_length=7, cache_dir=tmp_path)
    assert counting.calls > 0
    np.testing.assert_array_equal(got["ids"], word_tokenizer(list(table["s1"]), padding="max_length", truncation=True,
                                                        max_length=7, return_tensors="np")["input_ids"])


def mesh_check() -> None:
    """Run in an 8-device subprocess: on a (data=2, fsdp=2) mesh, prefetched batches are placed by the producer
    thread (sharding.place_batch) and train to the same params as the synchronous loop; callbacks see host batches."""
    mesh = jgoat.mesh(data=2, fsdp=2, devices=jax.devices()[:4])
    seen = []

    class Host(jgoat.Callback):
        def on_step_end(self, loop, step):
            seen.append(type(loop.batch[0]))

    sync, _ = run(0, mesh=mesh)
    ahead, _ = run(2, mesh=mesh, callbacks=[Host()])
    assert ahead.history == sync.history
    assert_same_trainable(ahead.params, sync.params)
    assert set(seen) == {np.ndarray}, seen
    assert not prefetch_threads()
    print("mesh prefetch OK")


def test_prefetch_on_a_mesh_places_batches_in_the_thread_and_changes_nothing():
    import os
    import pathlib
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    here = pathlib.Path(__file__).parent
    proc = subprocess.run([sys.executable, "-c", "import test_pipeline; test_pipeline.mesh_check()"], cwd=here,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "mesh prefetch OK" in proc.stdout, proc.stderr[-3000:]
