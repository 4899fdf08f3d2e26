"""Tokenize jsonl(.gz)/parquet documents into Megatron shards (``{prefix}_{key}_document.bin/.idx``).

The logic behind ``tools/preprocess_data.py`` and ``python -m megatron_doremi.data.preprocess``
(Megatron-LM's flags). Lines are read in the main process, parsed and batch-encoded with the HF
fast tokenizer (inline for ``--workers 1``, else in a process pool that keeps document order) and
streamed into :class:`~megatron_doremi.data.indexed.IndexedDatasetWriter` temp files, which get
their final names only after every input was processed without a fatal error.
"""

from __future__ import annotations

import argparse
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
)
from megatron_doremi.data.tokenizer import LoadedTokenizer, TokenizerError, load_tokenizer

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
    """Turns a :class:`Batch` into per-key text lists, collecting ``(number, message)`` for bad records."""

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = list(keys)

    def _check(self, value: object, key: str) -> str | None:
        """Error message for a bad value of ``key``, else None."""
        if not isinstance(value, str):
            return f"key {key!r} is {_json_type(value)}, expected a string"
        if not value:
            return f"empty document: key {key!r} is an empty string"
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
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


# ------------------------------------------------------------------------------------------ encoding


@dataclass
class EncodedBatch:
    """Encoded documents of one batch: per key a flat int64 token array and int64 lengths (eod included)."""

    path: str
    kind: str
    num_docs: int
    tokens: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    bad: list[tuple[int, str]]
    nbytes: int

    def location(self, number: int) -> str:
        return f"{self.path}:{number}" if self.kind == "jsonl" else f"{self.path}:row {number}"


class Encoder:
    """Parses and batch-encodes :class:`Batch` es; picklable settings, tokenizer rebuilt per process."""

    def __init__(
        self, tokenizer_json: str, keys: Sequence[str], eod_id: int | None, add_special_tokens: bool = True
    ) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.keys = list(keys)
        self.eod_id = eod_id
        self.add_special_tokens = add_special_tokens
        self.parser = RecordParser(keys)

    @classmethod
    def from_loaded(
        cls, loaded: LoadedTokenizer, keys: Sequence[str], eod_id: int | None, add_special_tokens: bool = True
    ) -> Encoder:
        """Encoder sharing ``loaded.tokenizer`` (no JSON round trip)."""
        enc = cls.__new__(cls)
        enc.tokenizer = loaded.tokenizer
        enc.keys = list(keys)
        enc.eod_id = eod_id
        enc.add_special_tokens = add_special_tokens
        enc.parser = RecordParser(keys)
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

    def encode(self, batch: Batch) -> EncodedBatch:
        """Parse, validate and encode one batch; records with zero tokens for any key are bad."""
        good, texts, bad = self.parser.parse(batch)
        ids: dict[str, list[list[int]]] = {}
        for key in self.keys:
            if not texts[key]:
                ids[key] = []
                continue
            encs = self.tokenizer.encode_batch_fast(texts[key], add_special_tokens=self.add_special_tokens)
            ids[key] = [e.ids for e in encs]
        if good:
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
        for key in self.keys:
            tokens[key], lengths[key] = self._flatten(ids[key])
        return EncodedBatch(batch.path, batch.kind, len(good), tokens, lengths, bad, batch.nbytes)


_WORKER_ENCODER: Encoder | None = None


def _init_worker(tokenizer_json: str, keys: list[str], eod_id: int | None, add_special_tokens: bool) -> None:
    global _WORKER_ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # N worker processes already use the cores
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and terminates the pool
    _WORKER_ENCODER = Encoder(tokenizer_json, keys, eod_id, add_special_tokens)


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
    on_error: str = "fail"  # "fail" | "skip"
    add_special_tokens: bool = True
    progress: bool = True


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


def output_prefix_for(output_prefix: str, key: str) -> str:
    """Megatron's naming: ``{output_prefix}_{key}_document``."""
    return f"{output_prefix}_{key}_document"


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


def preprocess(config: PreprocessConfig) -> PreprocessSummary:
    """Run the preprocessing described by ``config``; raises :class:`PreprocessError` on bad input.

    Nothing appears under the final ``{prefix}_{key}_document.bin/.idx`` names unless the run
    succeeds; on failure the temp files are removed and earlier outputs are left untouched.
    """
    if config.on_error not in ("fail", "skip"):
        raise PreprocessError(f"--on-error must be 'fail' or 'skip', got {config.on_error!r}")
    if config.workers < 1:
        raise PreprocessError(f"--workers must be >= 1, got {config.workers}")
    if config.batch_size < 1:
        raise PreprocessError(f"--batch-size must be >= 1, got {config.batch_size}")
    keys = list(config.json_keys)
    if not keys or any(not k for k in keys) or len(set(keys)) != len(keys):
        raise PreprocessError(f"--json-keys must be distinct non-empty names, got {keys}")
    files = resolve_inputs(config.inputs)
    try:
        loaded = load_tokenizer(config.tokenizer)
        eod_id = loaded.eod_id(config.eod_token) if (config.append_eod or config.eod_token) else None
    except TokenizerError as exc:
        raise PreprocessError(str(exc)) from None
    if config.append_eod and eod_id is None:
        raise PreprocessError(
            f"--append-eod: tokenizer {config.tokenizer} has no end-of-document token (looked for its eos and "
            f"{', '.join(('<|endoftext|>', '</s>', '<eos>'))}); pass --eod-token TOKEN"
        )
    if not config.append_eod:
        eod_id = None
    dtype = dtype_for_vocab(loaded.vocab_size)
    outputs = {key: output_prefix_for(config.output_prefix, key) for key in keys}
    summary = PreprocessSummary(files=files, outputs=outputs, tokens={k: 0 for k in keys})
    if config.workers <= 1:
        encoder_args: tuple = (Encoder.from_loaded(loaded, keys, eod_id, config.add_special_tokens), None)
    else:
        encoder_args = (None, (loaded.tokenizer.to_str(), keys, eod_id, config.add_special_tokens))

    from tqdm import tqdm

    start = time.perf_counter()
    with ExitStack() as stack:
        writers = {
            key: stack.enter_context(IndexedDatasetWriter(prefix, dtype)) for key, prefix in outputs.items()
        }
        bar = stack.enter_context(
            tqdm(
                desc="tokenizing",
                unit="doc",
                unit_scale=True,
                file=sys.stderr,
                disable=not config.progress,
                mininterval=0.5,
                dynamic_ncols=True,
            )
        )
        batches = iter_batches(files, keys, config.batch_size)
        # closing(): on an error the pool is terminated now, not when the generator is collected
        encoded = stack.enter_context(closing(_iter_encoded(config, batches, encoder_args)))
        for enc in encoded:
            for number, message in enc.bad:
                where = f"{enc.location(number)}: {message}"
                if config.on_error == "fail":
                    raise PreprocessError(where + " (use --on-error skip to skip bad lines)")
                summary.skipped += 1
                if len(summary.skipped_examples) < MAX_REPORTED_SKIPS:
                    summary.skipped_examples.append(where)
            for key in keys:
                writers[key].add_documents(enc.tokens[key], enc.lengths[key])
                summary.tokens[key] += int(enc.tokens[key].size)
            summary.documents += enc.num_docs
            summary.bytes_read += enc.nbytes
            if enc.num_docs:
                bar.update(enc.num_docs)
                rate = summary.total_tokens / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"{rate:,.0f} tok/s, {summary.skipped} skipped", refresh=False)
        if summary.documents == 0:
            raise PreprocessError(
                f"no documents to write: {summary.skipped} bad lines were skipped"
                if summary.skipped
                else f"no documents found in {len(files)} input file(s)"
            )
    summary.seconds = time.perf_counter() - start
    for prefix in outputs.values():
        summary.bytes_written += os.path.getsize(data_file_path(prefix)) + os.path.getsize(
            index_file_path(prefix)
        )
    return summary


def build_parser() -> argparse.ArgumentParser:
    """Megatron-LM's ``tools/preprocess_data.py`` flags (the ones that apply to HF tokenizers)."""
    p = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description="Tokenize jsonl(.gz)/parquet into Megatron .bin/.idx shards ({prefix}_{key}_document).",
    )
    g = p.add_argument_group("input")
    g.add_argument(
        "--input", nargs="+", required=True, help="files or globs: .jsonl, .json, .jsonl.gz, .parquet"
    )
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize, one output per key")
    g = p.add_argument_group("tokenizer")
    g.add_argument(
        "--tokenizer",
        "--tokenizer-model",
        dest="tokenizer",
        required=True,
        help="tokenizer.json or HF tokenizer dir",
    )
    g.add_argument(
        "--tokenizer-type",
        choices=("HuggingFaceTokenizer",),
        default="HuggingFaceTokenizer",
        help="accepted for Megatron compatibility; only HF tokenizers are supported",
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
        "--on-error", choices=("fail", "skip"), default="fail", help="on a bad line: fail, or skip it"
    )
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")
    return p


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: prints the summary to stdout, ``error: ...`` to stderr; returns the exit status."""
    args = build_parser().parse_args(argv)
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
