"""Rebuild the quickstart sample (examples/quickstart/data/*.jsonl) from its public sources.

This records how the shipped sample was made; users never need to run it. It needs Debian's packages
``bible-kjv`` (for the ``bible`` reader and the KJV text), ``dict-devil`` and ``dict-jargon`` (dictd files),
plus this interpreter's own standard library. See SOURCES.md beside this file for the licences.

    apt-get install bible-kjv dict-devil dict-jargon
    python examples/quickstart/build_sample.py --out examples/quickstart/data
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import subprocess
import sysconfig

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

KJV_BOOKS = (
    "Gen Exo Lev Num Deu Jos Jdg Rut 1Sa 2Sa 1Ki 2Ki 1Ch 2Ch Ezr Neh Est Job Psa Pro Ecc Son Isa Jer Lam Eze Dan "
    "Hos Joe Amo Oba Jon Mic Nah Hab Zep Hag Zec Mal Mat Mar Luk Joh Act Rom 1Co 2Co Gal Eph Phi Col 1Th 2Th 1Ti "
    "2Ti Tit Phm Heb Jas 1Pe 2Pe 1Jo 2Jo 3Jo Jude Rev"
).split()


def _b64(text: str) -> int:
    value = 0
    for ch in text:
        value = value * 64 + B64.index(ch)
    return value


def dictd_entries(prefix: str) -> list[tuple[str, str]]:
    """(headword, body) pairs of a dictd database, skipping its 00-database-* metadata entries."""
    with gzip.open(prefix + ".dict.dz", "rb") as f:
        blob = f.read()
    entries = []
    with open(prefix + ".index", encoding="utf-8") as f:
        for line in f:
            head, off, length = line.rstrip("\n").split("\t")[:3]
            if head.startswith("00database") or head.startswith("00-database"):
                continue
            body = blob[_b64(off) : _b64(off) + _b64(length)].decode("utf-8", errors="strict").strip()
            entries.append((head, body))
    return entries


def scripture(max_bytes: int) -> list[dict]:
    """KJV chapters, one document each, books taken in canonical order until max_bytes."""
    docs, total = [], 0
    for book in KJV_BOOKS:
        for chapter in range(1, 200):
            out = subprocess.run(
                ["bible", "-f", f"{book}{chapter}:1-200"], capture_output=True, text=True
            ).stdout
            lines = [v for v in out.strip().splitlines() if v.strip()]
            first = re.match(r"^\S*?(\d+):1\s", lines[0]) if lines else None
            if first is None or int(first.group(1)) != chapter:
                break  # unknown book name or past its last chapter (the reader clamps)
            text = "\n".join(re.sub(r"^\S+\s", "", v) for v in lines)
            docs.append({"text": text, "source": f"KJV {book} {chapter}"})
            total += len(text.encode())
            if total >= max_bytes:
                return docs
    return docs


def lexicon(devil_prefix: str, jargon_prefix: str, max_bytes: int) -> list[dict]:
    docs = [{"text": f"{h}\n{b}", "source": "Devil's Dictionary"} for h, b in dictd_entries(devil_prefix)]
    docs += [{"text": b, "source": "Jargon File 4.4.7"} for _, b in dictd_entries(jargon_prefix)]
    random.Random(0).shuffle(docs)
    out, total = [], 0
    for d in docs:
        if len(d["text"]) < 40:
            continue
        out.append(d)
        total += len(d["text"].encode())
        if total >= max_bytes:
            break
    return out


def code(max_bytes: int, max_file_bytes: int = 24000) -> list[dict]:
    stdlib = sysconfig.get_paths()["stdlib"]
    files = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(
            d for d in dirs if d not in {"test", "tests", "idlelib", "site-packages", "__pycache__"}
        )
        files += [os.path.join(root, n) for n in sorted(names) if n.endswith(".py")]
    random.Random(0).shuffle(files)
    out, total = [], 0
    for path in files:
        with open(path, encoding="utf-8", errors="strict") as f:
            text = f.read()
        if not 200 <= len(text) <= max_file_bytes:
            continue
        out.append({"text": text, "source": "CPython stdlib " + os.path.relpath(path, stdlib)})
        total += len(text.encode())
        if total >= max_bytes:
            break
    return out


def docs(max_bytes: int) -> list[dict]:
    from pydoc_data.topics import topics

    out, total = [], 0
    for name in sorted(topics):
        text = topics[name].strip()
        if len(text) < 100:
            continue
        out.append({"text": text, "source": f"Python reference topic {name}"})
        total += len(text.encode())
        if total >= max_bytes:
            break
    return out


def write_jsonl(path: str, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "data"))
    parser.add_argument("--bytes-per-domain", type=int, default=1_100_000)
    parser.add_argument("--dictd-dir", default="/usr/share/dictd")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    n = args.bytes_per_domain
    domains = {
        "scripture": scripture(n),
        "lexicon": lexicon(os.path.join(args.dictd_dir, "devil"), os.path.join(args.dictd_dir, "jargon"), n),
        "code": code(n),
        "docs": docs(n),
    }
    for name, rows in domains.items():
        write_jsonl(os.path.join(args.out, f"{name}.jsonl"), rows)
        size = sum(len(r["text"].encode()) for r in rows)
        print(f"{name:10s} {len(rows):6d} documents {size / 1e6:6.2f} MB")


if __name__ == "__main__":
    main()
