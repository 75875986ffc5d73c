"""The CLI's bad-input catalogue: each mistake exits with status 2 and ONE line on stderr that names the culprit,
before anything is loaded or written (--out stays absent), without a traceback (``--debug`` shows it)."""

import json
import subprocess
import sys

import pytest

from jgoat import cli

CASES = [  # (extra argv, a piece of the message that names the culprit)
    (["--batch-size", "0"], "--batch-size 0: must be a positive integer"),
    (["--batch-size", "-4"], "--batch-size -4: must be a positive integer"),
    (["--save-every", "0"], "--save-every 0"),
    (["--eval-batch-size", "0"], "--eval-batch-size 0"),
    (["--max-length", "0"], "--max-length 0"),
    (["--test-size", "-1"], "--test-size -1"),
    (["--epochs", "0"], "--epochs 0"),
    (["--steps", "0"], "--steps 0"),
    (["--steps", "-3"], "--steps -3"),
    (["--grad-accum", "0"], "--grad-accum 0"),
    (["--log-every", "0"], "--log-every 0"),
    (["--rank", "0"], "--rank 0"),
    (["--experts", "-2"], "--experts -2"),
    (["--seed", "-1"], "--seed -1: must be >= 0"),
    (["--lr", "0"], "--lr 0.0: must be a finite number > 0"),
    (["--lr=-1e-3"], "--lr -0.001"),
    (["--lr", "nan"], 'key "lr": Expected a <class \'float\'>. Got value: nan'),
    (["--lr", "inf"], 'key "lr": Expected a <class \'float\'>. Got value: inf'),
    (["--head-lr", "0"], "--head-lr 0.0"),
    (["--alpha", "nan"], 'key "alpha": Expected a <class \'float\'>. Got value: nan'),
    (["--alpha", "inf"], 'key "alpha": Expected a <class \'float\'>. Got value: inf'),
    (["--eta", "nan"], 'key "eta": Expected a <class \'float\'>. Got value: nan'),
    (["--eta", "-1"], "--eta -1.0"),
    (["--rho", "inf"], 'key "rho": Expected a <class \'float\'>. Got value: inf'),
    (["--rho", "nan"], 'key "rho": Expected a <class \'float\'>. Got value: nan'),
    (["--warmup-ratio", "1.0"], "--warmup-ratio 1.0: must be in [0, 1)"),
    (["--adapter-dropout", "1.5"], "--adapter-dropout 1.5"),
    (["--weight-decay", "-1"], "--weight-decay -1.0"),
    (["--clip-norm", "nan"], 'key "clip_norm": Expected a <class \'float\'>. Got value: nan'),
    (["--batch-size", "6", "--grad-accum", "4"], "--batch-size 6 is not divisible by --grad-accum 4"),
    (["--data", "missing.csv"], "--data missing.csv: no such file or folder"),
    (["--data", "./nowhere/"], "--data ./nowhere/: no such file or folder"),
    (["--eval-data", "held_out.jsonl"], "--eval-data held_out.jsonl: no such file"),
    (["--model", "/no/such/model"], "--model /no/such/model: no such file or folder"),
    (["--targets", "layer_.*(query"], "--targets 'layer_.*(query': invalid regex"),
    (["--rank", "eight"], 'key "rank"'),
    (["--method", "lorra"], "'lorra'"),
    (["--task", "regression"], "'regression'"),
    (["--quantize", "nf9"], "'nf9'"),
    (["--bogus-flag"], "--bogus-flag"),
    (["--allow-change", "learning_rate"], "--allow-change learning_rate"),
    (["--method", "prompt", "--prompt-init", "text"], "--prompt-init text needs --prompt-init-text"),
    (["--resume"], "--resume: no checkpoint under"),
    (["--config", "missing.json"], "--config missing.json: no such file"),
    ("bad.json", 'bad.json:3:12: invalid JSON'),
    ("bad.yaml", "bad.yaml:3:3: invalid YAML"),
    ("list.json", "list.json: a config file holds one mapping"),
    ("unknown.json", "'learning_rate' is not accepted"),
    ("badvalue.yaml", 'key "batch_size"'),
]
CONFIGS = {
    "bad.json": '{\n  "rank": 8,\n  "alpha": ,\n  "lr": 1e-3\n}\n',
    "bad.yaml": "rank: 8\nalpha: [16\nlr: 1e-3\n",
    "list.json": '["--rank", "8"]',
    "unknown.json": json.dumps({"learning_rate": 1e-4}),
    "badvalue.yaml": "batch_size: many\n",
}


@pytest.mark.parametrize("extra, message", CASES, ids=[m.split(":")[0][:40] for _, m in CASES])
def test_bad_cli_input_is_one_line_before_anything_runs(tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(tmp_path)  # relative paths (missing.csv, the config files) are looked up here
    if isinstance(extra, str):
        (tmp_path / extra).write_text(CONFIGS[extra])
        extra = ["--config", extra]
    out = tmp_path / "out"
    assert cli.main(["train", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    line, = err.strip().splitlines()  # exactly one line
    assert line.startswith("jgoat: error: ") and message in line, line
    assert not out.exists()  # nothing written


def test_unknown_command_and_debug_traceback(tmp_path, capsys):
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--lr 0.0"):  # --debug: the exception itself
        cli.main(["train", "--out", str(tmp_path / "o"), "--lr", "0", "--debug"])


def test_the_process_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jgoat", "train", "--out", str(tmp_path / "o"), "--batch-size",
                           "0"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("jgoat:")] == \
        ["jgoat: error: --batch-size 0: must be a positive integer"]
    assert not (tmp_path / "o").exists()


def test_wandb_asked_for_but_not_installed(tmp_path, capsys):
    try:
        import wandb  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("wandb is installed: the refusal cannot happen")
    assert cli.main(["train", "--out", str(tmp_path / "o"), "--wandb"]) == 2
    assert capsys.readouterr().err.strip() == \
        "jgoat: error: --wandb needs Weights & Biases: pip install wandb (or drop --wandb)"
    assert not (tmp_path / "o").exists()
