"""The public SONAR-LLM scoring (Pabiya/SONAR-LLM `evaluate_nlg.py` + the prompts of `generate.py`).

    python -m sonar_llm.eval.public_scoring generated.json [--out scores.json]

scores a JSON list of the public `generate.py` records `{"prefix", "full_text", "original_text"}`.

Prompts (`public_prompts`, as `generate.py`): the stories (already without the validation split's last
2,500, see `sonar_llm.data.tinystories`) that NLTK Punkt splits into at most 32 sentences, the first 512;
the prefix is the first 2 sentences (`start`) or the first `max(1, n // 2)` (`half`), joined by one space.
`full_text` is the prefix's Punkt sentences followed by the generated ones, joined by one space.

Scoring (`score_records`, as `evaluate_nlg.py`): the prefix is stripped from the generated and the original
text; the FIRST Punkt sentence of each is kept ("" when nothing is left); then per story
  BLEU    NLTK `sentence_bleu([ref.split()], gen.split(), smoothing_function=SmoothingFunction().method4)`,
  ROUGE-L rouge-score `RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True).score(ref, gen)` F,
  METEOR  NLTK `meteor_score([ref.split()], gen.split())` (WordNet synonyms),
averaged over stories, on the 0-1 scale the public script prints.

One deviation, counted: the public script asserts that both texts start with the prefix and stops if
not (a story whose first sentences are separated by a newline or two spaces fails it, because the prefix
is re-joined with one space). Here the original continuation is then taken after the prefix's last
Punkt sentence (its character span), which is the same text whenever the assertion holds;
`prefix_mismatches` in the result counts such stories.

Missing NLTK data is never replaced: without the Punkt model (`punkt_tab`) no metric can be computed (the
first sentence is Punkt's), without WordNet METEOR cannot; each missing metric is reported as None with
the reason (`missing`), never as a substitute number. `nltk_data_status()` says what is installed.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from sonar_llm.data.punkt import PUNKT_MISSING as _PUNKT_MISSING
from sonar_llm.data.punkt import punkt_sentences, punkt_tokenizer

__all__ = [
    "PUBLIC_METRICS",
    "PublicPrompt",
    "nltk_data_status",
    "punkt_sentences",
    "public_prompts",
    "public_record",
    "generate_public",
    "records_from_items",
    "score_records",
    "format_public",
    "missing_line",
    "main",
]

PUBLIC_METRICS = ("bleu", "rougeL", "meteor")
PUNKT_MISSING = f"{_PUNKT_MISSING}: the first sentences cannot be cut as the public evaluate_nlg.py does"
WORDNET_MISSING = ("NLTK WordNet corpus is not installed: METEOR's synonym stage cannot run as in the public "
                   "evaluate_nlg.py (python -m nltk.downloader wordnet)")

Splitter = Callable[[str], list[str]]


# ------------------------------------------------------------------------------------------ NLTK data
def _wordnet_reader():
    """NLTK's WordNet reader, or None when the corpus is not installed."""
    from nltk.corpus import wordnet

    try:
        wordnet.synsets("dog")
    except (LookupError, OSError):
        return None
    return wordnet


def nltk_data_status() -> dict[str, Any]:
    """Which NLTK data the public scoring needs is installed: {"punkt": bool, "wordnet": bool, "nltk": ver}."""
    import nltk

    return {"nltk": nltk.__version__, "punkt": punkt_tokenizer() is not None, "wordnet": _wordnet_reader() is not None}


# ------------------------------------------------------------------------------------------ prompts
@dataclass
class PublicPrompt:
    """One story's prompt as `generate.py` builds it.

    prefix: the first k Punkt sentences joined by " "; sentences: `sent_tokenize(prefix)` stripped (what the
    model is given); original_text: the whole story; reference: its Punkt sentences after the first k.
    """

    prefix: str
    sentences: list[str]
    original_text: str
    reference: list[str]


def public_prompts(texts: Iterable[str], mode: str = "start", num_texts: int = 512, max_sentences: int = 32,
                   *, split: Splitter | None = None) -> list[PublicPrompt]:
    """The first `num_texts` non-empty stories of at most `max_sentences` Punkt sentences, cut as `mode`."""
    if mode not in ("start", "half"):
        raise ValueError(f"prompt mode must be 'start' or 'half', got {mode!r}")
    if num_texts < 1 or max_sentences < 1:
        raise ValueError(f"num_texts and max_sentences must be >= 1, got {num_texts}, {max_sentences}")
    split = split or punkt_sentences
    out: list[PublicPrompt] = []
    for text in texts:
        if not text:
            continue
        sents = split(text)
        if len(sents) > max_sentences:
            continue
        k = 2 if mode == "start" else max(1, len(sents) // 2)
        prefix = " ".join(sents[:k])
        given = [s.strip() for s in split(prefix) if s.strip()]
        out.append(PublicPrompt(prefix, given, text, [s for s in sents[k:]]))
        if len(out) == num_texts:
            break
    return out


def public_record(prompt: PublicPrompt, generated: Sequence[str], *, split: Splitter | None = None) -> dict:
    """The `generate.py` output record for one prompt and its generated sentences."""
    split = split or punkt_sentences
    return {"prefix": prompt.prefix, "full_text": " ".join(list(split(prompt.prefix)) + list(generated)),
            "original_text": prompt.original_text}


def generate_public(prompts: Sequence[PublicPrompt], generate: Callable[[list[list[str]]], list[list[str]]],
                    batch_size: int = 16, *, split: Splitter | None = None) -> tuple[list[dict], list[dict]]:
    """Run `generate` on the public prompts; (items {prompt, reference, generation}, generate.py records)."""
    items: list[dict] = []
    records: list[dict] = []
    for b in range(0, len(prompts), batch_size):
        chunk = prompts[b:b + batch_size]
        outs = generate([list(p.sentences) for p in chunk])
        if len(outs) != len(chunk):
            raise ValueError(f"generate returned {len(outs)} continuations for {len(chunk)} prompts")
        for p, gen in zip(chunk, outs):
            items.append({"prompt": list(p.sentences), "reference": list(p.reference), "generation": list(gen),
                          "stop_reason": getattr(gen, "stop_reason", None)})
            records.append(public_record(p, list(gen), split=split))
    return items, records


def records_from_items(items: Iterable[Any]) -> list[dict]:
    """Public records from our protocol's items (prompt / reference / generation sentence lists)."""
    out = []
    for it in items:
        get = it.get if isinstance(it, dict) else lambda k: getattr(it, k)
        prefix = " ".join(get("prompt"))
        out.append({"prefix": prefix, "full_text": " ".join([prefix, *get("generation")]),
                    "original_text": " ".join([prefix, *get("reference")])})
    return out


# ------------------------------------------------------------------------------------------ scoring
def _after_prefix(text: str, prefix: str, tok) -> tuple[str, bool]:
    """`text[len(prefix):]` when text starts with prefix (the public script), else the text after the
    span of the prefix's last Punkt sentence; the flag says whether the public assertion held."""
    if text.startswith(prefix):
        return text[len(prefix):], True
    n = len(tok.tokenize(prefix)) if prefix.strip() else 0
    spans = list(tok.span_tokenize(text))
    if n == 0:
        return text, False
    if n > len(spans):
        return "", False
    return text[spans[n - 1][1]:], False


def _first_sentence(text: str, tok) -> str:
    if not text:
        return ""
    sents = tok.tokenize(text)
    return sents[0] if sents else ""  # the public script raises IndexError on whitespace-only text


def score_records(records: Sequence[dict], *, punkt=None, wordnet=None) -> dict[str, Any]:
    """Mean public BLEU / ROUGE-L / METEOR over `records` (dicts with prefix, full_text, original_text).

    punkt: a Punkt tokenizer (`tokenize`, `span_tokenize`); default NLTK's english model when installed.
    wordnet: a WordNet reader for METEOR; default NLTK's corpus when installed.
    Returns {"mode": "public", "metrics": {name: float | None}, "missing": {name: reason}, "num_records",
    "prefix_mismatches", "per_record": [...], "nltk": {...}}.
    """
    if not records:
        raise ValueError("public scoring needs at least one record")
    for i, r in enumerate(records):
        bad = [k for k in ("prefix", "full_text", "original_text") if not isinstance(r.get(k), str)]
        if bad:
            raise ValueError(f"record {i} has no string field(s) {bad}")
    status = {"punkt": True, "wordnet": True}
    if punkt is None:
        punkt = punkt_tokenizer()
        status["punkt"] = punkt is not None
    if wordnet is None:
        wordnet = _wordnet_reader()
        status["wordnet"] = wordnet is not None
    import nltk

    result: dict[str, Any] = {"mode": "public", "metrics": {k: None for k in PUBLIC_METRICS}, "missing": {},
                              "num_records": len(records), "prefix_mismatches": 0, "per_record": [],
                              "nltk": {"version": nltk.__version__, **status}}
    if punkt is None:
        result["missing"] = {k: PUNKT_MISSING for k in PUBLIC_METRICS}
        if wordnet is None:
            result["missing"]["meteor"] = f"{PUNKT_MISSING}; {WORDNET_MISSING}"
        return result
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from nltk.translate.meteor_score import meteor_score
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    smooth = SmoothingFunction().method4
    sums = {k: 0.0 for k in PUBLIC_METRICS}
    for r in records:
        gen, ok_g = _after_prefix(r["full_text"], r["prefix"], punkt)
        ref, ok_r = _after_prefix(r["original_text"], r["prefix"], punkt)
        result["prefix_mismatches"] += int(not (ok_g and ok_r))
        g, ref1 = _first_sentence(gen, punkt), _first_sentence(ref, punkt)
        row = {"generated_sentence": g, "reference_sentence": ref1,
               "bleu": float(sentence_bleu([ref1.split()], g.split(), smoothing_function=smooth)),
               "rougeL": float(scorer.score(ref1, g)["rougeL"].fmeasure),
               "meteor": None if wordnet is None else float(meteor_score([ref1.split()], g.split(), wordnet=wordnet))}
        for k in PUBLIC_METRICS:
            if row[k] is not None:
                sums[k] += row[k]
        result["per_record"].append(row)
    n = len(records)
    result["metrics"] = {k: sums[k] / n for k in PUBLIC_METRICS}
    if wordnet is None:
        result["metrics"]["meteor"] = None
        result["missing"]["meteor"] = WORDNET_MISSING
    for k, v in result["metrics"].items():
        if v is not None and not math.isfinite(v):
            raise ValueError(f"public {k} is not finite ({v})")
    return result


def missing_line(result: dict[str, Any]) -> str:
    """One line naming the public metrics that could not run, the NLTK data they lack and how to install it
    ("" when nothing is missing)."""
    if not result.get("missing"):
        return ""
    status = result.get("nltk") or {}
    need = [name for name, key in (("punkt_tab", "punkt"), ("wordnet", "wordnet")) if status.get(key) is False]
    labels = {"bleu": "BLEU", "rougeL": "ROUGE-L", "meteor": "METEOR"}
    names = ", ".join(labels[k] for k in PUBLIC_METRICS if k in result["missing"])
    if not need:  # data passed in by the caller: give the recorded reasons
        return f"public {names} not computed: " + "; ".join(sorted(set(result["missing"].values())))
    return (f"public {names} not computed: NLTK data {' and '.join(need)} not installed "
            f"(install: python -m nltk.downloader {' '.join(need)})")


def format_public(result: dict[str, Any]) -> str:
    """Lines as the public script prints them; the metrics that could not run are named on one line
    (`missing_line`), never given a number."""
    lines = [f"Total records: {result['num_records']}"]
    for label, k in (("BLEU   ", "bleu"), ("ROUGE-L", "rougeL"), ("METEOR ", "meteor")):
        v = result["metrics"][k]
        if v is not None:
            lines.append(f"{label}: {v:.4f}")
    if result.get("missing"):
        lines.append(missing_line(result))
    if result.get("prefix_mismatches"):
        lines.append(f"({result['prefix_mismatches']} records do not start with their prefix: the public script "
                     f"would stop on them)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sonar_llm.eval.public_scoring",
                                description="Score generate.py-style records as the public evaluate_nlg.py")
    p.add_argument("input_json", help="JSON list of {prefix, full_text, original_text}")
    p.add_argument("--out", default="", help="write the full result (per-record scores included) here")
    a = p.parse_args(argv)
    path = Path(a.input_json)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
        result = score_records(records)
    except (OSError, ValueError) as e:
        print(f"public_scoring error: {e}", file=sys.stderr)
        return 2
    print(format_public(result))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
