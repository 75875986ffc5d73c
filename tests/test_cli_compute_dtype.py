"""`jgoat train --compute-dtype` (and the config-file key ``compute_dtype``): the adapter dtype policy reaches every
method config that has one; a method without one refuses a non-auto value in one line; a run records it."""

import json

import pytest

from jgoat import cli
from jgoat.core import AdapterConfig
from jgoat.errors import JgoatError

# every method whose config is an AdapterConfig (model type "bert" gives (IA)³ its default targets)
WITH_POLICY = ("goat", "molora", "lora", "rslora", "dora", "pissa", "milora", "olora", "kasa", "gora", "lori",
               "lori_s", "ia3")


def _config(*argv):
    return cli.method_config(cli.build_parser().parse_args(["train", *argv]), "bert")


def test_every_method_with_a_policy_gets_the_flag_and_auto_stays_the_default():
    assert set(WITH_POLICY) | set(cli.NO_COMPUTE_DTYPE) == set(cli.METHODS)
    for method in WITH_POLICY:
        assert _config("--method", method).compute_dtype == "auto"
        for policy in ("float32", "bfloat16", "float16"):
            cfg = _config("--method", method, "--compute-dtype", policy)
            assert isinstance(cfg, AdapterConfig) and cfg.compute_dtype == policy, (method, policy)


@pytest.mark.parametrize("method", cli.NO_COMPUTE_DTYPE)
def test_a_method_without_a_policy_refuses_a_non_auto_value(method):
    _config("--method", method)  # auto: accepted (nothing to set)
    with pytest.raises(JgoatError, match=f"--compute-dtype bfloat16: --method {method} has no adapter dtype policy"):
        _config("--method", method, "--compute-dtype", "bfloat16")


@pytest.mark.parametrize("name, text", [("c.yaml", "compute_dtype: float16\nmethod: lora\n"),
                                        ("c.json", json.dumps({"compute-dtype": "bfloat16", "method": "goat"}))])
def test_config_file_key_and_the_command_line_override(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    expected = "float16" if name.endswith("yaml") else "bfloat16"
    assert _config("--config", str(path)).compute_dtype == expected
    assert _config("--config", str(path), "--compute-dtype", "float32").compute_dtype == "float32"


def test_a_bad_value_is_one_line_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["train", "--out", str(out), "--compute-dtype", "float64"]) == 2
    line, = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("jgoat: error: ") and "--compute-dtype: invalid choice: 'float64'" in line, line
    assert not out.exists()


def test_a_tiny_run_records_the_policy_and_trains_with_it(tmp_path, monkeypatch):
    from test_cli import write_tiny_bert

    write_tiny_bert(tmp_path / "model", tmp_path / "data.csv", per_label=20, encoding="utf-8")
    seen = []
    original = cli.method_config

    def spy(args, model_type=None):
        cfg = original(args, model_type)
        seen.append(cfg)
        return cfg

    monkeypatch.setattr(cli, "method_config", spy)
    out = tmp_path / "run"
    assert cli.main(["train", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data.csv"), "--out",
                     str(out), "--steps", "2", "--batch-size", "4", "--max-length", "16", "--test-size", "8",
                     "--method", "lora", "--rank", "4", "--compute-dtype", "bfloat16", "--no-baseline"]) == 0
    assert json.loads((out / "lora" / "config.json").read_text())["compute_dtype"] == "bfloat16"
    assert [cfg.compute_dtype for cfg in seen] == ["bfloat16"]
    result = json.loads((out / "lora" / "result.json").read_text())
    assert 0.0 <= result["test_accuracy"] <= 1.0
