"""Megatron-LM compatible ``MMapIndexedDataset`` shards: a streaming writer, a zero-copy reader, a merger.

A shard is a pair of files sharing a prefix:

* ``{prefix}.bin``: the raw token ids, one dtype, all sequences back to back.
* ``{prefix}.idx``: 9-byte magic ``MMIDIDX\\x00\\x00``, ``<Q`` version 1, ``<B`` dtype code,
  ``<Q`` sequence count S, ``<Q`` document count D (= documents + 1), then ``int32[S]`` sequence
  lengths (tokens), ``int64[S]`` byte offsets of each sequence in ``.bin``, ``int64[D]`` document
  boundaries in sequences (0 first, S last).

The writer produces files byte-identical to Megatron-LM's ``IndexedDatasetBuilder`` for the same
calls, keeps memory constant (lengths and boundaries are buffered in fixed-size numpy chunks and
spilled to temp side files) and only ever exposes complete pairs under the final names.
"""

from __future__ import annotations

import glob
import mmap
import os
import shutil
import socket
import struct
import uuid
from collections.abc import Iterable, Sequence
from types import TracebackType

import numpy as np

__all__ = [
    "DTYPE_CODES",
    "INDEX_HEADER",
    "IndexedDataset",
    "IndexedDatasetError",
    "IndexedDatasetWriter",
    "data_file_path",
    "dtype_for_vocab",
    "index_file_path",
    "merge_indexed_datasets",
    "remove_stale_temps",
]


class IndexedDatasetError(ValueError):
    """A shard cannot be written or read: bad token ids, wrong dtype, missing/corrupt files."""


INDEX_HEADER = b"MMIDIDX\x00\x00"
_VERSION = 1
_HEADER_SIZE = len(INDEX_HEADER) + 8 + 1 + 8 + 8  # 34 bytes

DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_CODE_OF: dict[np.dtype, int] = {dt: code for code, dt in DTYPE_CODES.items()}

_CHUNK = 1 << 16  # entries buffered per side array before spilling to disk
_COPY_CHUNK = 1 << 22  # entries per chunk when streaming index arrays
_TEMP_KINDS = ("bin", "idx", "lengths", "docs")


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """Token dtype for a vocabulary of ``vocab_size`` ids: uint16 below 65500, else int32 (Megatron's rule)."""
    if vocab_size < 0:
        raise IndexedDatasetError(f"vocab_size must be >= 0, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def data_file_path(prefix: str | os.PathLike[str]) -> str:
    """``prefix + ".bin"``."""
    return os.fspath(prefix) + ".bin"


def index_file_path(prefix: str | os.PathLike[str]) -> str:
    """``prefix + ".idx"``."""
    return os.fspath(prefix) + ".idx"


def _code_for(dtype: np.dtype) -> int:
    try:
        return _CODE_OF[np.dtype(dtype)]
    except (KeyError, TypeError):
        allowed = ", ".join(str(d) for d in DTYPE_CODES.values())
        raise IndexedDatasetError(f"unsupported shard dtype {dtype!r}; expected one of {allowed}") from None


# --------------------------------------------------------------------------------------------- temps


def _temp_path(prefix: str, kind: str, tag: str) -> str:
    return f"{prefix}.{kind}.tmp.{tag}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(prefix: str | os.PathLike[str]) -> list[str]:
    """Delete temp files of ``prefix`` left by dead writers on this host; return the removed paths.

    Temp names are ``{prefix}.{bin,idx,lengths,docs}.tmp.{host}.{pid}.{random}``; files of a live
    process, or written from another host (shared filesystems), are left alone.
    """
    prefix = os.fspath(prefix)
    host = socket.gethostname()
    removed: list[str] = []
    for kind in _TEMP_KINDS:
        stem = f"{prefix}.{kind}.tmp."
        for path in glob.glob(glob.escape(stem) + "*"):
            parts = path[len(stem) :].rsplit(".", 2)
            if len(parts) != 3 or not parts[1].isdigit():
                continue
            if parts[0] != host or _pid_alive(int(parts[1])):
                continue
            try:
                os.remove(path)
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _Spill:
    """Append-only array of one dtype: a fixed numpy buffer spilled to a temp file when full."""

    def __init__(self, path: str, dtype: np.dtype) -> None:
        self.path = path
        self.dtype = np.dtype(dtype)
        self._file = open(path, "wb")  # noqa: SIM115 - closed in flush_close()/abort
        self._buf = np.empty(_CHUNK, dtype=self.dtype)
        self._n = 0
        self.count = 0

    def append(self, value: int) -> None:
        self._buf[self._n] = value
        self._n += 1
        self.count += 1
        if self._n == _CHUNK:
            self._spill()

    def extend(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=self.dtype)
        if values.size == 0:
            return
        if self._n + values.size <= _CHUNK:
            self._buf[self._n : self._n + values.size] = values
            self._n += values.size
            if self._n == _CHUNK:
                self._spill()
        else:
            self._spill()
            self._file.write(values.tobytes())
        self.count += values.size

    def _spill(self) -> None:
        if self._n:
            self._file.write(self._buf[: self._n].tobytes())
            self._n = 0

    def close(self) -> None:
        self._spill()
        self._file.close()

    def iter_chunks(self) -> Iterable[np.ndarray]:
        """Stream the written values back (after :meth:`close`) in bounded chunks."""
        itemsize = self.dtype.itemsize
        with open(self.path, "rb") as f:
            while True:
                raw = f.read(_COPY_CHUNK * itemsize)
                if not raw:
                    return
                yield np.frombuffer(raw, dtype=self.dtype)


# -------------------------------------------------------------------------------------------- writer


class IndexedDatasetWriter:
    """Streaming writer of one shard, byte-compatible with Megatron-LM's ``IndexedDatasetBuilder``.

    Use as a context manager: a clean exit calls :meth:`finalize`, an exception calls :meth:`abort`.
    Token ids are validated against ``dtype`` (integers, in range) before anything is written.
    """

    def __init__(self, prefix: str | os.PathLike[str], dtype: np.dtype | type) -> None:
        self.prefix = os.fspath(prefix)
        self.dtype = np.dtype(dtype)
        self._code = _code_for(self.dtype)
        parent = os.path.dirname(os.path.abspath(self.prefix))
        os.makedirs(parent, exist_ok=True)
        remove_stale_temps(self.prefix)
        tag = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self._tmp_bin = _temp_path(self.prefix, "bin", tag)
        self._tmp_idx = _temp_path(self.prefix, "idx", tag)
        self._bin = open(self._tmp_bin, "wb", buffering=1 << 20)  # noqa: SIM115
        self._lengths = _Spill(_temp_path(self.prefix, "lengths", tag), np.dtype(np.int32))
        self._docs = _Spill(_temp_path(self.prefix, "docs", tag), np.dtype(np.int64))
        self._docs.append(0)
        self._num_tokens = 0
        self._open_sequences = 0  # sequences added since the last document boundary
        self._state = "open"
        if self.dtype.kind in "iu":
            info = np.iinfo(self.dtype)
            self._lo, self._hi = int(info.min), int(info.max)
        else:
            self._lo = self._hi = None

    # ---- properties
    @property
    def num_sequences(self) -> int:
        """Sequences written so far."""
        return self._lengths.count

    @property
    def num_documents(self) -> int:
        """Completed documents so far."""
        return self._docs.count - 1

    @property
    def num_tokens(self) -> int:
        """Tokens written so far."""
        return self._num_tokens

    # ---- validation
    def _check_open(self) -> None:
        if self._state != "open":
            raise IndexedDatasetError(f"writer for {self.prefix!r} is already {self._state}")

    def _coerce(self, tokens: object, what: str) -> np.ndarray:
        """Return ``tokens`` as a 1-D array of ``self.dtype``; raise naming ``what`` on bad ids."""
        try:
            arr = tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens)
        except (OverflowError, ValueError, TypeError) as exc:
            raise IndexedDatasetError(
                f"{what}: token ids are not a flat sequence of integers ({exc})"
            ) from None
        if arr.size == 0:
            return np.empty(0, dtype=self.dtype)
        if arr.ndim != 1:
            raise IndexedDatasetError(f"{what}: expected a 1-D sequence of token ids, got shape {arr.shape}")
        if arr.dtype.kind not in "iu":
            if self.dtype.kind == "f" and arr.dtype.kind == "f":
                return arr.astype(self.dtype, copy=False)
            bad = _first_non_integer(arr)
            if bad is None and arr.dtype == object:
                raise IndexedDatasetError(
                    f"{what}: token ids do not fit dtype {self.dtype} (too large for int64)"
                )
            raise IndexedDatasetError(
                f"{what}: token ids must be integers, got dtype {arr.dtype}"
                + (f" (value {bad[1]!r} at position {bad[0]})" if bad else "")
            )
        if self._lo is not None:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < self._lo or hi > self._hi:
                pos = int(np.argmin(arr)) if lo < self._lo else int(np.argmax(arr))
                raise IndexedDatasetError(
                    f"{what}: token id {int(arr[pos])} at position {pos} does not fit dtype {self.dtype} "
                    f"(allowed {self._lo}..{self._hi})"
                )
        return arr.astype(self.dtype, copy=False)

    def _write_tokens(self, arr: np.ndarray, what: str) -> None:
        if arr.size > np.iinfo(np.int32).max:
            raise IndexedDatasetError(f"{what}: sequence of {arr.size} tokens exceeds the int32 length field")
        self._bin.write(memoryview(np.ascontiguousarray(arr)).cast("B"))
        self._lengths.append(arr.size)
        self._num_tokens += arr.size

    # ---- Megatron's builder API
    def add_document(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Append one document made of one sequence (``tokens``, 1-D integer ids)."""
        self._check_open()
        arr = self._coerce(tokens, f"{self.prefix}: document #{self.num_documents}")
        self._write_tokens(arr, f"{self.prefix}: document #{self.num_documents}")
        self._open_sequences = 0
        self._docs.append(self._lengths.count)

    def add_sequence(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Append one sequence to the current (open) document; close it with :meth:`end_document`."""
        self._check_open()
        what = f"{self.prefix}: document #{self.num_documents} sequence #{self._open_sequences}"
        arr = self._coerce(tokens, what)
        self._write_tokens(arr, what)
        self._open_sequences += 1

    def end_document(self) -> None:
        """Mark a document boundary after the sequences added so far."""
        self._check_open()
        self._open_sequences = 0
        self._docs.append(self._lengths.count)

    def add_documents(
        self, tokens: np.ndarray, lengths: np.ndarray, sequences_per_document: np.ndarray | None = None
    ) -> None:
        """Append documents stored back to back in ``tokens``.

        Without ``sequences_per_document``: ``len(lengths)`` single-sequence documents (``add_document`` per
        slice, validated and written at once). With it: ``lengths`` are *sequence* lengths and document ``i``
        is the next ``sequences_per_document[i]`` sequences (0 gives an empty document, as Megatron writes
        for an empty text), like ``add_sequence`` ... ``end_document``.
        ``tokens``: 1-D integer array with ``lengths.sum()`` entries; ``lengths``: 1-D, >= 0.
        """
        self._check_open()
        lengths = np.asarray(lengths)
        if lengths.ndim != 1 or (lengths.size and lengths.dtype.kind not in "iu"):
            raise IndexedDatasetError(f"{self.prefix}: lengths must be a 1-D integer array")
        lengths = lengths.astype(np.int64, copy=False)
        if lengths.size and (lengths.min() < 0 or lengths.max() > np.iinfo(np.int32).max):
            raise IndexedDatasetError(f"{self.prefix}: document lengths must be in 0..2**31-1")
        total = int(lengths.sum())
        first = self.num_documents
        try:
            arr = self._coerce(tokens, f"{self.prefix}: documents #{first}..#{first + lengths.size - 1}")
        except IndexedDatasetError as exc:
            # Re-run per document to name the offending one precisely.
            flat = np.asarray(tokens).reshape(-1)
            start = 0
            for i, n in enumerate(lengths.tolist()):
                self._coerce(flat[start : start + n], f"{self.prefix}: document #{first + i}")
                start += n
            raise exc
        if arr.size != total:
            raise IndexedDatasetError(
                f"{self.prefix}: add_documents got {arr.size} tokens but lengths sum to {total}"
            )
        self._bin.write(memoryview(np.ascontiguousarray(arr)).cast("B"))
        self._num_tokens += total
        base = self._lengths.count
        self._lengths.extend(lengths)
        if sequences_per_document is None:
            self._docs.extend(base + np.arange(1, lengths.size + 1, dtype=np.int64))
        else:
            per_doc = np.asarray(sequences_per_document, dtype=np.int64)
            if (
                per_doc.ndim != 1
                or (per_doc.size and per_doc.min() < 0)
                or int(per_doc.sum()) != lengths.size
            ):
                raise IndexedDatasetError(
                    f"{self.prefix}: sequences_per_document must be >= 0 and sum to the {lengths.size} sequences"
                )
            self._docs.extend(base + np.cumsum(per_doc))
        self._open_sequences = 0

    def add_index(self, prefix: str | os.PathLike[str]) -> None:
        """Append a whole existing shard (same dtype), rebasing its document boundaries (Megatron's ``add_index``)."""
        self._check_open()
        if self._open_sequences:
            raise IndexedDatasetError(
                f"{self.prefix}: end_document() before add_index({os.fspath(prefix)!r})"
            )
        src = IndexedDataset(prefix)
        if src.dtype != self.dtype:
            raise IndexedDatasetError(
                f"cannot merge {os.fspath(prefix)!r} with dtype {src.dtype} into {self.prefix!r} with dtype "
                f"{self.dtype}: all shards must share one dtype"
            )
        self._bin.flush()
        with open(data_file_path(prefix), "rb") as f:
            shutil.copyfileobj(f, self._bin, 1 << 22)
        self._num_tokens += src.num_tokens
        base = self._lengths.count
        for start in range(0, len(src), _COPY_CHUNK):
            self._lengths.extend(src.sequence_lengths[start : start + _COPY_CHUNK])
        docs = src.document_indices
        for start in range(1, docs.size, _COPY_CHUNK):
            self._docs.extend(docs[start : start + _COPY_CHUNK] + base)
        del src

    # ---- completion
    def finalize(self) -> None:
        """Write the ``.idx``, fsync both files and move them to their final names.

        Sequences added after the last :meth:`end_document` are closed into a final document.

        The previous ``.idx`` (if any) is removed first, then ``.bin`` is replaced, then ``.idx``: a
        reader sees the old pair, a missing ``.idx``, or the new pair, never a mismatched one.
        """
        self._check_open()
        if self._open_sequences:
            self.end_document()
        try:
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            self._lengths.close()
            self._docs.close()
            self._write_index()
            final_bin, final_idx = data_file_path(self.prefix), index_file_path(self.prefix)
            if os.path.lexists(final_idx):
                os.remove(final_idx)
            os.replace(self._tmp_bin, final_bin)
            os.replace(self._tmp_idx, final_idx)
            _fsync_dir(os.path.dirname(os.path.abspath(self.prefix)))
        except BaseException:
            self.abort()
            raise
        self._remove_side_files()
        self._state = "finalized"

    def _write_index(self) -> None:
        itemsize = np.int64(self.dtype.itemsize)
        with open(self._tmp_idx, "wb", buffering=1 << 20) as f:
            f.write(INDEX_HEADER)
            f.write(struct.pack("<Q", _VERSION))
            f.write(struct.pack("<B", self._code))
            f.write(struct.pack("<Q", self._lengths.count))
            f.write(struct.pack("<Q", self._docs.count))
            for chunk in self._lengths.iter_chunks():
                f.write(chunk.tobytes())
            carry = np.int64(0)
            for chunk in self._lengths.iter_chunks():
                nbytes = chunk.astype(np.int64) * itemsize
                ptrs = np.empty_like(nbytes)
                ptrs[0] = carry
                np.cumsum(nbytes[:-1], out=ptrs[1:])
                ptrs[1:] += carry
                carry = carry + nbytes.sum()
                f.write(ptrs.tobytes())
            for chunk in self._docs.iter_chunks():
                f.write(chunk.tobytes())
            f.flush()
            os.fsync(f.fileno())

    def _remove_side_files(self) -> None:
        for path in (self._lengths.path, self._docs.path):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass

    def abort(self) -> None:
        """Discard everything written: close and delete the temp files; final names are left untouched."""
        if self._state != "open":
            return
        self._state = "aborted"
        for closer in (self._bin.close, self._lengths.close, self._docs.close):
            try:
                closer()
            except (OSError, ValueError):
                pass
        for path in (self._tmp_bin, self._tmp_idx, self._lengths.path, self._docs.path):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.finalize()

    def __del__(self) -> None:  # a writer dropped without finalize() leaves no temp files behind
        try:
            if getattr(self, "_state", None) == "open":
                self.abort()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


def _first_non_integer(arr: np.ndarray) -> tuple[int, object] | None:
    """Position and value of the first entry that is not an integer (for error messages)."""
    flat = arr.reshape(-1)
    for i, v in enumerate(flat[:100_000].tolist()):
        if isinstance(v, bool) or not isinstance(v, int):
            return i, v
    return None


# -------------------------------------------------------------------------------------------- reader


def _map_file(path: str) -> mmap.mmap | None:
    """Read-only mmap of ``path`` (None for an empty file, which cannot be mapped)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return None
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


class IndexedDataset:
    """Read-only, zero-copy view of a shard (``prefix.bin`` / ``prefix.idx``), validated on open.

    Attributes: ``dtype``; ``sequence_lengths`` (int32[S]); ``sequence_pointers`` (int64[S], bytes);
    ``document_indices`` (int64[D], sequences, 0..S); ``sequence_modes`` (int8[S] for a Megatron multimodal
    index, which appends them after the document indices; else None); ``tokens`` (the whole ``.bin`` as 1-D
    ``dtype``).
    ``ds[i]`` is sequence ``i`` as a 1-D view into ``tokens``.
    """

    def __init__(self, prefix: str | os.PathLike[str]) -> None:
        self.prefix = os.fspath(prefix)
        self.index_path = index_file_path(self.prefix)
        self.data_path = data_file_path(self.prefix)
        for path, what in ((self.index_path, "index (.idx)"), (self.data_path, "data (.bin)")):
            if not os.path.isfile(path):
                raise IndexedDatasetError(f"missing {what} file: {path}")
        self._open()

    def _open(self) -> None:
        idx_path, bin_path = self.index_path, self.data_path
        idx_size = os.path.getsize(idx_path)
        if idx_size < _HEADER_SIZE:
            raise IndexedDatasetError(
                f"{idx_path}: index file is {idx_size} bytes, shorter than the {_HEADER_SIZE}-byte header"
            )
        idx_map = _map_file(idx_path)
        assert idx_map is not None
        header = bytes(idx_map[: len(INDEX_HEADER)])
        if header != INDEX_HEADER:
            raise IndexedDatasetError(f"{idx_path}: bad magic {header!r}, expected {INDEX_HEADER!r}")
        (version,) = struct.unpack_from("<Q", idx_map, 9)
        if version != _VERSION:
            raise IndexedDatasetError(f"{idx_path}: unsupported index version {version}, expected {_VERSION}")
        (code,) = struct.unpack_from("<B", idx_map, 17)
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(
                f"{idx_path}: unknown dtype code {code}, expected one of {sorted(DTYPE_CODES)}"
            )
        seq_count, doc_count = struct.unpack_from("<QQ", idx_map, 18)
        expected = _HEADER_SIZE + seq_count * (4 + 8) + doc_count * 8
        multimodal = idx_size == expected + seq_count and seq_count > 0
        if idx_size != expected and not multimodal:
            raise IndexedDatasetError(
                f"{idx_path}: index file is {idx_size} bytes but its counts ({seq_count} sequences, "
                f"{doc_count} document boundaries) need {expected} bytes ({expected + seq_count} for a multimodal "
                "index with sequence modes): truncated or not a Megatron index"
            )
        if doc_count < 1:
            raise IndexedDatasetError(f"{idx_path}: document count is 0, expected at least 1 (the leading 0)")
        self.dtype: np.dtype = DTYPE_CODES[code]
        off = _HEADER_SIZE
        self.sequence_lengths: np.ndarray = np.frombuffer(
            idx_map, dtype=np.int32, count=seq_count, offset=off
        )
        off += 4 * seq_count
        self.sequence_pointers: np.ndarray = np.frombuffer(
            idx_map, dtype=np.int64, count=seq_count, offset=off
        )
        off += 8 * seq_count
        self.document_indices: np.ndarray = np.frombuffer(
            idx_map, dtype=np.int64, count=doc_count, offset=off
        )
        off += 8 * doc_count
        #: Megatron multimodal index: int8 mode of each sequence (e.g. text/image), None for a text index
        self.sequence_modes: np.ndarray | None = (
            np.frombuffer(idx_map, dtype=np.int8, count=seq_count, offset=off) if multimodal else None
        )

        itemsize = self.dtype.itemsize
        if seq_count and int(self.sequence_lengths.min()) < 0:
            raise IndexedDatasetError(f"{idx_path}: negative sequence length")
        self._seq_starts = np.zeros(seq_count + 1, dtype=np.int64)  # token offsets, S + 1 entries
        np.cumsum(self.sequence_lengths, dtype=np.int64, out=self._seq_starts[1:])
        self.num_tokens: int = int(self._seq_starts[-1])
        bin_size = os.path.getsize(bin_path)
        if bin_size != self.num_tokens * itemsize:
            raise IndexedDatasetError(
                f"{bin_path}: data file is {bin_size} bytes but {idx_path} describes {self.num_tokens} tokens of "
                f"{self.dtype} = {self.num_tokens * itemsize} bytes (truncated or mismatched .bin/.idx pair)"
            )
        if not np.array_equal(self.sequence_pointers, self._seq_starts[:-1] * itemsize):
            bad = int(np.argmax(self.sequence_pointers != self._seq_starts[:-1] * itemsize))
            raise IndexedDatasetError(
                f"{idx_path}: sequence pointer {bad} is {int(self.sequence_pointers[bad])}, expected "
                f"{int(self._seq_starts[bad]) * itemsize} (pointers must be the running byte offsets)"
            )
        docs = self.document_indices
        if docs[0] != 0 or docs[-1] != seq_count or (docs.size > 1 and bool(np.any(np.diff(docs) < 0))):
            raise IndexedDatasetError(
                f"{idx_path}: document indices must be non-decreasing from 0 to {seq_count} "
                f"(got first {int(docs[0])}, last {int(docs[-1])})"
            )
        bin_map = _map_file(bin_path)
        self.tokens: np.ndarray = (
            np.frombuffer(bin_map, dtype=self.dtype) if bin_map is not None else np.empty(0, dtype=self.dtype)
        )
        self._idx_map, self._bin_map = idx_map, bin_map

    # ---- sequences
    def __len__(self) -> int:
        """Number of sequences S."""
        return int(self.sequence_lengths.size)

    @property
    def num_documents(self) -> int:
        """Number of documents (D - 1)."""
        return int(self.document_indices.size) - 1

    def _check_index(self, i: int) -> int:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence index {i} out of range for {n} sequences in {self.prefix}")
        return i

    def __getitem__(self, i: int) -> np.ndarray:
        """Sequence ``i`` (negative counts from the end) as a read-only 1-D view."""
        i = self._check_index(i)
        return self.tokens[self._seq_starts[i] : self._seq_starts[i + 1]]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``i`` (to its end when ``length`` is None), a view."""
        i = self._check_index(i)
        n = int(self.sequence_lengths[i])
        if offset < 0 or offset > n or (length is not None and (length < 0 or offset + length > n)):
            raise IndexError(
                f"slice offset={offset} length={length} out of range for sequence {i} of {n} tokens"
            )
        start = int(self._seq_starts[i]) + offset
        stop = int(self._seq_starts[i + 1]) if length is None else start + length
        return self.tokens[start:stop]

    # ---- documents
    def document_token_offsets(self) -> np.ndarray:
        """int64[D]: token offset in :attr:`tokens` of each document start, last entry = ``num_tokens``."""
        return self._seq_starts[self.document_indices]

    def document_lengths(self) -> np.ndarray:
        """int64[D - 1]: tokens per document."""
        return np.diff(self.document_token_offsets())

    # ---- pickling (reopen in the child instead of copying the maps)
    def __getstate__(self) -> dict[str, str]:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.__init__(state["prefix"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({self.prefix!r}, dtype={self.dtype}, sequences={len(self)}, "
            f"documents={self.num_documents}, tokens={self.num_tokens})"
        )


# -------------------------------------------------------------------------------------------- merge


def merge_indexed_datasets(
    prefixes: Sequence[str | os.PathLike[str]], output_prefix: str | os.PathLike[str]
) -> None:
    """Concatenate shards (all of one dtype) into ``output_prefix``, streaming the ``.bin`` data.

    Document boundaries of each input are rebased by the sequences before it; the output appears
    atomically (temp files, then rename) and equals Megatron's ``add_index`` merge byte for byte.
    """
    prefixes = [os.fspath(p) for p in prefixes]
    if not prefixes:
        raise IndexedDatasetError("merge_indexed_datasets needs at least one input prefix")
    dtypes = {}
    for p in prefixes:
        dtypes[p] = IndexedDataset(p).dtype
    if len(set(dtypes.values())) != 1:
        listing = ", ".join(f"{p!r}: {d}" for p, d in dtypes.items())
        raise IndexedDatasetError(f"cannot merge shards of different dtypes ({listing})")
    with IndexedDatasetWriter(output_prefix, dtypes[prefixes[0]]) as writer:
        for p in prefixes:
            writer.add_index(p)
