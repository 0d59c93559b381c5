"""The evaluation command's paper-protocol options on toy models: --scoring ours|public (the public scoring
only when asked, the mode named, missing NLTK data reported on one line), the LLM judge against a local stub
server, --task summarization for every family. Toy models and SONAR come from test_eval_evaluate's fixture."""
from __future__ import annotations

import json

import pytest
from fixtures_nltk import no_nltk_data, tiny_punkt  # noqa: F401  (fixtures)
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_score import rouge_scorer
from test_eval_evaluate import _cli, _export_untrained, toy  # noqa: F401  (toy is a fixture)
from test_eval_judge import server  # noqa: F401  (a fixture)

FAM = "sonar_llm"


def test_ours_scoring_runs_no_public_scoring(toy, tmp_path, tiny_punkt, capsys):  # noqa: F811
    path, _ = _export_untrained(toy, FAM)
    out = tmp_path / "r.json"
    assert _cli(toy, path, out) == 0
    res = json.loads(out.read_text())
    assert res["scoring_mode"] == "ours" and res["scoring"]["prompts"] == "ours"
    # not asked for: not run even though Punkt is installed, and nothing of it printed
    assert "public" not in res["scoring"] and not any(k.startswith("public_") for k in res["metrics"])
    printed = capsys.readouterr().out
    assert "Total records" not in printed and "missing" not in printed and "BLEU   :" not in printed
    assert res["metrics"]["bleu"] == res["scoring"]["ours"]["bleu"]
    assert len(res["public_records"]) == len(res["items"])
    rec, it = res["public_records"][0], res["items"][0]
    assert rec["prefix"] == " ".join(it["prompt"]) and rec["full_text"].startswith(rec["prefix"])


def test_public_scoring_mode_with_punkt(toy, tmp_path, tiny_punkt):  # noqa: F811
    import nltk

    path, _ = _export_untrained(toy, FAM)
    out = tmp_path / "r.json"
    assert _cli(toy, path, out, "--scoring", "public", "--prompt-mode", "half") == 0
    res = json.loads(out.read_text())
    assert res["scoring_mode"] == "public" and res["scoring"]["prompts"] == "public"
    texts = [json.loads(x)["text"] for x in toy["stories"].read_text().splitlines()]
    want = []
    for t in texts:
        sents = nltk.sent_tokenize(t)
        if len(sents) <= 6:
            want.append(sents[: max(1, len(sents) // 2)])
    want = want[:2]
    assert [it["prompt"] for it in res["items"]] == want
    assert [r["original_text"] for r in res["public_records"]] == [t for t in texts if len(nltk.sent_tokenize(t)) <= 6][:2]
    bleu, rl = [], []
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for r in res["public_records"]:
        gen, ref = r["full_text"][len(r["prefix"]):], r["original_text"][len(r["prefix"]):]
        g = nltk.sent_tokenize(gen)[0] if gen.strip() else ""
        f = nltk.sent_tokenize(ref)[0] if ref.strip() else ""
        bleu.append(sentence_bleu([f.split()], g.split(), smoothing_function=SmoothingFunction().method4))
        rl.append(scorer.score(f, g)["rougeL"].fmeasure)
    assert res["metrics"]["public_bleu"] == pytest.approx(sum(bleu) / len(bleu), abs=1e-12)
    assert res["metrics"]["public_rougeL"] == pytest.approx(sum(rl) / len(rl), abs=1e-12)
    assert res["metrics"]["public_meteor"] is None and "wordnet" in res["scoring"]["public"]["missing"]["meteor"].lower()
    assert "bleu" in res["scoring"]["ours"]


def test_public_mode_without_punkt_falls_back_and_says_so(toy, tmp_path, no_nltk_data, capsys):  # noqa: F811
    path, _ = _export_untrained(toy, FAM)
    out = tmp_path / "r.json"
    assert _cli(toy, path, out, "--scoring", "public") == 0
    res = json.loads(out.read_text())
    assert res["scoring_mode"] == "public" and res["scoring"]["prompts"] == "ours"
    assert res["metrics"]["public_rougeL"] is None
    pub = res["scoring"]["public"]
    assert pub["metrics"] == {"bleu": None, "rougeL": None, "meteor": None}
    assert all("punkt_tab" in r for r in pub["missing"].values()) and "wordnet" in pub["missing"]["meteor"].lower()
    # ONE line says what is missing and how to install it; no per-metric "missing" lines
    said = [line for line in capsys.readouterr().out.splitlines() if "punkt_tab" in line or "missing" in line]
    assert said == ["--scoring public: public BLEU, ROUGE-L, METEOR not computed: NLTK data punkt_tab and wordnet "
                    "not installed (install: python -m nltk.downloader punkt_tab wordnet); prompts made as in "
                    "--scoring ours"]


def test_judge_in_the_report(toy, tmp_path, server):  # noqa: F811
    path, _ = _export_untrained(toy, FAM)
    out = tmp_path / "r.json"
    assert _cli(toy, path, out, "--judge-url", server.url, "--judge-model", "stub", "--judge-timeout", "5") == 0
    res = json.loads(out.read_text())
    j = res["judge"]
    assert j["mode"] == "llm_judge" and j["model"] == "stub" and j["num_items"] == len(res["items"])
    assert j["means"]["grammar"] == 8.0 and j["counts"]["plot"] == len(res["items"]) and not j["failed"]
    firsts = [r["body"]["messages"][1]["content"] for r in server.requests if len(r["body"]["messages"]) == 2]
    shown = [f"{r['prefix']}***{r['full_text'][len(r['prefix']):]}" for r in res["public_records"]]
    assert len(firsts) == len(shown) and all(any(x in c for c in firsts) for x in shown)


@pytest.mark.parametrize("family", ["sonar_llm", "base_lcm", "two_tower", "token_llm"])
def test_summarization_task_every_family(toy, tmp_path, family):  # noqa: F811
    from sonar_llm.eval import evaluate as EV

    path, _ = _export_untrained(toy, family)
    data = tmp_path / "xsum.jsonl"
    rows = [{"id": "a", "document": "A cat sat on the mat. It was warm. The dog came in.", "summary": "A cat sat."},
            {"id": "b", "document": "Rain fell all day. The river rose.", "summary": "The river rose after rain."}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "s.json"
    rc = EV.main(["--model", str(path), "--task", "summarization", "--summ-data", str(data), "--out", str(out),
                  "--encoder", str(toy["enc_path"]), "--decoder", str(toy["dec_path"]), "--tokenizer", str(toy["spm"]),
                  "--beam-size", "1", "--max-gen-len", "12", "--max-summary-sentences", "2",
                  "--max-prompt-sentences", "4", "--num-inference-steps", "3", "--max-new-tokens", "30"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["task"] == "summarization" and res["dataset"] == "xsum" and res["family"] == family
    assert [it["prompt_sentences"] for it in res["items"]] == [3, 2]
    assert all(len(it["summary"]) <= 2 for it in res["items"])
    scorer = rouge_scorer.RougeScorer(["rouge1"])
    want = sum(scorer.score(" ".join(it["reference"]), " ".join(it["summary"]))["rouge1"].fmeasure
               for it in res["items"]) / 2
    assert res["metrics"]["rouge1"] == pytest.approx(100 * want, abs=1e-9)
