"""Local HF tokenizers: load one for preprocessing, or train a byte-level BPE from jsonl/parquet/text.

Nothing here downloads anything: a tokenizer is a local ``tokenizer.json`` file or a directory that
``transformers.AutoTokenizer.from_pretrained(dir, local_files_only=True)`` can load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from megatron_doremi.atomic_io import atomic_write_text

__all__ = [
    "ENDOFTEXT",
    "EOD_CANDIDATES",
    "LoadedTokenizer",
    "TokenizerError",
    "iter_training_texts",
    "load_tokenizer",
    "main",
    "train_bpe_tokenizer",
]

ENDOFTEXT = "<|endoftext|>"
EOD_CANDIDATES: tuple[str, ...] = ("<|endoftext|>", "</s>", "<eos>")


class TokenizerError(ValueError):
    """A tokenizer cannot be loaded or trained, or has no end-of-document token."""


@dataclass
class LoadedTokenizer:
    """A fast tokenizer ready for ``encode_batch``; ``eos_token`` is the config's eos (dirs only)."""

    tokenizer: Tokenizer
    path: str
    eos_token: str | None = None

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit, added/special tokens included."""
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def eod_id(self, eod_token: str | None = None) -> int | None:
        """Id of ``eod_token`` (error if given but unknown), else of the config's eos, else of the
        first of :data:`EOD_CANDIDATES` in the vocabulary, else None."""
        if eod_token is not None:
            tid = self.tokenizer.token_to_id(eod_token)
            if tid is None:
                raise TokenizerError(
                    f"{self.path}: --eod-token {eod_token!r} is not in the tokenizer's vocabulary"
                )
            return int(tid)
        for cand in ((self.eos_token,) if self.eos_token else ()) + EOD_CANDIDATES:
            tid = self.tokenizer.token_to_id(cand)
            if tid is not None:
                return int(tid)
        return None


TOKENIZER_TYPES = ("HuggingFaceTokenizer", "GPT2BPETokenizer", "SentencePieceTokenizer", "TikTokenizer")


class _Encoding:
    __slots__ = ("ids",)

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids


class SentencePieceAdapter:
    """A SentencePiece model behind the part of the ``tokenizers.Tokenizer`` API preprocessing uses.

    Ids are ``SentencePieceProcessor.encode`` (no BOS/EOS); the end-of-document token is the model's eos, as
    Megatron's GPTSentencePieceTokenizer has it.
    """

    def __init__(self, model_path: str) -> None:
        try:
            import sentencepiece
        except ImportError:
            raise TokenizerError(
                "--tokenizer-type SentencePieceTokenizer needs the sentencepiece package (pip install sentencepiece)"
            ) from None
        self.model_path = model_path
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(f"{model_path}: cannot load as a SentencePiece model ({exc})") from None

    def encode_batch_fast(self, texts: list[str], add_special_tokens: bool = True) -> list[_Encoding]:
        return [_Encoding(ids) for ids in self.sp.encode(list(texts))]

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return int(self.sp.get_piece_size())

    def token_to_id(self, token: str) -> int | None:
        tid = int(self.sp.piece_to_id(token))
        return None if tid == self.sp.unk_id() and token != self.sp.id_to_piece(tid) else tid

    def eos_piece(self) -> str | None:
        eos = int(self.sp.eos_id())
        return self.sp.id_to_piece(eos) if eos >= 0 else None

    def to_str(self) -> str:
        return json.dumps({"sentencepiece": self.model_path})

    def no_truncation(self) -> None:
        pass

    def no_padding(self) -> None:
        pass


#: Megatron-LM's tiktoken split patterns (``--tiktoken-pattern v1|v2``)
TIKTOKEN_PATTERNS = {
    "v1": r"[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
    "v2": (
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
        r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
        r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
}
#: the special tokens Megatron-LM's TikTokenizer puts first when none are given (``</s>`` is its EOD)
TIKTOKEN_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


class TikTokenAdapter:
    """Megatron-LM's ``TikTokenizer`` behind the part of the ``tokenizers.Tokenizer`` API preprocessing uses.

    The vocabulary is Megatron's JSON list ``[{"rank": i, "token_bytes": base64, "token_str": str}, ...]`` (ranks
    0..255 the single bytes). As in Megatron-LM: ids ``0 .. num_special_tokens-1`` are the special tokens
    (``special_tokens``, then ``<SPECIAL_k>`` fillers), the first ``vocab_size - num_special_tokens`` ranks follow
    at ``rank + num_special_tokens``; text is encoded with ``encode_ordinary`` (special-token strings in the text
    are plain text); EOD is ``</s>``.
    """

    def __init__(
        self,
        path: str,
        pattern: str | None,
        vocab_size: int | None = None,
        num_special_tokens: int = 1000,
        special_tokens: Sequence[str] | None = None,
    ) -> None:
        try:
            import tiktoken
        except ImportError:
            raise TokenizerError(
                "--tokenizer-type TikTokenizer needs the tiktoken package (pip install tiktoken)"
            ) from None
        if pattern not in TIKTOKEN_PATTERNS:
            raise TokenizerError(
                f"--tokenizer-type TikTokenizer needs --tiktoken-pattern v1 or v2, got {pattern!r}"
            )
        self.path, self.pattern = path, pattern
        self.vocab_size = int(vocab_size) if vocab_size is not None else 2**17
        self.num_special_tokens = int(num_special_tokens)
        specials = list(TIKTOKEN_SPECIAL_TOKENS if special_tokens is None else special_tokens)
        if len(set(specials)) != len(specials):
            raise TokenizerError(f"--tiktoken-special-tokens must be distinct, got {specials}")
        if not set(TIKTOKEN_SPECIAL_TOKENS) <= set(specials):
            raise TokenizerError(f"--tiktoken-special-tokens must include {list(TIKTOKEN_SPECIAL_TOKENS)}")
        if not len(specials) <= self.num_special_tokens < self.vocab_size:
            raise TokenizerError(
                f"TikTokenizer: need {len(specials)} special tokens <= --tiktoken-num-special-tokens "
                f"({self.num_special_tokens}) < --vocab-size ({self.vocab_size})"
            )
        self.special_tokens = specials + [
            f"<SPECIAL_{i}>" for i in range(len(specials), self.num_special_tokens)
        ]
        ranks = _read_tiktoken_ranks(path, self.vocab_size - self.num_special_tokens)
        self._specials = {t: i for i, t in enumerate(self.special_tokens)}
        self.encoding = tiktoken.Encoding(
            name=os.path.basename(os.path.dirname(os.path.abspath(path))) or "tiktoken",
            pat_str=TIKTOKEN_PATTERNS[pattern],
            mergeable_ranks={b: r + self.num_special_tokens for b, r in ranks.items()},
            special_tokens=self._specials,
        )

    def encode_batch_fast(self, texts: list[str], add_special_tokens: bool = True) -> list[_Encoding]:
        return [_Encoding(ids) for ids in self.encoding.encode_ordinary_batch(list(texts), num_threads=1)]

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self._specials.get(token)

    def to_str(self) -> str:
        return json.dumps(
            {"tiktoken": self.path, "pattern": self.pattern, "vocab_size": self.vocab_size,
             "num_special_tokens": self.num_special_tokens, "special_tokens": self.special_tokens[: self._given()]}
        )  # fmt: skip

    def _given(self) -> int:
        return next(
            (i for i, t in enumerate(self.special_tokens) if t == f"<SPECIAL_{i}>"), len(self.special_tokens)
        )

    def no_truncation(self) -> None:
        pass

    def no_padding(self) -> None:
        pass


def _read_tiktoken_ranks(path: str, max_vocab: int) -> dict[bytes, int]:
    """Megatron's tiktoken vocabulary JSON as ``{token bytes: rank}`` (its first ``max_vocab`` entries)."""
    import base64
    import binascii

    if not os.path.isfile(path):
        raise TokenizerError(f"--tokenizer-model {path}: file not found (a TikTokenizer vocabulary .json)")
    try:
        with open(path, encoding="utf-8") as fh:
            vocab = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{path}: cannot read as a TikTokenizer vocabulary JSON ({exc})") from None
    if not isinstance(vocab, list):
        raise TokenizerError(
            f"{path}: expected a JSON list of {{rank, token_bytes, token_str}}, got {type(vocab).__name__}"
        )
    ranks: dict[bytes, int] = {}
    for i, entry in enumerate(vocab[:max_vocab]):
        if (
            not isinstance(entry, dict)
            or set(entry) != {"rank", "token_bytes", "token_str"}
            or entry["rank"] != i
        ):
            raise TokenizerError(
                f"{path}: entry {i}: expected {{'rank': {i}, 'token_bytes': ..., 'token_str': ...}}"
            )
        try:
            token = base64.b64decode(entry["token_bytes"], validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise TokenizerError(f"{path}: entry {i}: token_bytes is not base64") from None
        if i < 256 and token != bytes([i]):
            raise TokenizerError(f"{path}: entry {i}: ranks 0..255 must be the single bytes in order")
        if token in ranks:
            raise TokenizerError(f"{path}: entry {i}: token bytes {token!r} repeat entry {ranks[token]}")
        ranks[token] = i
    return ranks


def tokenizer_from_str(text: str) -> Tokenizer | SentencePieceAdapter | TikTokenAdapter:
    """Inverse of ``to_str()`` for every backend (what worker processes rebuild their tokenizer from)."""
    if text.startswith('{"sentencepiece"'):
        return SentencePieceAdapter(json.loads(text)["sentencepiece"])
    if text.startswith('{"tiktoken"'):
        spec = json.loads(text)
        return TikTokenAdapter(
            spec["tiktoken"],
            spec["pattern"],
            spec["vocab_size"],
            spec["num_special_tokens"],
            spec["special_tokens"],
        )
    return Tokenizer.from_str(text)


def load_megatron_tokenizer(
    tokenizer_type: str,
    tokenizer_model: str | None = None,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    tiktoken: dict | None = None,
) -> LoadedTokenizer:
    """A tokenizer named as Megatron's ``--tokenizer-type`` names it (local files only).

    HuggingFaceTokenizer: ``tokenizer_model`` (a tokenizer.json or HF directory); GPT2BPETokenizer: GPT-2's
    ``vocab_file`` (vocab.json) and ``merge_file`` (merges.txt), byte-level BPE with ``<|endoftext|>`` as
    EOD; SentencePieceTokenizer: ``tokenizer_model`` (a ``.model`` file); TikTokenizer: ``tokenizer_model`` (Megatron's
    vocabulary .json) and ``tiktoken`` = ``{"pattern", "vocab_size", "num_special_tokens", "special_tokens"}``
    (:class:`TikTokenAdapter`).
    """
    if tokenizer_type == "HuggingFaceTokenizer":
        if not tokenizer_model:
            raise TokenizerError(
                "--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model (or --tokenizer)"
            )
        return load_tokenizer(tokenizer_model)
    if tokenizer_type == "GPT2BPETokenizer":
        missing = [flag for flag, v in (("--vocab-file", vocab_file), ("--merge-file", merge_file)) if not v]
        if missing:
            raise TokenizerError(f"--tokenizer-type GPT2BPETokenizer needs {' and '.join(missing)}")
        for flag, file in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
            if not os.path.isfile(file):  # type: ignore[arg-type]
                raise TokenizerError(f"{flag} {file}: file not found")
        try:
            bpe = models.BPE.from_file(vocab_file, merge_file)
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise TokenizerError(
                f"{vocab_file} / {merge_file}: cannot load as GPT-2 BPE files ({exc})"
            ) from None
        tok = Tokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        if tok.token_to_id(ENDOFTEXT) is None:
            raise TokenizerError(f"{vocab_file}: no {ENDOFTEXT} entry (GPT-2's end-of-document token)")
        return LoadedTokenizer(tok, str(vocab_file), ENDOFTEXT)
    if tokenizer_type == "SentencePieceTokenizer":
        if not tokenizer_model:
            raise TokenizerError(
                "--tokenizer-type SentencePieceTokenizer needs --tokenizer-model (a .model file)"
            )
        if not os.path.isfile(tokenizer_model):
            raise TokenizerError(f"--tokenizer-model {tokenizer_model}: file not found")
        adapter = SentencePieceAdapter(tokenizer_model)
        return LoadedTokenizer(adapter, tokenizer_model, adapter.eos_piece())  # type: ignore[arg-type]
    if tokenizer_type == "TikTokenizer":
        if not tokenizer_model:
            raise TokenizerError(
                "--tokenizer-type TikTokenizer needs --tokenizer-model (its vocabulary .json)"
            )
        opts = dict(tiktoken or {})
        adapter = TikTokenAdapter(
            tokenizer_model,
            opts.get("pattern"),
            opts.get("vocab_size"),
            1000 if opts.get("num_special_tokens") is None else opts["num_special_tokens"],
            opts.get("special_tokens"),
        )
        return LoadedTokenizer(adapter, tokenizer_model, "</s>")  # type: ignore[arg-type]
    raise TokenizerError(f"--tokenizer-type {tokenizer_type!r}: expected one of {', '.join(TOKENIZER_TYPES)}")


def load_tokenizer(path: str | os.PathLike[str]) -> LoadedTokenizer:
    """Load a local tokenizer: a ``tokenizer.json`` file, or a directory (via ``AutoTokenizer``, offline).

    Truncation and padding stored in the file are switched off: preprocessing must see whole documents.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise TokenizerError(
            f"tokenizer not found: {path} (expected a tokenizer.json file or a tokenizer directory)"
        )
    if os.path.isdir(path):
        loaded = _load_dir(path)
    else:
        try:
            loaded = LoadedTokenizer(Tokenizer.from_file(path), path)
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"{path}: cannot load as a tokenizers JSON file ({exc})") from None
    loaded.tokenizer.no_truncation()
    loaded.tokenizer.no_padding()
    return loaded


def _load_dir(path: str) -> LoadedTokenizer:
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        backend = getattr(hf, "backend_tokenizer", None)
        if not isinstance(backend, Tokenizer):
            raise TokenizerError(f"{path}: {type(hf).__name__} is not a fast (tokenizers-backed) tokenizer")
        eos = hf.eos_token if isinstance(hf.eos_token, str) else None
        return LoadedTokenizer(backend, path, eos)
    except TokenizerError:
        raise
    except Exception as exc:
        file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            raise TokenizerError(f"{path}: cannot load tokenizer directory ({exc})") from None
        print(f"warning: AutoTokenizer failed on {path} ({exc}); using {file} directly", file=sys.stderr)
        eos = None
        cfg = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(cfg):
            with open(cfg, encoding="utf-8") as f:
                value = json.load(f).get("eos_token")
            eos = value if isinstance(value, str) else (value or {}).get("content")
        return LoadedTokenizer(Tokenizer.from_file(file), path, eos)


# ------------------------------------------------------------------------------------------ training


def iter_training_texts(inputs: Sequence[str], keys: Sequence[str] = ("text",)) -> Iterator[str]:
    """Texts of ``keys`` from jsonl(.gz)/parquet files (or every non-blank line of ``.txt`` files).

    ``inputs`` may hold globs. Bad lines raise :class:`~megatron_doremi.data.preprocess.PreprocessError`.
    """
    from megatron_doremi.data import preprocess

    files = preprocess.resolve_inputs(inputs, allow_text=True)
    encoder = preprocess.RecordParser(keys)
    for path in files:
        if path.endswith(".txt"):
            with open(path, "rb") as f:
                for n, raw in enumerate(f, 1):
                    try:
                        line = raw.decode("utf-8").rstrip("\r\n")
                    except UnicodeDecodeError as exc:
                        raise preprocess.PreprocessError(
                            f"{path}:{n}: invalid UTF-8 ({exc.reason})"
                        ) from None
                    if line.strip():
                        yield line
            continue
        for batch in preprocess.iter_batches([path], keys, 1024):
            _, texts, bad = encoder.parse(batch)
            if bad:
                n, msg = bad[0]
                raise preprocess.PreprocessError(f"{preprocess.location(batch, n)}: {msg}")
            for key in keys:
                yield from texts[key]


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    output_dir: str | os.PathLike[str],
    *,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = (),
) -> Tokenizer:
    """Train a GPT-2 style byte-level BPE on ``texts`` and save it to ``output_dir``.

    Writes ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` with
    ``<|endoftext|>`` (id 0) as eos/bos/unk, loadable offline by ``AutoTokenizer`` and
    ``PreTrainedTokenizerFast(tokenizer_file=...)``. Deterministic for the same texts and settings.
    """
    specials = [ENDOFTEXT] + [t for t in special_tokens if t != ENDOFTEXT]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise TokenizerError(
            f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least "
            f"{len(alphabet) + len(specials)} ids (256 bytes + {len(specials)} special tokens)"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    out = os.fspath(output_dir)
    os.makedirs(out, exist_ok=True)
    atomic_write_text(os.path.join(out, "tokenizer.json"), tok.to_str(pretty=True))
    special_map = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1000000000000000019884624838656,
    }
    if len(specials) > 1:
        special_map["additional_special_tokens"] = specials[1:]  # type: ignore[assignment]
        config["additional_special_tokens"] = specials[1:]
    atomic_write_text(os.path.join(out, "tokenizer_config.json"), json.dumps(config, indent=2) + "\n")
    atomic_write_text(os.path.join(out, "special_tokens_map.json"), json.dumps(special_map, indent=2) + "\n")
    return tok


def build_parser() -> argparse.ArgumentParser:
    """Flags of ``tools/train_tokenizer.py``."""
    p = argparse.ArgumentParser(
        prog="train_tokenizer.py",
        description="Train a byte-level BPE tokenizer locally (HF tokenizers) from jsonl(.gz)/parquet/txt files.",
    )
    p.add_argument(
        "--input", nargs="+", required=True, help="files or globs: .jsonl, .jsonl.gz, .parquet, .txt"
    )
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys holding the text (jsonl/parquet)")
    p.add_argument(
        "--vocab-size", type=int, required=True, help="total vocabulary size, special tokens included"
    )
    p.add_argument("--output-dir", required=True, help="directory for tokenizer.json and its HF config files")
    p.add_argument("--min-frequency", type=int, default=2, help="minimum pair frequency for a merge")
    p.add_argument("--special-tokens", nargs="*", default=[], help="extra special tokens after <|endoftext|>")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (1 on bad input, with ``error: ...`` on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        tok = train_bpe_tokenizer(
            iter_training_texts(args.input, args.json_keys),
            args.vocab_size,
            args.output_dir,
            min_frequency=args.min_frequency,
            special_tokens=args.special_tokens,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"trained byte-level BPE: vocab {tok.get_vocab_size(with_added_tokens=True)} "
        f"-> {os.path.join(args.output_dir, 'tokenizer.json')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
