"""Public SONAR-LLM scoring (evaluate_nlg.py / generate.py prompts) against NLTK and rouge-score called
directly, against numbers worked out by hand, and with NLTK data missing (no substitute numbers).

A tiny Punkt model in NLTK's `punkt_tab` layout is written into a temporary nltk_data folder; WordNet is
replaced by small stub readers passed through `wordnet=` (NLTK's METEOR takes one)."""
import json
import math

import pytest
from fixtures_nltk import no_nltk_data, tiny_punkt  # noqa: F401  (fixtures)
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from nltk.translate.meteor_score import meteor_score
from rouge_score import rouge_scorer

from sonar_llm.eval import public_scoring as P


class _Lemma:
    def __init__(self, name):
        self._name = name

    def name(self):
        return self._name


class _Synset:
    def __init__(self, names):
        self._names = names

    def lemmas(self):
        return [_Lemma(n) for n in self._names]


class StubWordNet:
    """What NLTK's METEOR uses of WordNet: synsets(word) -> objects with lemmas() -> objects with name()."""

    def __init__(self, synonyms=None):
        self.synonyms = synonyms or {}

    def synsets(self, word, *args, **kwargs):
        return [_Synset(self.synonyms[word])] if word in self.synonyms else []


# ------------------------------------------------------------------------------ numbers worked out by hand
def _rec(prefix, gen, ref):
    return {"prefix": prefix, "full_text": f"{prefix} {gen}", "original_text": f"{prefix} {ref}"}


def test_hand_worked_bleu_rouge_meteor(tiny_punkt):
    # hyp "the cat sat on the mat" vs ref "the cat sat on a mat": clipped n-gram precisions 5/6, 3/5, 2/4, 1/3,
    # equal lengths (no brevity penalty) -> BLEU = (5/6 * 3/5 * 1/2 * 1/3) ** (1/4) = (1/12) ** (1/4).
    # ROUGE-L: LCS "the cat sat on mat" = 5 of 6 words both ways -> F = 5/6.
    res = P.score_records([_rec("Once there was a cat.", "the cat sat on the mat. It slept.",
                                "the cat sat on a mat. It purred.")], wordnet=StubWordNet())
    m = res["metrics"]
    assert res["per_record"][0]["generated_sentence"].strip() == "the cat sat on the mat."
    assert m["bleu"] == pytest.approx((1 / 12) ** 0.25, abs=1e-12)  # "mat." is the same token in both
    assert m["rougeL"] == pytest.approx(5 / 6, abs=1e-12)
    assert res["missing"] == {}
    # METEOR (no synonyms), "the cat sat on a mat" vs "the cat sat on my mat": 5 matches (the cat sat on |
    # mat) in 2 chunks; P = R = 5/6, Fmean = 5/6, penalty 0.5 * (2/5) ** 3 = 0.032 -> 5/6 * 0.968.
    res = P.score_records([_rec("Hi.", "the cat sat on a mat", "the cat sat on my mat")], wordnet=StubWordNet())
    assert res["metrics"]["meteor"] == pytest.approx(5 / 6 * (1 - 0.5 * (2 / 5) ** 3), abs=1e-12)


def test_hand_worked_bleu_method4_smoothing(tiny_punkt):
    # hyp "the cat sat down" (4 words) vs ref "the cat sat on the mat" (6): p1 = 3/4, p2 = 2/3, p3 = 1/2,
    # p4 = 0/1 -> method4 (k=5): 1 / (2 * 5 / ln 4) / 1; brevity penalty exp(1 - 6/4).
    res = P.score_records([_rec("Hi.", "the cat sat down", "the cat sat on the mat")], wordnet=StubWordNet())
    p4 = math.log(4) / 10
    expect = math.exp(1 - 6 / 4) * (3 / 4 * 2 / 3 * 1 / 2 * p4) ** 0.25
    assert res["metrics"]["bleu"] == pytest.approx(expect, abs=1e-12)


def test_hand_worked_meteor_synonym_stage(tiny_punkt):
    # "the big dog" vs "the huge dog" (Porter leaves all three words as they are; NLTK looks synonyms up
    # after stemming): with 'big' -> {'huge'} all 3 words match in one chunk: 1 - 0.5 * (1/3) ** 3;
    # without synonyms 2 matches in 2 chunks: Fmean 2/3, penalty 0.5 -> 1/3.
    rec = [_rec("Start.", "the big dog", "the huge dog")]
    with_syn = P.score_records(rec, wordnet=StubWordNet({"big": ["huge", "big"]}))
    without = P.score_records(rec, wordnet=StubWordNet())
    assert with_syn["metrics"]["meteor"] == pytest.approx(1 - 0.5 / 27, abs=1e-12)
    assert without["metrics"]["meteor"] == pytest.approx(1 / 3, abs=1e-12)


# ------------------------------------------------------------------------------ against the libraries
PAIRS = [
    ("Lily went to the park.", "She saw a big dog there. It barked.", "She saw a small cat. It ran away."),
    ("Tom had a red ball.", "He threw the ball high! Then he laughed.", "He threw it to his friend Mr. Sam."),
    ("The sun was hot.", "Everyone was running and playing in the garden.", "The children were playing."),
    ("A bird sang.", "", "It was a happy song."),
    ("Max was sad.", "Dr. Bob came to help him. Max smiled.", "Dr. Bob was kind and helped him."),
]


def test_matches_nltk_and_rouge_score_called_directly(tiny_punkt):
    wn = StubWordNet({"small": ["little"], "little": ["small"], "kind": ["nice"]})
    res = P.score_records([_rec(*p) for p in PAIRS], wordnet=wn)
    from nltk.tokenize import sent_tokenize

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    b, r, m = [], [], []
    for prefix, gen, ref in PAIRS:
        g = sent_tokenize(gen)[0] if gen else ""
        t = sent_tokenize(ref)[0]
        b.append(sentence_bleu([t.split()], g.split(), smoothing_function=SmoothingFunction().method4))
        r.append(scorer.score(t, g)["rougeL"].fmeasure)
        m.append(meteor_score([t.split()], g.split(), wordnet=wn))
    assert res["per_record"][4]["reference_sentence"].strip() == "Dr. Bob was kind and helped him."  # abbreviation kept
    assert res["per_record"][3]["generated_sentence"] == ""
    assert res["metrics"]["bleu"] == pytest.approx(sum(b) / len(b), abs=1e-12)
    assert res["metrics"]["rougeL"] == pytest.approx(sum(r) / len(r), abs=1e-12)
    assert res["metrics"]["meteor"] == pytest.approx(sum(m) / len(m), abs=1e-12)
    assert 0 < res["metrics"]["bleu"] < 1 and res["prefix_mismatches"] == 0


def test_prefix_mismatch_is_counted_and_cut_after_the_prefix_sentences(tiny_punkt):
    # the original has a newline between its first two sentences: " ".join(prefix sentences) differs
    rec = {"prefix": "One day. Two birds.", "full_text": "One day. Two birds. Three cats came.",
           "original_text": "One day.\nTwo birds. Three dogs came. Four."}
    res = P.score_records([rec], wordnet=StubWordNet())
    assert res["prefix_mismatches"] == 1
    assert res["per_record"][0]["reference_sentence"].strip() == "Three dogs came."
    assert res["metrics"]["rougeL"] == pytest.approx(2 / 3, abs=1e-12)


# ------------------------------------------------------------------------------ missing NLTK data
def test_missing_punkt_reports_every_metric_missing(no_nltk_data):
    status = P.nltk_data_status()
    assert status["punkt"] is False and status["wordnet"] is False
    res = P.score_records([_rec(*PAIRS[0])])
    assert res["metrics"] == {"bleu": None, "rougeL": None, "meteor": None}
    assert set(res["missing"]) == {"bleu", "rougeL", "meteor"}
    assert "punkt" in res["missing"]["bleu"].lower() and "wordnet" in res["missing"]["meteor"].lower()
    with pytest.raises(LookupError, match="punkt_tab"):
        P.punkt_sentences("A. B.")


def test_missing_wordnet_marks_only_meteor(tiny_punkt):
    res = P.score_records([_rec(*PAIRS[0])])  # tiny_punkt's data folder has no WordNet
    assert res["metrics"]["meteor"] is None and "wordnet" in res["missing"]["meteor"].lower()
    assert set(res["missing"]) == {"meteor"}
    assert isinstance(res["metrics"]["bleu"], float) and isinstance(res["metrics"]["rougeL"], float)
    assert res["nltk"]["wordnet"] is False and res["nltk"]["punkt"] is True
    printed = P.format_public(res).splitlines()
    assert printed[0] == "Total records: 1" and printed[1].startswith("BLEU   : ") and printed[2].startswith("ROUGE-L: ")
    assert printed[3:] == ["public METEOR not computed: NLTK data wordnet not installed "
                           "(install: python -m nltk.downloader wordnet)"]


# ------------------------------------------------------------------------------ prompts (generate.py)
def test_public_prompts_start_half_limit(tiny_punkt):
    long_story = " ".join(f"Line {i} ends." for i in range(40))
    texts = ["", "A cat sat. It was red. It ran. The end.", long_story,
             "Mr. Lee had a hat. He lost it. He found it.", "One. Two. Three. Four. Five."]
    start = P.public_prompts(texts, "start", num_texts=2)
    assert [p.prefix for p in start] == ["A cat sat. It was red.", "Mr. Lee had a hat. He lost it."]
    assert start[1].sentences == ["Mr. Lee had a hat.", "He lost it."]
    assert start[0].reference == ["It ran.", "The end."]
    half = P.public_prompts(texts, "half")
    assert [p.prefix for p in half] == ["A cat sat. It was red.", "Mr. Lee had a hat.", "One. Two."]
    assert P.public_prompts([long_story], "start", max_sentences=40)[0].prefix == "Line 0 ends. Line 1 ends."
    rec = P.public_record(start[0], ["It jumped.", "Bye."])
    assert rec == {"prefix": "A cat sat. It was red.", "full_text": "A cat sat. It was red. It jumped. Bye.",
                   "original_text": texts[1]}
    with pytest.raises(ValueError, match="prompt mode"):
        P.public_prompts(texts, "all")


def test_records_from_protocol_items(tiny_punkt):
    items = [{"prompt": ["A b.", "C d."], "reference": ["E f."], "generation": ["G h.", "I j."]}]
    assert P.records_from_items(items) == [{"prefix": "A b. C d.", "full_text": "A b. C d. G h. I j.",
                                            "original_text": "A b. C d. E f."}]


def test_cli_scores_a_generate_py_json(tiny_punkt, tmp_path, capsys):
    path = tmp_path / "gen.json"
    path.write_text(json.dumps([_rec(*p) for p in PAIRS]))
    out = tmp_path / "scores.json"
    assert P.main([str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Total records: 5" in printed and "public METEOR not computed: NLTK data wordnet" in printed
    assert "METEOR :" not in printed  # no number, no per-metric "missing" line
    saved = json.loads(out.read_text())
    assert saved["mode"] == "public" and saved["metrics"]["meteor"] is None
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prefix": "x"}]))
    assert P.main([str(bad)]) == 2


def test_generate_public_batches_and_records(tiny_punkt):
    prompts = P.public_prompts(["A cat sat. It was red. It ran.", "One. Two.", "Dr. Who came. He left. Bye."], "start")
    seen = []

    def gen(batch):
        seen.append(batch)
        return [[f"New {len(p)}."] for p in batch]

    items, records = P.generate_public(prompts, gen, batch_size=2)
    assert [len(b) for b in seen] == [2, 1] and seen[1] == [["Dr. Who came.", "He left."]]
    assert items[1] == {"prompt": ["One.", "Two."], "reference": [], "generation": ["New 2."], "stop_reason": None}
    assert records[0]["full_text"] == "A cat sat. It was red. New 2."
    res = P.score_records(records, wordnet=StubWordNet())
    assert res["per_record"][1]["reference_sentence"] == "" and res["per_record"][1]["bleu"] == 0.0
    with pytest.raises(ValueError, match="continuations"):
        P.generate_public(prompts, lambda b: [], batch_size=2)
