"""Test helper: a tiny NLTK Punkt model in NLTK >= 3.9's `punkt_tab` layout (no download).

`use_tiny_punkt(root, monkeypatch)` writes `root/tokenizers/punkt_tab/english/` (abbreviations 'mr', 'dr'),
points NLTK at `root` only (so no other installed data is seen) and clears NLTK's tokenizer cache;
`use_no_nltk_data(root, monkeypatch)` points NLTK at an empty folder. Call `clear_punkt_cache()` afterwards.
The fixtures `tiny_punkt` and `no_nltk_data` do both (import them into a test module).
"""
from pathlib import Path

import nltk
import pytest


def clear_punkt_cache() -> None:
    from nltk import tokenize

    tokenize._get_punkt_tokenizer.cache_clear()


def write_tiny_punkt(root: Path) -> Path:
    lang = Path(root) / "tokenizers" / "punkt_tab" / "english"
    lang.mkdir(parents=True, exist_ok=True)
    (lang / "collocations.tab").write_text("")
    (lang / "sent_starters.txt").write_text("")
    (lang / "abbrev_types.txt").write_text("mr\ndr\n")
    (lang / "ortho_context.tab").write_text("")
    return Path(root)


def use_tiny_punkt(root: Path, monkeypatch) -> Path:
    write_tiny_punkt(root)
    monkeypatch.setattr(nltk.data, "path", [str(root)])
    clear_punkt_cache()
    return Path(root)


def use_no_nltk_data(root: Path, monkeypatch) -> Path:
    Path(root).mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(nltk.data, "path", [str(root)])
    clear_punkt_cache()
    return Path(root)


@pytest.fixture
def tiny_punkt(tmp_path, monkeypatch):
    """Fixture: NLTK sees only a tiny Punkt model (no WordNet); import it into a test module to use it."""
    yield use_tiny_punkt(tmp_path / "nltk_data", monkeypatch)
    clear_punkt_cache()


@pytest.fixture
def no_nltk_data(tmp_path, monkeypatch):
    """Fixture: NLTK sees only an empty data folder (neither Punkt nor WordNet)."""
    yield use_no_nltk_data(tmp_path / "no_nltk_data", monkeypatch)
    clear_punkt_cache()
