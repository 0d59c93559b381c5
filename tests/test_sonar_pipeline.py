"""TextToEmbedding / EmbeddingToText wrappers: order restoration, batching, truncation, decoding."""
from __future__ import annotations

import pytest
import torch

from fixtures_sonar import toy_decoder, toy_encoder, toy_tokenizer
from sonar_llm.sonar import EmbeddingToText, TextToEmbedding, generate


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return toy_tokenizer(tmp_path_factory.mktemp("spm"))


def test_text_to_embedding_restores_order(tok):
    enc = toy_encoder(seed=1, vocab_size=tok.vocab_size)
    texts = ["The dog sleeps.", "A big red house near the river with a small garden.", "Paul!", "The cat runs."]
    pipe = TextToEmbedding(enc, tok, batch_size=2)
    got = pipe.encode(texts, "eng_Latn")
    assert got.shape == (4, 32) and got.dtype == torch.float32
    for i, text in enumerate(texts):
        ids = torch.tensor(tok.encode_source([text], "eng_Latn"))
        torch.testing.assert_close(got[i], enc(ids)[0], atol=1e-5, rtol=1e-5)


def test_token_budget_batching(tok):
    enc = toy_encoder(seed=4, vocab_size=tok.vocab_size)
    pipe = TextToEmbedding(enc, tok, batch_size=3, max_tokens=70)
    lengths = [5, 30, 2, 30, 7, 3, 30]
    batches = pipe._batches(lengths)
    assert sorted(i for b in batches for i in b) == list(range(7))
    for b in batches:
        assert len(b) <= 3 and len(b) * max(lengths[i] for i in b) <= 70
    assert [lengths[i] for b in batches for i in b] == sorted(lengths)
    texts = ["The dog sleeps.", "Paul!", "A big red house near the river with a small garden."]
    torch.testing.assert_close(pipe.encode(texts), TextToEmbedding(enc, tok, batch_size=1).encode(texts),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="max_tokens"):
        TextToEmbedding(enc, tok, max_tokens=10)


def test_text_to_embedding_truncates_with_warning(tok):
    enc = toy_encoder(seed=2, vocab_size=tok.vocab_size, max_seq_len=8)
    pipe = TextToEmbedding(enc, tok, batch_size=3)
    with pytest.warns(UserWarning, match="truncated"):
        out = pipe.encode(["the dog and the cat walk slowly under the blue moon"])
    ids = torch.tensor([tok.encode_source(["the dog and the cat walk slowly under the blue moon"])[0][:8]])
    torch.testing.assert_close(out, enc(ids), atol=1e-5, rtol=1e-5)


def test_embedding_to_text_matches_generate(tok):
    dec = toy_decoder(seed=3, std=0.5, vocab_size=tok.vocab_size)
    emb = torch.randn(3, 32, generator=torch.Generator().manual_seed(3))
    pipe = EmbeddingToText(dec, tok, batch_size=2)
    for beam in (1, 3):
        ids = generate(dec, emb, tok.lang_id("fra_Latn"), beam_size=beam, max_gen_len=8)
        assert pipe.decode_ids(emb, "fra_Latn", beam_size=beam, max_gen_len=8) == ids
        assert pipe.decode(emb, "fra_Latn", beam_size=beam, max_gen_len=8) == tok.decode(ids)


def test_pipeline_argument_errors(tok):
    with pytest.raises(ValueError, match="batch_size"):
        TextToEmbedding(toy_encoder(vocab_size=tok.vocab_size), tok, batch_size=0)
    with pytest.raises(ValueError, match="tokenizer vocab"):
        EmbeddingToText(toy_decoder(vocab_size=50), tok)
    with pytest.raises(ValueError, match=r"\[N, E\]"):
        EmbeddingToText(toy_decoder(vocab_size=tok.vocab_size), tok).decode(torch.zeros(32))


def test_reads_as_is_the_greedy_reading(tok):
    """reads_as(text) is True exactly for the embeddings whose greedy decoding is `text`'s tokens, across
    batches (batch_size 2, 5 rows), whatever sampling fields the configuration carries."""
    from sonar_llm.sonar import GenerationConfig

    dec = toy_decoder(seed=3, std=0.5, vocab_size=tok.vocab_size)
    emb = torch.randn(5, 32, generator=torch.Generator().manual_seed(3))
    emb[3] = emb[0]
    pipe = EmbeddingToText(dec, tok, batch_size=2)
    cfg = GenerationConfig(max_gen_len=8, do_sample=True, temperature=0.8, top_p=0.9)
    ids = pipe.decode_ids(emb, "eng_Latn", cfg=GenerationConfig(beam_size=1, max_gen_len=8))
    text = tok.decode([ids[0]])[0]
    assert tok.tokenize(text)[0] == ids[0] and len(set(map(tuple, ids))) > 1
    assert pipe.reads_as(emb, text, "eng_Latn", cfg=cfg).tolist() == [i == ids[0] for i in ids]
    assert pipe.reads_as(emb, text + " more", "eng_Latn", cfg=cfg).tolist() == [False] * 5
