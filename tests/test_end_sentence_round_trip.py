"""The end-of-document sentence must survive SONAR (issue 26): the round-trip check (sonar_llm.sonar.round_trip)
fails loudly on a SONAR that cannot decode it, in the default pipeline (error, one line, non-zero exit), and
warns in preprocess and training; the tiny SONAR's corpus carries the sentence."""
import pytest
import torch
from fixtures_sonar import toy_decoder, toy_encoder, toy_tokenizer

from sonar_llm.sonar.pipeline import TextToEmbedding
from sonar_llm.sonar.round_trip import (
    END_OF_DOC_TEXT,
    RoundTripError,
    require_round_trip,
    round_trip,
    sonar_decode_fn,
)

EOD = END_OF_DOC_TEXT


@pytest.fixture(scope="module")
def toy_sonar(tmp_path_factory):
    """A random toy SONAR: it cannot decode "End of sequence." (it decodes anything to noise)."""
    tok = toy_tokenizer(tmp_path_factory.mktemp("spm"))
    enc = toy_encoder(seed=1, vocab_size=tok.vocab_size)
    dec = toy_decoder(seed=2, vocab_size=tok.vocab_size)
    return TextToEmbedding(enc, tok), dec, tok


def test_round_trip_fails_loudly_on_a_sonar_that_cannot_decode_the_end_sentence(toy_sonar):
    t2e, dec, tok = toy_sonar
    decode = sonar_decode_fn(dec, tok, "eng_Latn")
    encode = lambda texts: t2e.encode(texts, "eng_Latn")  # noqa: E731
    # what this SONAR makes of the sentence, computed here with the pipeline's own greedy decoding
    from sonar_llm.sonar.pipeline import EmbeddingToText

    expected = EmbeddingToText(dec, tok).decode(encode([EOD]), "eng_Latn", beam_size=1)[0]
    assert expected.strip() != EOD  # a random decoder does not produce the sentence
    with pytest.raises(RoundTripError) as err:
        require_round_trip(EOD, decode, encode=encode)
    msg = str(err.value)
    assert "\n" not in msg and repr(EOD) in msg and repr(expected) in msg and "does not round-trip" in msg
    assert err.value.result.decoded == expected and not err.value.result.exact


def test_round_trip_exact_match_rule():
    emb = torch.zeros(4)
    assert round_trip(EOD, lambda e: [" End of sequence. "], embedding=emb).exact  # white space around: same text
    assert not round_trip(EOD, lambda e: ["End of sequence"], embedding=emb).exact  # a missing period is not
    assert not round_trip(EOD, lambda e: ["end of sequence."], embedding=emb).exact
    assert require_round_trip(EOD, lambda e: [EOD], encode=lambda t: torch.ones(1, 4)).decoded == EOD
    with pytest.raises(ValueError, match="non-empty"):
        round_trip("  ", lambda e: [""], embedding=emb)
    with pytest.raises(ValueError, match="one text"):
        round_trip(EOD, lambda e: ["a", "b"], embedding=emb)


class _Codec:
    def __init__(self, decoded):
        self.decoded = decoded

    def encode(self, texts):
        return torch.ones(len(texts), 4)

    def target_tokens(self, texts):
        return [[3, 7, 11, 3] for _ in texts]

    def decode(self, emb):
        return [self.decoded] * emb.shape[0]


def test_default_pipeline_stops_with_one_line_when_the_end_sentence_is_lost(tmp_path, monkeypatch, capsys):
    from sonar_train import default_pipeline as dp

    with pytest.raises(RoundTripError, match="Iris learned that kindness beats speed"):
        dp.check_end_sentence(_Codec("Iris learned that kindness beats speed."))
    dp.check_end_sentence(_Codec(EOD))  # passes
    monkeypatch.setenv("SONAR_LLM_END_CHECK", "warn")  # smoke tests' knob: a warning, and the run goes on
    dp.check_end_sentence(_Codec("The The The"))
    assert "warning" in capsys.readouterr().out
    monkeypatch.setenv("SONAR_LLM_END_CHECK", "maybe")
    with pytest.raises(ValueError, match="SONAR_LLM_END_CHECK"):
        dp.check_end_sentence(_Codec(EOD))
    monkeypatch.delenv("SONAR_LLM_END_CHECK")

    def prepare(*a, **k):
        dp.check_end_sentence(_Codec("The The The"))

    monkeypatch.setattr(dp, "prepare", prepare)
    monkeypatch.setenv("SONAR_LLM_DEFAULT_DIR", str(tmp_path / "run"))
    monkeypatch.delenv("RANK", raising=False)
    assert dp.main() == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and repr(EOD) in err[0] and "'The The The'" in err[0]
    assert (tmp_path / "run" / ".prepared.failed").is_file()
    assert not (tmp_path / "run" / ".prepared.json").exists()  # nothing for training to start from


def _corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "A cat sat. It was red."}\n{"text": "Dogs run. They bark."}\n')
    return path


def test_preprocess_warns_naming_the_end_sentence(tmp_path, capsys):
    from sonar_llm.data.preprocess import preprocess

    preprocess(_corpus(tmp_path), tmp_path / "bad", _Codec("Her best friend's that day."), log=None,
               rank=0, world_size=1)
    err = capsys.readouterr().err
    assert "warning" in err and repr(EOD) in err and "Her best friend's that day." in err
    preprocess(_corpus(tmp_path), tmp_path / "good", _Codec(EOD), log=None, rank=0, world_size=1)
    assert "warning" not in capsys.readouterr().err


def test_training_warns_when_the_runs_sonar_cannot_decode_the_data_end_sentence(tmp_path, toy_sonar):
    from sonar_llm.data.preprocess import preprocess
    from sonar_train.config import RunConfig
    from sonar_train.end_sentence import warn_if_end_sentence_lost

    t2e, dec, tok = toy_sonar

    class Codec(_Codec):
        def encode(self, texts):
            return t2e.encode(texts, "eng_Latn")

    data = tmp_path / "data"
    preprocess(_corpus(tmp_path), data, Codec(EOD), log=None, rank=0, world_size=1)
    cfg = RunConfig()
    cfg.data.path = str(data)

    class Model(torch.nn.Module):  # SONAR-LLM's interface: the frozen decoder its loss reads
        sonar_decoder = dec

    seen = []
    msg = warn_if_end_sentence_lost(Model(), cfg, warn=seen.append, tokenizer=tok)
    # the stored (fp16) end embedding, decoded here with the pipeline's greedy decoding
    from sonar_llm.data.shards import ShardedDataset
    from sonar_llm.sonar.pipeline import EmbeddingToText

    stored = ShardedDataset(data).end_of_doc_embedding().float()[None]
    decoded = EmbeddingToText(dec, tok).decode(stored, "eng_Latn", beam_size=1)[0]
    assert msg is not None and seen == [msg] and repr(EOD) in msg and str(data) in msg
    assert repr(decoded[:200]).rstrip("'") in msg

    class NoDecoder(torch.nn.Module):
        pass

    assert warn_if_end_sentence_lost(NoDecoder(), cfg, warn=seen.append, tokenizer=tok) is None  # nothing to check
    assert len(seen) == 1


def test_tiny_sonar_corpus_holds_the_end_sentence(tmp_path, monkeypatch):
    """Every training story of the tiny SONAR ends with the end sentence (TinySonarConfig.end_sentence)."""
    import sonar_llm.sonar.train_tiny as T
    from sonar_llm.sonar.story_corpus import generate_story_sentences, split_stories

    assert T.TinySonarConfig().end_sentence == EOD
    seen = {}

    class Stop(Exception):
        pass

    def stop(cfg, encoder, decoder, src, tgt, progress):
        seen["tgt"] = tgt
        raise Stop  # before any training

    monkeypatch.setattr(T, "_train", stop)
    cfg = T.TinySonarConfig(n_stories=40, spm_vocab_size=300, eval_sentences=0, train_steps=1)
    with pytest.raises(Stop):
        T.ensure_tiny_sonar(tmp_path / "tiny", config=cfg, progress=False)
    train, _ = split_stories(generate_story_sentences(40, 0), cfg.held_out_fraction, 0)
    assert len(seen["tgt"]) == sum(len(s) + 1 for s in train)  # one end sentence per training story
    ends, i = [], 0
    for st in train:  # the sentence after each story's last one is the end sentence: the same ids every time
        i += len(st)
        ends.append(tuple(seen["tgt"][i]))
        i += 1
    assert len(set(ends)) == 1 and len(ends[0]) >= 4  # [</s>, lang, pieces..., </s>]
