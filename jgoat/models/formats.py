"""Checkpoint file formats, read and written with numpy only (no torch, no memory maps).

* ``model.safetensors`` (and shards): the JSON header is parsed here and each tensor is read with one positioned
  read into a fresh array, so the only host memory a loader holds is the tensor it is converting (a memory map
  would leave every page it touched resident until the file is closed).
* ``pytorch_model.bin`` (and shards): torch's zip serialisation (``<name>/data.pkl`` + ``<name>/data/<storage
  key>``), unpickled with an allow-list: tensors (``torch._utils._rebuild_tensor_v2``), typed storages
  (``torch.FloatStorage``, ``torch.BFloat16Storage``, ...) and ``collections.OrderedDict``. Any other global in
  the pickle raises :class:`UnsafeCheckpointError`; no pickled code is ever executed. Tensor data is read lazily,
  storage slice by storage slice, honouring offsets and strides.
* ``flax_model.msgpack`` (and shards): legacy ``transformers<5`` Flax checkpoints. Their parameter paths follow
  the torch module names, so they are renamed to torch state-dict keys and torch layout exactly as transformers'
  own ``convert_flax_state_dict_to_pt`` did (``kernel`` -> ``weight`` transposed, 4-D conv kernels
  ``[H, W, in, out]`` -> ``[out, in, H, W]``, ``scale`` / ``embedding`` -> ``weight``, path joined with ``.``);
  the per-family key maps of :mod:`jgoat.models` then apply unchanged.

:func:`checkpoint_files` finds the weights of a folder (safetensors first, then torch, then Flax; an index file
before a single file) and :class:`TensorReader` reads them one tensor at a time, or a safetensors tensor in row
ranges (:meth:`TensorReader.row_chunks`: what a loader filling only some devices' blocks of a param needs).
"""

from __future__ import annotations

import collections
import json
import math
import os
import pathlib
import pickle
import re
import struct
import zipfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from jgoat.errors import JgoatError

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TORCH_WEIGHTS_NAME = "pytorch_model.bin"
TORCH_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
FLAX_WEIGHTS_NAME = "flax_model.msgpack"
FLAX_WEIGHTS_INDEX_NAME = "flax_model.msgpack.index.json"

# safetensors dtype tags <-> numpy dtypes (ml_dtypes provides bfloat16 and float8 for numpy).
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_SAFETENSORS_TAGS = {dtype: tag for tag, dtype in SAFETENSORS_DTYPES.items()}

# torch's typed storage classes (the globals a state-dict pickle names) -> numpy dtype of their elements.
TORCH_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
}


def empty_aligned(shape: tuple[int, ...], dtype: Any, alignment: int = 64) -> np.ndarray:
    """``np.empty`` whose data starts on an ``alignment``-byte boundary.

    ``jax.device_put`` on the CPU backend adopts such a buffer without copying it (an unaligned one is copied), so
    a loader that fills a host buffer and hands it to jax holds one copy of the tensor, not two.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def transpose_into(dst: np.ndarray, src: np.ndarray, tile: int = 256) -> None:
    """``dst[...] = src.T`` (cast to ``dst``'s dtype), tile by tile for 2-D arrays.

    numpy's strided copy of a large transposed matrix misses the cache on every element; tiles of 256 x 256 make
    the same copy ~3x faster (a Llama loader transposes every linear weight of the checkpoint).
    """
    if src.ndim != 2:
        dst[...] = src.T
        return
    rows, cols = src.shape
    for r in range(0, rows, tile):
        for c in range(0, cols, tile):
            dst[c : c + tile, r : r + tile] = src[r : r + tile, c : c + tile].T


class CheckpointFormatError(JgoatError):
    """A checkpoint file that is not what its format requires; the one-line message names the file (and tensor)."""


def _read_exact(f, offset: int, out: np.ndarray) -> None:
    """Fills ``out`` (C-contiguous) with the bytes of ``f`` at ``offset``."""
    view = memoryview(out.reshape(-1).view(np.uint8))
    f.seek(offset)
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise CheckpointFormatError(f"{getattr(f, 'name', f)}: unexpected end of file at byte {offset + done}")
        done += n


class _Forward:
    """A compressed zip member's stream for :func:`_read_exact`: a forward seek inflates and drops 1 MiB at a time
    (``ZipExtFile.seek`` holds up to 16 MiB per step); a backward one rewinds."""

    def __init__(self, stream):
        self._stream = stream
        self.name = getattr(stream, "name", stream)

    def seek(self, offset: int) -> None:
        if offset < self._stream.tell():
            self._stream.seek(offset)
        while self._stream.tell() < offset:
            if not self._stream.read(min(offset - self._stream.tell(), 1 << 20)):
                return  # past the end: the read that follows reports it

    def readinto(self, view) -> int:
        return self._stream.readinto(view)


class _Closable:
    """Context-manager support for the file readers below (``with SafetensorsFile(p) as f: ...``)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------- safetensors


# The reference implementation's cap on the JSON header (safetensors' MAX_HEADER_SIZE): a length field above it is
# refused before anything is allocated.
SAFETENSORS_MAX_HEADER = 100_000_000


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        duplicate = next(k for k, n in collections.Counter(k for k, _ in pairs).items() if n > 1)
        raise ValueError(f"duplicate key {duplicate!r}")
    return out


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_safetensors_header(path: pathlib.Path, size: int, prefix: bytes, read: Callable[[int], bytes]):
    """(entries, metadata, data start) of a safetensors file, validated as the format requires.

    The format (and the reference reader, which refuses anything else): an 8-byte little-endian header length
    N; N bytes of UTF-8 JSON, an object; ``__metadata__`` (optional) maps str to str; every other key is a tensor
    {``dtype``: a known tag, ``shape``: non-negative ints, ``data_offsets``: [begin, end]}, offsets relative to the
    byte after the header; sorted by begin, the spans are contiguous from 0 (no gap, no overlap) and the last ends
    at the end of the file; end - begin = prod(shape) x dtype size. One rule more than the reference reader: a
    key may occur once (it keeps the last of duplicates, whose other spans then hold unread bytes).

    Args:
      path: the file (named in errors).
      size: its size in bytes.
      prefix: its first 8 bytes.
      read: reads the next N bytes (the header).

    Raises:
      CheckpointFormatError: the first rule broken, naming the file and the tensor.
    """
    if size < 8 or len(prefix) < 8:
        raise CheckpointFormatError(f"{path}: not a safetensors file ({size} bytes; the format starts with an "
                                    "8-byte header length)")
    (n,) = struct.unpack("<Q", prefix)
    if n > min(size - 8, SAFETENSORS_MAX_HEADER):
        raise CheckpointFormatError(f"{path}: not a safetensors file (header length {n} > file size {size}"
                                    f"{' or the format cap' if n > SAFETENSORS_MAX_HEADER else ''})")
    raw = read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointFormatError(f"{path}: the safetensors header is not valid JSON "
                                    f"({(str(err).splitlines() or ['?'])[0]})") from None
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{path}: the safetensors header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointFormatError(f"{path}: __metadata__ must map strings to strings")
    spans = []
    for key, entry in header.items():
        where = f"{path}: tensor {key!r}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise CheckpointFormatError(f"{where}: the entry must hold dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointFormatError(f"{where}: unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_natural(d) for d in shape):
            raise CheckpointFormatError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_natural(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise CheckpointFormatError(f"{where}: data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
        nbytes = SAFETENSORS_DTYPES[dtype].itemsize * math.prod(shape)
        if offsets[1] - offsets[0] != nbytes:
            raise CheckpointFormatError(f"{where}: data_offsets span {offsets[1] - offsets[0]} bytes, but {dtype} "
                                        f"x {shape} needs {nbytes}")
        spans.append((offsets[0], offsets[1], key))
    position, data_size = 0, size - 8 - n
    for begin, end, key in sorted(spans):
        if begin != position:
            problem = "overlaps the tensor before it" if begin < position else f"leaves a gap at byte {position}"
            raise CheckpointFormatError(f"{path}: tensor {key!r} (data_offsets [{begin}, {end}]) {problem}; the "
                                        "spans must be contiguous from 0")
        position = end
    if position != data_size:
        raise CheckpointFormatError(f"{path}: the tensors span {position} bytes but the data region holds "
                                    f"{data_size}{' (truncated file?)' if position > data_size else ''}")
    return header, metadata, 8 + n


class SafetensorsFile(_Closable):
    """One safetensors file: the header is parsed and validated once (:func:`parse_safetensors_header`); tensors
    are read with positioned reads (no memory map)."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self._f = open(self.path, "rb")  # noqa: SIM115  (kept open for the reader's lifetime)
        try:
            size = os.fstat(self._f.fileno()).st_size
            header, self.metadata, self._data_start = parse_safetensors_header(
                self.path, size, self._f.read(8), self._f.read)
        except BaseException:
            self._f.close()
            raise
        self._entries: dict[str, dict[str, Any]] = header

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def dtype(self, key: str) -> np.dtype:
        return SAFETENSORS_DTYPES[self._entries[key]["dtype"]]

    def read(self, key: str) -> np.ndarray:
        out = np.empty(self.shape(key), self.dtype(key))
        _read_exact(self._f, self._data_start + self._entries[key]["data_offsets"][0], out)
        return out

    def read_rows(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the tensor's first dim (the whole of a 0-d tensor), one positioned read of just
        those bytes."""
        shape = self.shape(key)
        if not shape:
            return self.read(key)
        out = np.empty((stop - start, *shape[1:]), self.dtype(key))
        row_bytes = math.prod(shape[1:]) * out.dtype.itemsize
        _read_exact(self._f, self._data_start + self._entries[key]["data_offsets"][0] + start * row_bytes, out)
        return out

    def close(self) -> None:
        self._f.close()


def write_safetensors(
    path: str | os.PathLike,
    tensors: Iterable[tuple[str, tuple[int, ...], Any, Callable[[], np.ndarray]]],
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Streams tensors into a safetensors file, producing (and holding) one tensor at a time.

    Args:
      path: file to write.
      tensors: ``(name, shape, dtype, produce)``; ``produce()`` returns the array (cast to ``dtype`` here).
      metadata: the header's ``__metadata__`` (e.g. ``{"format": "pt"}``).

    Returns:
      Bytes of tensor data written.
    """
    tensors = list(tensors)
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, shape, dtype, _ in tensors:
        dtype = np.dtype(dtype)
        if dtype not in _SAFETENSORS_TAGS:
            raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        span = [offset, offset + nbytes]
        header[name] = {"dtype": _SAFETENSORS_TAGS[dtype], "shape": list(shape), "data_offsets": span}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype, produce in tensors:
            array = np.asarray(produce(), dtype=np.dtype(dtype))
            if not array.flags.c_contiguous:  # (np.ascontiguousarray would turn a 0-d tensor into shape (1,))
                array = array.copy(order="C")
            if array.shape != tuple(shape):
                raise ValueError(f"tensor {name!r}: produced shape {array.shape}, declared {tuple(shape)}")
            f.write(memoryview(array.reshape(-1).view(np.uint8)))
    return offset


# ---------------------------------------------------------------------------------------------- torch zip pickle


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A ``pytorch_model.bin`` whose pickle needs something other than tensors, storages and dicts."""


class _StorageType(NamedTuple):
    name: str
    dtype: np.dtype


class _Storage(NamedTuple):
    key: str
    dtype: np.dtype
    numel: int


class TorchTensorRef(NamedTuple):
    """A tensor of a torch pickle: where its elements live, not the elements (those are read on demand)."""

    storage: _Storage
    offset: int  # in elements
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # in elements


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Stand-in for ``torch._utils._rebuild_tensor_v2``: records the view, reads nothing."""
    del requires_grad, backward_hooks, metadata
    if not isinstance(storage, _Storage):
        raise UnsafeCheckpointError(f"tensor rebuilt from {type(storage).__name__}, not from a storage")
    return TorchTensorRef(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    """Stand-in for ``torch._utils._rebuild_parameter`` (an ``nn.Parameter`` is its tensor)."""
    del requires_grad, backward_hooks
    if not isinstance(data, TorchTensorRef):
        raise UnsafeCheckpointError(f"parameter rebuilt from {type(data).__name__}, not from a tensor")
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): _StorageType(name, dtype) for name, dtype in TORCH_STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the allow-listed globals; storages come from ``persistent_load`` as descriptors."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[module, name]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self._source}: refusing to load global '{module}.{name}' from the pickle; only torch tensors, "
                "typed storages and OrderedDict are allowed (anything else could run arbitrary code). Convert the "
                "checkpoint to safetensors with torch if you trust it."
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"{self._source}: unsupported persistent id {pid!r} (expected a storage)")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise UnsafeCheckpointError(f"{self._source}: storage of unsupported type {storage_type!r}")
        return _Storage(str(key), storage_type.dtype, int(numel))


# Elements (1 Mi) a torch view may read beyond twice its own size in one go (see TorchBinFile._gather).
_GATHER_SLACK = 1 << 20


class TorchBinFile(_Closable):
    """One ``torch.save`` zip file of a state dict, read without torch.

    The pickle is parsed at construction (no tensor data is read); :meth:`read` reads the bytes a tensor spans
    in its storage and applies its offset, shape and strides.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        if not zipfile.is_zipfile(self.path):
            raise CheckpointFormatError(
                f"{self.path} ({self.path.stat().st_size} bytes) is not a zip archive: truncated, or a legacy "
                "(torch<1.6) serialisation, which is not supported; re-save it with torch.save or as safetensors"
            )
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as err:
            raise CheckpointFormatError(f"{self.path}: corrupt zip archive ({err})") from None
        try:
            self.tensors: dict[str, TorchTensorRef] = self._parse()
        except BaseException:
            self._zip.close()
            raise
        self._file = open(self.path, "rb")  # noqa: SIM115  (positioned reads of uncompressed members)
        self._data_offsets: dict[str, int] = {}

    def _parse(self) -> dict[str, TorchTensorRef]:
        """The state dict's tensor descriptors (the pickle, unpickled with the allow-list)."""
        pickles = [n for n in self._zip.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointFormatError(f"{self.path}: expected one '<name>/data.pkl' in the archive, found {pickles}")
        self._prefix = pickles[0][: -len("data.pkl")]
        byteorder = self._prefix + "byteorder"
        if byteorder in self._zip.namelist() and self._zip.read(byteorder).decode().strip() != "little":
            raise CheckpointFormatError(f"{self.path}: big-endian torch checkpoints are not supported")
        try:
            with self._zip.open(pickles[0]) as f:
                state = _RestrictedUnpickler(f, str(self.path)).load()
        except UnsafeCheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError, KeyError,
                zipfile.BadZipFile) as err:
            raise CheckpointFormatError(f"{self.path}: corrupt state-dict pickle ({type(err).__name__}: "
                                        f"{(str(err).splitlines() or [''])[0]})") from None
        if not isinstance(state, Mapping):
            raise CheckpointFormatError(f"{self.path}: the pickle holds a {type(state).__name__}, not a state dict")
        bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, TorchTensorRef)]
        if bad:
            raise CheckpointFormatError(f"{self.path}: entries that are not tensors: {bad[:5]}")
        return dict(state)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.tensors[key].shape

    def dtype(self, key: str) -> np.dtype:
        return self.tensors[key].storage.dtype

    def _member_offset(self, info: zipfile.ZipInfo) -> int:
        """File offset of an uncompressed member's bytes (after its local header)."""
        if info.filename not in self._data_offsets:
            self._file.seek(info.header_offset)
            local = self._file.read(30)
            if local[:4] != b"PK\x03\x04":
                raise CheckpointFormatError(f"{self.path}: bad local header for {info.filename}")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            self._data_offsets[info.filename] = info.header_offset + 30 + name_len + extra_len
        return self._data_offsets[info.filename]

    def read(self, key: str) -> np.ndarray:
        ref = self.tensors[key]
        dtype, itemsize = ref.storage.dtype, ref.storage.dtype.itemsize
        if any(s < 0 for s in ref.strides) or ref.offset < 0:
            raise CheckpointFormatError(f"{self.path}: tensor {key!r} has negative strides or offset")
        if 0 in ref.shape:
            return np.empty(ref.shape, dtype)
        last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.strides, strict=True))
        if last >= ref.storage.numel:
            raise CheckpointFormatError(f"{self.path}: tensor {key!r} reads past the end of storage {ref.storage.key}")
        member = f"{self._prefix}data/{ref.storage.key}"
        try:
            info = self._zip.getinfo(member)
        except KeyError:
            raise CheckpointFormatError(f"{self.path}: storage {member!r} of tensor {key!r} is missing") from None
        if info.file_size != ref.storage.numel * itemsize:
            raise CheckpointFormatError(f"{self.path}: storage {member!r} has {info.file_size} bytes, expected "
                             f"{ref.storage.numel} x {itemsize}")
        if info.compress_type == zipfile.ZIP_STORED:
            base = self._member_offset(info)
            return self._gather(ref, lambda begin, out: _read_exact(self._file, base + begin * itemsize, out))
        # torch writes uncompressed members; a re-zipped one is inflated as a stream, up to the bytes a view needs
        with self._zip.open(info) as stream:
            return self._gather(ref, lambda begin, out: _read_exact(_Forward(stream), begin * itemsize, out))

    def _gather(self, ref: TorchTensorRef, read_span: Callable[[int, np.ndarray], None]) -> np.ndarray:
        """The elements of view `ref`, reading storage spans with ``read_span(first element, out)``.

        What a view may pull into memory is capped at twice its own size plus ``_GATHER_SLACK`` elements: a
        contiguous or transposed view spans exactly its elements and is read in one go; a view whose span is
        larger (strided slices, a few elements of a huge storage) is read along its first axis, sub-view by
        sub-view, down to single elements.
        """
        dtype, itemsize = ref.storage.dtype, ref.storage.dtype.itemsize
        numel = int(np.prod(ref.shape, dtype=np.int64))
        count = 1 + sum((n - 1) * s for n, s in zip(ref.shape, ref.strides, strict=True))
        if count > 2 * numel + _GATHER_SLACK:
            out = np.empty(ref.shape, dtype)
            for i in range(ref.shape[0]):
                out[i] = self._gather(TorchTensorRef(ref.storage, ref.offset + i * ref.strides[0], ref.shape[1:],
                                                     ref.strides[1:]), read_span)
            return out
        span = np.empty(count, dtype)
        read_span(ref.offset, span)
        if not ref.shape:  # as_strided treats shape () as "keep the input's shape"
            return span.reshape(())
        view = np.lib.stride_tricks.as_strided(
            span, shape=ref.shape, strides=tuple(s * itemsize for s in ref.strides), writeable=False
        )
        return np.ascontiguousarray(view)

    def close(self) -> None:
        self._file.close()
        self._zip.close()


def load_torch_bin(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a ``torch.save`` state dict (``pytorch_model.bin``) as numpy arrays, without torch.

    Args:
      path: the ``.bin`` file (torch>=1.6 zip serialisation).

    Returns:
      ``{state-dict key: array}`` in torch layout (bf16 as ``ml_dtypes.bfloat16``); tensors that share a
      storage (tied weights, views) come back as independent arrays.

    Raises:
      UnsafeCheckpointError: the pickle names a global outside the allow-list (nothing is executed).
      ValueError: not a zip-format torch file, or a malformed one.

    Example::

      state = load_torch_bin("pytorch_model.bin")
      w_OxI = state["bert.encoder.layer.0.attention.self.query.weight"]
    """
    with TorchBinFile(path) as f:
        return {k: f.read(k) for k in f.keys()}


# ------------------------------------------------------------------------------------------------ flax msgpack


def flax_to_torch_key(flax_path: tuple[str, ...], ndim: int | None = None) -> tuple[str, tuple[int, ...] | None]:
    """HF-Flax parameter path -> (torch state-dict key, axis permutation to torch layout or None).

    Follows transformers 4.x ``convert_flax_state_dict_to_pt``: ``kernel`` becomes ``weight`` (4-D conv kernels
    permuted ``(3, 2, 0, 1)``, others transposed), ``scale`` and ``embedding`` become ``weight``, anything else
    (``bias``, Llama's RMSNorm ``weight``, CLIP's ``class_embedding``) keeps its name; the path joins with ``.``.

    Example::

      flax_to_torch_key(("bert", "encoder", "layer", "0", "attention", "self", "query", "kernel"), 2)
      # -> ("bert.encoder.layer.0.attention.self.query.weight", (1, 0))
    """
    *modules, leaf = flax_path
    perm = None
    if leaf == "kernel":
        leaf = "weight"
        if ndim is not None:
            perm = (3, 2, 0, 1) if ndim == 4 else tuple(range(ndim))[::-1]
    elif leaf in ("scale", "embedding"):
        leaf = "weight"
    return ".".join([*modules, leaf]), perm


def _flat_msgpack(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterable[tuple[tuple[str, ...], Any]]:
    """Leaves of a restored msgpack tree; keys of sharded files are already ``/``-joined paths."""
    for k, v in tree.items():
        path = (*prefix, *str(k).split("/"))
        if isinstance(v, Mapping) and "__msgpack_chunked_array__" not in v:
            yield from _flat_msgpack(v, path)
        else:
            yield path, v


def _strip_collection(tree: Mapping[str, Any], source: str) -> Mapping[str, Any]:
    if set(tree) == {"params"}:  # a whole variables dict
        return tree["params"]
    if "batch_stats" in tree:
        raise ValueError(f"{source}: Flax checkpoints with batch statistics are not supported")
    return tree


class FlaxMsgpackFile(_Closable):
    """One HF-Flax ``flax_model.msgpack`` (or shard), restored with ``flax.serialization.msgpack_restore`` and
    exposed under torch state-dict keys, in torch layout (transposed views; nothing is copied)."""

    def __init__(self, path: str | os.PathLike):
        from flax.serialization import msgpack_restore

        self.path = pathlib.Path(path)
        tree = _strip_collection(msgpack_restore(self.path.read_bytes()), str(self.path))
        self.tensors: dict[str, np.ndarray] = {}
        self.flax_keys: dict[str, str] = {}
        for fpath, value in _flat_msgpack(tree):
            array = np.asarray(value)
            key, perm = flax_to_torch_key(fpath, array.ndim)
            if key in self.tensors:
                raise CheckpointFormatError(f"{self.path}: Flax params {self.flax_keys[key]!r} and {'/'.join(fpath)!r} "
                                 f"both map to {key!r}")
            self.tensors[key] = array if perm is None else array.transpose(perm)
            self.flax_keys[key] = "/".join(fpath)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def read(self, key: str) -> np.ndarray:
        return self.tensors[key]

    def close(self) -> None:
        self.tensors.clear()


def _msgpack_keys(path: pathlib.Path) -> list[str]:
    """Torch keys of a msgpack file without building its arrays (array payloads are skipped)."""
    import msgpack

    def skip_arrays(code, data):
        return None

    tree = msgpack.unpackb(path.read_bytes(), ext_hook=skip_arrays, raw=False)
    tree = _strip_collection(tree, str(path))
    return [flax_to_torch_key(p)[0] for p, _ in _flat_msgpack(tree)]


def load_flax_msgpack(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a ``transformers<5`` Flax checkpoint (``flax_model.msgpack``) under torch keys, in torch layout.

    Args:
      path: the msgpack file.

    Returns:
      ``{torch state-dict key: array}`` (see :func:`flax_to_torch_key`).

    Example::

      state = load_flax_msgpack("flax_model.msgpack")
      w_OxI = state["model.layers.0.self_attn.q_proj.weight"]  # from model/layers/0/self_attn/q_proj/kernel
    """
    return dict(FlaxMsgpackFile(path).tensors)


# ------------------------------------------------------------------------------------------------ folder level


def _open(path: pathlib.Path):
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    if path.suffix == ".bin":
        return TorchBinFile(path)
    if path.suffix == ".msgpack":
        return FlaxMsgpackFile(path)
    raise ValueError(f"{path}: unknown checkpoint file type (expected .safetensors, .bin or .msgpack)")


def _flax_index_key(key: str) -> str:
    return flax_to_torch_key(tuple(key.split("/")))[0]


def _keys_of(cls) -> Callable[[pathlib.Path], list[str]]:
    def keys(path: pathlib.Path) -> list[str]:
        with cls(path) as f:
            return f.keys()

    return keys


def _weight_map(index: pathlib.Path) -> dict[str, pathlib.Path]:
    """key -> shard file of a sharded checkpoint's index; every shard a file of the index's folder."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointFormatError(f"{index}: not a valid JSON index ({(str(err).splitlines() or [''])[0]})") from None
    except (KeyError, TypeError):
        raise CheckpointFormatError(f"{index}: no 'weight_map' object") from None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise CheckpointFormatError(f"{index}: 'weight_map' must map tensor names to shard file names")
    shards = {}
    for key, name in weight_map.items():
        if pathlib.PurePath(name).name != name or name in ("", ".", ".."):
            raise CheckpointFormatError(f"{index}: tensor {key!r} names shard {name!r}, not a file of its folder")
        shards[key] = index.parent / name
        if not shards[key].is_file():
            raise CheckpointFormatError(f"{index}: shard {name!r} (of tensor {key!r}) is missing")
    return shards


def checkpoint_files(folder: str | os.PathLike) -> dict[str, pathlib.Path]:
    """Checkpoint key (torch naming) -> file holding it, for the weights of a HF checkpoint folder.

    Looks, in this order, for ``model.safetensors.index.json``, ``model.safetensors``,
    ``pytorch_model.bin.index.json``, ``pytorch_model.bin``, ``flax_model.msgpack.index.json``,
    ``flax_model.msgpack``; the first one present is used.

    Raises:
      FileNotFoundError: none of them is present.
    """
    folder = pathlib.Path(folder)
    formats = (
        (SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, _keys_of(SafetensorsFile), None),
        (TORCH_WEIGHTS_INDEX_NAME, TORCH_WEIGHTS_NAME, _keys_of(TorchBinFile), None),
        (FLAX_WEIGHTS_INDEX_NAME, FLAX_WEIGHTS_NAME, _msgpack_keys, _flax_index_key),
    )
    for index_name, single_name, list_keys, rename in formats:
        index = folder / index_name
        if index.is_file():
            return {(rename(k) if rename else k): f for k, f in _weight_map(index).items()}
        single = folder / single_name
        if single.is_file():
            return dict.fromkeys(list_keys(single), single)
    names = ", ".join(n for f in formats for n in f[:2])
    raise FileNotFoundError(f"No checkpoint weights in {folder}: looked for {names}")


class TensorReader(_Closable):
    """Reads one tensor at a time as numpy from the files :func:`checkpoint_files` returns, keeping one open
    handle per file (plain file reads, no memory maps) until :meth:`close` or garbage collection."""

    def __init__(self):
        self._files: dict[pathlib.Path, Any] = {}

    def _file(self, path: pathlib.Path):
        path = pathlib.Path(path)
        if path not in self._files:
            self._files[path] = _open(path)
        return self._files[path]

    def shape(self, file: pathlib.Path, key: str) -> tuple[int, ...]:
        return tuple(self._file(file).shape(key))

    def read(self, file: pathlib.Path, key: str) -> np.ndarray:
        return self._file(file).read(key)

    def row_chunks(self, file: pathlib.Path, key: str, start: int, stop: int,
                   max_bytes: int) -> Iterable[tuple[int, np.ndarray]]:
        """Rows ``start:stop`` of the tensor's first dim as ``(first row, rows)`` pieces of at most ``max_bytes``
        (at least one row each) from safetensors; other formats yield the range as one piece (after reading the
        whole tensor). A 0-d tensor is one piece, ``(0, tensor)``."""
        f = self._file(file)
        if not isinstance(f, SafetensorsFile):
            array = f.read(key)
            yield start, array if array.ndim == 0 else array[start:stop]
            return
        shape = f.shape(key)
        if not shape:
            yield 0, f.read(key)
            return
        rows = max(1, max_bytes // max(1, math.prod(shape[1:]) * f.dtype(key).itemsize))
        for first in range(start, stop, rows):
            yield first, f.read_rows(key, first, min(first + rows, stop))

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __del__(self):  # the loaders drop their reader when done: release the file handles then
        self.close()


# ------------------------------------------------------------------------------------------- config vs checkpoint

# config.json sizes that must be positive integers when present (at the top level or in a vision/text sub-config).
CONFIG_SIZE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                      "intermediate_size", "vocab_size", "max_position_embeddings", "head_dim", "image_size",
                      "patch_size", "num_channels", "num_labels")
# sub-config -> the checkpoint-key component its tensors live under (CLIP's two towers).
_TOWERS = {"vision_config": "vision_model", "text_config": "text_model"}
_LAYER_INDEX = re.compile(r"^(.*?\blayers?)\.(\d+)\.")
# embeddings whose shape holds the hidden size: tokens [vocab, hidden], patches [hidden, C, p, p]
_HIDDEN_KEYS = re.compile(r"(embed_tokens|word_embeddings|patch_embedding|patch_embeddings\.projection)\.weight$")


def check_config_sizes(config: Mapping[str, Any], source: str) -> None:
    """Every size of :data:`CONFIG_SIZE_FIELDS` present in `config` (and its vision/text sub-configs) is a positive
    integer; else CheckpointFormatError naming the field."""
    for section, values in (("", config), *((f"{k}.", config[k]) for k in _TOWERS if isinstance(config.get(k), dict))):
        for field in CONFIG_SIZE_FIELDS:
            value = values.get(field)
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise CheckpointFormatError(f"{source}: {section}{field} must be a positive integer, got {value!r}")


def check_config_against_checkpoint(config: Mapping[str, Any], folder: str | os.PathLike,
                                    files: Mapping[str, pathlib.Path] | None = None) -> None:
    """Refuses a ``config.json`` that cannot describe the checkpoint beside it, before any model is built.

    Checks (reading the checkpoint's key names and at most one tensor header per tower, no tensor data): sizes are
    positive integers (:func:`check_config_sizes`); the config's ``num_hidden_layers`` layers all exist in the
    checkpoint (layer indices ``...layers.<i>.`` / ``...layer.<i>.`` 0 .. n-1; a config with fewer layers than the
    checkpoint is allowed, as transformers loads the first n); ``hidden_size`` equals the hidden dimension of the
    token or patch embedding. CLIP's ``vision_config`` / ``text_config`` are checked against the
    ``vision_model.`` / ``text_model.`` keys.

    Args:
      config: the parsed ``config.json``.
      folder: the checkpoint folder (named in errors).
      files: :func:`checkpoint_files` of the folder if already listed (else listed here; none: sizes only).

    Raises:
      CheckpointFormatError: the first disagreement, naming the field, the config value and the checkpoint's.
    """
    source = str(pathlib.Path(folder) / "config.json")
    check_config_sizes(config, source)
    if files is None:
        try:
            files = checkpoint_files(folder)
        except FileNotFoundError:
            return
    towers = [(f"{k}.", config[k], lambda key, t=t: f"{t}." in f".{key}") for k, t in _TOWERS.items()
              if isinstance(config.get(k), dict)] or [("", config, lambda key: True)]
    reader = TensorReader()
    try:
        for section, values, owns in towers:
            keys = [k for k in files if owns(k)]
            layers = values.get("num_hidden_layers")
            indices: dict[str, set[int]] = collections.defaultdict(set)
            for key in keys:
                match = _LAYER_INDEX.match(key)
                if match:
                    indices[match.group(1)].add(int(match.group(2)))
            if layers is not None and indices:
                stack, present = max(indices.items(), key=lambda item: len(item[1]))
                missing = sorted(set(range(layers)) - present)
                if missing:
                    raise CheckpointFormatError(
                        f"{source}: {section}num_hidden_layers is {layers} but the checkpoint's {stack} has "
                        f"{len(present)} layer(s) (indices {min(present)}..{max(present)}); first missing: "
                        f"{stack}.{missing[0]}")
            hidden = values.get("hidden_size")
            embedding = next((k for k in keys if _HIDDEN_KEYS.search(k)), None)
            if hidden is not None and embedding is not None:
                shape = reader.shape(files[embedding], embedding)
                axis = -1 if "patch" not in embedding else 0  # tokens: [vocab, hidden]; patches: [hidden, C, p, p]
                if len(shape) < 2 or shape[axis] != hidden:
                    raise CheckpointFormatError(f"{source}: {section}hidden_size is {hidden} but the checkpoint's "
                                                f"{embedding} has shape {list(shape)}")
    finally:
        reader.close()
