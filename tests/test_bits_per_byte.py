"""Bits per byte of the true continuation (`sonar_llm.eval.nll`) against hand computations in float64.

For every family with a token distribution and both kinds of user tokenizer, on tiny untrained float64
models: the reference runs the model's own forward pass on a stream built here from the libraries'
tokenizations, takes the full-vocabulary log-softmax, sums -log p of the continuation's tokens (and the
end: EOS / the end-of-document sentence) and divides by ln 2 and by the UTF-8 bytes of
" " + " ".join(sentences[2:]), counted here from the original text.
  * SONAR-LLM: the decoder's per-token log-probabilities given the predicted embedding of each later sentence
    (its language tag is not scored), the end-of-document sentence scored with no bytes;
  * token LLM over SONAR ids: the training stream `2 w.. 3 w.. 3`, same scored tokens;
  * token LLM over whole stories with a `tokenizers` BPE and with a SentencePiece model.
A SentencePiece model trained on the stories here round-trips them, so decoded bytes == original bytes.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fixtures_sonar import toy_decoder, toy_encoder

from sonar_llm.data.batch import ConceptBatch
from sonar_llm.eval.nll import NLLConfig, dataset_token_nll
from sonar_llm.sonar.story_corpus import generate_story_sentences

LANG = "eng_Latn"
EOD = "End of sequence."
LN2 = math.log(2.0)


def _cont_bytes(sents: list[str], c: int = 2) -> int:
    return len((" " + " ".join(sents[c:])).encode("utf-8")) if len(sents) > c else 0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import sentencepiece as spm

    from sonar_llm.sonar import NllbTokenizer

    root = tmp_path_factory.mktemp("bpb")
    stories = [s[:4 + i % 3] for i, s in enumerate(generate_story_sentences(40, seed=11))]
    (root / "sents.txt").write_text("\n".join(x for s in stories for x in s) + "\n" + EOD + "\n")
    spm.SentencePieceTrainer.train(input=str(root / "sents.txt"), model_prefix=str(root / "st"), vocab_size=300,
                                   model_type="bpe", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, num_threads=1, minloglevel=2, hard_vocab_limit=False)
    tok = NllbTokenizer(root / "st.model")
    return {"root": root, "stories": stories[:5], "tok": tok, "spm": root / "st.model"}


def _sonar_batch(world):
    """The first stories + the end-of-document sentence, as the SONAR preprocessing stores them."""
    tok = world["tok"]
    enc = toy_encoder(seed=1, vocab_size=tok.vocab_size, lang_offset=tok.lang_offset).double()
    docs = [s + [EOD] for s in world["stories"]]
    sents = [x for d in docs for x in d]
    with torch.no_grad():
        emb = enc(*tok.pad_batch(tok.encode_source(sents, LANG)))
    toks = [list(map(int, t)) for t in tok.encode_target(sents, LANG)]
    lens = [len(t) for t in toks]
    dl = [len(d) for d in docs]
    batch = ConceptBatch(
        embeddings=emb.double(), doc_cu_seqlens=torch.tensor([0] + torch.tensor(dl).cumsum(0).tolist(), dtype=torch.int32),
        tokens=torch.tensor([x for t in toks for x in t]),
        tok_cu_seqlens=torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32),
        max_doc_len=max(dl), max_sent_len=max(lens))
    return batch, docs, toks


def test_sonar_text_round_trips(world):
    tok = world["tok"]
    sents = [x for s in world["stories"] for x in s]
    assert tok.decode(tok.encode_target(sents, LANG)) == sents  # so decoded bytes are the original bytes


def test_sonar_llm_bits_per_byte(world):
    from sonar_llm.models.presets import backbone_config
    from sonar_llm.models.sonar_llm import SonarLLM, SonarLLMConfig

    torch.manual_seed(3)
    tok = world["tok"]
    batch, docs, toks = _sonar_batch(world)
    dec = toy_decoder(seed=4, std=0.3, vocab_size=tok.vocab_size, lang_offset=tok.lang_offset).double()
    model = SonarLLM(SonarLLMConfig(backbone_config("tiny"), sonar_dim=batch.embeddings.shape[1]),
                     decoder=dec).double().eval()
    got = dataset_token_nll(model, "sonar_llm", [batch], NLLConfig(), decode=tok.decode,
                            end_of_doc_tokens=toks[len(docs[0]) - 1])
    ref, n_bytes, row = 0.0, 0, 0
    with torch.no_grad():
        for d, story in zip(docs, world["stories"]):
            emb = batch.embeddings[row:row + len(d)]
            for k in range(2, len(d)):  # the end sentence (k = len(d) - 1) too
                h = model.backbone.forward_padded(model.input_proj(emb[:k])[None])[0, -1]
                t = torch.tensor(toks[row + k])  # [</s>, lang, w.., </s>]
                logp = dec(t[None, :-1], model.output_proj(h)[None, None]).log_softmax(-1)[0]
                ref -= float(logp[torch.arange(1, t.numel() - 1), t[2:]].sum())  # words + </s>, not the tag
            n_bytes += _cont_bytes(story)
            row += len(d)
    assert got["num_bytes"] == n_bytes
    assert got["bits_per_byte"] == pytest.approx(ref / LN2 / n_bytes, rel=1e-9)


def test_sonar_token_llm_bits_per_byte(world):
    from sonar_llm.models.presets import backbone_config
    from sonar_llm.models.token_llm import TokenLLM

    torch.manual_seed(5)
    tok = world["tok"]
    batch, docs, toks = _sonar_batch(world)
    model = TokenLLM(backbone_config("tiny"), vocab_size=tok.vocab_size).double().eval()
    got = dataset_token_nll(model, "token_llm", [batch], NLLConfig(), decode=tok.decode,
                            end_of_doc_tokens=toks[len(docs[0]) - 1])
    ref, n_bytes, row = 0.0, 0, 0
    with torch.no_grad():
        for d, story in zip(docs, world["stories"]):
            stream, owner = [2], [-1]
            for k in range(len(d)):
                stream += toks[row + k][2:]
                owner += [k] * (len(toks[row + k]) - 2)
            ids = torch.tensor(stream)
            logp = (model.backbone.forward_padded(model.embed(ids)[None])[0] @ model.embed.weight.t()).log_softmax(-1)
            ref -= sum(float(logp[p - 1, stream[p]]) for p in range(1, len(stream)) if owner[p] >= 2)
            n_bytes += _cont_bytes(story)
            row += len(d)
    assert got["num_bytes"] == n_bytes
    assert got["bits_per_byte"] == pytest.approx(ref / LN2 / n_bytes, rel=1e-9)


def _bpe(world) -> Path:
    tokenizers = pytest.importorskip("tokenizers")
    path = world["root"] / "tokenizer.json"
    if not path.exists():
        tok = tokenizers.Tokenizer(tokenizers.models.BPE())
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tokenizers.decoders.ByteLevel()
        texts = [" ".join(s) for s in generate_story_sentences(40, seed=11)]
        tok.train_from_iterator(texts, tokenizers.trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<s>", "</s>"],
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
        tok.save(str(path))
    return path


def _library_ids(kind: str, path: Path):
    """(bos, eos, encode) straight from the library (the reference's own tokenization)."""
    if kind == "tokenizers":
        from tokenizers import Tokenizer

        t = Tokenizer.from_file(str(path))
        return t.token_to_id("<s>"), t.token_to_id("</s>"), lambda s: t.encode(s, add_special_tokens=False).ids
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(path))
    return sp.bos_id(), sp.eos_id(), lambda s: sp.encode(s)


@pytest.mark.parametrize("kind", ["tokenizers", "sentencepiece"])
def test_whole_document_token_llm_bits_per_byte(world, kind, tmp_path):
    from sonar_llm.data.preprocess_tokens import main as preprocess_main
    from sonar_llm.models.presets import backbone_config
    from sonar_llm.models.token_llm import TokenLLM, TokenLLMConfig

    path = _bpe(world) if kind == "tokenizers" else world["spm"]
    bos, eos, encode = _library_ids(kind, path)
    stories = world["stories"]
    # the held-out data as the command reads it: whole-story shards of the original texts
    (tmp_path / "held.jsonl").write_text("".join(json.dumps({"text": " ".join(s)}) + "\n" for s in stories))
    assert preprocess_main(["--input", str(tmp_path / "held.jsonl"), "--output", str(tmp_path / "held"),
                            "--tokenizer", str(path)]) == 0
    torch.manual_seed(7)
    model = TokenLLM(TokenLLMConfig(backbone_config("tiny"), text_tokenizer=str(path)), vocab_size=300).double().eval()
    got = dataset_token_nll(model, "token_llm", str(tmp_path / "held"), NLLConfig(docs_per_batch=2))
    ref, n_tok, n_bytes = 0.0, 0, 0
    with torch.no_grad():
        for s in stories:
            ctx = encode(" ".join(s[:2]))
            cont = encode(" " + " ".join(s[2:]))
            ids = [bos, *ctx, *cont, eos]
            h = model.backbone.forward_padded(model.embed(torch.tensor(ids))[None])[0]
            logp = (h @ model.embed.weight.t()).log_softmax(-1)
            first = 1 + len(ctx)
            ref -= sum(float(logp[p - 1, ids[p]]) for p in range(first, len(ids)))
            n_tok += len(ids) - first
            n_bytes += _cont_bytes(s)
    assert (got["num_tokens"], got["num_bytes"]) == (n_tok, n_bytes)
    assert got["token_nll"] == pytest.approx(ref / n_tok, rel=1e-9)
    assert got["bits_per_byte"] == pytest.approx(ref / LN2 / n_bytes, rel=1e-9)


def test_uniform_model_bits_per_byte_is_closed_form(world):
    """All-zero output weights: every scored token costs log2 V bits, so bits per byte = tokens * log2 V / bytes."""
    from sonar_llm.models.presets import backbone_config
    from sonar_llm.models.token_llm import TokenLLM

    tok = world["tok"]
    batch, docs, toks = _sonar_batch(world)
    model = TokenLLM(backbone_config("tiny"), vocab_size=tok.vocab_size).double()
    with torch.no_grad():
        model.embed.weight.zero_()
    got = dataset_token_nll(model, "token_llm", [batch], NLLConfig(), decode=tok.decode,
                            end_of_doc_tokens=toks[len(docs[0]) - 1])
    n_tok = sum(len(t) - 2 for d_i, d in enumerate(docs) for k, t in
                enumerate(toks[sum(map(len, docs[:d_i])):sum(map(len, docs[:d_i + 1]))]) if k >= 2)
    n_bytes = sum(_cont_bytes(s) for s in world["stories"])
    assert got["bits_per_byte"] == pytest.approx(n_tok * math.log2(tok.vocab_size) / n_bytes, rel=1e-12)
