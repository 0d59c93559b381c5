"""TinyStories -> our shards, split and segmented as the public SONAR-LLM code does.

    python -m sonar_llm.data.tinystories --out data/tinystories                       # online (HF datasets)
    python -m sonar_llm.data.tinystories --out data/tinystories --data-dir ~/TinyStories   # downloaded files
    python -m sonar_llm.data.tinystories --out data/tinystories --train A.txt --validation B.txt

Sources. Online: `datasets.load_dataset("roneneldan/TinyStories")` (imported only then), the splits
"train" and "validation", column "text". Offline, the dataset's own layouts, recognised per file:
  Parquet  Hugging Face's `data/train-*.parquet` / `data/validation-*.parquet`, column "text";
  TXT      `TinyStories[V2-GPT4]-train.txt` / `-valid.txt`, stories separated by `<|endoftext|>`;
  JSON     `TinyStories_all_data/data*.json`, lists of objects whose "story" is the text (train only:
           the archive has no validation split, give a validation file beside it);
  JSONL    one {"text": ...} per line (what this command writes itself).
`--data-dir` finds them (Parquet first, then TXT, then JSON); `--train` / `--validation` name files.

Splits (the public code): empty texts are dropped (`if item["text"]`). train = every train story.
The validation split is cut as the public scripts use it: its last `--validation-holdout` (2,500) stories
are the held-out set (`train_llm.py` takes `val[-2500:]` for the validation loss) and are encoded into
`valid/` (the path the configs/*.toml read as `data.val_path`); the others, `val[:-2500]`, are
the generation prompts (`generate.py`), written as text to
`prompts.jsonl` for `python -m sonar_llm.eval.evaluate --stories OUT/prompts.jsonl --scoring public`
(which keeps the stories of at most 32 Punkt sentences, the first 512). A validation split of at most
`--validation-holdout` stories leaves no prompt: the command says so in a warning (prompts.jsonl is empty).

Documents: split into sentences with NLTK Punkt (`nltk.sent_tokenize`, stripped, empty ones dropped) when
its model is installed, else with blingfire (`sonar_llm.data.segment.split_sentences`, which also
normalises whitespace and re-splits sentences of 256+ characters); the output and the manifest say which
(`--segmenter` forces one). Each document keeps its first `--max-sentences` (32) sentences, then the EOS
sentence "End of sequence." is appended (the public training dataset class with max_sentences=32: up to
33 positions); a document with no sentence is dropped. Encoding: `sonar_llm.data.preprocess` with the
SONAR encoder and tokenizer (or `--codec-factory`), into `OUT/train/` and `OUT/valid/`: `--encoder` /
`--tokenizer`, else the SONAR registry, else the cached tiny SONAR (as the other commands).
The summary (`OUT/tinystories.json`, and the last log line) gives each split's documents and sentences.
Errors follow `sonar_llm.cli`: bad input exits 2 with one line naming the flag or file (and line).

Resuming: the stories are first written once to `OUT/source/*.jsonl` (atomically, with `SOURCES.json`
recording where they came from); a re-run reuses them and `preprocess` continues with the first incomplete
shard. A re-run with a different source, split or segmenter is refused unless `--overwrite`.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from .preprocess import SentenceCodec, _load_factory, load_sonar_codec, preprocess
from .punkt import PUNKT_MISSING, punkt_tokenizer
from .shards import write_json_atomic

__all__ = ["TinyStoriesConfig", "read_story_file", "find_files", "make_segmenter", "prepare_tinystories", "main"]

EOT = "<|endoftext|>"
HF_NAME = "roneneldan/TinyStories"


@dataclass
class TinyStoriesConfig:
    """Settings of the TinyStories preparation."""

    out: str = "data/tinystories"
    data_dir: str = ""  # downloaded dataset folder (layouts found automatically)
    train: list[str] = field(default_factory=list)  # or explicit files per split
    validation: list[str] = field(default_factory=list)
    validation_holdout: int = 2500  # the last N validation stories: held-out shards; the rest: prompts
    max_sentences: int = 32  # sentences kept per document, before the EOS sentence
    end_of_doc_text: str = "End of sequence."
    segmenter: str = "auto"  # auto | punkt | blingfire
    max_train_stories: int = 0  # 0 = all (smaller for a smoke run)
    shard_size_docs: int = 10000
    dtype: str = "fp16"
    batch_size: int = 256  # sentences handed to the codec at once
    max_target_tokens: int = 256
    overwrite: bool = False

    def validate(self) -> None:
        if self.segmenter not in ("auto", "punkt", "blingfire"):
            raise ValueError(f"segmenter must be auto, punkt or blingfire, got {self.segmenter!r}")
        if self.validation_holdout < 0 or self.max_sentences < 1 or self.max_train_stories < 0:
            raise ValueError("validation_holdout >= 0, max_sentences >= 1 and max_train_stories >= 0 are required")
        if bool(self.train) != bool(self.validation):
            raise ValueError("give both --train and --validation files (or --data-dir, or neither for HF)")
        if self.data_dir and self.train:
            raise ValueError("give --data-dir or --train/--validation, not both")


# ------------------------------------------------------------------------------------------ reading
def read_story_file(path: str | os.PathLike) -> Iterator[str]:
    """The stories of one file in any TinyStories layout (see the module doc), in file order, unfiltered."""
    p = Path(path)
    name = p.name.lower()
    if not p.is_file():
        raise FileNotFoundError(f"TinyStories file not found: {p}")
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(p)
        except (pa.ArrowException, OSError) as e:  # truncated or not Parquet: name the file
            raise ValueError(f"{p}: not a readable Parquet file ({e})") from None
        if "text" not in pf.schema_arrow.names:
            raise ValueError(f"{p}: no 'text' column (columns: {pf.schema_arrow.names})")
        for batch in pf.iter_batches(batch_size=4096, columns=["text"]):
            yield from (t if t is not None else "" for t in batch.column(0).to_pylist())
    elif name.endswith(".txt"):
        with open(p, "rb") as f:  # streamed: the train files are gigabytes
            lines: list[str] = []
            for lineno, raw in enumerate(f, 1):
                line = _utf8_line(raw, p, lineno).replace("\r\n", "\n")
                while EOT in line:
                    head, line = line.split(EOT, 1)
                    yield ("".join(lines) + head).strip()
                    lines = []
                lines.append(line)
            rest = "".join(lines).strip()
            if rest:
                yield rest
    elif name.endswith(".jsonl"):
        with open(p, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                line = _utf8_line(raw, p, lineno)
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{lineno}: bad JSON ({e.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text", ""), str):
                    raise ValueError(f"{p}:{lineno}: expected an object with a string 'text'")
                yield obj.get("text", "")
    elif name.endswith(".json"):
        from sonar_llm.cli import read_utf8

        try:
            data = json.loads(read_utf8(p))
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{e.lineno}: bad JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise ValueError(f"{p}: expected a JSON list of stories (TinyStories_all_data layout)")
        for i, obj in enumerate(data):
            if not isinstance(obj, dict) or not isinstance(obj.get("story", ""), str):
                raise ValueError(f"{p}: item {i} is not an object with a string 'story'")
            yield obj.get("story", "")
    else:
        raise ValueError(f"{p}: unknown TinyStories file type (expected .parquet, .txt, .json or .jsonl)")


def _utf8_line(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x})") from None


def find_files(data_dir: str | os.PathLike) -> tuple[list[Path], list[Path], str]:
    """(train files, validation files, layout) found in a downloaded TinyStories folder."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--data-dir {root} is not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    rel = lambda p: str(p.relative_to(root)).lower()  # noqa: E731
    pq_train = [p for p in files if p.name.lower().startswith("train-") and p.suffix == ".parquet"]
    pq_valid = [p for p in files if p.name.lower().startswith("validation-") and p.suffix == ".parquet"]
    if pq_train and pq_valid:
        return pq_train, pq_valid, "parquet"
    txt_train = [p for p in files if p.suffix == ".txt" and "train" in p.name.lower()]
    txt_valid = [p for p in files if p.suffix == ".txt" and "valid" in p.name.lower()]
    if len(txt_train) > 1 or len(txt_valid) > 1:  # e.g. V1 and V2 side by side: the user must choose
        names = [rel(p) for p in txt_train + txt_valid]
        raise ValueError(f"{root}: several TinyStories text files per split ({names}); name them with "
                         f"--train/--validation")
    json_train = [p for p in files if p.suffix == ".json" and "tinystories_all_data" in rel(p)]
    train = txt_train or json_train
    if train and txt_valid:
        return train, txt_valid, "txt" if txt_train else "json+txt"
    raise FileNotFoundError(f"{root}: no TinyStories train and validation files found (data/train-*.parquet and "
                            f"data/validation-*.parquet, *train*.txt and *valid*.txt, or TinyStories_all_data/*.json "
                            f"with a *valid*.txt)")


def _stories(files: Iterable[Path]) -> Iterator[str]:
    for f in files:
        for t in read_story_file(f):
            if t:  # the public code: `if item["text"]`
                yield t


def _load_hf() -> tuple[list[str], list[str]]:
    from sonar_llm.cli import CommandFailed

    try:
        import datasets  # optional: only for the online path
    except ImportError as e:
        raise CommandFailed("reading TinyStories online needs the 'datasets' package (pip install datasets); "
                           "offline, give --data-dir or --train/--validation files") from e
    try:
        ds = datasets.load_dataset(HF_NAME)
    except Exception as e:  # network, hub or cache errors: say what to do instead
        raise CommandFailed(f"could not load {HF_NAME} through datasets ({type(e).__name__}: {e}); offline, give "
                           f"--data-dir or --train/--validation files") from e
    return ([t for t in ds["train"]["text"] if t], [t for t in ds["validation"]["text"] if t])


# ------------------------------------------------------------------------------------------ segmentation
def make_segmenter(name: str = "auto", max_sentences: int = 32) -> tuple[Callable[[str], list[str]], str, str]:
    """(segment(text) -> at most `max_sentences` sentences, segmenter id, a line saying which and why)."""
    tok = punkt_tokenizer() if name in ("auto", "punkt") else None
    if name == "punkt" and tok is None:
        raise LookupError(f"--segmenter punkt: {PUNKT_MISSING}")
    if tok is not None:
        import nltk

        def punkt(text: str) -> list[str]:
            return [s.strip() for s in tok.tokenize(text) if s.strip()][:max_sentences]

        return punkt, f"nltk-punkt-{nltk.__version__}", "sentences: NLTK Punkt (as the public code)"
    import blingfire

    from .segment import split_sentences

    def bling(text: str) -> list[str]:
        return split_sentences(text)[:max_sentences]

    why = "forced by --segmenter" if name == "blingfire" else PUNKT_MISSING
    return bling, f"blingfire-{getattr(blingfire, '__version__', '')}".rstrip("-"), \
        f"sentences: blingfire, NOT the public code's Punkt ({why})"


# ------------------------------------------------------------------------------------------ the command
def _write_jsonl(path: Path, texts: Iterable[str]) -> int:
    tmp = path.with_suffix(path.suffix + ".tmp")
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for t in texts:  # a generator over the source files: a bad file fails here, leaving nothing
                f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return n


def _materialize(cfg: TinyStoriesConfig, out: Path, log: Callable[[str], None]) -> dict:
    """Write source/train.jsonl, source/validation.jsonl and prompts.jsonl once; return SOURCES.json's content."""
    src_dir = out / "source"
    src_dir.mkdir(parents=True, exist_ok=True)
    if cfg.data_dir:
        train_f, valid_f, layout = find_files(cfg.data_dir)
    elif cfg.train:
        train_f, valid_f, layout = [Path(p) for p in cfg.train], [Path(p) for p in cfg.validation], "files"
    else:
        train_f, valid_f, layout = [], [], "huggingface"
    want = {"source": layout, "train_files": [str(p) for p in train_f], "validation_files": [str(p) for p in valid_f],
            "validation_holdout": cfg.validation_holdout, "max_train_stories": cfg.max_train_stories}
    marker = src_dir / "SOURCES.json"
    if marker.is_file():
        have = json.loads(marker.read_text())
        if {k: have.get(k) for k in want} == want:
            log(f"tinystories: reusing the stories written before ({have['counts']})")
            return have
        if not cfg.overwrite:
            diff = [k for k in want if have.get(k) != want[k]]
            raise ValueError(f"{marker} was written from other sources/settings ({diff}); pass --overwrite to redo")
        marker.unlink()
    if layout == "huggingface":
        log(f"tinystories: loading {HF_NAME} through datasets")
        train, valid = _load_hf()
    else:
        what = "the given files" if layout == "files" else f"the {layout} files of {cfg.data_dir}"
        log(f"tinystories: reading {what}: train {want['train_files']}, validation {want['validation_files']}")
        train, valid = _stories(train_f), list(_stories(valid_f))
    if cfg.max_train_stories:
        train = (t for i, t in zip(range(cfg.max_train_stories), train))
    h = cfg.validation_holdout
    held, prompts = (valid[-h:], valid[:-h]) if h else ([], valid)
    if not held:
        raise ValueError(f"the validation split has {len(valid)} stories: nothing is left for --validation-holdout {h}")
    if h and not prompts:
        log(f"warning: the validation split has {len(valid)} stories, not more than --validation-holdout {h}: all "
            f"are held out and {out / 'prompts.jsonl'} gets no prompt (give a larger validation set or a smaller "
            f"--validation-holdout)")
    counts = {"train": _write_jsonl(src_dir / "train.jsonl", train),
              "validation_heldout": _write_jsonl(src_dir / "validation.jsonl", held),
              "prompts": _write_jsonl(out / "prompts.jsonl", prompts)}
    if counts["train"] == 0:
        for written in (src_dir / "train.jsonl", src_dir / "validation.jsonl", out / "prompts.jsonl"):
            written.unlink()  # a failed command leaves nothing behind
        raise ValueError(f"no train story was read from {', '.join(want['train_files']) or HF_NAME} (empty files?)")
    info = {**want, "counts": counts}
    write_json_atomic(marker, info)
    log(f"tinystories: stories {counts}")
    return info


def prepare_tinystories(cfg: TinyStoriesConfig, codec: SentenceCodec,
                        log: Callable[[str], None] | None = print) -> dict:
    """Read, split, segment and encode TinyStories into `cfg.out`; returns the summary written to tinystories.json."""
    cfg.validate()
    log = log or (lambda s: None)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    segment, seg_id, seg_line = make_segmenter(cfg.segmenter, cfg.max_sentences)
    log(f"tinystories: {seg_line}")
    sources = _materialize(cfg, out, log)
    manifests = {}
    for split, fname in (("train", "train.jsonl"), ("valid", "validation.jsonl")):
        manifests[split] = preprocess(
            out / "source" / fname, out / split, codec, shard_size_docs=cfg.shard_size_docs, dtype=cfg.dtype,
            end_of_doc_text=cfg.end_of_doc_text, max_sentences_per_doc=cfg.max_sentences + 1,
            doc_overflow="truncate", min_doc_sentences=2, batch_size=cfg.batch_size, text_field="text",
            max_target_tokens=cfg.max_target_tokens, overwrite=cfg.overwrite, segment=segment, segmenter=seg_id,
            rank=0, world_size=1, log=log)
    summary = {"segmenter": seg_id, "segmenter_note": seg_line, "sources": sources, "settings": asdict(cfg),
               "splits": {k: {"path": str(out / k), "num_docs": int(m["totals"]["docs"]),
                              "num_sentences": int(m["totals"]["sentences"])} for k, m in manifests.items()},
               "prompts": str(out / "prompts.jsonl")}
    write_json_atomic(out / "tinystories.json", summary)
    log(f"tinystories: done; {seg_line}; train {summary['splits']['train']}, validation "
        f"{summary['splits']['valid']}, prompts {out / 'prompts.jsonl'} ({sources['counts']['prompts']} stories)")
    return summary


def _sonar_paths(encoder: str | None, tokenizer: str | None, log: Callable[[str], None]) -> tuple[Path, Path]:
    """--encoder / --tokenizer, else the SONAR registry, else the cached tiny SONAR (trained on first use)."""
    from sonar_llm.sonar.registry import resolve_asset

    found: dict[str, Path] = {}
    for name, given in (("encoder", encoder), ("tokenizer", tokenizer)):
        try:
            found[name] = resolve_asset(name, given or None)
        except FileNotFoundError:
            if given:
                raise FileNotFoundError(f"--{name}: file not found: {given}") from None
    if len(found) < 2:
        from sonar_llm.sonar.train_tiny import ensure_tiny_sonar

        tiny = ensure_tiny_sonar()
        log(f"tinystories: no SONAR {' / '.join(n for n in ('encoder', 'tokenizer') if n not in found)} given or "
            f"registered: using the tiny SONAR of {tiny.root}")
        for name in ("encoder", "tokenizer"):
            found.setdefault(name, getattr(tiny, name))
    return found["encoder"], found["tokenizer"]


def _parser():
    from sonar_llm.cli import int_at_least, parser

    p = parser("python -m sonar_llm.data.tinystories", description=__doc__.split("\n")[0])
    d = TinyStoriesConfig()
    p.add_argument("--out", required=True, help="output folder (source/, train/, valid/, prompts.jsonl)")
    p.add_argument("--data-dir", default="", help="downloaded TinyStories folder (else --train/--validation, else HF)")
    p.add_argument("--train", nargs="+", default=[], help="train story files (.parquet, .txt, .json, .jsonl)")
    p.add_argument("--validation", nargs="+", default=[], help="validation story files (same formats)")
    p.add_argument("--validation-holdout", type=int_at_least(0), default=d.validation_holdout,
                   help="the last N validation stories are the held-out shards, the rest the prompts (default 2500)")
    p.add_argument("--max-sentences", type=int_at_least(1), default=d.max_sentences,
                   help="sentences kept per story before the end sentence (default 32)")
    p.add_argument("--segmenter", default=d.segmenter, choices=("auto", "punkt", "blingfire"),
                   help="sentence splitter (auto: NLTK Punkt when installed, else blingfire)")
    p.add_argument("--max-train-stories", type=int_at_least(0), default=0, help="train stories to keep (0 = all)")
    p.add_argument("--shard-size-docs", type=int_at_least(1), default=d.shard_size_docs, help="documents per shard")
    p.add_argument("--dtype", default=d.dtype, choices=("fp16", "bf16"), help="embedding storage dtype")
    p.add_argument("--batch-size", type=int_at_least(1), default=d.batch_size, help="sentences handed to the encoder at once")
    p.add_argument("--overwrite", action="store_true", help="redo a folder written from other sources or settings")
    p.add_argument("--encoder", help="SONAR text encoder checkpoint (default: registry, else the cached tiny SONAR)")
    p.add_argument("--tokenizer", help="NLLB sentencepiece model (default: registry, else the cached tiny SONAR)")
    p.add_argument("--codec-factory", help="'module:callable' returning a SentenceCodec (instead of --encoder)")
    p.add_argument("--encoder-batch-size", type=int_at_least(1), default=64, help="sentences per encoder forward")
    p.add_argument("--encoder-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="encoder compute dtype")
    p.add_argument("--device", default="", help="encoder device: cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--lang", default="eng_Latn", help="language of the stories (SONAR code)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The command; exit 0, 2 on bad input (one line on stderr), 1 when the work fails (sonar_llm.cli)."""
    from sonar_llm.cli import run

    return run("tinystories", _main, argv, usage_errors=(LookupError,))


def _main(argv: list[str]) -> int:
    import torch

    from sonar_llm.cli import check_device

    a = _parser().parse_args(argv)
    cfg = TinyStoriesConfig(out=a.out, data_dir=a.data_dir, train=a.train, validation=a.validation,
                            validation_holdout=a.validation_holdout, max_sentences=a.max_sentences,
                            segmenter=a.segmenter, max_train_stories=a.max_train_stories,
                            shard_size_docs=a.shard_size_docs, dtype=a.dtype, batch_size=a.batch_size,
                            overwrite=a.overwrite)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    cfg.validate()
    for f in cfg.train + cfg.validation:  # before anything is written
        if not Path(f).is_file():
            raise FileNotFoundError(f"{'--train' if f in cfg.train else '--validation'}: file not found: {f}")
    device = check_device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if a.codec_factory:
        codec = _load_factory(a.codec_factory)()
    else:
        encoder, tokenizer = _sonar_paths(a.encoder, a.tokenizer, log)
        codec = load_sonar_codec(encoder, tokenizer, device, getattr(torch, a.encoder_dtype), lang=a.lang,
                                 batch_size=a.encoder_batch_size)
    out = Path(cfg.out)
    existed = out.exists()
    try:
        prepare_tinystories(cfg, codec, log)
    except BaseException:
        if not existed:  # a first run that failed: leave no empty folders behind (files are written atomically)
            for d in sorted((p for p in [out, *out.rglob("*")] if p.is_dir()), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    d.rmdir()
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
