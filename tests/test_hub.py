"""Hub access (issue 13 §5) without a network: a repo id resolves through huggingface_hub's own cache (a snapshot laid
out exactly as the hub client writes it, read under ``HF_HUB_OFFLINE=1`` in a subprocess so the client reads the
environment as a user's would), a missing repo is one line naming the local-folder alternative, and an adapter push
goes through the client's API (its two calls recorded) or fails leaving the exported folder in place."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers

import jgoat
from jgoat import hub
from jgoat.errors import JgoatError
from jgoat.interop import export_peft

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LOAD = r"""
import os, sys, jax, numpy as np
from jgoat import hub
from jgoat.errors import JgoatError
from jgoat.models import from_pretrained
folder = hub.resolve_model("jgoat-tests/tiny-llama")
_, cached, _ = from_pretrained("jgoat-tests/tiny-llama")
_, local, _ = from_pretrained(sys.argv[1])
same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(cached), jax.tree.leaves(local)))
print("FOLDER", folder)
print("SAME", same, len(jax.tree.leaves(cached)))
data = hub.resolve_dataset("jgoat-tests/tweets")
print("DATA", data, sorted(p.name for p in data.iterdir()))
from jgoat import cli
args = cli.build_parser().parse_args(["train", "--task", "sft", "--model", "jgoat-tests/tiny-llama",
                                      "--data", "jgoat-tests/tweets"])
cli.validate(args)  # what `jgoat train` checks before anything loads: both resolved to their cached snapshots
print("CLI", args.model, args.data)
for resolve, name in ((hub.resolve_model, "jgoat-tests/not-cached"), (hub.resolve_model, "./no/such/folder"),
                      (hub.resolve_dataset, "jgoat-tests/no-data")):
    try:
        resolve(name)
    except (JgoatError, FileNotFoundError) as err:
        print("REFUSED", type(err).__name__, err)
"""


def cache(root, kind: str, repo_id: str, files: dict[str, bytes]):
    """huggingface_hub's cache layout: {kind}s--{owner}--{name}/{refs/main -> commit, snapshots/{commit}/files}."""
    repo = root / f"{kind}s--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def tiny_llama(folder) -> None:
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)


def test_a_repo_id_resolves_through_the_hub_cache_and_a_missing_one_names_the_local_alternative(tmp_path):
    local = tmp_path / "tiny"
    tiny_llama(local)
    snapshot = cache(tmp_path / "cache", "model", "jgoat-tests/tiny-llama", {f.name: f.read_bytes()
                                                                            for f in local.iterdir()})
    data = cache(tmp_path / "cache", "dataset", "jgoat-tests/tweets", {"train.csv": b"text,label\nhi,0\nho,1\n"})
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", LOAD, str(local)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert f"FOLDER {snapshot}" in lines
    same, = [line for line in lines if line.startswith("SAME")]
    assert same.split()[1] == "True" and int(same.split()[2]) > 0  # every leaf bit-identical to the folder load
    assert f"DATA {data} ['train.csv']" in lines
    assert f"CLI {snapshot} {data}" in lines
    refused = [line for line in lines if line.startswith("REFUSED")]
    assert len(refused) == 3
    assert refused[0].startswith("REFUSED JgoatError 'jgoat-tests/not-cached' is not a local folder")
    assert "HF_HUB_OFFLINE is set" in refused[0]
    assert "hf download jgoat-tests/not-cached --local-dir DIR" in refused[0]
    assert refused[1] == "REFUSED FileNotFoundError ./no/such/folder: no such file or folder"
    assert "the Hugging Face Hub could not provide the dataset" in refused[2]
    assert "hf download jgoat-tests/no-data --repo-type dataset --local-dir DIR" in refused[2]


@pytest.mark.parametrize("name, repo", [("org/model", True), ("org/model-v1.5_x", True), ("./org/model", False),
                                        ("/abs/path", False), ("a/b/c", False), ("model.gguf", False),
                                        ("org/model.safetensors", False), ("~/m", False), ("plain", False)])
def test_repo_id_spelling(name, repo):
    assert hub.is_repo_id(name) is repo


@pytest.fixture()
def lora_export(tmp_path):
    base = {"dense": {"kernel": np.ones((8, 4), np.float32)}}
    cfg = jgoat.LoraConfig(rank=2, alpha=4.0, targets=["dense"])
    return jgoat.wrap(base, cfg, key=jax.random.key(0)), cfg, tmp_path / "adapter"


def test_export_peft_pushes_the_written_folder(lora_export, monkeypatch):
    tree, cfg, out = lora_export
    calls = []
    monkeypatch.setattr(hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))

    def upload(self, *, repo_id, folder_path, commit_message):
        calls.append(("upload", repo_id, sorted(os.listdir(folder_path)), commit_message))
        return "https://huggingface.co/me/adapter/commit/1"

    monkeypatch.setattr(hub.HfApi, "upload_folder", upload)
    export_peft(tree, cfg, out, push_to_hub="me/adapter")
    files = ["adapter_config.json", "adapter_model.safetensors", "jgoat_torch_names.json"]
    assert calls == [("create", "me/adapter", {"private": None, "exist_ok": True}),
                     ("upload", "me/adapter", files, "jgoat adapter")]


def test_a_failed_push_keeps_the_export_and_says_how_to_upload_it_later(lora_export, monkeypatch):
    tree, cfg, out = lora_export

    def offline(self, repo_id, **kw):
        raise OSError("Name or service not known")

    monkeypatch.setattr(hub.HfApi, "create_repo", offline)
    with pytest.raises(JgoatError, match=r"the folder is written and kept: upload it later with `hf upload me/a "):
        export_peft(tree, cfg, out, push_to_hub="me/a")
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    with pytest.raises(JgoatError, match=r"push_to_hub='not a repo' is not a Hub repo id"):
        export_peft(tree, cfg, tmp := out.parent / "other", push_to_hub="not a repo")
    assert not tmp.exists()  # refused before anything is written


NO_NETWORK = r"""
import pathlib, socket, sys
attempts = []
def refuse(*args, **kwargs):  # recorded, then refused (`datasets` swallows the error of its ping)
    attempts.append(args[:2])
    raise OSError("no network in this test")
socket.getaddrinfo = refuse
socket.create_connection = refuse
from jgoat import data
folder = pathlib.Path(sys.argv[1])
print("ROWS", len(data.load_table(str(folder / "a.csv"))), len(data.load_table(str(folder / "b.jsonl"))))
print("ATTEMPTS", attempts)
"""


def test_reading_local_data_never_touches_the_network(tmp_path):
    """With the Hub online (HF_HUB_OFFLINE unset), reading local files sends nothing: `datasets` would otherwise
    ping its S3 bucket to count the load of every packaged builder."""
    (tmp_path / "a.csv").write_text("text,label\nhi,0\nho,1\n")
    (tmp_path / "b.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    done = subprocess.run([sys.executable, "-c", NO_NETWORK, str(tmp_path)], capture_output=True, text=True,
                          env={**env, "JAX_PLATFORMS": "cpu", "HF_HOME": str(tmp_path / "hf")}, timeout=600)
    assert done.returncode == 0 and "ROWS 2 1" in done.stdout, done.stderr[-3000:]
    assert "ATTEMPTS []" in done.stdout, done.stdout
