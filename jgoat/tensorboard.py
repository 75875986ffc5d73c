"""TensorBoard scalar event files without TensorFlow: TFRecord framing + the few ``Event`` protobuf fields needed.

An event file is a sequence of records ``len (u64 LE) | masked crc32c(len) | data | masked crc32c(data)``; each
``data`` is an ``Event`` message (wall_time = 1: double, step = 2: int64, file_version = 3: string, summary = 5:
``Summary{value = 1: Value{tag = 1: string, simple_value = 2: float}}``). TensorBoard's own reader loads these files.
"""

from __future__ import annotations

import functools
import os
import pathlib
import socket
import struct
import time
from collections.abc import Iterable, Mapping


@functools.cache
def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord uses."""
    table, crc = _crc32c_table(), 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits, value = value & 0x7F, value >> 7
        out.append(bits | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire_type) + payload


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _field(number, 2, _varint(len(payload)) + payload)


def event(wall_time: float, step: int, *, scalars: Mapping[str, float] | None = None,
          file_version: str | None = None) -> bytes:
    """One serialised ``Event``: a file-version header or scalar summaries at `step`."""
    out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if scalars:
        values = b"".join(_bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", value)))
                          for tag, value in scalars.items())
        out += _bytes_field(5, values)
    return out


def record(data: bytes) -> bytes:
    """TFRecord framing of one serialised message."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


def write_scalars(log_dir: str | os.PathLike, rows: Iterable[Mapping[str, float]], *,
                  wall_time: float | None = None) -> pathlib.Path:
    """Write one event file under `log_dir` with every numeric entry of each row (``row["step"]`` is the step).

    Returns:
      The file written (``events.out.tfevents.<time>.<host>``, the name TensorBoard looks for).
    """
    now = time.time() if wall_time is None else wall_time
    log_dir = pathlib.Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"events.out.tfevents.{int(now)}.{socket.gethostname()}"
    chunks = [record(event(now, 0, file_version="brain.Event:2"))]
    for row in rows:
        scalars = {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, int | float)}
        chunks.append(record(event(now, int(row["step"]), scalars=scalars)))
    path.write_bytes(b"".join(chunks))
    return path
