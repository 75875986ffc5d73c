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
    (["--mesh", "data=2"], "--mesh data=2: data×fsdp×tensor×expert = 2×1×1×1 = 2, not the 1 device here"),
    (["--mesh", "tensor=2"], "--mesh tensor=2: fsdp×tensor×expert = 1×2×1 = 2 does not divide the 1 device here"),
    (["--mesh", "data=1,pipeline=1"], "--mesh data=1,pipeline=1: unknown axis 'pipeline'"),
    (["--mesh", "data=one"], "--mesh data=one: data=one is not a positive integer"),
    (["--mesh", "data=-1"], "--mesh data=-1: data=-1 is not a positive integer"),
    (["--mesh", "data:1"], "--mesh data:1: 'data:1' is not axis=size"),
    (["--steps", "5", "--epochs", "2"], "--steps and --epochs both given: give one"),
    (["--epochs=2", "--steps=5"], "--steps and --epochs both given: give one"),
    (["--data", "stanfordnlp/imdb"], "--data 'stanfordnlp/imdb' is not a local folder and the Hugging Face Hub could "
                                     "not provide the dataset (HF_HUB_OFFLINE is set: only cached repos resolve)"),
    (["--data", "imdb"], "--data imdb: no such file or folder (or a Hub repo id owner/name)"),
    (["--eval-data", "glue/sst2"], "--eval-data 'glue/sst2' is not a local folder and the Hugging Face Hub"),
    (["--model", "meta-llama/Llama-2-7b-hf"], "`hf download meta-llama/Llama-2-7b-hf --local-dir DIR`"),
    ("length.yaml", "length.yaml: gives both 'steps' and 'epochs': keep one of them"),
    ("mesh.json", "--mesh data=4,fsdp=2: data×fsdp×tensor×expert = 4×2×1×1 = 8, not the 1 device here"),
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
    "length.yaml": "steps: 10\nepochs: 2\n",
    "mesh.json": json.dumps({"mesh": {"data": 4, "fsdp": 2}}),
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


def test_command_line_run_length_beats_the_config_files(tmp_path):
    """Explicit command-line flags beat config-file values, and --steps / --epochs are one setting (the run's
    length): --steps on the command line replaces a file's epochs (and --epochs a file's steps), wherever --config
    stands; a later config file's length replaces an earlier one's."""
    parser = cli.build_parser()
    epochs = tmp_path / "epochs.yaml"
    epochs.write_text("epochs: 3\nbatch_size: 8\n")
    steps = tmp_path / "steps.json"
    steps.write_text(json.dumps({"steps": 5}))
    n_train = 80  # 10 steps per epoch at batch 8
    for argv in (["--config", str(epochs), "--steps", "7"], ["--steps=7", "--config", str(epochs)]):
        args = parser.parse_args(["train", *argv])
        assert (args.steps, args.epochs, args.batch_size) == (7, None, 8)
        assert cli.total_steps(args, n_train) == (7, 10)
    args = parser.parse_args(["train", "--config", str(epochs)])
    assert cli.total_steps(args, n_train) == (30, 10)  # the file's epochs when the command line gives no length
    args = parser.parse_args(["train", "--config", str(steps), "--epochs", "2", "--batch-size", "8"])
    assert cli.total_steps(args, n_train) == (20, 10)
    args = parser.parse_args(["train", "--config", str(epochs), "--config", str(steps)])
    assert (args.steps, args.epochs) == (5, None)
    args = parser.parse_args(["train", "--config", str(steps), "--config", str(epochs)])
    assert args.epochs == 3 and cli.total_steps(args, n_train) == (30, 10)


def test_resume_of_a_run_older_than_a_setting(tmp_path, monkeypatch):
    """A run stored before a setting existed resumes when this run leaves that setting at its default (the old run
    behaved as the default does); a non-default value is still a change --resume refuses."""
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), "--no-baseline", "--resume"]
    stored = cli.run_config(cli.build_parser().parse_args(argv))
    for newer in ("bucketing", "compute_dtype"):
        del stored[newer]
    (out / "goat").mkdir(parents=True)
    (out / "goat" / "config.json").write_text(json.dumps(stored))
    monkeypatch.setattr(cli.jgoat, "latest_step", lambda path: 3 if path.parent.name == "goat" else None)
    cli.check_resume(cli.build_parser().parse_args(argv))
    with pytest.raises(ValueError, match=r"compute_dtype: None -> 'bfloat16'.*--allow-change compute_dtype"):
        cli.check_resume(cli.build_parser().parse_args([*argv, "--compute-dtype", "bfloat16"]))
