"""The binary, columnar container of the fusion service's online-state snapshot.

A file is ``MAGIC``, the header's length (u64, little-endian), a JSON header,
then raw little-endian numpy arrays, each at a 64-byte aligned offset the header
names (``"arrays": {name: {"dtype", "shape", "offset"}}``). The header also
carries what is small and irregular (format version, topic, offsets, the live
items); everything that grows with the number of users is an array, so writing
is a few big ``write`` calls and reading a few ``readinto`` calls, with no
per-value parsing. Strings are Arrow-style tables (int64 offsets + UTF-8 bytes),
converted by pyarrow in C++.

``write_file`` is the only writer and ``read_file`` the only reader of this
layout; ``UserColumns`` is the users' state in columns (built and consumed by
``online_state.UserStore``).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import pyarrow as pa

from services.common.registry import write_atomic

# Not valid JSON (nor UTF-8) in its first byte, so a reader tells the formats apart
# from 8 bytes; the newline catches text-mode mangling, as PNG's magic does.
MAGIC = b"\x89CSSNAP\n"
_ALIGN = 64
_LENGTH = struct.Struct("<Q")


class SnapshotCorrupt(ValueError):
    """A columnar snapshot that cannot be read back (truncated, inconsistent)."""


class Streamed(NamedTuple):
    """A 1-D array written chunk by chunk, so the writer never holds it whole;
    ``chunks`` makes a fresh iterator per write."""

    dtype: str
    length: int
    chunks: Callable[[], Iterable[np.ndarray]]


Section = np.ndarray | Streamed


def is_columnar(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(len(MAGIC)) == MAGIC


def _aligned(offset: int) -> int:
    return -(-offset // _ALIGN) * _ALIGN


def _layout(sections: Mapping[str, Section]) -> dict[str, dict[str, Any]]:
    specs: dict[str, dict[str, Any]] = {}
    for name, section in sections.items():
        if isinstance(section, Streamed):
            dtype, shape = np.dtype(section.dtype), (section.length,)
        else:
            dtype, shape = section.dtype, section.shape
        if dtype.hasobject:
            raise TypeError(f"section {name!r}: object arrays have no binary form")
        specs[name] = {"dtype": dtype.newbyteorder("<").str, "shape": list(shape)}
    return specs


def _write_sections(
    handle: IO[bytes], header: Mapping[str, Any], sections: Mapping[str, Section]
) -> None:
    specs = _layout(sections)
    # The offsets depend on the header's length, which depends on the offsets: lay out
    # with a generous guess, then grow the guess until the header fits before it.
    reserved = _ALIGN * 4
    while True:
        offset = _aligned(len(MAGIC) + _LENGTH.size + reserved)
        for spec in specs.values():
            spec["offset"] = offset
            size = int(np.prod(spec["shape"], dtype=np.int64)) * np.dtype(spec["dtype"]).itemsize
            offset = _aligned(offset + size)
        encoded = json.dumps({**header, "arrays": specs}, separators=(",", ":")).encode()
        if len(encoded) <= reserved:
            break
        reserved = _aligned(len(encoded))
    handle.write(MAGIC)
    handle.write(_LENGTH.pack(len(encoded)))
    handle.write(encoded)
    position = len(MAGIC) + _LENGTH.size + len(encoded)
    for name, section in sections.items():
        spec = specs[name]
        handle.write(b"\0" * (spec["offset"] - position))
        position = spec["offset"]
        dtype = np.dtype(spec["dtype"])
        chunks = section.chunks() if isinstance(section, Streamed) else (section,)
        written = 0
        for chunk in chunks:
            data = np.ascontiguousarray(chunk, dtype=dtype)
            handle.write(data.reshape(-1).view(np.uint8).data)
            written += data.nbytes
        expected = int(np.prod(spec["shape"], dtype=np.int64)) * dtype.itemsize
        if written != expected:  # a bug in the caller, not a disk problem
            raise ValueError(f"section {name!r}: {written} bytes written, {expected} declared")
        position += written


def write_file(path: Path, header: Mapping[str, Any], sections: Mapping[str, Section]) -> None:
    """Readers (a restarted service) see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda handle: _write_sections(handle, header, sections), binary=True)


def read_file(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The header (without ``"arrays"``) and each array, in its own writable buffer."""
    with path.open("rb") as handle:
        if handle.read(len(MAGIC)) != MAGIC:
            raise SnapshotCorrupt("not a columnar snapshot")
        size = os.fstat(handle.fileno()).st_size
        try:
            (length,) = _LENGTH.unpack(handle.read(_LENGTH.size))
            if length > size:
                raise SnapshotCorrupt("header longer than the file")
            header = json.loads(handle.read(length))
            specs = header.pop("arrays")
            arrays: dict[str, np.ndarray] = {}
            for name, spec in specs.items():
                dtype = np.dtype(spec["dtype"])
                if dtype.hasobject:
                    raise SnapshotCorrupt(f"section {name!r}: object dtype")
                shape = tuple(int(d) for d in spec["shape"])
                offset = int(spec["offset"])
                nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                # Checked before allocating: a corrupt shape must not ask for terabytes.
                if min(shape, default=0) < 0 or offset < 0 or offset + nbytes > size:
                    raise SnapshotCorrupt(f"section {name!r} runs past the end of the file")
                array = np.empty(shape, dtype=dtype)
                handle.seek(offset)
                if array.nbytes and handle.readinto(array.reshape(-1).view(np.uint8).data) != (
                    array.nbytes
                ):
                    raise SnapshotCorrupt(f"section {name!r} is short")
                arrays[name] = array
        except SnapshotCorrupt:
            raise
        except (struct.error, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SnapshotCorrupt(f"header: {type(exc).__name__}: {exc}") from None
    return header, arrays


# -- string tables ---------------------------------------------------------


def _string_sections(name: str, strings: Sequence[str]) -> dict[str, np.ndarray]:
    array = pa.array(strings, type=pa.large_string())
    _validity, offsets, data = array.buffers()
    count = len(array)
    if offsets is None or offsets.size < 8 * (count + 1):  # an empty table
        starts = np.zeros(count + 1, np.int64)
    else:
        starts = np.frombuffer(offsets, dtype=np.int64, count=count + 1)
    size = int(starts[-1])
    chars = np.frombuffer(data, dtype=np.uint8, count=size) if size else np.zeros(0, np.uint8)
    return {f"{name}.offsets": starts, f"{name}.data": chars}


def _strings(arrays: Mapping[str, np.ndarray], name: str) -> list[str]:
    offsets, data = arrays[f"{name}.offsets"], arrays[f"{name}.data"]
    if offsets.dtype != np.int64 or offsets.ndim != 1 or not len(offsets):
        raise SnapshotCorrupt(f"string table {name!r}: bad offsets")
    table = pa.LargeStringArray.from_buffers(
        len(offsets) - 1, pa.py_buffer(offsets), pa.py_buffer(data)
    )
    try:
        table.validate(full=True)  # offsets in range and monotonic, valid UTF-8
    except pa.ArrowInvalid as exc:
        raise SnapshotCorrupt(f"string table {name!r}: {exc}") from None
    strings: list[str] = table.to_pylist()
    return strings


def factorize(strings: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """int32 codes into a table of the distinct strings (hashing done in C++)."""
    if not strings:
        return np.zeros(0, np.int32), []
    encoded = pa.array(strings, type=pa.large_string()).dictionary_encode()
    codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    table: list[str] = encoded.dictionary.to_pylist()
    return codes, table


# -- the users' state in columns --------------------------------------------


@dataclass(frozen=True)
class UserColumns:
    """All users' state as arrays; row ``u`` of every per-user array is ``user_ids[u]``.

    Ragged per-user lists are CSR: ``*_offsets`` (n + 1, int64) bound user ``u``'s
    slice ``[offsets[u], offsets[u + 1])`` of the flat arrays."""

    user_ids: list[str]
    updated_at_ms: np.ndarray  # int64 (n)
    # attributes: codes into attr_table (keys and values share it: few distinct values)
    attr_offsets: np.ndarray
    attr_keys: np.ndarray  # int32
    attr_values: np.ndarray  # int32
    attr_table: list[str]
    # recent items, oldest first: codes into item_table
    item_offsets: np.ndarray
    item_codes: np.ndarray  # int32
    item_table: list[str]
    # ratings (most items have none): codes into item_table and their values
    rating_offsets: np.ndarray
    rating_codes: np.ndarray  # int32
    rating_values: np.ndarray  # float64 (the exact Python float)
    # interest vectors, float32, concatenated; an empty slice is "no vector"
    vector_offsets: np.ndarray
    vectors: np.ndarray | Streamed
    seen: list[str]

    def sections(self) -> dict[str, Section]:
        return {
            **_string_sections("user_ids", self.user_ids),
            "updated_at_ms": self.updated_at_ms,
            "attr_offsets": self.attr_offsets,
            "attr_keys": self.attr_keys,
            "attr_values": self.attr_values,
            **_string_sections("attr_table", self.attr_table),
            "item_offsets": self.item_offsets,
            "item_codes": self.item_codes,
            **_string_sections("item_table", self.item_table),
            "rating_offsets": self.rating_offsets,
            "rating_codes": self.rating_codes,
            "rating_values": self.rating_values,
            "vector_offsets": self.vector_offsets,
            "vectors": self.vectors,
            **_string_sections("seen", self.seen),
        }

    @classmethod
    def from_sections(cls, arrays: Mapping[str, np.ndarray]) -> UserColumns:
        """Checked, so restoring them cannot fail half-way on a corrupt file."""
        try:
            columns = cls(
                user_ids=_strings(arrays, "user_ids"),
                updated_at_ms=arrays["updated_at_ms"],
                attr_offsets=arrays["attr_offsets"],
                attr_keys=arrays["attr_keys"],
                attr_values=arrays["attr_values"],
                attr_table=_strings(arrays, "attr_table"),
                item_offsets=arrays["item_offsets"],
                item_codes=arrays["item_codes"],
                item_table=_strings(arrays, "item_table"),
                rating_offsets=arrays["rating_offsets"],
                rating_codes=arrays["rating_codes"],
                rating_values=arrays["rating_values"],
                vector_offsets=arrays["vector_offsets"],
                vectors=arrays["vectors"],
                seen=_strings(arrays, "seen"),
            )
        except KeyError as exc:
            raise SnapshotCorrupt(f"section {exc} missing") from None
        columns._check()
        return columns

    def _check(self) -> None:
        n = len(self.user_ids)
        expect = {
            "updated_at_ms": (self.updated_at_ms, np.int64, n),
            "attr_offsets": (self.attr_offsets, np.int64, n + 1),
            "attr_keys": (self.attr_keys, np.int32, None),
            "attr_values": (self.attr_values, np.int32, len(self.attr_keys)),
            "item_offsets": (self.item_offsets, np.int64, n + 1),
            "item_codes": (self.item_codes, np.int32, None),
            "rating_offsets": (self.rating_offsets, np.int64, n + 1),
            "rating_codes": (self.rating_codes, np.int32, None),
            "rating_values": (self.rating_values, np.float64, len(self.rating_codes)),
            "vector_offsets": (self.vector_offsets, np.int64, n + 1),
        }
        if isinstance(self.vectors, np.ndarray):
            expect["vectors"] = (self.vectors, np.float32, None)
        for name, (array, dtype, length) in expect.items():
            if array.dtype != dtype or array.ndim != 1:
                raise SnapshotCorrupt(f"{name}: {array.dtype}[{array.ndim}-d], not {dtype}")
            if length is not None and len(array) != length:
                raise SnapshotCorrupt(f"{name}: {len(array)} values, not {length}")
        for name, offsets, flat in (
            ("attr", self.attr_offsets, self.attr_keys),
            ("item", self.item_offsets, self.item_codes),
            ("rating", self.rating_offsets, self.rating_codes),
            ("vector", self.vector_offsets, self.vectors),
        ):
            total = flat.length if isinstance(flat, Streamed) else len(flat)
            if offsets[0] != 0 or offsets[-1] != total or np.any(np.diff(offsets) < 0):
                raise SnapshotCorrupt(f"{name}_offsets do not partition {total} values")
        for name, codes, table in (
            ("attr_keys", self.attr_keys, self.attr_table),
            ("attr_values", self.attr_values, self.attr_table),
            ("item_codes", self.item_codes, self.item_table),
            ("rating_codes", self.rating_codes, self.item_table),
        ):
            if len(codes) and (codes.min() < 0 or codes.max() >= len(table)):
                raise SnapshotCorrupt(f"{name}: a code outside its table")
