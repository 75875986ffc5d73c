"""The Hugging Face Hub, when there is one: a repo id resolves to a local snapshot folder; a folder uploads.

Everything goes through ``huggingface_hub`` and its cache (``HF_HUB_CACHE``), so its settings hold: with
``HF_HUB_OFFLINE=1`` only what is already cached resolves, and a token comes from ``HF_TOKEN`` / ``hf auth login``.
Without a network (or the repo), the error says so in one line and names the local-folder alternative: everything
in jgoat also takes a folder.
"""

from __future__ import annotations

import os
import pathlib
import re

from huggingface_hub import HfApi, is_offline_mode, snapshot_download
from huggingface_hub.errors import HFValidationError

from jgoat.errors import JgoatError

__all__ = ["MODEL_FILES", "check_push_target", "is_repo_id", "push_folder", "resolve_dataset", "resolve_model"]

# What jgoat reads from a model repo: the config, safetensors weights (sharded or not), tokenizer and image processor
# files. `pytorch_model*.bin` only when the repo has no safetensors (second pass), never both.
MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
               "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.model",
               "preprocessor_config.json")
BIN_FILES = ("pytorch_model*.bin", "pytorch_model.bin.index.json")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_repo_id(name: str) -> bool:
    """`name` is spelled like a Hub repo id ``owner/name`` (not a path: no leading ``.`` ``/`` ``~``, one slash)."""
    return bool(_REPO_ID.fullmatch(name)) and not name.endswith((".json", ".gguf", ".safetensors", ".bin"))


def check_push_target(repo_id: str) -> None:
    """Refuse a `push_to_hub` value that is not ``owner/name`` before anything is written."""
    if not isinstance(repo_id, str) or not is_repo_id(repo_id):
        raise JgoatError(f"push_to_hub={repo_id!r} is not a Hub repo id (owner/name)")


def _local_path(name: str | os.PathLike) -> pathlib.Path | None:
    """`name` as an existing local path, or None when it is a repo id to fetch; FileNotFoundError for neither."""
    path = pathlib.Path(name).expanduser()
    if path.exists():
        return path
    if not is_repo_id(os.fspath(name)):
        raise FileNotFoundError(f"{os.fspath(name)}: no such file or folder")
    return None


def _unreachable(name: str, err: Exception, what: str) -> JgoatError:
    reason = " ".join(str(err).split())[:240] or type(err).__name__
    offline = " (HF_HUB_OFFLINE is set: only cached repos resolve)" if is_offline_mode() else ""
    kind = " --repo-type dataset" if what == "dataset" else ""
    return JgoatError(f"{name!r} is not a local folder and the Hugging Face Hub could not provide the {what}"
                      f"{offline}: {reason}. Pass a local folder instead, e.g. one written where there is a network "
                      f"by `hf download {name}{kind} --local-dir DIR`")


def resolve_model(name: str | os.PathLike, *, revision: str | None = None) -> pathlib.Path:
    """A local model folder/file for `name`: the path itself when it exists, else the Hub snapshot of repo `name`
    (downloaded into huggingface_hub's cache once, only the files jgoat reads: :data:`MODEL_FILES`).

    Raises FileNotFoundError for a missing path that is not spelled like a repo id, JgoatError (one line, naming
    the local-folder alternative) when the Hub cannot provide it: no network, offline mode, no such repo, gated.
    """
    local = _local_path(name)
    if local is not None:
        return local
    repo = os.fspath(name)
    try:
        folder = pathlib.Path(snapshot_download(repo, revision=revision, allow_patterns=list(MODEL_FILES)))
        if not any(folder.glob("*.safetensors")):
            folder = pathlib.Path(snapshot_download(repo, revision=revision,
                                                    allow_patterns=[*MODEL_FILES, *BIN_FILES]))
    except (OSError, HFValidationError) as err:  # huggingface_hub's HTTP, offline and cache misses are OSErrors
        raise _unreachable(repo, err, "model") from None
    if not (folder / "config.json").is_file():
        raise JgoatError(f"Hub repo {repo!r} has no config.json: not a transformers model repo jgoat can load")
    return folder


def resolve_dataset(name: str | os.PathLike, *, revision: str | None = None) -> pathlib.Path:
    """A local data file/folder for `name`: the path itself when it exists, else the Hub snapshot of dataset repo
    `name` (its data files and card; never its loading scripts, which jgoat does not run). Errors as
    :func:`resolve_model`."""
    local = _local_path(name)
    if local is not None:
        return local
    repo = os.fspath(name)
    try:
        return pathlib.Path(snapshot_download(repo, repo_type="dataset", revision=revision, ignore_patterns=["*.py"]))
    except (OSError, HFValidationError) as err:
        raise _unreachable(repo, err, "dataset") from None


def push_folder(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None,
                commit_message: str = "jgoat adapter") -> str:
    """Upload `folder` to Hub model repo `repo_id` (created if missing); returns the commit URL.

    The folder stays as written whatever happens: a failed upload is a JgoatError saying the folder is kept.
    """
    check_push_target(repo_id)
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=os.fspath(folder), commit_message=commit_message)
    except (OSError, HFValidationError) as err:
        raise JgoatError(f"could not push {os.fspath(folder)} to the Hugging Face Hub repo {repo_id!r} "
                         f"({' '.join(str(err).split())[:240]}); the folder is written and kept: upload it later "
                         f"with `hf upload {repo_id} {os.fspath(folder)}`") from None
    return str(getattr(info, "commit_url", info))
