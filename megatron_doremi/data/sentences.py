"""Sentence splitting for ``preprocess_data.py --split-sentences`` (NLTK punkt, as Megatron-LM does).

Nothing is downloaded: NLTK and its punkt data must be installed (``pip install nltk`` and
``python -m nltk.downloader punkt_tab``, or ``NLTK_DATA``); otherwise :func:`sentence_splitter` raises a
ValueError naming what is missing. Texts are split in chunks of 10^6 characters, as Megatron does.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["CHUNK_CHARS", "sentence_splitter"]

CHUNK_CHARS = 1_000_000


def _punkt(lang: str):  # noqa: ANN202 - an nltk PunktSentenceTokenizer
    import nltk

    try:
        return nltk.data.load(f"tokenizers/punkt/{lang}.pickle")
    except (LookupError, OSError, ValueError):
        pass
    try:
        from nltk.tokenize.punkt import PunktTokenizer  # nltk >= 3.8.2: the punkt_tab data

        return PunktTokenizer(lang)
    except (ImportError, LookupError, OSError, ValueError):
        raise ValueError(
            f"--split-sentences: NLTK's punkt data for {lang!r} is not installed (run `python -m nltk.downloader "
            "punkt_tab`, or point NLTK_DATA at it); nothing is downloaded at run time"
        ) from None


def sentence_splitter(lang: str = "english", keep_newlines: bool = False) -> Callable[[str], list[str]]:
    """``text -> sentences`` with NLTK punkt for ``lang``; ``keep_newlines`` keeps the whitespace (newlines
    included) after each sentence instead of dropping it (Megatron's ``--keep-newlines``)."""
    try:
        import nltk  # noqa: F401
    except ImportError:
        raise ValueError(
            "--split-sentences needs the nltk package (pip install nltk) and its punkt data "
            "(python -m nltk.downloader punkt_tab)"
        ) from None
    splitter = _punkt(lang)
    if keep_newlines:
        from nltk.tokenize.punkt import PunktLanguageVars, PunktSentenceTokenizer

        class _KeepWhitespace(PunktLanguageVars):  # sentence ends may be followed by any whitespace, kept
            _period_context_fmt = r"""
                \S*                          # some word material
                %(SentEndChars)s             # a potential sentence ending
                \s*                          # any whitespace, newlines included, stays with the sentence
                (?=(?P<after_tok>
                    %(NonWord)s              # either other punctuation
                    |
                    (?P<next_tok>\S+)        # or the next word
                ))"""

        splitter = PunktSentenceTokenizer(train_text=splitter._params, lang_vars=_KeepWhitespace())

    def split(text: str) -> list[str]:
        return [
            s for i in range(0, len(text), CHUNK_CHARS) for s in splitter.tokenize(text[i : i + CHUNK_CHARS])
        ]

    return split
