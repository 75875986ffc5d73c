"""The three task kinds of `jgoat train`: what a batch is, its loss, its weight under accumulation, its evaluation.

- ``classify``: sequence classification with an encoder (BERT / RoBERTa + classifier); batch {ids, mask, labels}.
- ``sft``: causal-LM supervised fine-tuning of a decoder (Llama / Mistral / Qwen2); batch {ids, mask, labels} with
  labels = ids on response tokens and -100 on prompt and padding (loss on response tokens only). Packed (the
  default where it is exact, :func:`sft_packing`), a row holds several examples and the batch adds segment_ids:
  attention stays within each example, positions restart per example, and the loss, the counted tokens and GOAT's
  aux / expert load (over the real tokens, ``mask``) are those of the same examples padded one per row.
- ``image``: image classification with CLIP vision / ViT + a linear head; batch {pixels, labels}, pixels produced
  per batch by HF-identical preprocessing (``jgoat.models.preprocess``).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from tqdm.auto import tqdm

import jgoat
from jgoat import data as data_lib
from jgoat.models import causal_lm_loss, from_pretrained, load_tokenizer, preprocess, read_preprocessor_config

KINDS = ("classify", "sft", "image")


@dataclasses.dataclass(frozen=True)
class ArraySplit:
    """Examples held as equal-length numpy arrays (tokenised text), typically memory-mapped from the token cache
    (:func:`jgoat.data.sft_arrays`, :func:`jgoat.data.pair_arrays`): a batch reads only its rows."""

    arrays: Mapping[str, np.ndarray]

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def batch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[idx] for k, v in self.arrays.items()}


@dataclasses.dataclass(frozen=True)
class ImageSplit:
    """Images decoded and preprocessed per batch (a dataset of full-size pixels would not fit in memory)."""

    dataset: Any  # datasets.Dataset
    image_column: str
    labels: np.ndarray
    processor_config: Mapping[str, Any]
    base_dir: pathlib.Path  # relative image paths are resolved against it

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        column = self.dataset[[int(i) for i in idx]][self.image_column]
        images = [data_lib.rgb_uint8(self.base_dir / x if isinstance(x, str) else x) for x in column]
        return {"pixels": preprocess(images, dict(self.processor_config)), "labels": self.labels[idx]}


@dataclasses.dataclass(frozen=True)
class Task:
    """A loaded model and its data, ready for `jgoat train`'s loop."""

    kind: str
    model: Any
    params: Any
    train: ArraySplit | ImageSplit
    eval: ArraySplit | ImageSplit
    label_names: tuple[str, ...]  # () for sft
    source: str
    model_dir: str | None = None  # recorded in exported adapters
    tokenizer: Any = None  # for prompt tuning's text init (sft)

    @property
    def modules_to_save(self) -> tuple[str, ...]:
        """The new head trains alongside the adapters (classification); an LM keeps its head frozen."""
        return () if self.kind == "sft" else ("classifier",)


def forward(task_kind: str, model, params, batch, rng, *, aux_count_padding: bool = False, collect_load=False):
    """(logits, aux[, load]) of a batch; rng None means eval (no dropout)."""
    rngs = {} if rng is None else {"dropout": rng}
    fn = jgoat.apply(model.apply, collect_load=collect_load)
    if task_kind == "image":
        return fn({"params": params}, batch["pixels"], deterministic=rng is None, rngs=rngs)
    mask = None if aux_count_padding else batch["mask"]
    packed = {"segment_ids_BxT": batch["segment_ids"]} if "segment_ids" in batch else {}
    out = fn({"params": params}, batch["ids"], batch["mask"], deterministic=rng is None, rngs=rngs, aux_mask=mask,
             **packed)
    return (out[0].logits, *out[1:]) if task_kind == "sft" else out


def loss(task_kind: str, model, params, batch, rng, *, aux_count_padding: bool = False):
    """(mean task loss + the adapters' regulariser (KaSA's; 0 for other methods), aux): cross-entropy over examples,
    or over response tokens for sft."""
    logits, aux = forward(task_kind, model, params, batch, rng, aux_count_padding=aux_count_padding)
    if task_kind == "sft":
        task_loss = causal_lm_loss(logits, batch["labels"])
    else:
        labels = batch["labels"]
        task_loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels))
    return task_loss + jgoat.regularizer(params), aux


def weight(task_kind: str, batch) -> jax.Array:
    """How many units the mean loss of `batch` averages: counted (response) tokens for sft, else examples."""
    if task_kind == "sft":
        return jnp.sum(batch["labels"][:, 1:] != data_lib.IGNORE_INDEX)
    return jnp.asarray(batch["labels"].shape[0])


def throughput_units(task_kind: str, batch) -> int:
    """Tokens (real, unpadded) of a text batch, images of an image batch: the progress bar's rate."""
    return int(batch["labels"].shape[0]) if task_kind == "image" else int(np.sum(batch["mask"]))


def train_batches(task: Task, opts, rows: np.ndarray | slice = slice(None)) -> Callable[[int], dict[str, np.ndarray]]:
    """``batch(step)`` of `jgoat train`'s loop, this process's `rows` of the global batch; a pure function of
    ``opts.seed`` and the step (a resumed run sees the batches of an uninterrupted one).

    Default: :func:`jgoat.data.batch_indices`' batches of full rows. ``opts.bucketing`` (classify): the batches of
    :func:`jgoat.data.bucketed_batch_indices` (similar lengths), each trimmed to the shortest of
    :func:`jgoat.data.bucket_lengths` that holds the longest example of the global batch. Trimming drops only
    padding columns, keys every query masks out, that carry no label and none of the real tokens GOAT's aux and
    expert load count (``aux_mask``): each example's loss and gradient are those of its full row up to float
    rounding (tests/test_bucketing.py); only with --aux-count-padding, which counts the padding, would GOAT's aux
    change (the CLI refuses the pair)."""
    n, size, seed = len(task.train), opts.batch_size, opts.seed
    if not (getattr(opts, "bucketing", False) and task.kind == "classify"):
        return lambda step: task.train.batch(data_lib.batch_indices(n, size, seed, step)[rows])
    mask = task.train.arrays["mask"]
    lengths, widths = data_lib.row_lengths(mask), data_lib.bucket_lengths(mask.shape[1])

    def batch(step: int) -> dict[str, np.ndarray]:
        idx = data_lib.bucketed_batch_indices(lengths, size, seed, step)
        width = next(w for w in widths if w >= lengths[idx].max())
        return {k: v[:, :width] if v.ndim == 2 else v for k, v in task.train.batch(idx[rows]).items()}

    return batch


@functools.partial(jax.jit, static_argnums=(0, 1))
def _eval_sums(task_kind: str, model, params, batch):
    """Per-batch sums: (loss sum, correct, counted units) and the GOAT expert load."""
    logits, _, load = forward(task_kind, model, params, batch, None, collect_load=True)
    logits = logits.astype(jnp.float32)
    if task_kind == "sft":
        logits, targets = logits[:, :-1], batch["labels"][:, 1:]
        valid = targets != data_lib.IGNORE_INDEX
    else:
        targets, valid = batch["labels"], jnp.ones(batch["labels"].shape, bool)
    safe = jnp.where(valid, targets, 0)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
    correct = (jnp.argmax(logits, axis=-1) == safe) & valid
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(correct), jnp.sum(valid), load


def length_sorted_batches(split: ArraySplit | ImageSplit, batch_size: int) -> list[tuple[np.ndarray, int | None]]:
    """Eval batches of similar length: ``(example indices, row length)`` pairs, examples sorted by length (the
    position after their last real token; stable) and cut into batches, each trimmed to the shortest of T/8, T/4,
    T/2, T (rounded up to a multiple of 8, at least 64) that holds its longest example. Trimming drops only padding
    (masked keys, no counted label), so the eval sums are those of the full rows up to float rounding, at a fraction
    of the padded FLOPs; the few lengths bound the compiles, and below 64 tokens a compile costs more than the
    padding it saves. Rows of at most 64 tokens, image splits (no mask): in order, untrimmed (row length None)."""
    if not isinstance(split, ArraySplit) or "mask" not in split.arrays:
        return _in_order(len(split), batch_size)
    mask = split.arrays["mask"]
    lengths, buckets = data_lib.row_lengths(mask), data_lib.bucket_lengths(mask.shape[1], 8, at_least=64)
    if len(buckets) == 1:
        return _in_order(len(split), batch_size)
    order = np.argsort(lengths, kind="stable")
    batches = []
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batches.append((idx, next(b for b in buckets if b >= lengths[idx].max())))
    return batches


def _in_order(n: int, batch_size: int) -> list[tuple[np.ndarray, None]]:
    return [(np.arange(s, min(s + batch_size, n)), None) for s in range(0, n, batch_size)]


def evaluate(task: Task, params, batch_size: int, *, bucketed: bool = True
             ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Eval metrics over the whole eval split and the GOAT expert load per layer (over all eval tokens: each
    batch's load weighted by its real tokens, or examples for images).

    classify / image: accuracy and mean cross-entropy per example; sft: mean cross-entropy per response token
    (``loss``), its ``perplexity`` and next-token ``accuracy`` on response tokens. `bucketed`: text batches of
    similar length, trimmed (:func:`length_sorted_batches`); False: in order, full rows.
    """
    total = np.zeros(3)
    loads, weights = [], []
    batches = (length_sorted_batches if bucketed else lambda split, b: _in_order(len(split), b))(task.eval, batch_size)
    bar = tqdm(batches, desc="    eval", leave=False, dynamic_ncols=True, disable=None if len(batches) > 1 else True)
    for idx, length in bar:  # disable=None: shown on a terminal only
        batch = task.eval.batch(idx)
        if length is not None:
            batch = {k: v[:, :length] if v.ndim == 2 else v for k, v in batch.items()}
        *values, load = _eval_sums(task.kind, task.model, params, batch)
        total += [float(v) for v in values]
        loads.append(load)
        weights.append(float(np.sum(batch["mask"])) if "mask" in batch else float(len(idx)))
    count = max(total[2], 1.0)
    metrics = {"loss": total[0] / count, "accuracy": total[1] / count}
    if task.kind == "sft":
        metrics["perplexity"] = float(np.exp(metrics["loss"]))
    load = ({k: np.average([np.asarray(x[k]) for x in loads], axis=0, weights=weights) for k in loads[0]}
            if loads else {})
    return metrics, load


def classify_task(model, params, data: data_lib.TextClassificationData, model_dir: str | None = None) -> Task:
    """The task of the embedded default (and any labelled CSV), from already tokenised data."""
    return Task("classify", model, params,
                ArraySplit({"ids": data.train_ids, "mask": data.train_mask, "labels": data.train_labels}),
                ArraySplit({"ids": data.test_ids, "mask": data.test_mask, "labels": data.test_labels}),
                data.label_names, data.source, model_dir)


def _tokenise_pairs(tokenizer, dataset, text_column: str, pair_column: str | None, max_length: int):
    arrays = data_lib.pair_arrays(tokenizer, dataset, text_column=text_column, pair_column=pair_column,
                                  max_length=max_length, cache_dir=data_lib.default_cache_dir())
    return arrays["ids"], arrays["mask"]


def train_and_eval(opts) -> tuple[Any, Any]:
    """(train, eval) datasets of --data / --eval-data (or --test-size held out), read with --encoding and
    --skip-bad-images."""
    read = dict(encoding=opts.encoding, skip_bad_images=opts.skip_bad_images)
    return data_lib.train_eval_split(data_lib.load_table(opts.data, **read), opts.eval_data, opts.test_size,
                                     opts.seed, **read)


def load_classify(opts, *, model_dir: str, dtype, key, mesh: Mesh | None = None) -> Task:
    """Encoder + labelled text from `datasets` (text column, optional text-pair column as GLUE, label column); the
    encoder and its new head loaded straight onto `mesh` (sharded by :data:`jgoat.sharding.PARAM_RULES`), or onto the
    default device without one."""
    tokenizer = load_tokenizer(model_dir)
    train, held_out = train_and_eval(opts)
    label_column = opts.label_column or "label"
    names = data_lib.label_names_of(train, label_column)
    splits = []
    for ds in (train, held_out):
        ids, mask = _tokenise_pairs(tokenizer, ds, opts.text_column, opts.text_pair_column, opts.max_length)
        splits.append(ArraySplit({"ids": ids, "mask": mask, "labels": data_lib.label_ids(ds, label_column, names)}))
    model, params, _ = from_pretrained(model_dir, num_labels=len(names), key=key, dtype=dtype, mesh=mesh)
    return Task("classify", model, params, splits[0], splits[1], names, opts.data, model_dir)


def sft_packing(opts) -> bool:
    """Whether SFT rows are packed: --packing (the default), unless the run needs one example per row to be right:
    prompt tuning prepends its virtual tokens to each row, not to each example, and --aux-count-padding asks for the
    official code's aux over padded rows (packing removes that padding, so it would be another number)."""
    return bool(opts.packing) and opts.method != "prompt" and not opts.aux_count_padding


def load_sft(opts, *, model_dir: str, dtype, key, mesh: Mesh | None = None) -> Task:
    """Decoder + prompt/response or chat-messages data, tokenised (batched, cached on disk under
    :func:`jgoat.data.default_cache_dir`) with the tokenizer's chat template if any, packed per :func:`sft_packing`
    (train and eval: the eval metrics are sums over response tokens, the same either way); the decoder loaded
    straight onto `mesh` (default device without one)."""
    tokenizer = load_tokenizer(model_dir)
    if opts.data is None:
        raise ValueError("--task sft needs --data (a json/jsonl/csv/parquet file, a data folder or a hub name)")
    train, held_out = train_and_eval(opts)
    kw = dict(max_length=opts.max_length, prompt_column=opts.prompt_column, response_column=opts.response_column,
              messages_column=opts.messages_column, use_chat_template=opts.chat_template,
              packing=sft_packing(opts), cache_dir=data_lib.default_cache_dir())
    splits = [ArraySplit(data_lib.sft_arrays(tokenizer, ds, **kw)) for ds in (train, held_out)]
    model, params, _ = from_pretrained(model_dir, dtype=dtype, remat_policy=opts.remat, mesh=mesh)
    return Task("sft", model, params, splits[0], splits[1], (), opts.data, model_dir, tokenizer)


def load_image(opts, *, model_dir: str, dtype, key, mesh: Mesh | None = None) -> Task:
    """CLIP vision / ViT + a new linear head, loaded straight onto `mesh` (default device without one); images from
    an imagefolder or a table with image and label columns."""
    if opts.data is None:
        raise ValueError("--task image needs --data (an imagefolder directory, a table of image paths, or a hub name)")
    processor = read_preprocessor_config(model_dir)
    train, held_out = train_and_eval(opts)
    base = pathlib.Path(opts.data)
    base_dir = base.parent if base.is_file() else base
    eval_dir = base_dir if opts.eval_data is None else pathlib.Path(opts.eval_data).parent
    check = functools.partial(data_lib.checked_image_table, column=opts.image_column,
                              skip_bad_images=opts.skip_bad_images)
    train, held_out = check(train, base_dir=base_dir), check(held_out, base_dir=eval_dir)
    label_column = opts.label_column or "label"
    names = data_lib.label_names_of(train, label_column)

    def split(ds, where):
        return ImageSplit(ds, opts.image_column, data_lib.label_ids(ds, label_column, names), processor, where)

    model, params, _ = from_pretrained(model_dir, num_labels=len(names), key=key, dtype=dtype, mesh=mesh)
    return Task("image", model, params, split(train, base_dir), split(held_out, eval_dir), names, opts.data,
                model_dir)


def torch_module_name(flax_path: str, index: Sequence[int]) -> str:
    """HF torch module name of a jgoat module path: ``layer_3``/``layers_3`` → ``layer.3``/``layers.3``, and a
    scanned decoder's layer index after ``layers`` (``model/layers/self_attn/q_proj``, (3,) →
    ``model.layers.3.self_attn.q_proj``)."""
    parts: list[str] = []
    for part in flax_path.split("/"):
        name, _, number = part.rpartition("_")
        parts += [name, number] if name in ("layer", "layers") and number.isdigit() else [part]
        if part == "layers" and index:
            parts += [str(i) for i in index]
    return ".".join(parts)
