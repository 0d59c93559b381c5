"""Summarization as the LCM paper evaluates it (CNN/DailyMail, XSum), for any model family.

    python -m sonar_llm.eval.evaluate --task summarization --summ-data cnn_dm/test.parquet ...   (the command)

Data (`read_summarization`): local files in the Hugging Face layouts — CNN/DailyMail (`article`,
`highlights`, `id`) and XSum (`document`, `summary`, `id`) — as Parquet (`data/test-*.parquet`), CSV,
JSON Lines or a JSON list; a directory is read file by file in sorted order. The dataset is recognised
from the columns (or named). Rows with an empty source or reference are skipped and counted.

Protocol (`run_summarization`, after the LCM code's `lcm_generation` task): the source document is split
into sentences (`sonar_llm.data.segment.split_sentences`; the LCM used wtpsplit, not available here) and,
with optional instruction sentences before (`prefix`) and after (`suffix`) it, is the prompt; at most
`max_prompt_sentences` document sentences are kept. The family's `generate(prompts) -> continuations`
produces the summary sentences; it stops at the end-of-document sentence, and the summary is cut to
`max_summary_sentences`. Scores, as the LCM's `rouge_score` (rouge-score, no stemming by default):
ROUGE-1/2/L F1 of the summary sentences joined by " " against the reference sentences joined by " ", and
ROUGE-Lsum with both joined by newlines, averaged over documents, 0-100; plus the mean summary length in
sentences and the share of empty summaries.
"""
from __future__ import annotations

import csv
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

__all__ = ["DATASETS", "SummExample", "SummarizationConfig", "read_summarization", "summary_sentences",
           "make_prompt", "score_summaries", "run_summarization"]

# dataset -> (source column, reference column)
DATASETS = {"cnn_dailymail": ("article", "highlights"), "xsum": ("document", "summary")}
_EXTS = (".parquet", ".csv", ".jsonl", ".json")


@dataclass
class SummExample:
    """One document and its reference summary."""

    id: str
    document: str
    summary: str


@dataclass
class SummarizationConfig:
    """Settings of the summarization protocol."""

    max_prompt_sentences: int = 128  # document sentences kept in the prompt (the first ones)
    max_summary_sentences: int = 8  # summary sentences kept (the family's generate stops earlier at EOS)
    prefix: str = ""  # instruction text before the document (split into sentences), e.g. the LCM README's
    suffix: str = ""  # instruction text after the document, e.g. "[MODEL]:"
    use_stemmer: bool = False  # the LCM's rouge_score passes no stemmer
    max_sentence_chars: int = 256  # segmenter: longer sentences are re-split (as the LCM's data preparation)
    num_examples: int = 0  # 0 = all
    batch_size: int = 8

    def validate(self) -> None:
        if self.max_prompt_sentences < 1 or self.max_summary_sentences < 1 or self.batch_size < 1:
            raise ValueError("max_prompt_sentences, max_summary_sentences and batch_size must be >= 1")
        if self.num_examples < 0:
            raise ValueError(f"num_examples must be >= 0, got {self.num_examples}")


# ------------------------------------------------------------------------------------------ readers
def _files(path: Path) -> list[Path]:
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _EXTS
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not found:
            raise FileNotFoundError(f"summarization data directory {path} holds no .parquet/.csv/.jsonl/.json file")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"summarization data not found: {path}")
    if path.suffix.lower() not in _EXTS:
        raise ValueError(f"{path}: unknown summarization file type (expected one of {_EXTS})")
    return [path]


def _rows(path: Path) -> Iterator[dict]:
    ext = path.suffix.lower()
    if ext == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=512):
            yield from batch.to_pylist()
    elif ext == ".csv":
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # news articles exceed the 128 KiB default
        with open(path, newline="", encoding="utf-8") as f:
            yield from csv.DictReader(f)
    else:
        with open(path, encoding="utf-8") as f:
            head = f.read(1)
            while head and head.isspace():
                head = f.read(1)
            f.seek(0)
            if head == "[":  # a JSON list of records
                data = json.load(f)
                yield from data
                return
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{lineno}: not a JSON record ({e.msg})") from None


def _columns(dataset: str, row: dict, path: Path) -> tuple[str, str, str]:
    if dataset == "auto":
        for name, (src, ref) in DATASETS.items():
            if src in row and ref in row:
                return name, src, ref
        raise ValueError(f"{path}: cannot tell the dataset from the columns {sorted(row)}; expected "
                         + " or ".join(f"{s}/{r} ({n})" for n, (s, r) in DATASETS.items()))
    if dataset not in DATASETS:
        raise ValueError(f"unknown summarization dataset {dataset!r}; expected 'auto' or one of {tuple(DATASETS)}")
    src, ref = DATASETS[dataset]
    if src not in row or ref not in row:
        raise ValueError(f"{path}: {dataset} needs the columns {src!r} and {ref!r}; found {sorted(row)}")
    return dataset, src, ref


def read_summarization(path: str | os.PathLike, dataset: str = "auto", limit: int = 0,
                       stats: Counter | None = None) -> tuple[str, list[SummExample]]:
    """(dataset name, examples) from local CNN/DailyMail or XSum files; `stats` counts skipped rows."""
    stats = stats if stats is not None else Counter()
    name = None
    out: list[SummExample] = []
    for f in _files(Path(path)):
        for i, row in enumerate(_rows(f)):
            if not isinstance(row, dict):
                raise ValueError(f"{f}: record {i} is a {type(row).__name__}, not an object")
            if name is None or dataset == "auto":
                found, src, ref = _columns(dataset if name is None else name, row, f)
                if name is not None and found != name:
                    raise ValueError(f"{f}: {found} columns in a {name} dataset")
                name = found
            doc, summ = row.get(src), row.get(ref)
            if not isinstance(doc, str) or not doc.strip():
                stats["empty_source"] += 1
                continue
            if not isinstance(summ, str) or not summ.strip():
                stats["empty_reference"] += 1
                continue
            out.append(SummExample(str(row.get("id", f"{f.name}:{i}")), doc, summ))
            if limit and len(out) == limit:
                return name, out
    if not out:
        raise ValueError(f"{path}: no document with a reference summary")
    return name or dataset, out


# ------------------------------------------------------------------------------------------ protocol
def summary_sentences(text: str, max_sentence_chars: int = 256) -> list[str]:
    """Sentences of a reference summary: CNN/DM highlights are one per line, then split further."""
    from sonar_llm.data.segment import split_sentences

    return [s for line in text.split("\n") for s in split_sentences(line, max_sentence_chars)]


def make_prompt(ex: SummExample, cfg: SummarizationConfig) -> list[str]:
    """Prefix sentences + the document's first `max_prompt_sentences` sentences + suffix sentences."""
    from sonar_llm.data.segment import split_sentences

    seg = lambda t: split_sentences(t, cfg.max_sentence_chars) if t.strip() else []  # noqa: E731
    return seg(cfg.prefix) + seg(ex.document)[: cfg.max_prompt_sentences] + seg(cfg.suffix)


def score_summaries(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]],
                    use_stemmer: bool = False) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (" "-joined) and ROUGE-Lsum ("\\n"-joined) over documents, 0-100."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} references (need >= 1)")
    flat = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=use_stemmer)
    lsum = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=use_stemmer)
    tot = Counter()
    for pred, ref in zip(predictions, references):
        for k, v in flat.score(" ".join(ref), " ".join(pred)).items():
            tot[k] += v.fmeasure
        tot["rougeLsum"] += lsum.score("\n".join(ref), "\n".join(pred))["rougeLsum"].fmeasure
    n = len(predictions)
    return {k: 100.0 * tot[k] / n for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")}


def run_summarization(examples: Sequence[SummExample], generate: Callable[[list[list[str]]], list[list[str]]],
                      cfg: SummarizationConfig | None = None, *, end_of_doc_text: str = "End of sequence.",
                      dataset: str = "") -> dict:
    """Summarize every example with `generate` and score the summaries; a JSON-ready result."""
    cfg = cfg or SummarizationConfig()
    cfg.validate()
    if cfg.num_examples:
        examples = list(examples)[: cfg.num_examples]
    if not examples:
        raise ValueError("summarization needs at least one example")
    prompts = [make_prompt(ex, cfg) for ex in examples]
    empty = [ex.id for ex, p in zip(examples, prompts) if not p]
    if empty:
        raise ValueError(f"documents without a sentence: {empty[:5]}")
    eod = end_of_doc_text.strip()
    preds: list[list[str]] = []
    t0 = time.perf_counter()
    for b in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[b:b + cfg.batch_size]
        outs = generate(chunk)
        if len(outs) != len(chunk):
            raise ValueError(f"generate returned {len(outs)} continuations for {len(chunk)} prompts")
        for sents in outs:
            keep = []
            for s in sents:
                if s.strip() == eod:  # a family that emits the end sentence as text stops here too
                    break
                keep.append(s)
            preds.append(keep[: cfg.max_summary_sentences])
    seconds = time.perf_counter() - t0
    refs = [summary_sentences(ex.summary, cfg.max_sentence_chars) for ex in examples]
    metrics = score_summaries(preds, refs, cfg.use_stemmer)
    metrics["mean_summary_sentences"] = sum(map(len, preds)) / len(preds)
    metrics["empty_summaries"] = sum(not p for p in preds) / len(preds)
    return {"task": "summarization", "dataset": dataset, "config": asdict(cfg), "metrics": metrics,
            "num_examples": len(examples), "generation_seconds": seconds,
            "items": [{"id": ex.id, "prompt_sentences": len(p), "summary": pr, "reference": r}
                      for ex, p, pr, r in zip(examples, prompts, preds, refs)]}
