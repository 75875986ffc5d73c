"""Packed SFT batches (jgoat.data.pack_sft + segment-masked Llama attention) against the same examples padded one per
row, on a tiny fp32 Llama with LoRA and GOAT; the packer; the batched, cached tokenisation.

Tolerances of packed-vs-padded comparisons: both layouts run the same fp32 maths on the same tokens; attention
masks the other examples' keys (exp(finfo.min - max) is exactly 0), so what differs is only float32 summation
order and length (softmax and attention sums over a key axis holding the example at another offset; the loss mean;
the gradient's sums over the batch's tokens: 240 padded positions against 144 packed ones, blocked differently).
- logits-derived values (per-example loss, aux, expert load): RTOL = 1e-6 (~8 float32 ulps, eps = 1.2e-7) of each
  quantity's scale; measured below 3e-7.
- gradients: GRAD_RTOL = 4e-6 of each leaf's largest entry (~32 ulps). Measured (this CPU): LoRA up to 9e-7, GOAT up
  to 1.7e-6 on one leaf (the router's, whose softmax/top-k backward sums many cancelling terms); over the whole
  tree ||g_packed - g_padded|| / ||g_padded|| is 7e-7 (LoRA) and 8e-7 (GOAT), which is asserted <= 1e-6. Permuting
  the rows of the padded batch alone (pure summation order) moves leaves by up to 6e-7, the same order.
A leak across examples or positions not restarting moves these numbers by 1e-2 and more (asserted below, so the
comparisons can fail).
"""

import dataclasses
import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgoat
from jgoat import data as data_lib
from jgoat import tasks
from jgoat.models.llama import LlamaConfig, LlamaForCausalLM, position_ids_from_segments

RTOL = 1e-6
GRAD_RTOL = 4e-6
IGNORE = data_lib.IGNORE_INDEX
MAX_LENGTH = 24
# mixed lengths (2..24, one truncated from 30) and prompt lengths: 10 examples pack into fewer rows than 10
LENGTHS = (5, 17, 3, 11, 8, 24, 2, 13, 7, 30)
PROMPTS = (2, 9, 1, 4, 5, 10, 1, 6, 3, 12)
CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, initializer_range=0.2, max_position_embeddings=64)
METHODS = {"lora": jgoat.LoraConfig(rank=4, alpha=8),
           "goat": jgoat.GoatConfig(rank=8, experts=4, top_k=2)}


def examples(seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n, p in zip(LENGTHS, PROMPTS, strict=True):
        ids = rng.integers(1, CFG.vocab_size, n)
        out.append(data_lib.SftExample(tuple(int(i) for i in ids), (IGNORE,) * p + tuple(int(i) for i in ids[p:])))
    return out


@functools.cache
def model():
    return LlamaForCausalLM(CFG)


@functools.cache
def wrapped(method):
    params = model().init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
    tree = jgoat.wrap(params, METHODS[method], key=jax.random.key(1))
    if method == "lora":  # B = 0 at init: give it values so that A has a gradient and the adapter shows in the logits
        tree = _randomize_lora_b(tree)
    return tree


def _randomize_lora_b(tree):
    keys = iter(jax.random.split(jax.random.key(2), 64))

    def fix(leaf):
        if isinstance(leaf, jgoat.LoraAdapter):
            return dataclasses.replace(leaf, B=0.1 * jax.random.normal(next(keys), leaf.B.shape, leaf.B.dtype))
        return leaf

    return jax.tree.map(fix, tree, is_leaf=lambda x: isinstance(x, jgoat.LoraAdapter))


@functools.cache
def forward(**kw):
    """tasks.forward of the tiny model, jitted (test_no_attention_across_segments also runs it un-jitted)."""
    return jax.jit(functools.partial(tasks.forward, "sft", model(), **kw))


@functools.cache
def loss():
    return jax.jit(functools.partial(tasks.loss, "sft", model()))


def batches():
    exs = examples()
    return data_lib.pad_sft(exs, MAX_LENGTH, 0), data_lib.pack_sft(exs, MAX_LENGTH, 0)


def token_nll(logits_BxTxV, labels_BxT):
    """Per target position (t predicts t + 1): nll [B, T-1] and whether it counts."""
    logits = np.asarray(logits_BxTxV, np.float64)[:, :-1]
    targets = np.asarray(labels_BxT)[:, 1:]
    valid = targets != IGNORE
    logz = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    picked = np.take_along_axis(logits, np.where(valid, targets, 0)[..., None], -1)[..., 0]
    return np.where(valid, logz - picked, 0.0), valid


def per_example_loss(batch, logits):
    """Mean nll of each example's counted tokens: rows of a padded batch, (row, segment) groups of a packed one,
    in the packer's example order."""
    nll, valid = token_nll(logits, batch["labels"])
    if "segment_ids" not in batch:
        return nll.sum(1) / valid.sum(1)
    seg = batch["segment_ids"][:, 1:]
    rows = data_lib.pack_rows([min(n, MAX_LENGTH) for n in LENGTHS], MAX_LENGTH)
    out = np.zeros(len(LENGTHS))
    for r, members in enumerate(rows):
        for s, i in enumerate(members, 1):
            out[i] = nll[r][seg[r] == s].sum() / valid[r][seg[r] == s].sum()
    return out


def _rel_close(got, want, rtol=RTOL):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * max(float(np.max(np.abs(want))), 1e-30))


# ---------------------------------------------------------------------------------------------------------------
# the packer


def test_pack_rows_best_fit_decreasing_is_deterministic_and_complete():
    rng = np.random.default_rng(0)
    for _ in range(20):
        lengths = [int(n) for n in rng.integers(1, 33, rng.integers(1, 60))]
        rows = data_lib.pack_rows(lengths, 32)
        assert rows == data_lib.pack_rows(lengths, 32)  # a pure function of the lengths
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in row) <= 32 for row in rows)
        greedy = 1  # greedy in data order (the alternative), computed independently
        room = 32
        for n in lengths:
            if n > room:
                greedy, room = greedy + 1, 32
            room -= n
        assert -(-sum(lengths) // 32) <= len(rows) <= greedy
    # where in-order greedy wastes rows: [6], [5, 5], [4] against 6+4, 5+5
    assert data_lib.pack_rows([6, 5, 5, 4], 10) == [[0, 3], [1, 2]]
    with pytest.raises(ValueError, match="11 tokens"):
        data_lib.pack_rows([3, 11], 10)


def test_pack_sft_rows_hold_each_example_once_with_segment_ids_and_first_label_ignored():
    exs = examples()
    packed = data_lib.pack_sft(exs, MAX_LENGTH, 0)
    assert packed["ids"].shape[1] == MAX_LENGTH and len(packed["ids"]) < len(exs)
    rows = data_lib.pack_rows([min(n, MAX_LENGTH) for n in LENGTHS], MAX_LENGTH)
    for r, members in enumerate(rows):
        t = 0
        for s, i in enumerate(members, 1):
            n = min(LENGTHS[i], MAX_LENGTH)
            np.testing.assert_array_equal(packed["ids"][r, t:t + n], exs[i].ids[:n])
            np.testing.assert_array_equal(packed["segment_ids"][r, t:t + n], s)
            assert packed["labels"][r, t] == IGNORE  # the previous example's last token must not predict it
            np.testing.assert_array_equal(packed["labels"][r, t + 1:t + n], exs[i].labels[1:n])
            t += n
        assert (packed["segment_ids"][r, t:] == 0).all() and (packed["labels"][r, t:] == IGNORE).all()
    np.testing.assert_array_equal(packed["mask"], packed["segment_ids"] != 0)
    padded = data_lib.pad_sft(exs, MAX_LENGTH, 0)  # the same tokens are counted either way
    assert int(tasks.weight("sft", packed)) == int(tasks.weight("sft", padded))
    assert packed["mask"].sum() == padded["mask"].sum()


def test_positions_restart_per_segment():
    _, packed = batches()
    want = np.zeros_like(packed["segment_ids"])  # independent: a running counter reset at each new segment
    for r, row in enumerate(packed["segment_ids"]):
        for t in range(1, len(row)):
            want[r, t] = want[r, t - 1] + 1 if row[t] == row[t - 1] and row[t] != 0 else 0
    want[packed["segment_ids"] == 0] = 0
    np.testing.assert_array_equal(np.asarray(position_ids_from_segments(packed["segment_ids"])), want)
    np.testing.assert_array_equal(np.asarray(jax.jit(position_ids_from_segments)(packed["segment_ids"])), want)


# ---------------------------------------------------------------------------------------------------------------
# packed == padded


@pytest.mark.parametrize("method", sorted(METHODS))
def test_packed_and_padded_give_the_same_per_example_loss_aux_and_load(method):
    padded, packed = batches()
    params = wrapped(method)
    outs = {}
    for name, batch in (("padded", padded), ("packed", packed)):
        outs[name] = forward(collect_load=True)(params, batch, None)
    _rel_close(per_example_loss(packed, outs["packed"][0]), per_example_loss(padded, outs["padded"][0]))
    for name in ("padded", "packed"):  # the training loss is the mean over the same counted tokens
        batch = padded if name == "padded" else packed
        nll, valid = token_nll(outs[name][0], batch["labels"])
        _rel_close(loss()(params, batch, None)[0], nll.sum() / valid.sum())
    # GOAT: aux and expert load over the real tokens are those of the same tokens unpacked
    _rel_close(outs["packed"][1], outs["padded"][1])
    assert outs["packed"][2].keys() == outs["padded"][2].keys()
    for path in outs["padded"][2]:
        _rel_close(outs["packed"][2][path], outs["padded"][2][path])
    if method == "goat":
        assert float(outs["padded"][1]) > 0
        # counting padding (the official code's aux) would differ: the layouts hold different padding
        counted = [forward(aux_count_padding=True)(params, b, None)[1] for b in (padded, packed)]
        assert abs(float(counted[0]) - float(counted[1])) > 1e-4 * float(counted[0])


def test_without_segment_ids_the_packed_loss_differs():
    """The comparisons above can fail: the same packed rows with plain causal attention over the whole row (and
    positions running on) give other per-example losses."""
    padded, packed = batches()
    params = wrapped("lora")
    leaky = {k: v for k, v in packed.items() if k != "segment_ids"}
    got = per_example_loss(packed, forward()(params, leaky, None)[0])
    want = per_example_loss(padded, forward()(params, padded, None)[0])
    assert np.max(np.abs(got - want) / want) > 1e-2


@pytest.mark.parametrize("method", sorted(METHODS))
def test_packed_and_padded_give_the_same_gradients(method):
    padded, packed = batches()
    trainable, frozen = jgoat.split(wrapped(method))

    def objective(batch):
        def f(t):
            task, aux = tasks.loss("sft", model(), jgoat.combine(t, frozen), batch, None)
            return task + 1e-3 * aux  # train_step's objective (aux_coeff 1e-3)
        return jax.jit(jax.value_and_grad(f))(trainable)

    (loss_pad, g_pad), (loss_pack, g_pack) = objective(padded), objective(packed)
    _rel_close(loss_pack, loss_pad)
    leaves_pad, leaves_pack = jax.tree.leaves(g_pad), jax.tree.leaves(g_pack)
    assert len(leaves_pad) == len(leaves_pack) > 0
    for a, b in zip(leaves_pack, leaves_pad, strict=True):
        assert float(jnp.max(jnp.abs(b))) > 0
        _rel_close(a, b, GRAD_RTOL)
    assert _tree_rel(g_pack, g_pad) <= RTOL
    leaky = objective({k: v for k, v in packed.items() if k != "segment_ids"})[1]
    assert _tree_rel(leaky, g_pad) > 1e-2


def _tree_rel(a, b):
    """||a - b|| / ||b|| over all leaves, in float64."""
    def sq(t):
        return sum(float(np.sum(np.square(np.asarray(x, np.float64)))) for x in jax.tree.leaves(t))
    return np.sqrt(sq(jax.tree.map(lambda x, y: np.asarray(x, np.float64) - np.asarray(y, np.float64), a, b)) / sq(b))


@pytest.mark.parametrize("method, jit", [("lora", False), ("lora", True), ("goat", True)])
def test_no_attention_across_segments(method, jit):
    """Perturb the first example of a packed row: the logits of the row's other examples are bit-identical."""
    _, packed = batches()
    row = int(np.argmax(packed["segment_ids"].max(axis=1)))  # the row with the most examples
    seg = packed["segment_ids"][row]
    assert seg.max() >= 2
    ids = packed["ids"].copy()
    ids[row, seg == 1] = (ids[row, seg == 1] + 7) % CFG.vocab_size
    params = wrapped(method)

    def logits(batch):
        fn = forward() if jit else functools.partial(tasks.forward, "sft", model())
        return np.asarray(fn(params, batch, None)[0])

    before, after = logits(packed), logits({**packed, "ids": ids})
    others = (seg >= 2)
    np.testing.assert_array_equal(after[row][others], before[row][others])
    assert np.abs(after[row][seg == 1] - before[row][seg == 1]).max() > 1e-3  # the perturbation took effect
    # without the segment mask the later examples see the earlier one
    plain = {k: v for k, v in packed.items() if k != "segment_ids"}
    leaked = logits({**plain, "ids": ids})[row][others] - logits(plain)[row][others]
    assert np.abs(leaked).max() > 1e-3


def test_segment_ids_refused_where_packing_is_wrong():
    _, packed = batches()
    params = wrapped("lora")
    with pytest.raises(ValueError, match="segment_ids has shape"):
        model().apply({"params": params}, packed["ids"], segment_ids_BxT=packed["segment_ids"][:, :-1])
    prompt = jgoat.add_prompt(model().init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"],
                              jgoat.PromptTuningConfig(num_virtual_tokens=3), key=jax.random.key(0), model=model())
    with pytest.raises(ValueError, match="prompt tuning"):
        model().apply({"params": prompt}, packed["ids"], segment_ids_BxT=packed["segment_ids"])


# ---------------------------------------------------------------------------------------------------------------
# batched, cached tokenisation

TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' </s> ' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}")
WORDS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "a", "b", "c", "d", "e"]


@pytest.fixture(scope="module")
def tokenizer():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"])
    fast.chat_template = TEMPLATE
    return fast


class Counting:
    """A tokenizer that counts the calls that tokenise or render (everything else is passed through)."""

    def __init__(self, tok):
        self._tok, self.calls = tok, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._tok(*args, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        self.calls += 1
        return self._tok.apply_chat_template(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def _chat_table(n=12):
    import datasets

    rows = [{"messages": [{"role": "user", "content": " ".join("abcde"[(i + j) % 5] for j in range(1 + i % 4))},
                          {"role": "assistant", "content": " ".join("edcba"[(i * j) % 5] for j in range(1 + i % 7))}]}
            for i in range(n)]
    return datasets.Dataset.from_list(rows)


def test_batched_tokenisation_equals_one_example_at_a_time(tokenizer):
    table = _chat_table()
    chats = list(table["messages"])
    batch = data_lib.tokenize_sft_batch(tokenizer, chats=chats)
    assert batch == [data_lib.tokenize_sft(tokenizer, messages=m) for m in chats]
    prompts, responses = ["a b", "c", "d e a"], ["b", "c d e", "a"]
    for template in (True, False):
        batch = data_lib.tokenize_sft_batch(tokenizer, prompts=prompts, responses=responses,
                                            use_chat_template=template)
        assert batch == [data_lib.tokenize_sft(tokenizer, prompt=p, response=r, use_chat_template=template)
                         for p, r in zip(prompts, responses, strict=True)]


def test_second_run_reads_the_cache_without_calling_the_tokenizer(tokenizer, tmp_path):
    table = _chat_table()
    want = data_lib.sft_arrays(tokenizer, table, max_length=16, packing=True)
    first = Counting(tokenizer)
    got = data_lib.sft_arrays(first, table, max_length=16, packing=True, cache_dir=tmp_path)
    assert first.calls > 0 and len(list((tmp_path / "sft").glob("*.npz"))) == 1
    second = Counting(tokenizer)
    again = data_lib.sft_arrays(second, table, max_length=16, packing=True, cache_dir=tmp_path)
    assert second.calls == 0
    for arrays in (got, again):
        assert arrays.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(arrays[k], want[k])
    # the cache holds untruncated tokens: another max_length or layout reuses it
    third = Counting(tokenizer)
    padded = data_lib.sft_arrays(third, table, max_length=12, cache_dir=tmp_path)
    assert third.calls == 0
    np.testing.assert_array_equal(padded["ids"], data_lib.sft_arrays(tokenizer, table, max_length=12)["ids"])
    # other data, another chat template (a different tokenizer) or no template: tokenised anew, new entries
    other = Counting(tokenizer)
    data_lib.sft_arrays(other, _chat_table(13), max_length=16, cache_dir=tmp_path)
    assert other.calls > 0
    changed = Counting(tokenizer)
    changed._tok = tokenizer.__class__.from_pretrained(_saved(tokenizer, tmp_path / "tok"))
    changed._tok.chat_template = TEMPLATE.replace("</s> ", "</s> </s> ")
    data_lib.sft_arrays(changed, table, max_length=16, cache_dir=tmp_path)
    assert changed.calls > 0
    assert len(list((tmp_path / "sft").glob("*.npz"))) == 3
    # an unreadable entry is rebuilt, not trusted
    for entry in (tmp_path / "sft").glob("*.npz"):
        entry.write_bytes(b"garbage")
    broken = Counting(tokenizer)
    rebuilt = data_lib.sft_arrays(broken, table, max_length=16, packing=True, cache_dir=tmp_path)
    assert broken.calls > 0
    np.testing.assert_array_equal(rebuilt["ids"], want["ids"])


def _saved(tokenizer, path):
    tokenizer.save_pretrained(path)
    return str(path)


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("JGOAT_CACHE", str(tmp_path / "j"))
    assert data_lib.default_cache_dir() == tmp_path / "j"
    monkeypatch.delenv("JGOAT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert data_lib.default_cache_dir() == tmp_path / "x" / "jgoat"


# ---------------------------------------------------------------------------------------------------------------
# the CLI: packing on by default where exact, SIGKILL resume bit-identical with packed rows


def test_sft_packing_is_on_where_it_is_exact():
    from jgoat import cli

    def args(*extra):
        return cli.build_parser().parse_args(["train", "--task", "sft", *extra])

    assert tasks.sft_packing(args())
    assert not tasks.sft_packing(args("--no-packing"))
    assert not tasks.sft_packing(args("--method", "prompt"))
    assert not tasks.sft_packing(args("--aux-count-padding"))
    assert tasks.sft_packing(args("--method", "prefix"))  # the prefix is per layer: every example sees it


@pytest.mark.slow
def test_packed_sft_sigkill_resume_is_exact(tmp_path, tokenizer):
    """tests/test_cli_tasks.py's resume test with rows that do pack (several examples per row)."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    root = tmp_path / "model"
    tokenizer.save_pretrained(root)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(root)
    data = tmp_path / "train.jsonl"
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in _chat_table(64).to_list())
    env = {**os.environ, "JGOAT_CACHE": str(tmp_path / "cache")}

    def run(out, *extra, kill=None):
        faults = pathlib.Path(__file__).parent / "faults.py"
        launcher = ["-m", "jgoat"] if kill is None else [str(faults), str(kill), "begin"]
        cmd = [sys.executable, *launcher, "train", "--task", "sft", "--model", str(root), "--data", str(data),
               "--out", str(out), "--method", "goat", "--rank", "4", "--experts", "2", "--top-k", "1",
               "--adapter-dropout", "0.1", "--epochs", "3", "--batch-size", "4", "--max-length", "32",
               "--test-size", "8", "--save-every", "3", "--no-baseline", *extra]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)

    straight = run(tmp_path / "a")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = run(tmp_path / "b", kill=4)  # SIGKILL before step 5, after the step-3 save
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-2000:])
    resumed = run(tmp_path / "b", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 3" in resumed.stdout
    rows_a = [json.loads(x) for x in (tmp_path / "a" / "goat" / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (tmp_path / "b" / "goat" / "metrics.jsonl").read_text().splitlines()]
    steps = max(r["step"] for r in rows_a)
    assert steps < 3 * 56 // 4  # 56 train examples packed into fewer rows than examples
    assert [(r["step"], r.get("task_loss"), r.get("eval/loss")) for r in rows_b] == \
        [(r["step"], r.get("task_loss"), r.get("eval/loss")) for r in rows_a]


# ---------------------------------------------------------------------------------------------------------------
# length-bucketed eval


def test_length_sorted_eval_batches_trim_padding_and_keep_the_metrics():
    exs = examples()
    padded = data_lib.pad_sft(exs, 256, 0)  # long rows, short examples: padding dominates
    plan = tasks.length_sorted_batches(tasks.ArraySplit(padded), 4)
    assert sorted(i for idx, _ in plan for i in idx) == list(range(len(LENGTHS)))
    lengths = padded["mask"].sum(1)
    assert [list(lengths[idx]) for idx, _ in plan] == [[2, 3, 5, 7], [8, 11, 13, 17], [24, 30]]  # sorted
    assert [length for _, length in plan] == [64, 64, 64]  # buckets 64, 128, 256: the shortest that holds them
    long = data_lib.pad_sft([*exs, data_lib.SftExample((1,) * 100, (IGNORE,) * 50 + (1,) * 50)], 256, 0)
    assert [length for _, length in tasks.length_sorted_batches(tasks.ArraySplit(long), 4)] == [64, 64, 128]
    short = tasks.length_sorted_batches(tasks.ArraySplit(data_lib.pack_sft(exs, MAX_LENGTH, 0)), 4)
    assert [(list(idx), length) for idx, length in short] == [([0, 1, 2, 3], None), ([4], None)]  # T <= 64: in order
    params = wrapped("goat")
    for arrays in (padded, data_lib.pack_sft(exs, MAX_LENGTH, 0)):
        task = tasks.Task("sft", model(), params, tasks.ArraySplit(arrays), tasks.ArraySplit(arrays), (), "toy")
        (m_sorted, load_sorted), (m_order, load_order) = (tasks.evaluate(task, params, 4, bucketed=b)
                                                          for b in (True, False))
        assert m_sorted.keys() == m_order.keys()
        for k in m_order:
            _rel_close(m_sorted[k], m_order[k])
        for path in load_order:  # the load over all eval tokens does not depend on the batching
            _rel_close(load_sorted[path], load_order[path])
