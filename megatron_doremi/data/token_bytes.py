"""UTF-8 bytes per token id, for bits-per-byte: ``bpb = Σ loss / (ln 2 · Σ bytes(target))``.

A byte-level BPE piece stands for raw bytes, and a multi-byte character may be split over two pieces, so
``len(tokenizer.decode([id]).encode())`` is wrong for such a piece (it decodes to U+FFFD, 3 bytes). The table
takes the bytes from the tokenizer's own model instead:

* byte-level BPE (a ``ByteLevel`` decoder or pre-tokenizer): the piece's characters through the inverse of
  GPT-2's byte-to-unicode map, one byte each; exact, so the bytes of a document's tokens sum to
  ``len(text.encode("utf-8"))`` of its decoding;
* SentencePiece (and HF tokenizers with a ``Metaspace`` decoder / ``<0xNN>`` byte fallback): ``<0xNN>`` is one
  byte, ``▁`` one space, the rest the piece's UTF-8 bytes (a document's first word counts the space its
  decoding strips: one byte per document too many);
* any other tokenizer: ``len(decode([id]).encode("utf-8"))`` per id.

Special (and SentencePiece control/unknown) tokens count 0 bytes: they are not part of the document text, so
the end-of-document target's loss is scored against the bytes of the text it ends.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

import numpy as np

__all__ = ["byte_decoder", "token_byte_lengths", "token_byte_lengths_for_path"]

_BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's unicode character -> byte map (the inverse of ``bytes_to_unicode``)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    bs, cs = list(printable), list(printable)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _types(node: Any) -> set[str]:
    """Every ``type`` in a tokenizers JSON component (Sequence members included)."""
    if isinstance(node, dict):
        out = {node["type"]} if isinstance(node.get("type"), str) else set()
        for value in node.values():
            out |= _types(value)
        return out
    if isinstance(node, list):
        return set().union(*(_types(v) for v in node)) if node else set()
    return set()


def token_byte_lengths(tokenizer: Any, vocab_size: int | None = None) -> np.ndarray:
    """int64 [V]: the UTF-8 bytes each id stands for (see the module docstring); ``V`` is ``vocab_size`` (the
    model's, which may exceed the tokenizer's: extra ids count 0) or the tokenizer's size.

    ``tokenizer``: a ``tokenizers.Tokenizer`` or the SentencePiece adapter of :mod:`.tokenizer`.
    """
    from megatron_doremi.data.tokenizer import SentencePieceAdapter

    size = int(tokenizer.get_vocab_size(with_added_tokens=True))
    table = np.zeros(max(size, int(vocab_size or 0)), dtype=np.int64)
    if isinstance(tokenizer, SentencePieceAdapter):
        sp = tokenizer.sp
        for i in range(size):
            if sp.is_control(i) or sp.is_unknown(i):
                continue
            table[i] = 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("▁", " ").encode("utf-8"))
        return table
    spec = json.loads(tokenizer.to_str())
    kinds = _types(spec.get("decoder")) | _types(spec.get("pre_tokenizer"))
    byte_level = "ByteLevel" in kinds
    metaspace = "Metaspace" in kinds or "ByteFallback" in kinds
    added = {int(t["id"]): t for t in spec.get("added_tokens") or []}
    decode = byte_decoder()
    for i in range(size):
        piece = tokenizer.id_to_token(i)
        if piece is None or (i in added and added[i].get("special")):
            continue
        if i in added:  # a non-special added token is literal text
            table[i] = len(piece.encode("utf-8"))
        elif byte_level and all(c in decode for c in piece):
            table[i] = len(piece)
        elif metaspace and _BYTE_FALLBACK.match(piece):
            table[i] = 1
        elif metaspace:
            table[i] = len(piece.replace("▁", " ").encode("utf-8"))
        else:
            table[i] = len(tokenizer.decode([i], skip_special_tokens=False).encode("utf-8"))
    return table


def token_byte_lengths_for_path(path: str, vocab_size: int | None = None) -> np.ndarray:
    """:func:`token_byte_lengths` of the local tokenizer at ``path`` (a tokenizer.json or an HF directory)."""
    from megatron_doremi.data.tokenizer import load_tokenizer

    return token_byte_lengths(load_tokenizer(path).tokenizer, vocab_size)
