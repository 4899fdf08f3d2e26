"""--tokenizer-type TikTokenizer: Megatron-LM's tiktoken vocabulary JSON, its special-token offset and EOD,
checked against megatron-core's TikTokenTokenizer when that is importable."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from megatron_doremi.data.indexed import IndexedDataset
from megatron_doremi.data.preprocess import main as preprocess_main
from megatron_doremi.data.tokenizer import TikTokenAdapter, TokenizerError, tokenizer_from_str

tiktoken = pytest.importorskip("tiktoken")

WORDS = ["the", "data", "mixture", "über", "naïve", "日本語", "tokens", "domain", "weight", "café"]
TEXTS = [" ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(3 + i % 5)) + f" {i}!" for i in range(40)]


def _vocab(path: Path) -> Path:
    """256 single bytes, then every prefix of each word and of ' word' (each is a merge of two earlier tokens)."""
    tokens = [bytes([i]) for i in range(256)]
    seen = set(tokens)
    for word in WORDS:
        for form in (word, " " + word):
            raw = form.encode("utf-8")
            for k in range(2, len(raw) + 1):
                if raw[:k] not in seen:
                    seen.add(raw[:k])
                    tokens.append(raw[:k])
    entries = [
        {"rank": i, "token_bytes": base64.b64encode(t).decode(), "token_str": t.decode("utf-8", "replace")}
        for i, t in enumerate(tokens)
    ]
    path.write_text(json.dumps(entries))
    return path


def _docs(prefix: Path) -> list[list[int]]:
    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))]


@pytest.mark.parametrize("pattern", ["v1", "v2"])
def test_tiktokenizer_preprocessing_gives_megatrons_ids(tmp_path, pattern):
    vocab = _vocab(tmp_path / "vocab.json")
    n = len(json.loads(vocab.read_text()))
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    args = ["--input", str(src), "--tokenizer-type", "TikTokenizer", "--tokenizer-model", str(vocab),
            "--tiktoken-pattern", pattern, "--vocab-size", str(n + 1000), "--append-eod", "--no-progress"]  # fmt: skip
    assert preprocess_main([*args, "--output-prefix", str(tmp_path / "a")]) == 0
    assert preprocess_main([*args, "--output-prefix", str(tmp_path / "b"), "--workers", "2"]) == 0
    docs = _docs(tmp_path / "a_text_document")
    assert docs == _docs(tmp_path / "b_text_document")  # workers rebuild the same tokenizer
    # the same encoding built directly: ranks shifted by the 1000 special ids, EOD = </s> = 2
    specials = {
        t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"<SPECIAL_{i}>" for i in range(3, 1000)])
    }
    ranks = {base64.b64decode(e["token_bytes"]): e["rank"] + 1000 for e in json.loads(vocab.read_text())}
    from megatron_doremi.data.tokenizer import TIKTOKEN_PATTERNS

    enc = tiktoken.Encoding(
        "t", pat_str=TIKTOKEN_PATTERNS[pattern], mergeable_ranks=ranks, special_tokens=specials
    )
    assert docs == [enc.encode_ordinary(t) + [2] for t in TEXTS]
    assert all(min(d[:-1]) >= 1000 for d in docs) and any(
        len(t.encode()) > len(d) for t, d in zip(TEXTS, docs)
    )
    assert enc.decode(docs[5][:-1]) == TEXTS[5]
    core = pytest.importorskip("megatron.core.tokenizers.text.libraries.tiktoken_tokenizer")
    ref = core.TikTokenTokenizer(
        str(vocab), special_tokens=["<unk>", "<s>", "</s>", "<mask>", "<pad>", "<cls>", "<sep>"],
        num_special_tokens=1000, pattern=pattern, vocab_size=n + 1000,
    )  # fmt: skip
    assert [ref.text_to_ids(t) + [ref.eod] for t in TEXTS] == docs


def test_tiktokenizer_bad_inputs_name_the_problem(tmp_path):
    vocab = _vocab(tmp_path / "vocab.json")
    with pytest.raises(TokenizerError, match="--tiktoken-pattern v1 or v2"):
        TikTokenAdapter(str(vocab), None)
    with pytest.raises(TokenizerError, match="must include"):
        TikTokenAdapter(str(vocab), "v2", special_tokens=["<s>"])
    with pytest.raises(TokenizerError, match="< --vocab-size"):
        TikTokenAdapter(str(vocab), "v2", vocab_size=500, num_special_tokens=1000)
    entries = json.loads(vocab.read_text())
    entries[3]["token_bytes"] = base64.b64encode(b"x").decode()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(entries))
    with pytest.raises(TokenizerError, match="entry 3: ranks 0..255 must be the single bytes"):
        TikTokenAdapter(str(bad), "v2")
    bad.write_text("{}")
    with pytest.raises(TokenizerError, match="expected a JSON list"):
        TikTokenAdapter(str(bad), "v2")
    with pytest.raises(TokenizerError, match="file not found"):
        TikTokenAdapter(str(tmp_path / "missing.json"), "v2")
    tok = TikTokenAdapter(
        str(vocab), "v1", vocab_size=2000, num_special_tokens=10, special_tokens=["</s>", "<s>", "<unk>"]
    )
    again = tokenizer_from_str(tok.to_str())
    assert again.special_tokens == tok.special_tokens and again.token_to_id("</s>") == 0
    assert [e.ids for e in again.encode_batch_fast(TEXTS[:3])] == [
        e.ids for e in tok.encode_batch_fast(TEXTS[:3])
    ]
