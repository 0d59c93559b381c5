"""Text and concept-level metrics of the evaluation protocol.

Surface metrics use well-known implementations: BLEU from sacrebleu, ROUGE-1/2/L from Google's
rouge-score, METEOR from NLTK. NLTK's METEOR needs WordNet for its synonym stage, and WordNet is a
run-time download, so we run NLTK's METEOR with its exact and Porter-stem matching stages and an empty
synonym table (`meteor_no_wordnet`); the value is therefore a lower bound of full METEOR and is labelled
"METEOR (no WordNet)" in reports.

Concept-level metrics follow the LCM evaluation: round-trip l2 and cosine (decode then re-encode),
REP-4 (share of repeated 4-grams in a text: 1 - unique/total) and OVL-n (share of the generated n-grams
that already occur in the prompt).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Callable, Sequence

import torch

__all__ = [
    "bleu",
    "rouge",
    "meteor_no_wordnet",
    "repetition_n",
    "ngram_overlap",
    "round_trip",
    "token_nll_summary",
    "words",
]


def _check_pairs(hyps: Sequence[str], refs: Sequence[str]) -> None:
    if len(hyps) != len(refs):
        raise ValueError(f"got {len(hyps)} hypotheses but {len(refs)} references")
    if len(hyps) == 0:
        raise ValueError("metrics need at least one hypothesis/reference pair")


def words(text: str) -> list[str]:
    """Lower-cased whitespace tokens with surrounding punctuation stripped (for n-gram metrics)."""
    out = []
    for w in text.lower().split():
        w = w.strip(".,!?;:\"'()[]{}")
        if w:
            out.append(w)
    return out


def bleu(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, exponential smoothing off), 0-100."""
    import sacrebleu

    _check_pairs(hyps, refs)
    return float(sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score)


def rouge(hyps: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (rouge-score, Porter stemming), 0-100."""
    from rouge_score import rouge_scorer

    _check_pairs(hyps, refs)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = Counter()
    for h, r in zip(hyps, refs):
        scores = scorer.score(r, h)
        for k, v in scores.items():
            totals[k] += v.fmeasure
    return {k: 100.0 * totals[k] / len(hyps) for k in ("rouge1", "rouge2", "rougeL")}


class _NoSynonyms:
    """Stands in for NLTK's WordNet reader: no synonyms, so no download is needed."""

    def synsets(self, *args, **kwargs):  # noqa: D401 - NLTK's interface
        return []


def meteor_no_wordnet(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Mean sentence METEOR (NLTK, exact + stem stages, no WordNet synonyms), 0-100."""
    from nltk.translate.meteor_score import meteor_score

    _check_pairs(hyps, refs)
    syn = _NoSynonyms()
    total = 0.0
    for h, r in zip(hyps, refs):
        total += meteor_score([r.split()], h.split(), wordnet=syn)
    return 100.0 * total / len(hyps)


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def repetition_n(text: str, n: int = 4) -> float:
    """REP-n: 1 - (distinct n-grams / n-grams) of one text; 0.0 when it has no n-gram."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = _ngrams(words(text), n)
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def ngram_overlap(prompt: str, generation: str, n: int = 3) -> float:
    """OVL-n: share of the generation's n-grams (with multiplicity) that occur in the prompt."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    gen = _ngrams(words(generation), n)
    if not gen:
        return 0.0
    seen = set(_ngrams(words(prompt), n))
    return sum(g in seen for g in gen) / len(gen)


def round_trip(
    embeddings: torch.Tensor,
    decode: Callable[[torch.Tensor], list[str]],
    encode: Callable[[list[str]], torch.Tensor],
) -> dict[str, float]:
    """Decode embeddings to text, re-encode the text, and compare: mean l2 distance and cosine."""
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be [N, E], got shape {tuple(embeddings.shape)}")
    texts = decode(embeddings)
    again = encode(texts).to(embeddings.device, torch.float32)
    e = embeddings.float()
    l2 = (e - again).norm(dim=-1)
    cos = torch.nn.functional.cosine_similarity(e, again, dim=-1)
    return {"round_trip_l2": float(l2.mean()), "round_trip_cos": float(cos.mean())}


def token_nll_summary(total_nll: float, num_tokens: int) -> dict[str, float]:
    """Mean token negative log-likelihood (nats) and perplexity from a summed NLL."""
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    nll = total_nll / num_tokens
    return {"token_nll": nll, "token_ppl": math.exp(min(nll, 50.0)), "num_tokens": num_tokens}
