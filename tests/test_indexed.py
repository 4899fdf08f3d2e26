"""Tests for megatron_doremi.data.indexed: Megatron byte compatibility, reader validation, merge, atomicity."""

from __future__ import annotations

import os
import pickle
import socket
import struct

import numpy as np
import pytest

from megatron_doremi.data import indexed
from megatron_doremi.data.indexed import (
    DTYPE_CODES,
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    data_file_path,
    dtype_for_vocab,
    index_file_path,
    merge_indexed_datasets,
)

# Spec constants written out independently of the module under test.
SPEC_CODES = {
    "uint8": 1,
    "int8": 2,
    "int16": 3,
    "int32": 4,
    "int64": 5,
    "float64": 6,
    "float32": 7,
    "uint16": 8,
}


def spec_bytes(docs: list[list[list[int]]], dtype: np.dtype) -> tuple[bytes, bytes]:
    """Expected (.bin, .idx) bytes per the MMIDIDX spec; ``docs`` is a list of documents of sequences."""
    dtype = np.dtype(dtype)
    lengths: list[int] = []
    doc_idx = [0]
    data = b""
    for doc in docs:
        for seq in doc:
            data += np.array(seq, dtype=dtype).tobytes()
            lengths.append(len(seq))
        doc_idx.append(len(lengths))
    pointers, pos = [], 0
    for n in lengths:
        pointers.append(pos)
        pos += n * dtype.itemsize
    idx = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", SPEC_CODES[dtype.name])
    idx += struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(doc_idx))
    idx += struct.pack(f"<{len(lengths)}i", *lengths)
    idx += struct.pack(f"<{len(pointers)}q", *pointers)
    idx += struct.pack(f"<{len(doc_idx)}q", *doc_idx)
    return data, idx


def random_docs(rng: np.random.Generator, n_docs: int, hi: int, max_seqs: int = 1) -> list[list[list[int]]]:
    docs = []
    for _ in range(n_docs):
        n_seqs = int(rng.integers(0 if max_seqs > 1 else 1, max_seqs + 1))
        docs.append([rng.integers(0, hi, size=int(rng.integers(0, 40))).tolist() for _ in range(n_seqs)])
    return docs


def write_docs(prefix: str, docs: list[list[list[int]]], dtype: np.dtype) -> None:
    with IndexedDatasetWriter(prefix, dtype) as w:
        for doc in docs:
            if len(doc) == 1:
                w.add_document(doc[0])
            else:
                for seq in doc:
                    w.add_sequence(seq)
                w.end_document()


def read_files(prefix: str) -> tuple[bytes, bytes]:
    with open(data_file_path(prefix), "rb") as b, open(index_file_path(prefix), "rb") as i:
        return b.read(), i.read()


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.uint8, np.int64])
def test_writer_bytes_match_spec(tmp_path, dtype):
    rng = np.random.default_rng(0)
    hi = min(int(np.iinfo(dtype).max), 70000)
    docs = random_docs(rng, 60, hi, max_seqs=3)
    prefix = str(tmp_path / "shard")
    write_docs(prefix, docs, np.dtype(dtype))
    assert read_files(prefix) == spec_bytes(docs, np.dtype(dtype))


def test_spill_chunks_and_add_documents_match_spec(tmp_path, monkeypatch):
    # Tiny chunk sizes force many spills and pointer carries across chunk boundaries.
    monkeypatch.setattr(indexed, "_CHUNK", 7)
    monkeypatch.setattr(indexed, "_COPY_CHUNK", 5)
    rng = np.random.default_rng(1)
    docs = random_docs(rng, 100, 65000)
    prefix = str(tmp_path / "batched")
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        bounds = [0, 3, 40, 41, 41, 100]  # uneven batches, one empty
        for a, b in zip(bounds[:-1], bounds[1:]):
            seqs = [d[0] for d in docs[a:b]]
            flat = np.array([t for s in seqs for t in s], dtype=np.int64)
            w.add_documents(flat, np.array([len(s) for s in seqs], dtype=np.int64))
        assert w.num_documents == 100
    assert read_files(prefix) == spec_bytes(docs, np.dtype(np.uint16))


def test_dtype_codes_and_vocab_rule():
    assert {c: d.name for c, d in DTYPE_CODES.items()} == {v: k for k, v in SPEC_CODES.items()}
    assert dtype_for_vocab(50257) == np.uint16
    assert dtype_for_vocab(65499) == np.uint16
    assert dtype_for_vocab(65500) == np.int32
    assert dtype_for_vocab(128256) == np.int32
    assert data_file_path("a/b") == "a/b.bin" and index_file_path("a/b") == "a/b.idx"


def test_reader_views_and_document_helpers(tmp_path):
    docs = [[[1, 2, 3]], [[4], [5, 6]], [], [[7, 8, 9, 10]], [[]]]
    prefix = str(tmp_path / "r")
    write_docs(prefix, docs, np.uint16)
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.uint16 and len(ds) == 5 and ds.num_documents == 5 and ds.num_tokens == 10
    assert ds.sequence_lengths.dtype == np.int32 and ds.sequence_pointers.dtype == np.int64
    assert ds.document_indices.tolist() == [0, 1, 3, 3, 4, 5]
    assert ds.sequence_pointers.tolist() == [0, 6, 8, 12, 20]
    assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10], []]
    assert ds[-2].tolist() == [7, 8, 9, 10]
    assert ds.get(3, offset=1, length=2).tolist() == [8, 9]
    assert ds.get(3, offset=2).tolist() == [9, 10]
    assert ds.document_lengths().tolist() == [3, 3, 0, 4, 0]
    assert ds.document_lengths().dtype == np.int64
    assert ds.document_token_offsets().tolist() == [0, 3, 6, 6, 10, 10]
    # zero copy: views into the mmap of the .bin
    assert not ds.tokens.flags.owndata and not ds.tokens.flags.writeable
    assert np.shares_memory(ds[3], ds.tokens)
    with pytest.raises(IndexError):
        ds[5]
    with pytest.raises(IndexError):
        ds.get(0, offset=2, length=5)
    clone = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(clone.tokens, ds.tokens) and clone.prefix == ds.prefix


def test_empty_shard_round_trips(tmp_path):
    prefix = str(tmp_path / "empty")
    with IndexedDatasetWriter(prefix, np.int32):
        pass
    assert read_files(prefix) == spec_bytes([], np.dtype(np.int32))
    ds = IndexedDataset(prefix)
    assert len(ds) == 0 and ds.num_tokens == 0 and ds.document_lengths().size == 0


@pytest.mark.parametrize(
    "tokens, pattern",
    [
        ([1, 2, -1], r"document #1.*-1.*uint16"),
        ([65535, 65536], r"document #1.*65536.*uint16"),
        ([1.0, 2.0], r"document #1.*integers.*float64"),
        (["a"], r"document #1.*integers"),
        ([[1, 2], [3, 4]], r"document #1.*1-D"),
        ([2**70], r"document #1.*fit"),
    ],
)
def test_writer_rejects_bad_ids_and_leaves_nothing(tmp_path, tokens, pattern):
    prefix = str(tmp_path / "bad")
    with pytest.raises(IndexedDatasetError, match=pattern):
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            w.add_document([0, 1])
            w.add_document(tokens)
    assert os.listdir(tmp_path) == []


def test_add_documents_names_the_bad_document(tmp_path):
    with pytest.raises(IndexedDatasetError, match=r"document #4\b.*70000"):
        with IndexedDatasetWriter(str(tmp_path / "b"), np.uint16) as w:
            w.add_document([1])
            w.add_documents(np.array([1, 2, 3, 4, 70000, 5]), np.array([2, 1, 1, 2]))
    with pytest.raises(IndexedDatasetError, match="lengths sum"):
        with IndexedDatasetWriter(str(tmp_path / "c"), np.uint16) as w:
            w.add_documents(np.array([1, 2, 3]), np.array([2, 2]))
    assert os.listdir(tmp_path) == []


def test_abort_keeps_existing_final_files_and_finalize_is_atomic(tmp_path):
    prefix = str(tmp_path / "keep")
    write_docs(prefix, [[[1, 2, 3]]], np.uint16)
    before = read_files(prefix)
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            w.add_document([9, 9, 9, 9])
            raise RuntimeError("boom")
    assert read_files(prefix) == before
    assert sorted(os.listdir(tmp_path)) == ["keep.bin", "keep.idx"]
    # while a writer is open, its data lives under temp names only
    w = IndexedDatasetWriter(str(tmp_path / "new"), np.uint16)
    w.add_document([1, 2])
    names = os.listdir(tmp_path)
    assert "new.bin" not in names and "new.idx" not in names
    assert any(n.startswith("new.bin.tmp.") for n in names)
    w.finalize()
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("new")) == ["new.bin", "new.idx"]
    with pytest.raises(IndexedDatasetError, match="already finalized"):
        w.add_document([1])


def test_stale_temps_of_dead_writers_are_removed(tmp_path):
    host = socket.gethostname()
    dead = 2**22 + 12345  # above the default pid_max, so no such process
    stale = tmp_path / f"p.bin.tmp.{host}.{dead}.abcd1234"
    live = tmp_path / f"p.idx.tmp.{host}.{os.getpid()}.abcd1234"
    other_prefix = tmp_path / f"p2.bin.tmp.{host}.{dead}.abcd1234"
    other_host = tmp_path / f"p.bin.tmp.not-{host}.{dead}.abcd1234"
    for f in (stale, live, other_prefix, other_host):
        f.write_bytes(b"x")
    with IndexedDatasetWriter(str(tmp_path / "p"), np.uint16) as w:
        w.add_document([1])
    assert not stale.exists()
    assert live.exists() and other_prefix.exists() and other_host.exists()


def _corrupt(prefix: str, which: str, data: bytes, offset: int | None = None) -> None:
    path = index_file_path(prefix) if which == "idx" else data_file_path(prefix)
    if offset is None:
        with open(path, "wb") as f:
            f.write(data)
    else:
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(data)


def test_reader_validation_errors(tmp_path):
    docs = [[[1, 2, 3]], [[4, 5]], [[6]]]
    good_bin, good_idx = spec_bytes(docs, np.dtype(np.uint16))
    prefix = str(tmp_path / "v")

    def reset() -> None:
        _corrupt(prefix, "bin", good_bin)
        _corrupt(prefix, "idx", good_idx)

    with pytest.raises(IndexedDatasetError, match=r"missing index \(\.idx\) file: .*v\.idx"):
        IndexedDataset(prefix)
    _corrupt(prefix, "idx", good_idx)
    with pytest.raises(IndexedDatasetError, match=r"missing data \(\.bin\) file: .*v\.bin"):
        IndexedDataset(prefix)
    reset()
    assert IndexedDataset(prefix).num_tokens == 6

    cases = [
        ("idx", b"MMIDIDX\x00\x01", 0, "bad magic"),
        ("idx", struct.pack("<Q", 2), 9, "version 2"),
        ("idx", struct.pack("<B", 9), 17, "dtype code 9"),
        ("idx", struct.pack("<Q", 4), 18, "counts"),
        ("idx", struct.pack("<q", 7), 34 + 12 + 8, "sequence pointer 1"),
        ("idx", struct.pack("<qq", 2, 1), 34 + 36 + 8, "non-decreasing"),
        ("idx", struct.pack("<q", 1), 34 + 36, "from 0"),
    ]
    for which, data, offset, pattern in cases:
        reset()
        _corrupt(prefix, which, data, offset)
        with pytest.raises(IndexedDatasetError, match=pattern):
            IndexedDataset(prefix)
    reset()
    _corrupt(prefix, "idx", good_idx[:-8])
    with pytest.raises(IndexedDatasetError, match="counts"):
        IndexedDataset(prefix)
    reset()
    _corrupt(prefix, "idx", good_idx[:20])
    with pytest.raises(IndexedDatasetError, match="header"):
        IndexedDataset(prefix)
    reset()
    _corrupt(prefix, "bin", good_bin[:-2])
    with pytest.raises(IndexedDatasetError, match=r"v\.bin.*10 bytes.*12 bytes"):
        IndexedDataset(prefix)


def test_merge_equals_single_writer(tmp_path, monkeypatch):
    monkeypatch.setattr(indexed, "_COPY_CHUNK", 3)
    rng = np.random.default_rng(2)
    parts = [random_docs(rng, n, 60000, max_seqs=3) for n in (5, 0, 17, 9)]
    prefixes = []
    for i, docs in enumerate(parts):
        prefixes.append(str(tmp_path / f"part{i}"))
        write_docs(prefixes[-1], docs, np.uint16)
    out = str(tmp_path / "merged" / "all")
    merge_indexed_datasets(prefixes, out)
    assert read_files(out) == spec_bytes([d for docs in parts for d in docs], np.dtype(np.uint16))
    ds = IndexedDataset(out)
    assert ds.num_documents == 31


def test_merge_rejects_mixed_dtypes_without_output(tmp_path):
    write_docs(str(tmp_path / "a"), [[[1, 2]]], np.uint16)
    write_docs(str(tmp_path / "b"), [[[1, 2]]], np.int32)
    with pytest.raises(IndexedDatasetError, match="different dtypes.*uint16.*int32"):
        merge_indexed_datasets([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "m"))
    with pytest.raises(IndexedDatasetError, match="missing"):
        merge_indexed_datasets([str(tmp_path / "a"), str(tmp_path / "nope")], str(tmp_path / "m"))
    with pytest.raises(IndexedDatasetError, match="dtype int32"):
        with IndexedDatasetWriter(str(tmp_path / "m"), np.uint16) as w:
            w.add_index(str(tmp_path / "b"))
    assert not any(n.startswith("m") for n in os.listdir(tmp_path))


def test_unsupported_writer_dtype(tmp_path):
    with pytest.raises(IndexedDatasetError, match="unsupported shard dtype"):
        IndexedDatasetWriter(str(tmp_path / "x"), np.uint32)


def test_reads_a_megatron_multimodal_index(tmp_path):
    """Megatron's multimodal .idx appends int8 sequence modes after the document indices."""
    from megatron_doremi.data.indexed import IndexedDataset, IndexedDatasetError, IndexedDatasetWriter

    prefix = str(tmp_path / "mm")
    with IndexedDatasetWriter(prefix, np.dtype(np.int32)) as w:
        w.add_sequence(np.arange(5))
        w.add_sequence(np.arange(3))
        w.end_document()
        w.add_document(np.arange(4))
    plain = IndexedDataset(prefix)
    assert plain.sequence_modes is None
    with open(prefix + ".idx", "ab") as f:
        f.write(np.array([0, 1, 0], dtype=np.int8).tobytes())
    mm = IndexedDataset(prefix)
    assert mm.sequence_modes.tolist() == [0, 1, 0]
    assert mm.document_indices.tolist() == [0, 2, 3] and mm[1].tolist() == [0, 1, 2]
    with open(prefix + ".idx", "ab") as f:
        f.write(b"\x00")
    with pytest.raises(IndexedDatasetError, match="multimodal"):
        IndexedDataset(prefix)
