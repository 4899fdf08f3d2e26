"""Tokenize jsonl(.gz)/parquet documents into Megatron shards (``{prefix}_{key}_document.bin/.idx``).

The logic behind ``tools/preprocess_data.py`` and ``python -m megatron_doremi.data.preprocess``
(Megatron-LM's flags). Lines are read in the main process, parsed and batch-encoded with the HF
fast tokenizer (inline for ``--workers 1``, else in a process pool that keeps document order) and
streamed into :class:`~megatron_doremi.data.indexed.IndexedDatasetWriter` temp files, which get
their final names only after every input was processed without a fatal error.
"""

from __future__ import annotations

import argparse
import errno
import glob
import gzip
import itertools
import json
import multiprocessing as mp
import os
import signal
import sys
import time
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, closing
from dataclasses import dataclass, field

import numpy as np

from megatron_doremi.data.indexed import (
    IndexedDatasetWriter,
    data_file_path,
    dtype_for_vocab,
    index_file_path,
    merge_indexed_datasets,
)
from megatron_doremi.data.tokenizer import (
    TOKENIZER_TYPES,
    LoadedTokenizer,
    TokenizerError,
    load_megatron_tokenizer,
)

__all__ = [
    "Batch",
    "EncodedBatch",
    "Encoder",
    "PreprocessConfig",
    "PreprocessError",
    "PreprocessSummary",
    "RecordParser",
    "build_parser",
    "iter_batches",
    "location",
    "main",
    "output_prefix_for",
    "preprocess",
    "resolve_inputs",
]

MAX_REPORTED_SKIPS = 5
ON_ERROR = ("fail", "skip", "keep-empty")


class PreprocessError(ValueError):
    """Bad input (file, line, key) or configuration; the message names where and what was expected."""


# --------------------------------------------------------------------------------------------- inputs


def _is_parquet(path: str) -> bool:
    return path.lower().endswith(".parquet")


def resolve_inputs(inputs: Sequence[str], *, allow_text: bool = False) -> list[str]:
    """Expand globs (sorted matches) and check every file exists and is readable; drop duplicates.

    Raises :class:`PreprocessError` naming the first missing path, unreadable file or empty glob.
    """
    if not inputs:
        raise PreprocessError("no --input given")
    files: list[str] = []
    seen: set[str] = set()
    for pattern in inputs:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise PreprocessError(f"input glob {pattern!r} matched no files")
        else:
            if not os.path.exists(pattern):
                raise PreprocessError(f"input file not found: {pattern}")
            if os.path.isdir(pattern):
                raise PreprocessError(
                    f"input {pattern} is a directory; pass files or a glob such as '{pattern}/*.jsonl'"
                )
            matches = [pattern]
        for path in matches:
            real = os.path.realpath(path)
            if real in seen:
                continue
            seen.add(real)
            try:
                with open(path, "rb") as f:
                    f.read(1)
            except OSError as exc:
                raise PreprocessError(f"cannot read input {path}: {exc.strerror or exc}") from None
            if path.endswith(".txt") and not allow_text:
                raise PreprocessError(
                    f"{path}: plain .txt input is not supported; use jsonl (one JSON object per line)"
                )
            files.append(path)
    return files


@dataclass
class Batch:
    """Up to ``batch_size`` consecutive records of one file.

    jsonl: ``lines`` holds the raw bytes of each non-blank line; parquet: ``columns`` maps each key
    to its values. ``numbers`` are 1-based line numbers (jsonl) or row numbers (parquet).
    """

    path: str
    kind: str  # "jsonl" | "parquet"
    numbers: list[int]
    lines: list[bytes] | None = None
    columns: dict[str, list[object]] | None = None
    nbytes: int = 0


def location(batch: Batch, number: int) -> str:
    """``file:line`` (jsonl) or ``file:row N`` (parquet)."""
    return f"{batch.path}:{number}" if batch.kind == "jsonl" else f"{batch.path}:row {number}"


def _iter_jsonl(path: str, batch_size: int) -> Iterator[Batch]:
    opener = gzip.open if path.lower().endswith(".gz") else open
    numbers: list[int] = []
    lines: list[bytes] = []
    nbytes = 0
    n = 0
    try:
        with opener(path, "rb") as f:
            for n, raw in enumerate(f, 1):  # noqa: B007 - n is used after the loop
                nbytes += len(raw)
                if not raw.strip():
                    continue
                numbers.append(n)
                lines.append(raw)
                if len(lines) >= batch_size:
                    yield Batch(path, "jsonl", numbers, lines=lines, nbytes=nbytes)
                    numbers, lines, nbytes = [], [], 0
    except (OSError, EOFError, zlib.error) as exc:
        raise PreprocessError(f"{path}: cannot read (after line {n}): {exc}") from None
    if lines or nbytes:
        yield Batch(path, "jsonl", numbers, lines=lines, nbytes=nbytes)


def _iter_parquet(path: str, keys: Sequence[str], batch_size: int) -> Iterator[Batch]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        raise PreprocessError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise PreprocessError(f"{path}: cannot read as parquet: {exc}") from None
    schema = pf.schema_arrow
    for key in keys:
        if key not in schema.names:
            raise PreprocessError(f"{path}: missing column {key!r} (columns: {', '.join(schema.names)})")
        typ = schema.field(key).type
        if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
            raise PreprocessError(f"{path}: column {key!r} has type {typ}, expected a string column")
    row = 0
    try:
        for rb in pf.iter_batches(batch_size=batch_size, columns=list(keys)):
            numbers = list(range(row + 1, row + rb.num_rows + 1))
            row += rb.num_rows
            cols = {key: rb.column(key).to_pylist() for key in keys}
            yield Batch(path, "parquet", numbers, columns=cols, nbytes=rb.nbytes)
    except (OSError, pa.ArrowException) as exc:
        raise PreprocessError(f"{path}: cannot read parquet after row {row}: {exc}") from None


def iter_batches(files: Sequence[str], keys: Sequence[str], batch_size: int) -> Iterator[Batch]:
    """Batches of records of ``files`` in order (jsonl, jsonl.gz, parquet by extension)."""
    for path in files:
        if _is_parquet(path):
            yield from _iter_parquet(path, keys, batch_size)
        else:
            yield from _iter_jsonl(path, batch_size)


# ------------------------------------------------------------------------------------------- parsing

_JSON_TYPE = {
    type(None): "null",
    bool: "boolean",
    int: "number",
    float: "number",
    list: "array",
    dict: "object",
}


def _json_type(value: object) -> str:
    return _JSON_TYPE.get(type(value), type(value).__name__)


class RecordParser:
    """Turns a :class:`Batch` into per-key text lists, collecting ``(number, message)`` for bad records.

    A value is a string, or (jsonl) a list of strings: pre-split sentences, one sequence each, as Megatron
    takes them. ``keep_empty`` lets an empty string (or list) through: it becomes an empty document.
    """

    def __init__(self, keys: Sequence[str], keep_empty: bool = False) -> None:
        self.keys = list(keys)
        self.keep_empty = keep_empty

    def _check(self, value: object, key: str) -> str | None:
        """Error message for a bad value of ``key``, else None."""
        if isinstance(value, list):
            if not value and not self.keep_empty:
                return f"empty document: key {key!r} is an empty list (use --on-error keep-empty to keep it)"
            for i, item in enumerate(value):
                if not isinstance(item, str):
                    return f"key {key!r} item {i} is {_json_type(item)}, expected a string"
                if not item.isascii() and _bad_unicode(item):
                    return f"key {key!r} item {i} contains an unpaired surrogate escape (not valid Unicode)"
            return None
        if not isinstance(value, str):
            return f"key {key!r} is {_json_type(value)}, expected a string or a list of strings"
        if not value and not self.keep_empty:
            return f"empty document: key {key!r} is an empty string (use --on-error keep-empty to keep it)"
        if not value.isascii() and _bad_unicode(value):
            return f"key {key!r} contains an unpaired surrogate escape (not valid Unicode)"
        return None

    def parse(self, batch: Batch) -> tuple[list[int], dict[str, list[str]], list[tuple[int, str]]]:
        """Return (numbers of good records, texts per key, bad records as (number, message))."""
        keys = self.keys
        good: list[int] = []
        texts: dict[str, list[str]] = {k: [] for k in keys}
        bad: list[tuple[int, str]] = []
        if batch.kind == "parquet":
            assert batch.columns is not None
            cols = [batch.columns[k] for k in keys]
            for i, n in enumerate(batch.numbers):
                values = [c[i] for c in cols]
                err = next((e for k, v in zip(keys, values) if (e := self._check(v, k))), None)
                if err:
                    bad.append((n, err))
                    continue
                good.append(n)
                for k, v in zip(keys, values):
                    texts[k].append(v)  # type: ignore[arg-type]
            return good, texts, bad
        assert batch.lines is not None
        loads = json.loads
        single = keys[0] if len(keys) == 1 else None
        for n, raw in zip(batch.numbers, batch.lines):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad.append(
                    (
                        n,
                        f"invalid UTF-8 ({exc.reason} at byte {exc.start}: {raw[exc.start : exc.start + 4]!r})",
                    )
                )
                continue
            try:
                obj = loads(line)
            except ValueError as exc:
                msg = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
                col = f" at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
                bad.append((n, f"malformed JSON ({msg}{col})"))
                continue
            if not isinstance(obj, dict):
                bad.append((n, f"expected a JSON object, got {_json_type(obj)}"))
                continue
            if single is not None:  # fast path for the common one-key case
                value = obj.get(single, _MISSING)
                if type(value) is str and value and value.isascii():
                    good.append(n)
                    texts[single].append(value)
                    continue
            err = None
            for k in keys:
                if k not in obj:
                    present = ", ".join(repr(x) for x in list(obj)[:10]) or "none"
                    err = f"missing key {k!r} (keys present: {present})"
                    break
                err = self._check(obj[k], k)
                if err:
                    break
            if err:
                bad.append((n, err))
                continue
            good.append(n)
            for k in keys:
                texts[k].append(obj[k])
        return good, texts, bad


_MISSING = object()


def _bad_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# ------------------------------------------------------------------------------------------ encoding


@dataclass
class EncodedBatch:
    """Encoded documents of one batch: per key a flat int64 token array and int64 sequence lengths (eod
    included), and the sequences of each document (``None``: one sequence per document)."""

    path: str
    kind: str
    num_docs: int
    tokens: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    bad: list[tuple[int, str]]
    nbytes: int
    sequences_per_document: dict[str, np.ndarray | None] = field(default_factory=dict)

    def location(self, number: int) -> str:
        return f"{self.path}:{number}" if self.kind == "jsonl" else f"{self.path}:row {number}"


@dataclass(frozen=True)
class EncoderOptions:
    """How documents become sequences: ``split_sentences`` (NLTK punkt for ``lang``, ``keep_newlines``) and
    ``keep_empty`` (an empty text is an empty document, as Megatron writes it)."""

    split_sentences: bool = False
    lang: str = "english"
    keep_newlines: bool = False
    keep_empty: bool = False


class Encoder:
    """Parses and batch-encodes :class:`Batch` es; picklable settings, tokenizer rebuilt per process."""

    def __init__(
        self,
        tokenizer_json: str,
        keys: Sequence[str],
        eod_id: int | None,
        add_special_tokens: bool = True,
        options: EncoderOptions | None = None,
    ) -> None:
        from megatron_doremi.data.tokenizer import tokenizer_from_str

        self.tokenizer = tokenizer_from_str(tokenizer_json)
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self._setup(keys, eod_id, add_special_tokens, options)

    def _setup(
        self,
        keys: Sequence[str],
        eod_id: int | None,
        add_special_tokens: bool,
        options: EncoderOptions | None,
    ) -> None:
        self.keys = list(keys)
        self.eod_id = eod_id
        self.add_special_tokens = add_special_tokens
        self.options = options or EncoderOptions()
        self.parser = RecordParser(keys, keep_empty=self.options.keep_empty)
        self.splitter = None
        if self.options.split_sentences:
            from megatron_doremi.data.sentences import sentence_splitter

            self.splitter = sentence_splitter(self.options.lang, self.options.keep_newlines)

    @classmethod
    def from_loaded(
        cls,
        loaded: LoadedTokenizer,
        keys: Sequence[str],
        eod_id: int | None,
        add_special_tokens: bool = True,
        options: EncoderOptions | None = None,
    ) -> Encoder:
        """Encoder sharing ``loaded.tokenizer`` (no JSON round trip)."""
        enc = cls.__new__(cls)
        enc.tokenizer = loaded.tokenizer
        enc._setup(keys, eod_id, add_special_tokens, options)
        return enc

    def _flatten(self, ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        total = int(lengths.sum())
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=total)
        if self.eod_id is None:
            return flat, lengths
        out = np.empty(total + len(ids), dtype=np.int64)
        ends = np.cumsum(lengths + 1) - 1  # position of each document's eod
        mask = np.ones(out.size, dtype=bool)
        mask[ends] = False
        out[mask] = flat
        out[ends] = self.eod_id
        return out, lengths + 1

    def _encode_sequences(self, values: list[str | list[str]]) -> list[list[list[int]]]:
        """Per document its non-empty sequences' ids (sentences, or list items), eod on the last one."""
        sentences: list[str] = []
        counts: list[int] = []
        for value in values:
            parts = [value] if isinstance(value, str) else list(value)
            if self.splitter is not None:
                parts = [s for part in parts for s in self.splitter(part)]
            sentences.extend(parts)
            counts.append(len(parts))
        encs = self.tokenizer.encode_batch_fast(sentences, add_special_tokens=self.add_special_tokens)
        docs: list[list[list[int]]] = []
        pos = 0
        for n in counts:
            seqs = [e.ids for e in encs[pos : pos + n] if len(e.ids)]  # Megatron drops empty sentences
            pos += n
            if seqs and self.eod_id is not None:
                seqs[-1] = [*seqs[-1], self.eod_id]
            docs.append(seqs)
        return docs

    @staticmethod
    def _flatten_sequences(docs: list[list[list[int]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        seqs = [seq for doc in docs for seq in doc]
        lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
        flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=int(lengths.sum()))
        return flat, lengths, np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))

    def encode(self, batch: Batch) -> EncodedBatch:
        """Parse, validate and encode one batch; records with zero tokens for any key are bad (unless
        ``keep_empty``: then that key's document is empty)."""
        good, texts, bad = self.parser.parse(batch)
        simple = self.splitter is None and all(type(v) is str for k in self.keys for v in texts[k])
        ids: dict[str, list] = {}
        for key in self.keys:
            if not texts[key]:
                ids[key] = []
            elif simple:
                encs = self.tokenizer.encode_batch_fast(
                    texts[key], add_special_tokens=self.add_special_tokens
                )
                ids[key] = [e.ids for e in encs]
            else:
                ids[key] = self._encode_sequences(texts[key])
        if good and not self.options.keep_empty:
            empty = np.zeros(len(good), dtype=bool)
            for key in self.keys:
                empty |= np.fromiter(map(len, ids[key]), dtype=np.int64, count=len(good)) == 0
            if empty.any():
                for i in np.flatnonzero(empty).tolist():
                    key = next(k for k in self.keys if not ids[k][i])
                    bad.append((good[i], f"empty document: key {key!r} encodes to zero tokens"))
                keep = np.flatnonzero(~empty).tolist()
                good = [good[i] for i in keep]
                ids = {k: [v[i] for i in keep] for k, v in ids.items()}
                bad.sort()
        tokens: dict[str, np.ndarray] = {}
        lengths: dict[str, np.ndarray] = {}
        per_doc: dict[str, np.ndarray | None] = {}
        for key in self.keys:
            if simple and all(len(x) for x in ids[key]):
                tokens[key], lengths[key] = self._flatten(ids[key])
                per_doc[key] = None
            else:
                docs = ids[key] if not simple else [[x] if len(x) else [] for x in ids[key]]
                if simple and self.eod_id is not None:
                    docs = [[[*d[0], self.eod_id]] if d else [] for d in docs]
                tokens[key], lengths[key], per_doc[key] = self._flatten_sequences(docs)
        return EncodedBatch(batch.path, batch.kind, len(good), tokens, lengths, bad, batch.nbytes, per_doc)


_WORKER_ENCODER: Encoder | None = None


def _init_worker(
    tokenizer_json: str,
    keys: list[str],
    eod_id: int | None,
    add_special_tokens: bool,
    options: EncoderOptions | None = None,
) -> None:
    global _WORKER_ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # N worker processes already use the cores
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and terminates the pool
    _WORKER_ENCODER = Encoder(tokenizer_json, keys, eod_id, add_special_tokens, options)


def _encode_in_worker(batch: Batch) -> EncodedBatch:
    assert _WORKER_ENCODER is not None, "worker not initialised"
    return _WORKER_ENCODER.encode(batch)


# -------------------------------------------------------------------------------------------- driver


@dataclass
class PreprocessConfig:
    """Settings of one preprocessing run (the CLI flags)."""

    inputs: list[str]
    output_prefix: str
    tokenizer: str
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    append_eod: bool = False
    eod_token: str | None = None
    workers: int = 1
    batch_size: int = 1024
    on_error: str = "fail"  # "fail" | "skip" | "keep-empty" (empty texts become empty documents)
    add_special_tokens: bool = True
    progress: bool = True
    tokenizer_type: str = "HuggingFaceTokenizer"
    vocab_file: str | None = None
    merge_file: str | None = None
    split_sentences: bool = False
    keep_newlines: bool = False
    lang: str = "english"
    partitions: int = 1
    keep_sequential_samples: bool = False
    log_interval: int | None = None  # print a progress line every N documents instead of the progress bar
    tiktoken_pattern: str | None = None  # TikTokenizer: "v1" | "v2"
    vocab_size: int | None = None  # TikTokenizer: total ids (default 2**17, as Megatron)
    tiktoken_num_special_tokens: int = 1000
    tiktoken_special_tokens: list[str] | None = None


@dataclass
class PreprocessSummary:
    """What a run did; ``skipped_examples`` holds up to :data:`MAX_REPORTED_SKIPS` ``file:line: message``."""

    files: list[str]
    outputs: dict[str, str]
    documents: int = 0
    tokens: dict[str, int] = field(default_factory=dict)
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens.values())

    def format(self) -> str:
        """Human-readable multi-line summary."""
        secs = max(self.seconds, 1e-9)
        lines = [
            "preprocess summary",
            f"  input files : {len(self.files)} ({self.bytes_read / 1e6:,.1f} MB read)",
            f"  documents   : {self.documents:,}",
            f"  tokens      : {self.total_tokens:,}"
            + (
                f" ({', '.join(f'{k}: {v:,}' for k, v in self.tokens.items())})"
                if len(self.tokens) > 1
                else ""
            ),
            f"  time        : {self.seconds:,.2f} s ({self.documents / secs:,.0f} docs/s, "
            f"{self.total_tokens / secs:,.0f} tokens/s)",
            f"  written     : {self.bytes_written / 1e6:,.2f} MB in "
            + ", ".join(f"{p}.bin/.idx" for p in self.outputs.values()),
            f"  skipped     : {self.skipped:,} bad lines",
        ]
        lines += [f"    {ex}" for ex in self.skipped_examples]
        if self.skipped > len(self.skipped_examples):
            lines.append(f"    ... and {self.skipped - len(self.skipped_examples):,} more")
        return "\n".join(lines)


def output_prefix_for(output_prefix: str, key: str, level: str = "document") -> str:
    """Megatron's naming: ``{output_prefix}_{key}_document`` (``_sentence`` with ``--split-sentences``)."""
    return f"{output_prefix}_{key}_{level}"


def _iter_encoded(
    config: PreprocessConfig, batches: Iterator[Batch], encoder_args: tuple
) -> Iterator[EncodedBatch]:
    """Encoded batches in input order: inline for one worker, else a bounded-queue process pool."""
    if config.workers <= 1:
        encoder: Encoder = encoder_args[0]
        for batch in batches:
            yield encoder.encode(batch)
        return
    ctx = mp.get_context("spawn")  # no fork of a process that may hold tokenizer threads
    with ctx.Pool(config.workers, initializer=_init_worker, initargs=encoder_args[1]) as pool:
        pending: deque = deque()
        limit = 2 * config.workers + 1
        for batch in batches:
            pending.append(pool.apply_async(_encode_in_worker, (batch,)))
            while len(pending) >= limit:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _check_config(config: PreprocessConfig) -> None:
    if config.on_error not in ON_ERROR:
        raise PreprocessError(f"--on-error must be one of {', '.join(ON_ERROR)}, got {config.on_error!r}")
    for flag, value in (
        ("--workers", config.workers),
        ("--batch-size", config.batch_size),
        ("--partitions", config.partitions),
    ):
        if value < 1:
            raise PreprocessError(f"{flag} must be >= 1, got {value}")
    if config.log_interval is not None and config.log_interval < 1:
        raise PreprocessError(f"--log-interval must be >= 1, got {config.log_interval}")
    keys = list(config.json_keys)
    if not keys or any(not k for k in keys) or len(set(keys)) != len(keys):
        raise PreprocessError(f"--json-keys must be distinct non-empty names, got {keys}")


def _load(config: PreprocessConfig) -> tuple[LoadedTokenizer, int | None]:
    try:
        tiktoken = {
            "pattern": config.tiktoken_pattern,
            "vocab_size": config.vocab_size,
            "num_special_tokens": config.tiktoken_num_special_tokens,
            "special_tokens": config.tiktoken_special_tokens,
        }
        loaded = load_megatron_tokenizer(
            config.tokenizer_type, config.tokenizer, config.vocab_file, config.merge_file, tiktoken
        )
        eod_id = loaded.eod_id(config.eod_token) if (config.append_eod or config.eod_token) else None
    except TokenizerError as exc:
        raise PreprocessError(str(exc)) from None
    if config.append_eod and eod_id is None:
        raise PreprocessError(
            f"--append-eod: tokenizer {loaded.path} has no end-of-document token (looked for its eos and "
            f"{', '.join(('<|endoftext|>', '</s>', '<eos>'))}); pass --eod-token TOKEN"
        )
    return loaded, eod_id if config.append_eod else None


def _partition_of(enc: EncodedBatch, key: str, first_doc: int, partitions: int) -> list[tuple]:
    """``enc``'s documents of ``key`` dealt round-robin to partitions (document ``g`` -> ``g % partitions``),
    as (tokens, sequence lengths, sequences per document) per partition."""
    lengths = enc.lengths[key]
    per_doc = enc.sequences_per_document.get(key)
    if per_doc is None:
        per_doc = np.ones(len(lengths), dtype=np.int64)
    doc_part = (first_doc + np.arange(len(per_doc))) % partitions
    seq_part = np.repeat(doc_part, per_doc)
    tok_part = np.repeat(seq_part, lengths)
    return [
        (enc.tokens[key][tok_part == p], lengths[seq_part == p], per_doc[doc_part == p])
        for p in range(partitions)
    ]


def preprocess(config: PreprocessConfig) -> PreprocessSummary:
    """Run the preprocessing described by ``config``; raises :class:`PreprocessError` on bad input.

    Nothing appears under the final ``{prefix}_{key}_document.bin/.idx`` names unless the run
    succeeds; on failure (bad input, a full disk) the temp files are removed and earlier outputs are left
    untouched. ``partitions > 1`` writes Megatron's merged ``--partitions`` shard: documents dealt round-robin
    to the partitions (contiguous chunks with ``keep_sequential_samples``, which keeps the input order),
    then the partitions concatenated in order.
    """
    _check_config(config)
    keys = list(config.json_keys)
    files = resolve_inputs(config.inputs)
    loaded, eod_id = _load(config)
    options = EncoderOptions(
        split_sentences=config.split_sentences,
        lang=config.lang,
        keep_newlines=config.keep_newlines,
        keep_empty=config.on_error == "keep-empty",
    )
    dtype = dtype_for_vocab(loaded.vocab_size)
    level = "sentence" if config.split_sentences else "document"
    outputs = {key: output_prefix_for(config.output_prefix, key, level) for key in keys}
    summary = PreprocessSummary(files=files, outputs=outputs, tokens={k: 0 for k in keys})
    try:
        if config.workers <= 1:
            encoder_args: tuple = (
                Encoder.from_loaded(loaded, keys, eod_id, config.add_special_tokens, options),
                None,
            )
        else:
            Encoder.from_loaded(
                loaded, keys, eod_id, config.add_special_tokens, options
            )  # fail fast (e.g. nltk)
            encoder_args = (
                None,
                (loaded.tokenizer.to_str(), keys, eod_id, config.add_special_tokens, options),
            )
    except ValueError as exc:
        raise PreprocessError(str(exc)) from None
    dealt = config.partitions if config.partitions > 1 and not config.keep_sequential_samples else 1
    if config.partitions > 1 and config.keep_sequential_samples:
        print(
            "note: --partitions with --keep-sequential-samples gives the input order, written as one shard",
            file=sys.stderr,
        )
    part_prefixes = {
        key: [f"{config.output_prefix}_{p}_{key}_{level}" for p in range(dealt)] if dealt > 1 else [prefix]
        for key, prefix in outputs.items()
    }
    start = time.perf_counter()
    try:
        _write_all(config, files, keys, encoder_args, dtype, part_prefixes, summary, start)
        if dealt > 1:
            for key, prefix in outputs.items():
                merge_indexed_datasets(part_prefixes[key], prefix)
    except OSError as exc:
        where = os.path.dirname(os.path.abspath(config.output_prefix)) or "."
        if exc.errno == errno.ENOSPC:
            raise PreprocessError(
                f"no space left on {where} while writing {config.output_prefix}_*: nothing was written under the "
                "final names; free space (the shards need about 2 bytes per token) and run again"
            ) from None
        raise PreprocessError(f"cannot write under {where}: {exc.strerror or exc}") from None
    finally:
        if dealt > 1:
            for prefix in (p for parts in part_prefixes.values() for p in parts):
                for path in (data_file_path(prefix), index_file_path(prefix)):
                    if os.path.exists(path):
                        os.remove(path)
    summary.seconds = time.perf_counter() - start
    for prefix in outputs.values():
        summary.bytes_written += os.path.getsize(data_file_path(prefix)) + os.path.getsize(
            index_file_path(prefix)
        )
    return summary


def _write_all(
    config: PreprocessConfig,
    files: list[str],
    keys: list[str],
    encoder_args: tuple,
    dtype: np.dtype,
    part_prefixes: dict[str, list[str]],
    summary: PreprocessSummary,
    start: float,
) -> None:
    """Encode every input and write the (partition) shards; raises before any final name is written."""
    from tqdm import tqdm

    with ExitStack() as stack:
        writers = {
            key: [stack.enter_context(IndexedDatasetWriter(prefix, dtype)) for prefix in prefixes]
            for key, prefixes in part_prefixes.items()
        }
        bar = stack.enter_context(
            tqdm(
                desc="tokenizing",
                unit="doc",
                unit_scale=True,
                file=sys.stderr,
                disable=not config.progress or config.log_interval is not None,
                mininterval=0.5,
                dynamic_ncols=True,
            )
        )
        batches = iter_batches(files, keys, config.batch_size)
        # closing(): on an error the pool is terminated now, not when the generator is collected
        encoded = stack.enter_context(closing(_iter_encoded(config, batches, encoder_args)))
        next_log = config.log_interval
        for enc in encoded:
            for number, message in enc.bad:
                where = f"{enc.location(number)}: {message}"
                if config.on_error != "skip":
                    raise PreprocessError(where + " (use --on-error skip to skip bad lines)")
                summary.skipped += 1
                if len(summary.skipped_examples) < MAX_REPORTED_SKIPS:
                    summary.skipped_examples.append(where)
            for key in keys:
                if len(writers[key]) == 1:
                    writers[key][0].add_documents(
                        enc.tokens[key], enc.lengths[key], enc.sequences_per_document.get(key)
                    )
                else:
                    for writer, part in zip(
                        writers[key], _partition_of(enc, key, summary.documents, len(writers[key]))
                    ):
                        writer.add_documents(*part)
                summary.tokens[key] += int(enc.tokens[key].size)
            summary.documents += enc.num_docs
            summary.bytes_read += enc.nbytes
            if enc.num_docs:
                bar.update(enc.num_docs)
                rate = summary.total_tokens / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"{rate:,.0f} tok/s, {summary.skipped} skipped", refresh=False)
            while next_log is not None and summary.documents >= next_log:
                elapsed = max(time.perf_counter() - start, 1e-9)
                print(
                    f"Processed {summary.documents} documents ({summary.documents / elapsed:,.0f} docs/s, "
                    f"{summary.bytes_read / elapsed / 2**20:,.2f} MB/s).",
                    file=sys.stderr,
                )
                next_log += config.log_interval  # type: ignore[operator]
        if summary.documents == 0:
            raise PreprocessError(
                f"no documents to write: {summary.skipped} bad lines were skipped"
                if summary.skipped
                else f"no documents found in {len(files)} input file(s)"
            )


# Megatron flags accepted with a one-line note because they do not change the output here (name -> nargs)
_IGNORED_FLAGS = {
    "--find-optimal-num-workers": 0,
    "--workers-to-check": "+",
    "--max-documents": 1,
    "--make-vocab-size-divisible-by": 1,
    "--tensor-model-parallel-size": 1,
    "--rank": 1,
}


def build_parser() -> argparse.ArgumentParser:
    """Megatron-LM's ``tools/preprocess_data.py`` flags."""
    p = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description="Tokenize jsonl(.gz)/parquet into Megatron .bin/.idx shards ({prefix}_{key}_document).",
    )
    g = p.add_argument_group("input")
    g.add_argument(
        "--input", nargs="+", required=True, help="files or globs: .jsonl, .json, .jsonl.gz, .parquet"
    )
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize, one output per key")
    g.add_argument(
        "--split-sentences",
        action="store_true",
        help="one sequence per sentence (NLTK punkt, installed locally); outputs {prefix}_{key}_sentence",
    )
    g.add_argument("--keep-newlines", action="store_true", help="keep newlines between split sentences")
    g.add_argument("--lang", default="english", help="NLTK punkt language for --split-sentences")
    g = p.add_argument_group("tokenizer")
    g.add_argument(
        "--tokenizer",
        "--tokenizer-model",
        dest="tokenizer",
        default=None,
        help="HuggingFaceTokenizer: tokenizer.json or HF tokenizer dir; SentencePieceTokenizer: the .model file; "
        "TikTokenizer: Megatron's vocabulary .json",
    )
    g.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default="HuggingFaceTokenizer")
    g.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: GPT-2's vocab.json")
    g.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: GPT-2's merges.txt")
    g.add_argument("--vocab-extra-ids", type=int, default=0, help="only 0 is supported")
    g.add_argument(
        "--tiktoken-pattern", choices=("v1", "v2"), default=None, help="TikTokenizer: split pattern"
    )
    g.add_argument("--vocab-size", type=int, default=None, help="TikTokenizer: total ids (default 131072)")
    g.add_argument(
        "--tiktoken-num-special-tokens", type=int, default=1000, help="TikTokenizer: ids before the ranks"
    )
    g.add_argument(
        "--tiktoken-special-tokens",
        "--tokenizer-special-tokens",
        dest="tiktoken_special_tokens",
        nargs="+",
        default=None,
        help="TikTokenizer: the first special tokens (default <unk> <s> </s>; </s> is EOD)",
    )
    g.add_argument(
        "--append-eod", action="store_true", help="append the end-of-document token to each document"
    )
    g.add_argument("--eod-token", default=None, help="eod token (default: eos, <|endoftext|>, </s> or <eos>)")
    g.add_argument(
        "--no-add-special-tokens",
        dest="add_special_tokens",
        action="store_false",
        help="do not run the tokenizer's post-processor (e.g. no BOS)",
    )
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="encoding processes (1 = in-process)")
    g.add_argument("--batch-size", type=int, default=1024, help="documents per encode_batch call")
    g.add_argument(
        "--partitions",
        type=int,
        default=1,
        help="Megatron's partitions: documents dealt round-robin to N partitions, merged in partition order",
    )
    g.add_argument(
        "--keep-sequential-samples", action="store_true", help="with --partitions: keep the input order"
    )
    g.add_argument(
        "--on-error",
        choices=ON_ERROR,
        default="fail",
        help="on a bad line: fail, skip it, or keep-empty (an empty text is an empty document; else fail)",
    )
    g.add_argument("--log-interval", type=int, default=None, help="a progress line every N documents")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")
    g = p.add_argument_group("accepted for Megatron compatibility (no effect here)")
    for flag, nargs in _IGNORED_FLAGS.items():
        if nargs == 0:
            g.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
        else:
            g.add_argument(flag, nargs=nargs, default=None, help=argparse.SUPPRESS)
    return p


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: prints the summary to stdout, ``error: ...`` to stderr; returns the exit status."""
    args = build_parser().parse_args(argv)
    for flag in _IGNORED_FLAGS:
        if getattr(args, flag.lstrip("-").replace("-", "_")) not in (None, False):
            print(
                f"warning: {flag} is accepted for Megatron compatibility and has no effect here",
                file=sys.stderr,
            )
    if args.vocab_extra_ids:
        print("error: --vocab-extra-ids is not supported (only 0)", file=sys.stderr)
        return 1
    config = PreprocessConfig(
        inputs=args.input,
        output_prefix=args.output_prefix,
        tokenizer=args.tokenizer,
        json_keys=args.json_keys,
        append_eod=args.append_eod,
        eod_token=args.eod_token,
        workers=args.workers,
        batch_size=args.batch_size,
        on_error=args.on_error,
        add_special_tokens=args.add_special_tokens,
        progress=args.progress,
        tokenizer_type=args.tokenizer_type,
        vocab_file=args.vocab_file,
        merge_file=args.merge_file,
        split_sentences=args.split_sentences,
        keep_newlines=args.keep_newlines,
        lang=args.lang,
        partitions=args.partitions,
        keep_sequential_samples=args.keep_sequential_samples,
        log_interval=args.log_interval,
        tiktoken_pattern=args.tiktoken_pattern,
        vocab_size=args.vocab_size,
        tiktoken_num_special_tokens=args.tiktoken_num_special_tokens,
        tiktoken_special_tokens=args.tiktoken_special_tokens,
    )
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # SIGTERM cleans temps like Ctrl-C
    try:
        summary = preprocess(config)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; no output written", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
