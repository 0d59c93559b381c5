"""NllbTokenizer: fairseq2 id layout, source/target formats, decoding, padding, truncation and errors."""
from __future__ import annotations

import pytest
import sentencepiece as spm
import torch

from fixtures_sonar import TOY_LANGS, corpus_lines, make_spm_model
from sonar_llm.sonar import SONAR_LANGS, NllbTokenizer


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    return make_spm_model(tmp_path_factory.mktemp("spm"), vocab_size=200)


@pytest.fixture(scope="module")
def tok(spm_path):
    return NllbTokenizer(spm_path, langs=TOY_LANGS)


def test_sonar_language_list_matches_card_ids():
    assert len(SONAR_LANGS) == 202 and len(set(SONAR_LANGS)) == 202
    ids = {lang: 256_001 + i for i, lang in enumerate(SONAR_LANGS)}  # 256,000 pieces + pad
    assert ids["eng_Latn"] == 256047
    assert ids["deu_Latn"] == 256042
    assert ids["fra_Latn"] == 256057
    assert ids["zul_Latn"] == 256202
    assert SONAR_LANGS[:3] == ("ace_Arab", "ace_Latn", "acm_Arab")
    assert 256_001 + 202 + 3 == 256_206  # + 3 internal tags = the model vocabulary


def test_default_languages_and_vocab_size(spm_path):
    t = NllbTokenizer(spm_path)
    raw = spm.SentencePieceProcessor(model_file=str(spm_path))
    n = raw.get_piece_size()
    assert t.langs == SONAR_LANGS
    assert t.lang_offset == n + 1
    assert t.lang_id("eng_Latn") == n + 1 + 46 and t.lang_id("zul_Latn") == n + 202
    assert t.vocab_size == n + 1 + 202 + 3
    assert t.id_to_token(n + 1 + 202) == "<MINED_DATA>" and t.id_to_token(t.vocab_size - 1) == "<SMT_BT_DATA>"
    assert t.lang_id() == t.lang_id("eng_Latn")


def test_piece_ids_are_shifted_by_one(tok, spm_path):
    raw = spm.SentencePieceProcessor(model_file=str(spm_path))
    assert (raw.unk_id(), raw.bos_id(), raw.eos_id()) == (0, 1, 2)
    texts = corpus_lines(n=5, seed=11)
    expected = [[p + 1 for p in raw.encode(t)] for t in texts]
    assert tok.tokenize(texts) == expected
    assert tok.id_to_token(0) == "<pad>"
    assert tok.id_to_token(1) == raw.id_to_piece(0) == "<unk>"
    assert tok.id_to_token(2) == "<s>" and tok.id_to_token(3) == "</s>"
    assert tok.id_to_token(10) == raw.id_to_piece(9)
    assert [tok.id_to_token(tok.lang_id(lang)) for lang in TOY_LANGS] == [f"__{x}__" for x in TOY_LANGS]
    with pytest.raises(ValueError, match="outside"):
        tok.id_to_token(tok.vocab_size)


def test_source_and_target_formats(tok):
    texts = ["The cat sleeps near the river.", "Paul reads a letter!"]
    pieces = tok.tokenize(texts)
    fra = tok.lang_id("fra_Latn")
    assert tok.encode_source(texts, "fra_Latn") == [[fra, *p, 3] for p in pieces]
    assert tok.encode_target(texts, "fra_Latn") == [[3, fra, *p, 3] for p in pieces]
    assert tok.encode_source("The cat.", "eng_Latn")[0][0] == tok.lang_id("eng_Latn")


def test_decode_drops_control_ids(tok):
    texts = ["The old dog finds bread.", "Marie sings, always!"]
    assert tok.decode(tok.encode_target(texts, "deu_Latn")) == texts
    ids = tok.encode_source(texts[:1], "eng_Latn")[0]
    padded = ids + [0, 0, tok.internal_offset]
    assert tok.decode([padded]) == texts[:1]
    assert tok.decode(torch.tensor(padded)) == texts[:1]
    with pytest.raises(ValueError, match="outside"):
        tok.decode([[5, tok.vocab_size]])
    with pytest.raises(TypeError, match="list of id lists"):
        tok.decode([5, 6])


def test_truncation_warns(tok):
    text = ["the dog and the cat walk slowly under the blue moon"]
    full = tok.encode_source(text)[0]
    assert len(full) > 6
    with pytest.warns(UserWarning, match="truncated"):
        cut = tok.encode_source(text, max_len=6)
    assert cut == [full[:6]]
    with pytest.warns(UserWarning, match="truncated"):
        assert tok.encode_target(text, max_len=4) == [tok.encode_target(text)[0][:4]]
    with pytest.raises(ValueError, match="max_len"):
        tok.encode_source(text, max_len=0)


def test_pad_batch(tok):
    seqs = [[5, 6, 7], [8], [9, 10]]
    tokens, mask = tok.pad_batch(seqs)
    assert tokens.dtype == torch.int64 and mask.dtype == torch.bool
    assert tokens.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert mask.tolist() == [[True] * 3, [True, False, False], [True, True, False]]
    tokens, mask = tok.pad_batch(seqs, pad_to_multiple=4)
    assert tokens.shape == (3, 4) and mask.sum().item() == 6
    with pytest.raises(ValueError, match="at least one"):
        tok.pad_batch([])


def test_unigram_model_works(tmp_path):
    t = NllbTokenizer(make_spm_model(tmp_path, vocab_size=150, model_type="unigram"), langs=["eng_Latn"])
    assert t.vocab_size == t.spm_size + 1 + 1 + 3
    assert t.decode(t.encode_source(["The sun and the moon."])) == ["The sun and the moon."]


def test_errors(tmp_path, spm_path):
    with pytest.raises(FileNotFoundError, match="missing.model"):
        NllbTokenizer(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="SentencePiece"):
        NllbTokenizer(bad)
    with pytest.raises(ValueError, match="duplicates"):
        NllbTokenizer(spm_path, langs=["eng_Latn", "eng_Latn"])
    with pytest.raises(ValueError, match="default_lang"):
        NllbTokenizer(spm_path, langs=["fra_Latn"], default_lang="eng_Latn")
    assert NllbTokenizer(spm_path, langs=["fra_Latn"]).default_lang == "fra_Latn"
    t = NllbTokenizer(spm_path, langs=TOY_LANGS)
    with pytest.raises(ValueError, match="unknown language 'xx'"):
        t.encode_source(["hi"], "xx")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        t.encode_source(["ok", 3])
