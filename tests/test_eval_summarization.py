"""Summarization protocol (sonar_llm.eval.summarization): readers for the CNN/DailyMail and XSum layouts
written by the test (Parquet / CSV through Hugging Face `datasets` as the reference writer, JSONL, JSON list),
prompts, the cut at the end sentence and at the length limit, ROUGE against rouge-score called directly and
against numbers worked out by hand."""
import collections
import json

import pytest
from rouge_score import rouge_scorer

from sonar_llm.eval import summarization as S

CNN = [
    {"id": "c1", "article": "The mayor opened a new park on Monday. Children played there all day. It has a pond.",
     "highlights": "Mayor opens a new park.\nChildren play all day."},
    {"id": "c2", "article": "Heavy rain hit the coast. Roads were closed for hours.", "highlights": "Rain closes roads."},
    {"id": "c3", "article": "", "highlights": "No article."},
]
XSUM = [
    {"id": "x1", "document": "A cat was rescued from a tree. Firefighters used a ladder.", "summary": "Firefighters rescue a cat."},
    {"id": "x2", "document": "The team won the cup. Fans cheered in the streets.", "summary": "The team won the cup."},
]


def _write_hf(rows, path, fmt):
    import datasets

    ds = datasets.Dataset.from_list(rows)
    getattr(ds, f"to_{fmt}")(str(path))


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_read_cnn_dailymail_layouts(tmp_path, fmt):
    if fmt == "jsonl":
        path = tmp_path / "test.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in CNN) + "\n")
    else:
        sub = tmp_path / "data"
        sub.mkdir()
        path = sub / f"test-00000-of-00001.{fmt}"
        _write_hf(CNN, path, fmt)
        path = tmp_path  # a directory, as HF's snapshot layout
    stats = collections.Counter()
    name, ex = S.read_summarization(path, stats=stats)
    assert name == "cnn_dailymail" and [e.id for e in ex] == ["c1", "c2"] and stats["empty_source"] == 1
    assert ex[0].summary == CNN[0]["highlights"] and ex[1].document == CNN[1]["article"]


def test_read_xsum_json_list_and_named_dataset(tmp_path):
    path = tmp_path / "xsum.json"
    path.write_text(json.dumps(XSUM))
    name, ex = S.read_summarization(path, "xsum", limit=1)
    assert name == "xsum" and [e.id for e in ex] == ["x1"]
    with pytest.raises(ValueError, match="article"):
        S.read_summarization(path, "cnn_dailymail")
    bad = tmp_path / "other.jsonl"
    bad.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match="cannot tell the dataset"):
        S.read_summarization(bad)
    with pytest.raises(FileNotFoundError):
        S.read_summarization(tmp_path / "missing.parquet")


def test_hand_worked_rouge():
    # "the cat sat" vs "the cat ran": ROUGE-1 2/3, ROUGE-2 (the cat | cat sat vs the cat | cat ran) 1/2,
    # ROUGE-L (LCS "the cat") 2/3; ROUGE-Lsum of one sentence each = ROUGE-L.
    m = S.score_summaries([["the cat sat"]], [["the cat ran"]])
    assert m["rouge1"] == pytest.approx(200 / 3, abs=1e-9)
    assert m["rouge2"] == pytest.approx(50.0, abs=1e-9)
    assert m["rougeL"] == pytest.approx(200 / 3, abs=1e-9) and m["rougeLsum"] == pytest.approx(200 / 3, abs=1e-9)


def test_hand_worked_rouge_lsum_reads_sentences():
    # reference sentences "a b c" / "d e", prediction "d e" / "a b c" (swapped): ROUGE-L on the joined texts has
    # LCS "a b c" = 3 of 5 tokens (F 60); ROUGE-Lsum takes per reference sentence the union LCS over the
    # predicted sentences: 3 + 2 = 5 of 5 (F 100)
    m = S.score_summaries([["d e", "a b c"]], [["a b c", "d e"]])
    assert m["rougeL"] == pytest.approx(60.0, abs=1e-9) and m["rougeLsum"] == pytest.approx(100.0, abs=1e-9)


def test_protocol_with_a_lead_generator(tmp_path):
    path = tmp_path / "cnn.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in CNN) + "\n")
    _, ex = S.read_summarization(path)
    seen = []

    def generate(prompts):  # "lead" summaries: the first document sentences, the end sentence, then noise
        seen.extend(prompts)
        return [p[1:3] + ["End of sequence.", "never used"] for p in prompts]

    cfg = S.SummarizationConfig(prefix="Summarize the following news.", suffix="[MODEL]:", batch_size=1,
                                max_summary_sentences=1)
    res = S.run_summarization(ex, generate, cfg, dataset="cnn_dailymail")
    assert seen[0] == ["Summarize the following news.", "The mayor opened a new park on Monday.",
                       "Children played there all day.", "It has a pond.", "[MODEL]:"]
    preds = [it["summary"] for it in res["items"]]
    assert preds == [["The mayor opened a new park on Monday."], ["Heavy rain hit the coast."]]  # cut at 1
    assert res["items"][0]["reference"] == ["Mayor opens a new park.", "Children play all day."]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    want = {k: 0.0 for k in ("rouge1", "rouge2", "rougeL")}
    for p, r in zip(preds, [CNN[0]["highlights"].replace("\n", " "), CNN[1]["highlights"]]):
        for k, v in scorer.score(r, " ".join(p)).items():
            want[k] += 50.0 * v.fmeasure
    for k in want:
        assert res["metrics"][k] == pytest.approx(want[k], abs=1e-9)
    assert res["metrics"]["mean_summary_sentences"] == 1.0 and res["metrics"]["empty_summaries"] == 0.0
    # the end sentence stops the summary; stemming is an option (off, as the LCM's rouge_score)
    res2 = S.run_summarization(ex, lambda ps: [["End of sequence.", "x"] for _ in ps], S.SummarizationConfig())
    assert res2["metrics"]["empty_summaries"] == 1.0 and res2["metrics"]["rouge1"] == 0.0
    with pytest.raises(ValueError, match="continuations"):
        S.run_summarization(ex, lambda ps: [], S.SummarizationConfig())


def test_prompt_cut_to_max_sentences():
    ex = S.SummExample("a", " ".join(f"Sentence number {i} is here." for i in range(10)), "Short.")
    p = S.make_prompt(ex, S.SummarizationConfig(max_prompt_sentences=3))
    assert p == ["Sentence number 0 is here.", "Sentence number 1 is here.", "Sentence number 2 is here."]
