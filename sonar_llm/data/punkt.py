"""NLTK's Punkt sentence splitter, exactly as `nltk.sent_tokenize` uses it, when its model is installed.

The public SONAR-LLM code splits TinyStories with `nltk.sent_tokenize` (Punkt, english). NLTK >= 3.9 reads
the model from `tokenizers/punkt_tab/english/` in an nltk_data folder (`python -m nltk.downloader
punkt_tab`); nothing here downloads it. `punkt_tokenizer()` is None when it is missing, so callers can say
so and fall back or report the gap.
"""
from __future__ import annotations

__all__ = ["PUNKT_MISSING", "punkt_tokenizer", "punkt_sentences"]

PUNKT_MISSING = ("NLTK Punkt model 'punkt_tab' (english) is not installed "
                 "(python -m nltk.downloader punkt_tab)")


def punkt_tokenizer(language: str = "english"):
    """The tokenizer `nltk.sent_tokenize(text, language)` uses (cached by NLTK), or None when not installed."""
    from nltk import tokenize

    try:
        return tokenize._get_punkt_tokenizer(language)
    except LookupError:
        return None


def punkt_sentences(text: str) -> list[str]:
    """`nltk.sent_tokenize(text)`; LookupError naming the download when the model is missing."""
    tok = punkt_tokenizer()
    if tok is None:
        raise LookupError(PUNKT_MISSING)
    return tok.tokenize(text)
