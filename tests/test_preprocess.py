"""Tests for tools/preprocess_data.py (megatron_doremi.data.preprocess) and tools/train_tokenizer.py."""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from megatron_doremi.data.indexed import IndexedDataset
from megatron_doremi.data.preprocess import main as preprocess_main
from megatron_doremi.data.tokenizer import iter_training_texts, load_tokenizer, train_bpe_tokenizer
from megatron_doremi.data.tokenizer import main as train_main

REPO = Path(__file__).resolve().parents[1]
WORDS = (
    "the quick brown fox jumps over a lazy dog while data mixtures reweight domains of web text, "
    "books, code and wikipedia; naïve café déjà vu — 数据 混合 权重"
).split()


def make_texts(n: int, seed: int = 0, max_words: int = 40) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, max_words))) for _ in range(n)]


def write_jsonl(path: Path, records: list[object], opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    """A small byte-level BPE trained through the train_tokenizer CLI logic on a few KB of text."""
    root = tmp_path_factory.mktemp("tok")
    corpus = write_jsonl(root / "corpus.jsonl", [{"text": t} for t in make_texts(300, seed=42)])
    assert train_main(["--input", str(corpus), "--vocab-size", "400", "--output-dir", str(root / "tok")]) == 0
    return root / "tok"


@pytest.fixture(scope="session")
def tok_json(tok_dir) -> str:
    return str(tok_dir / "tokenizer.json")


def encode(tok_json: str, texts: list[str]) -> list[list[int]]:
    tok = Tokenizer.from_file(tok_json)
    return [e.ids for e in tok.encode_batch(texts)]


def finals(prefix: Path, key: str = "text") -> list[Path]:
    stem = f"{prefix}_{key}_document"
    return [p for p in (Path(stem + ".bin"), Path(stem + ".idx")) if p.exists()]


def run_main(args: list[str]) -> int:
    return preprocess_main([*args, "--no-progress"])


# ----------------------------------------------------------------------------------------- tokenizer


def test_train_tokenizer_deterministic_and_loadable(tok_dir, tmp_path):
    again = tmp_path / "again"
    texts = [json.loads(line)["text"] for line in (tok_dir.parent / "corpus.jsonl").read_text().splitlines()]
    train_bpe_tokenizer(iter(texts), 400, again)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (again / name).read_bytes() == (tok_dir / name).read_bytes(), name
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    auto = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    assert auto.eos_token == "<|endoftext|>" and auto.eos_token_id == 0
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"))
    sample = "the quick brown café 数据"
    raw = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    assert auto(sample).input_ids == fast(sample).input_ids == raw.encode(sample).ids
    assert raw.decode(raw.encode(sample).ids) == sample  # byte-level: lossless
    loaded = load_tokenizer(tok_dir)
    assert loaded.eos_token == "<|endoftext|>" and loaded.eod_id() == 0


def test_train_tokenizer_cli_errors(tmp_path, capsys):
    assert (
        train_main(["--input", str(tmp_path / "none.jsonl"), "--vocab-size", "300", "--output-dir", "x"]) == 1
    )
    assert "input file not found" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "b.jsonl", [{"text": "ok"}, {"txt": "no"}])
    assert train_main(["--input", str(bad), "--vocab-size", "300", "--output-dir", str(tmp_path / "o")]) == 1
    assert "b.jsonl:2: missing key 'text'" in capsys.readouterr().err
    txt = tmp_path / "t.txt"
    txt.write_text("alpha beta\n\ngamma\n")
    assert list(iter_training_texts([str(txt)])) == ["alpha beta", "gamma"]
    assert train_main(["--input", str(txt), "--vocab-size", "100", "--output-dir", str(tmp_path / "o")]) == 1
    assert "too small" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- happy path


def test_preprocess_matches_tokenizer_across_formats(tok_json, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = make_texts(130, seed=1)
    d = tmp_path / "in"
    d.mkdir()
    write_jsonl(d / "a.jsonl", [{"text": t, "n": i} for i, t in enumerate(texts[:50])])
    write_jsonl(d / "b.jsonl.gz", [{"text": t} for t in texts[50:90]], opener=gzip.open)
    pq.write_table(pa.table({"text": texts[90:]}), d / "c.parquet", row_group_size=16)
    out = tmp_path / "out" / "deep" / "wiki"  # missing parents are created
    args = [
        "--input",
        str(d / "a.jsonl"),
        str(d / "b*.gz"),
        str(d / "c.parquet"),
        "--output-prefix",
        str(out),
    ]
    rc = run_main([*args, "--tokenizer", tok_json, "--append-eod", "--batch-size", "7"])
    assert rc == 0
    summary = capsys.readouterr().out
    assert "documents   : 130" in summary and "skipped     : 0" in summary
    ds = IndexedDataset(f"{out}_text_document")
    assert ds.dtype == np.uint16 and ds.num_documents == 130
    expected = [ids + [0] for ids in encode(tok_json, texts)]
    assert [ds[i].tolist() for i in range(len(ds))] == expected
    assert f"{ds.num_tokens:,}" in summary


def test_workers_and_directory_tokenizer_give_identical_bytes(tok_dir, tok_json, tmp_path):
    texts = make_texts(400, seed=3)
    src = write_jsonl(tmp_path / "x.jsonl", [{"text": t, "title": t[:10]} for t in texts])
    common = ["--input", str(src), "--json-keys", "text", "title", "--append-eod", "--batch-size", "50"]
    assert run_main([*common, "--output-prefix", str(tmp_path / "one"), "--tokenizer", tok_json]) == 0
    assert (
        run_main(
            [*common, "--output-prefix", str(tmp_path / "two"), "--tokenizer", str(tok_dir), "--workers", "2"]
        )
        == 0
    )
    for key in ("text", "title"):
        for ext in (".bin", ".idx"):
            a = (tmp_path / f"one_{key}_document{ext}").read_bytes()
            assert a == (tmp_path / f"two_{key}_document{ext}").read_bytes()
    ds = IndexedDataset(str(tmp_path / "one_title_document"))
    assert [ds[i].tolist() for i in range(3)] == [
        ids + [0] for ids in encode(tok_json, [t[:10] for t in texts[:3]])
    ]


def test_cli_entry_points(tok_json, tmp_path):
    src = write_jsonl(tmp_path / "s.jsonl", [{"text": t} for t in make_texts(20)])
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for i, cmd in enumerate(
        (
            [sys.executable, str(REPO / "tools" / "preprocess_data.py")],
            [sys.executable, "-m", "megatron_doremi.data.preprocess"],
        )
    ):
        out = tmp_path / f"o{i}"
        proc = subprocess.run(
            [*cmd, "--input", str(src), "--output-prefix", str(out), "--tokenizer", tok_json, "--append-eod"],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr
        assert "documents   : 20" in proc.stdout and "tok/s" in proc.stderr  # summary + progress bar
        assert IndexedDataset(f"{out}_text_document").num_documents == 20
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_doremi.data.preprocess", "--input", str(tmp_path / "nope.jsonl")]
        + ["--output-prefix", str(tmp_path / "z"), "--tokenizer", tok_json],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 1 and proc.stderr.startswith("error: input file not found")


# ------------------------------------------------------------------------------------------ bad input

BAD_LINES = {
    "malformed": ('{"text": "ok"', r"bad\.jsonl:3: malformed JSON"),
    "missing_key": ('{"body": "x"}', r"bad\.jsonl:3: missing key 'text' \(keys present: 'body'\)"),
    "non_string": ('{"text": 42}', r"bad\.jsonl:3: key 'text' is number, expected a string"),
    "null": ('{"text": null}', r"bad\.jsonl:3: key 'text' is null"),
    "not_object": ('["text"]', r"bad\.jsonl:3: expected a JSON object, got array"),
    "empty": ('{"text": ""}', r"bad\.jsonl:3: empty document: key 'text' is an empty string"),
    "surrogate": ('{"text": "a\\ud800b"}', r"bad\.jsonl:3: key 'text' contains an unpaired surrogate"),
}


def write_with_bad_line(path: Path, bad: bytes) -> Path:
    with open(path, "wb") as f:
        f.write(b'{"text": "first doc"}\n\n')  # line 2 is blank: ignored, but counted
        f.write(bad + b"\n")
        f.write(b'{"text": "last doc"}\n')
    return path


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_fails_then_skips(tok_json, tmp_path, capsys, case):
    line, pattern = BAD_LINES[case]
    src = write_with_bad_line(tmp_path / "bad.jsonl", line.encode())
    out = tmp_path / "o" / "p"
    assert run_main(["--input", str(src), "--output-prefix", str(out), "--tokenizer", tok_json]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and __import__("re").search(pattern, err), err
    assert finals(out) == [] and os.listdir(out.parent) == []
    assert (
        run_main(
            ["--input", str(src), "--output-prefix", str(out), "--tokenizer", tok_json, "--on-error", "skip"]
        )
        == 0
    )
    summary = capsys.readouterr().out
    assert "skipped     : 1 bad lines" in summary and __import__("re").search(pattern, summary)
    assert IndexedDataset(f"{out}_text_document").num_documents == 2


def test_non_utf8_line(tok_json, tmp_path, capsys):
    src = write_with_bad_line(tmp_path / "bad.jsonl", b'{"text": "caf\xe9"}')
    out = tmp_path / "p"
    assert run_main(["--input", str(src), "--output-prefix", str(out), "--tokenizer", tok_json]) == 1
    assert "bad.jsonl:3: invalid UTF-8" in capsys.readouterr().err
    assert finals(out) == []


def test_zero_token_document(tok_json, tmp_path, capsys):
    stripping = Tokenizer.from_file(tok_json)
    stripping.normalizer = normalizers.Strip()
    tok_path = str(tmp_path / "strip.json")
    stripping.save(tok_path)
    src = write_with_bad_line(tmp_path / "bad.jsonl", b'{"text": "   "}')
    out = tmp_path / "p"
    assert run_main(["--input", str(src), "--output-prefix", str(out), "--tokenizer", tok_path]) == 1
    assert "bad.jsonl:3: empty document: key 'text' encodes to zero tokens" in capsys.readouterr().err
    assert finals(out) == []
    args = ["--input", str(src), "--output-prefix", str(out), "--tokenizer", tok_path, "--on-error", "skip"]
    assert run_main([*args, "--append-eod"]) == 0
    expected = [ids + [0] for ids in encode(tok_path, ["first doc", "last doc"])]
    assert [x.tolist() for x in IndexedDataset(f"{out}_text_document")] == expected


def test_bad_line_in_second_file_with_workers_leaves_nothing(tok_json, tmp_path, capsys):
    good = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in make_texts(300)])
    bad = write_with_bad_line(tmp_path / "b.jsonl", b"{oops")
    out = tmp_path / "p"
    args = ["--input", str(good), str(bad), "--output-prefix", str(out), "--tokenizer", tok_json]
    assert run_main([*args, "--workers", "2", "--batch-size", "16"]) == 1
    assert "b.jsonl:3: malformed JSON" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl", "b.jsonl"]  # temps removed too


def test_existing_outputs_survive_a_failed_run(tok_json, tmp_path, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "hello"}])
    out = tmp_path / "p"
    assert run_main(["--input", str(src), "--output-prefix", str(out), "--tokenizer", tok_json]) == 0
    before = [p.read_bytes() for p in finals(out)]
    bad = write_with_bad_line(tmp_path / "b.jsonl", b"{oops")
    assert run_main(["--input", str(bad), "--output-prefix", str(out), "--tokenizer", tok_json]) == 1
    assert [p.read_bytes() for p in finals(out)] == before


def test_input_and_config_errors(tok_json, tmp_path, capsys):
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"text": "hello"}])
    out = str(tmp_path / "o" / "p")
    cases = [
        (["--input", str(tmp_path / "missing.jsonl")], "input file not found: .*missing.jsonl"),
        (["--input", str(ok), str(tmp_path / "*.nothing")], r"input glob '.*\*\.nothing' matched no files"),
        (["--input", str(tmp_path)], "is a directory"),
        (["--input", str(ok), "--tokenizer", str(tmp_path / "no_tok.json")], "tokenizer not found"),
        (["--input", str(ok), "--workers", "0"], "--workers must be >= 1"),
        (["--input", str(ok), "--eod-token", "<nope>"], "'<nope>' is not in the tokenizer's vocabulary"),
    ]
    gz = tmp_path / "broken.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"text": "a"}\n' * 50)[:-20])
    cases.append((["--input", str(gz)], r"broken\.jsonl\.gz: cannot read"))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    cases.append((["--input", str(tmp_path / "nocol.parquet")], r"nocol\.parquet: missing column 'text'"))
    pq.write_table(pa.table({"text": ["ok", None]}), tmp_path / "null.parquet")
    cases.append((["--input", str(tmp_path / "null.parquet")], r"null\.parquet:row 2: key 'text' is null"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    cases.append((["--input", str(empty)], "no documents found"))
    for args, pattern in cases:
        argv = [*args, "--output-prefix", out]
        if "--tokenizer" not in args:
            argv += ["--tokenizer", tok_json]
        assert run_main(argv) == 1, args
        err = capsys.readouterr().err
        assert __import__("re").search(pattern, err), (args, err)
    assert not (tmp_path / "o").exists() or os.listdir(tmp_path / "o") == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read mode-000 files")
def test_unreadable_input(tok_json, tmp_path, capsys):
    src = write_jsonl(tmp_path / "locked.jsonl", [{"text": "hi"}])
    src.chmod(0)
    assert (
        run_main(["--input", str(src), "--output-prefix", str(tmp_path / "p"), "--tokenizer", tok_json]) == 1
    )
    err = capsys.readouterr().err
    assert "cannot read input" in err and "locked.jsonl" in err and "Permission denied" in err


def test_append_eod_without_eod_token(tmp_path, capsys):
    word = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    path = str(tmp_path / "word.json")
    word.save(path)
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "hello world"}, {"text": "world"}])
    out = str(tmp_path / "p")
    assert run_main(["--input", str(src), "--output-prefix", out, "--tokenizer", path, "--append-eod"]) == 1
    assert "no end-of-document token" in capsys.readouterr().err
    argv = [
        "--input",
        str(src),
        "--output-prefix",
        out,
        "--tokenizer",
        path,
        "--append-eod",
        "--eod-token",
        "[UNK]",
    ]
    assert run_main(argv) == 0
    assert [x.tolist() for x in IndexedDataset(f"{out}_text_document")] == [[0, 1, 2], [1, 2]]


# ---------------------------------------------------------------------------------------- interrupted


def test_sigkill_leaves_no_final_files_and_next_run_cleans_temps(tok_json, tmp_path):
    src = tmp_path / "big.jsonl"
    line = json.dumps({"text": " ".join(make_texts(1, seed=5, max_words=400)[0] for _ in range(4))}) + "\n"
    with open(src, "w") as f:
        f.write(line * 4000)  # ~26 MB, ~10 s of work: killed long before the end
    out = tmp_path / "o" / "big"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(src)]
    cmd += ["--output-prefix", str(out), "--tokenizer", tok_json, "--no-progress", "--batch-size", "64"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    temp_bin = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        temps = (
            list((tmp_path / "o").glob("big_text_document.bin.tmp.*")) if (tmp_path / "o").exists() else []
        )
        if temps and temps[0].stat().st_size > 100_000:
            temp_bin = temps[0]
            break
        time.sleep(0.01)
    assert proc.poll() is None, "preprocess finished before it could be killed; grow the input"
    assert temp_bin is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert finals(out) == []
    assert temp_bin.exists()  # temps of the dead run are left behind ...
    small = write_jsonl(tmp_path / "small.jsonl", [{"text": "hello"}])
    assert run_main(["--input", str(small), "--output-prefix", str(out), "--tokenizer", tok_json]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "big_text_document.bin",
        "big_text_document.idx",
    ]


def test_input_that_cannot_be_read_as_a_file(tok_json, tmp_path, capsys):
    """Runs as root too (where mode-000 files stay readable): a directory given as an input file."""
    bad = tmp_path / "adir.jsonl"
    bad.mkdir()
    assert (
        run_main(["--input", str(bad), "--output-prefix", str(tmp_path / "p"), "--tokenizer", tok_json]) == 1
    )
    err = capsys.readouterr().err
    assert "adir.jsonl is a directory" in err
    assert not list(tmp_path.glob("p_*"))


# ---- Megatron preprocess_data.py flags ------------------------------------------------------------------------------


def _docs(prefix: Path) -> list[list[list[int]]]:
    """Per document its sequences' token ids."""
    ds = IndexedDataset(str(prefix))
    d = ds.document_indices
    return [[ds[i].tolist() for i in range(int(d[k]), int(d[k + 1]))] for k in range(len(d) - 1)]


def test_no_space_left_is_a_clear_error_and_leaves_nothing(tok_json, tmp_path, capsys, monkeypatch):
    import errno

    from megatron_doremi.data.indexed import IndexedDatasetWriter

    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in make_texts(50)])

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(IndexedDatasetWriter, "add_documents", full)
    out = tmp_path / "out" / "x"
    out.parent.mkdir()
    assert run_main(["--input", str(src), "--tokenizer", tok_json, "--output-prefix", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"no space left on {out.parent}" in err
    assert os.listdir(out.parent) == []  # no final shard, no temp file


def test_list_valued_text_keep_empty_and_split_sentences(tok_json, tmp_path, capsys, monkeypatch):
    from megatron_doremi.data import sentences

    records = [{"text": ["one two", "three"]}, {"text": ""}, {"text": "alpha. beta gamma. delta"}]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    args = ["--input", str(src), "--tokenizer", tok_json, "--append-eod", "--no-progress"]
    assert run_main([*args, "--output-prefix", str(tmp_path / "a")]) == 1  # the empty text fails by default
    assert "--on-error keep-empty" in capsys.readouterr().err
    assert run_main([*args, "--output-prefix", str(tmp_path / "a"), "--on-error", "keep-empty"]) == 0
    eod = load_tokenizer(tok_json).eod_id()
    docs = _docs(tmp_path / "a_text_document")
    one, three, whole = encode(tok_json, ["one two", "three", records[2]["text"]])
    assert docs == [[one, three + [eod]], [], [whole + [eod]]]  # pre-split sentences; an empty document
    # --split-sentences: NLTK's punkt (not installed here) replaced by a stand-in splitter
    monkeypatch.setattr(
        sentences, "sentence_splitter", lambda lang, keep: lambda t: [s for s in t.split(". ")]
    )
    assert (
        run_main(
            [*args, "--output-prefix", str(tmp_path / "s"), "--on-error", "keep-empty", "--split-sentences"]
        )
        == 0
    )
    docs = _docs(tmp_path / "s_text_sentence")  # Megatron's name for sentence-level shards
    parts = encode(tok_json, ["alpha", "beta gamma", "delta"])
    assert docs[2] == [parts[0], parts[1], parts[2] + [eod]]


def test_split_sentences_without_nltk_names_it(tok_json, tmp_path, capsys):
    try:
        import nltk  # noqa: F401

        pytest.skip("nltk is installed here")
    except ImportError:
        pass
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "a b. c"}])
    args = [
        "--input",
        str(src),
        "--tokenizer",
        tok_json,
        "--output-prefix",
        str(tmp_path / "x"),
        "--split-sentences",
    ]
    assert run_main(args) == 1
    assert "needs the nltk package (pip install nltk)" in capsys.readouterr().err
    assert not list(tmp_path.glob("x_*"))


def test_partitions_deal_documents_round_robin(tok_json, tmp_path, capsys):
    texts = make_texts(23, seed=3)
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    base = ["--input", str(src), "--tokenizer", tok_json, "--no-progress", "--batch-size", "5"]
    assert (
        run_main([*base, "--output-prefix", str(tmp_path / "p"), "--partitions", "3", "--log-interval", "10"])
        == 0
    )
    assert capsys.readouterr().err.count("Processed ") == 2
    ids = encode(tok_json, texts)
    expected = [ids[i] for p in range(3) for i in range(p, len(ids), 3)]
    assert [d[0] for d in _docs(tmp_path / "p_text_document")] == expected
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "p_text_document.bin", "p_text_document.idx"]
    assert (
        run_main(
            [*base, "--output-prefix", str(tmp_path / "q"), "--partitions", "3", "--keep-sequential-samples"]
        )
        == 0
    )
    assert [d[0] for d in _docs(tmp_path / "q_text_document")] == ids


def test_gpt2_bpe_and_sentencepiece_tokenizer_types(tok_json, tmp_path, capsys):
    texts = make_texts(30, seed=5)
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    # GPT-2 files (vocab.json + merges.txt) saved from a byte-level BPE: the same ids as that BPE
    bpe_dir = tmp_path / "gpt2"
    bpe_dir.mkdir()
    vocab, merges = Tokenizer.from_file(tok_json).model.save(str(bpe_dir))
    args = [
        "--input",
        str(src),
        "--tokenizer-type",
        "GPT2BPETokenizer",
        "--vocab-file",
        vocab,
        "--merge-file",
        merges,
    ]
    assert run_main([*args, "--output-prefix", str(tmp_path / "g"), "--append-eod"]) == 0
    eod = Tokenizer.from_file(tok_json).token_to_id("<|endoftext|>")
    assert [d[0] for d in _docs(tmp_path / "g_text_document")] == [x + [eod] for x in encode(tok_json, texts)]
    assert (
        run_main(["--input", str(src), "--tokenizer-type", "GPT2BPETokenizer", "--output-prefix", "y"]) == 1
    )
    assert "needs --vocab-file and --merge-file" in capsys.readouterr().err
    assert run_main(["--input", str(src), "--tokenizer-type", "TikTokenizer", "--tokenizer-model", tok_json,
                     "--output-prefix", str(tmp_path / "t")]) == 1  # fmt: skip
    assert "needs --tiktoken-pattern v1 or v2" in capsys.readouterr().err
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(make_texts(200, seed=1)), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=60,
                                   character_coverage=1.0, minloglevel=2)  # fmt: skip
    model = str(tmp_path / "sp.model")
    sp_args = ["--input", str(src), "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model]
    assert (
        run_main([*sp_args, "--output-prefix", str(tmp_path / "sp"), "--append-eod", "--workers", "2"]) == 0
    )
    proc = spm.SentencePieceProcessor(model_file=model)
    assert [d[0] for d in _docs(tmp_path / "sp_text_document")] == [
        x + [proc.eos_id()] for x in proc.encode(texts)
    ]


def test_megatron_only_flags_warn_or_fail_by_name(tok_json, tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "a b c"}])
    base = [
        "--input",
        str(src),
        "--tokenizer",
        tok_json,
        "--output-prefix",
        str(tmp_path / "w"),
        "--no-progress",
    ]
    assert run_main([*base, "--find-optimal-num-workers", "--make-vocab-size-divisible-by", "128"]) == 0
    err = capsys.readouterr().err
    assert "--find-optimal-num-workers is accepted for Megatron compatibility" in err
    assert "--make-vocab-size-divisible-by is accepted" in err
    assert run_main([*base, "--vocab-extra-ids", "2"]) == 1
    assert "--vocab-extra-ids is not supported" in capsys.readouterr().err
