"""The resumable preprocess command: corpus -> sentences -> SONAR embeddings + target tokens -> shards.

    python -m sonar_llm.data.preprocess --input corpus/ --output data/ds --encoder enc.pt --tokenizer spm.model

Pipeline: `ingest.iter_documents` reads records; documents are assigned to shards by their position in
the (deterministic) ingest stream, `shard_size_docs` source documents per shard; each shard's documents
are split into sentences (`segment.split_sentences`), the end-of-document sentence is appended, and
documents longer than `max_sentences_per_doc` sentences are cut into consecutive chunks of at most that
many sentences (`doc_overflow="chunk"`; only the last chunk ends with the end-of-document sentence) or
cut to the first chunk (`"truncate"`), or cut to their first `max_sentences_per_doc - 1` sentences followed by
the end-of-document sentence (`"cut"`: the public SONAR-LLM dataset, 32 sentences + "End of sequence." with
max_sentences_per_doc=33); chunks of fewer than `min_doc_sentences` sentences are dropped.
The unique sentences of a shard are sorted by length and encoded in batches of `batch_size`
(`codec.encode`) and tokenized in target mode (`codec.target_tokens`, at most `max_target_tokens` ids,
the final </s> kept). The end-of-document sentence is encoded once; when the codec can decode (`codec.decode`,
e.g. `load_sonar_codec(decoder_path=...)`, `--decoder`), its embedding is decoded back and a warning names the
sentence if it does not come back exactly (`sonar_llm.sonar.round_trip`): a model trained on the data could
never stop on it.

Resuming and ranks: shard k belongs to rank k % world_size (RANK / WORLD_SIZE from torchrun when not
given). Each rank records its completed shards in its manifest part after every shard (see
`shards.py`; a single rank's part is manifest.json itself) and a re-run skips them, continuing with the
first incomplete shard; shards are written atomically, so a run killed at any point leaves no
half-written shard visible. The last rank to finish merges the parts into manifest.json (the reader
also merges them itself). A re-run with different settings is refused unless `overwrite=True`.
"""
from __future__ import annotations

import importlib
import itertools
import inspect
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from .ingest import IngestStats, iter_documents, list_input_files
from .segment import SegmentConfig, split_sentences
from .shards import DatasetWriter, ShardArrays, ShardGroups, relative_inputs, shard_name, to_storage

__all__ = ["SentenceCodec", "SonarCodec", "load_sonar_codec", "PreprocessConfig", "preprocess", "main"]


@runtime_checkable
class SentenceCodec(Protocol):
    """What preprocess needs from a sentence encoder + tokenizer.

    encode(sentences) -> Tensor[n, E]: one embedding per sentence (batching by length is the codec's job).
    target_tokens(sentences) -> list of n target-mode id lists `[3, lang, w1..wn, 3]`.
    Optional string attributes `encoder_id` / `tokenizer_id` name the models in the manifest; an optional
    `decode(embeddings [n, E]) -> list[str]` lets preprocess check that the end-of-document sentence round-trips.
    """

    def encode(self, sentences: list[str]) -> torch.Tensor: ...

    def target_tokens(self, sentences: list[str]) -> list[list[int]]: ...


def _truncate_ids(ids: Sequence[int], max_len: int) -> list[int]:
    ids = [int(t) for t in ids]
    if len(ids) > max_len:
        ids = ids[: max_len - 1] + ids[-1:]  # keep the closing </s>
    return ids


class SonarCodec:
    """`SentenceCodec` over a SONAR text-encoder pipeline and the NLLB tokenizer (duck typed).

    encoder: e.g. `sonar_llm.sonar.pipeline.TextToEmbedding`: `encode(texts, lang=...)` (or `encode(texts)`,
        `predict(texts)`, or a callable) returning a [n, E] tensor; it batches by length itself.
    tokenizer: e.g. `sonar_llm.sonar.tokenizer.NllbTokenizer`: `encode_target(texts, lang=...)` returning one
        `[3, lang, w1..wn, 3]` id list per text.
    Target sequences longer than `max_target_tokens` are cut, keeping the closing </s>.
    """

    def __init__(self, encoder, tokenizer, *, lang: str = "eng_Latn", max_target_tokens: int = 256,
                 encoder_id: str = "sonar_text_encoder", tokenizer_id: str = "nllb",
                 decode: Callable[[torch.Tensor], list[str]] | None = None):
        if not callable(getattr(tokenizer, "encode_target", None)):
            raise TypeError(f"tokenizer {type(tokenizer).__name__} has no encode_target(texts, lang=...)")
        fn = getattr(encoder, "encode", None) or getattr(encoder, "predict", None) or encoder
        if not callable(fn):
            raise TypeError(f"encoder {type(encoder).__name__} has no encode/predict and is not callable")
        try:
            takes_lang = "lang" in inspect.signature(fn).parameters
        except (TypeError, ValueError):  # builtins without a signature
            takes_lang = False
        self._encode = (lambda xs: fn(xs, lang=lang)) if takes_lang else fn
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.lang = lang
        self.max_target_tokens = max_target_tokens
        self.encoder_id = encoder_id
        self.tokenizer_id = tokenizer_id
        self.decode = decode  # SONAR decoding (None: the end sentence's round trip is not checked)

    def encode(self, sentences: list[str]) -> torch.Tensor:
        out = self._encode(list(sentences))
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(sentences):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"encoder returned {got}; expected [n={len(sentences)}, E]")
        return out

    def target_tokens(self, sentences: list[str]) -> list[list[int]]:
        seqs = self.tokenizer.encode_target(list(sentences), lang=self.lang)
        if len(seqs) != len(sentences):
            raise ValueError(f"tokenizer.encode_target returned {len(seqs)} sequences for {len(sentences)} texts")
        return [_truncate_ids(s.tolist() if isinstance(s, torch.Tensor) else s, self.max_target_tokens)
                for s in seqs]


def load_sonar_codec(encoder_path: str | os.PathLike | None = None, tokenizer_path: str | os.PathLike | None = None,
                     device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32, *,
                     lang: str = "eng_Latn", batch_size: int = 64,
                     decoder_path: str | os.PathLike | None = None) -> SonarCodec:
    """SonarCodec from a SONAR encoder checkpoint and the NLLB sentencepiece model.

    Paths default to the SONAR asset registry (`SONAR_ENCODER` / `SONAR_TOKENIZER` environment variables or
    the registry TOML, see sonar_llm.sonar.registry). `decoder_path` (else the registry's decoder, when one is
    registered) gives the codec a greedy `decode`, with which preprocess checks the end sentence's round trip.
    """
    from sonar_llm.sonar.checkpoint import load_sonar_encoder  # lazy: the SONAR models are optional here
    from sonar_llm.sonar.pipeline import TextToEmbedding
    from sonar_llm.sonar.registry import resolve_asset
    from sonar_llm.sonar.tokenizer import NllbTokenizer

    enc_path = resolve_asset("encoder", encoder_path)
    tok_path = resolve_asset("tokenizer", tokenizer_path)
    tokenizer = NllbTokenizer(tok_path)
    encoder = load_sonar_encoder(enc_path, dtype=dtype, device=device)
    pipeline = TextToEmbedding(encoder, tokenizer, batch_size=batch_size)
    decode = None
    try:
        dec_path = resolve_asset("decoder", decoder_path)
    except FileNotFoundError:
        if decoder_path is not None:
            raise
    else:
        from sonar_llm.sonar.checkpoint import load_sonar_decoder
        from sonar_llm.sonar.round_trip import sonar_decode_fn

        decode = sonar_decode_fn(load_sonar_decoder(dec_path, dtype=dtype, device=device), tokenizer, lang)
    # the content, not only the name, identifies the models: a resumed preprocess with another encoder saved
    # under the same file name must not reuse embeddings of the old one
    return SonarCodec(pipeline, tokenizer, lang=lang, encoder_id=_file_id(enc_path), tokenizer_id=_file_id(tok_path),
                      decode=decode)


def _file_id(path: Path) -> str:
    """`name (sha256 <first 16 hex digits>)` of a model file."""
    from sonar_llm.data.shards import sha256_file

    return f"{path.name} (sha256 {sha256_file(path)[:16]})"


@dataclass
class PreprocessConfig:
    """Settings that determine the dataset's content (a resumed run must use the same)."""

    shard_size_docs: int = 1000
    dtype: str = "fp16"
    end_of_doc_text: str = "End of sequence."
    max_sentences_per_doc: int = 128
    min_doc_sentences: int = 2
    doc_overflow: str = "chunk"
    max_sentence_chars: int = 256
    newline_is_boundary: bool = False
    max_target_tokens: int = 256
    text_field: str = "text"
    doc_separator: str = "blank_line"
    file_format: str | None = None
    batch_size: int = 256
    world_size: int = 1

    def __post_init__(self) -> None:
        for name in ("shard_size_docs", "max_sentences_per_doc", "min_doc_sentences", "batch_size", "world_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.max_target_tokens < 3:
            raise ValueError(f"max_target_tokens must be >= 3, got {self.max_target_tokens}")
        if self.dtype not in ("fp16", "bf16"):
            raise ValueError(f"dtype must be 'fp16' or 'bf16', got {self.dtype!r}")
        if self.doc_overflow not in ("chunk", "truncate", "cut"):
            raise ValueError(f"doc_overflow must be 'chunk', 'truncate' or 'cut', got {self.doc_overflow!r}")
        if not self.end_of_doc_text.strip():
            raise ValueError("end_of_doc_text must not be empty")
        SegmentConfig(self.max_sentence_chars, self.newline_is_boundary)  # validates


def _chunk_document(sents: list[str], eod: str, cfg: PreprocessConfig) -> list[list[str]]:
    stream = sents + [eod]
    m = cfg.max_sentences_per_doc
    chunks = [stream[i:i + m] for i in range(0, len(stream), m)]
    if cfg.doc_overflow == "truncate":
        chunks = chunks[:1]
    elif cfg.doc_overflow == "cut":
        chunks = [sents[:m - 1] + [eod]]
    return [c for c in chunks if len(c) >= cfg.min_doc_sentences]


def _encode_shard(docs: list[tuple[str, str]], codec: SentenceCodec, cfg: PreprocessConfig,
                  eod_emb: torch.Tensor, eod_tokens: list[int],
                  segment: Callable[[str], list[str]] | None = None) -> tuple[ShardArrays, list[str], dict]:
    seg = SegmentConfig(cfg.max_sentence_chars, cfg.newline_is_boundary)
    eod = cfg.end_of_doc_text
    chunks: list[list[str]] = []
    ids: list[str] = []
    stats = {"source_docs": len(docs), "no_sentences": 0, "dropped_short_chunks": 0, "chunked_docs": 0}
    for doc_id, text in docs:
        sents = segment(text) if segment is not None else split_sentences(text, config=seg)
        if not sents:
            stats["no_sentences"] += 1
            continue
        all_chunks = _chunk_document(sents, eod, cfg)
        n_total = -(-(len(sents) + 1) // cfg.max_sentences_per_doc)
        if cfg.doc_overflow in ("truncate", "cut"):
            n_total = 1
        stats["dropped_short_chunks"] += n_total - len(all_chunks)
        stats["chunked_docs"] += int(n_total > 1)
        for c, chunk in enumerate(all_chunks):
            chunks.append(chunk)
            ids.append(doc_id if n_total == 1 else f"{doc_id}#{c}")
    # unique sentences (the end-of-document sentence is encoded once, outside the shards)
    unique = sorted({s for ch in chunks for s in ch if s != eod}, key=lambda s: (len(s), s))
    row = {s: i for i, s in enumerate(unique)}
    E = eod_emb.shape[-1]
    emb_u = torch.empty(len(unique), E, dtype=torch.float32)
    tok_u: list[list[int]] = []
    for b in range(0, len(unique), cfg.batch_size):
        part = unique[b:b + cfg.batch_size]
        e = codec.encode(part)
        if not isinstance(e, torch.Tensor) or tuple(e.shape) != (len(part), E):
            raise ValueError(f"codec.encode returned shape {tuple(getattr(e, 'shape', ()))}, "
                             f"expected ({len(part)}, {E})")
        emb_u[b:b + len(part)] = e.detach().to("cpu", torch.float32)
        t = codec.target_tokens(part)
        if len(t) != len(part):
            raise ValueError(f"codec.target_tokens returned {len(t)} lists for {len(part)} sentences")
        tok_u.extend(_truncate_ids(x, cfg.max_target_tokens) for x in t)
    for s, t in zip(unique, tok_u):
        if not t:
            raise ValueError(f"codec.target_tokens returned no ids for sentence {s!r}")
    eod_row = len(unique)
    table = torch.cat([emb_u, eod_emb.detach().to("cpu", torch.float32).reshape(1, E)])
    tok_u.append(list(eod_tokens))
    sent_rows = np.array([eod_row if s == eod else row[s] for ch in chunks for s in ch], dtype=np.int64)
    lengths = np.array([len(t) for t in tok_u], dtype=np.int64)[sent_rows] if len(sent_rows) else np.zeros(0, np.int64)
    sent_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = [x for r in sent_rows for x in tok_u[r]]
    tokens = np.array(flat, dtype=np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**31):
        raise ValueError("codec.target_tokens returned ids outside [0, 2**31)")
    doc_offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64)
    emb = to_storage(table[torch.from_numpy(sent_rows)] if len(sent_rows) else table[:0], cfg.dtype)
    return ShardArrays(emb, tokens.astype(np.int32), sent_offsets, doc_offsets), ids, stats


def _check_end_round_trip(codec, text: str, embedding: torch.Tensor, rank: int) -> None:
    """Warn (stderr, rank 0) when the codec's SONAR decodes the end sentence's embedding to another text."""
    decode = getattr(codec, "decode", None)
    if rank != 0 or not callable(decode):
        return
    from sonar_llm.sonar.round_trip import round_trip

    result = round_trip(text, decode, embedding=embedding)
    if not result.exact:
        print(f"preprocess: warning: {result.message()}", file=sys.stderr, flush=True)


def _identifiers(codec) -> tuple[str, str]:
    return (str(getattr(codec, "encoder_id", type(codec).__name__)),
            str(getattr(codec, "tokenizer_id", type(codec).__name__)))


def preprocess(inputs: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike,
               codec: SentenceCodec, *, shard_size_docs: int = 1000, dtype: str = "fp16",
               end_of_doc_text: str = "End of sequence.", max_sentences_per_doc: int = 128,
               batch_size: int = 256, rank: int | None = None, world_size: int | None = None,
               text_field: str = "text", doc_separator: str = "blank_line", file_format: str | None = None,
               max_sentence_chars: int = 256, min_doc_sentences: int = 2, doc_overflow: str = "chunk",
               newline_is_boundary: bool = False, max_target_tokens: int = 256, overwrite: bool = False,
               log: Callable[[str], None] | None = print,
               segment: Callable[[str], list[str]] | None = None, segmenter: str = "") -> dict:
    """Preprocess `inputs` into a sharded dataset at `out_dir`; return this rank's manifest (merged if final).

    Safe to re-run: completed shards are kept and the run continues with the first incomplete one.
    `segment(text) -> sentences` replaces `split_sentences` (then `max_sentence_chars` and
    `newline_is_boundary` are not used); `segmenter` names it in the manifest's config.
    """
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if not isinstance(codec, SentenceCodec):
        raise TypeError(f"codec must have encode(list[str]) and target_tokens(list[str]), got {type(codec).__name__}")
    log = log or (lambda s: None)
    cfg = PreprocessConfig(shard_size_docs=shard_size_docs, dtype=dtype, end_of_doc_text=end_of_doc_text,
                           max_sentences_per_doc=max_sentences_per_doc, min_doc_sentences=min_doc_sentences,
                           doc_overflow=doc_overflow, max_sentence_chars=max_sentence_chars,
                           newline_is_boundary=newline_is_boundary, max_target_tokens=max_target_tokens,
                           text_field=text_field, doc_separator=doc_separator, file_format=file_format,
                           batch_size=batch_size, world_size=world_size)
    files = [str(p) for p in list_input_files(inputs)]
    out = Path(out_dir)
    encoder_id, tokenizer_id = _identifiers(codec)
    config = asdict(cfg)
    config["inputs"] = relative_inputs(files, out)  # relative to the dataset folder (shards.relative_inputs)
    if segment is not None:
        config["segmenter"] = segmenter or getattr(segment, "__name__", "custom")

    stats = IngestStats()
    docs = iter_documents(files, doc_separator=doc_separator, text_field=text_field, file_format=file_format,
                          stats=stats)
    first = next(docs, None)
    if first is None:  # checked before anything is written
        raise ValueError(f"preprocess: the input holds no documents: {', '.join(files) or inputs} "
                         f"({stats.summary()}); nothing written to {out}")
    docs = itertools.chain([first], docs)

    # the end-of-document sentence: encoded once, stored beside the shards and appended to every document
    eod_emb = codec.encode([end_of_doc_text])
    if not isinstance(eod_emb, torch.Tensor) or eod_emb.dim() != 2 or eod_emb.shape[0] != 1:
        raise ValueError(f"codec.encode([eod]) must return [1, E], got {tuple(getattr(eod_emb, 'shape', ()))}")
    eod_emb = eod_emb[0].detach().to("cpu", torch.float32)
    _check_end_round_trip(codec, end_of_doc_text, eod_emb, rank)
    eod_tokens = _truncate_ids(codec.target_tokens([end_of_doc_text])[0], max_target_tokens)
    writer = DatasetWriter(out, embed_dim=int(eod_emb.shape[-1]), dtype=dtype, end_of_doc_text=end_of_doc_text,
                           end_of_doc_tokens=eod_tokens, end_of_doc_embedding=eod_emb, encoder=encoder_id,
                           tokenizer=tokenizer_id, config=config, rank=rank, world_size=world_size,
                           overwrite=overwrite)
    done = writer.completed
    if writer.complete:
        log(f"preprocess: rank {rank} already complete ({len(done)} shards) in {out}")
        return writer.finish(writer.manifest["num_planned_shards"], writer.manifest["ingest"])
    if done:
        log(f"preprocess: rank {rank} resuming after {len(done)} completed shards")

    t0 = time.time()
    written = 0
    groups = ShardGroups(docs, shard_size_docs, skip=lambda k: k % world_size != rank or k in done)
    for k, group in groups:
        arrays, ids, sstats = _encode_shard(group, codec, cfg, eod_emb, eod_tokens, segment)
        entry = writer.add_shard(k, arrays, doc_ids=ids, extra=sstats)
        written += 1
        log(f"preprocess: rank {rank} wrote {shard_name(k)} ({entry['num_docs']} docs, "
            f"{entry['num_sentences']} sentences) [{time.time() - t0:.1f}s]")
    num_shards = groups.num_shards
    result = writer.finish(num_shards, stats.to_dict())
    log(f"preprocess: rank {rank} done: {written} shards written this run, {len(writer.completed)} of "
        f"{num_shards} shards on this rank; {stats.summary()}; "
        f"{writer.manifest['skipped_no_sentences']} documents without sentences")
    if result is not writer.manifest:
        log(f"preprocess: merged {world_size} manifest parts into {out / 'manifest.json'}")
    return result


def _load_factory(spec: str):
    """The callable `--codec-factory module:callable` names; UsageError naming the flag when it cannot be had."""
    from sonar_llm.cli import UsageError

    if ":" not in spec:
        raise ValueError(f"--codec-factory must look like 'module:callable', got {spec!r}")
    mod, fn = spec.split(":", 1)
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"--codec-factory {spec}: {e}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (also the `sonar-llm-preprocess` script); returns the exit status: 0, 2 with one
    line on stderr on bad input (a missing input or model file, an input that holds no documents, a device this
    machine lacks), 1 when the work fails (`sonar_llm.cli`)."""
    from sonar_llm.cli import run

    return run("preprocess", _main, argv)


def _main(argv: list[str]) -> int:
    from sonar_llm.cli import check_device, int_at_least, parser

    p = parser("python -m sonar_llm.data.preprocess", description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="files, directories or glob patterns")
    p.add_argument("--output", required=True, help="dataset directory")
    p.add_argument("--encoder", help="SONAR text encoder checkpoint (.pt / .safetensors); default: registry")
    p.add_argument("--tokenizer", help="NLLB sentencepiece model; default: registry")
    p.add_argument("--decoder", help="SONAR text decoder, to check that --end-of-doc-text round-trips (a warning "
                                     "names it if not); default: the registry's, else no check")
    p.add_argument("--encoder-batch-size", type=int_at_least(1), default=64, help="sentences per encoder forward")
    p.add_argument("--codec-factory", help="'module:callable' returning a SentenceCodec (instead of --encoder)")
    p.add_argument("--lang", default="eng_Latn", help="language of the texts (SONAR code)")
    p.add_argument("--device", default="", help="encoder device: cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--encoder-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="encoder compute dtype")
    p.add_argument("--text-field", default="text", help="JSONL / Parquet field holding the text")
    p.add_argument("--doc-separator", default="blank_line", choices=["blank_line", "line"],
                   help="text files: documents end at a blank line, or every line is one")
    p.add_argument("--format", default=None, choices=["text", "jsonl", "parquet"], dest="file_format",
                   help="input format (default: from the file suffix)")
    p.add_argument("--shard-size-docs", type=int_at_least(1), default=1000, help="source documents per shard")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"], help="embedding storage dtype")
    p.add_argument("--end-of-doc-text", default="End of sequence.", help="sentence appended to every document")
    p.add_argument("--max-sentences-per-doc", type=int_at_least(1), default=128,
                   help="sentences per document, end sentence included (see --doc-overflow)")
    p.add_argument("--min-doc-sentences", type=int_at_least(1), default=2, help="shorter chunks are dropped")
    p.add_argument("--doc-overflow", default="chunk", choices=["chunk", "truncate", "cut"],
                   help="longer documents: cut into chunks, keep the first chunk, or cut and end them")
    p.add_argument("--max-sentence-chars", type=int_at_least(1), default=256, help="longer sentences are re-split")
    p.add_argument("--batch-size", type=int_at_least(1), default=256, help="sentences handed to the codec at once")
    p.add_argument("--overwrite", action="store_true", help="redo a dataset written with other settings")
    args = p.parse_args(argv)
    list_input_files(args.input)  # a missing input is said before any model loads
    device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.codec_factory:
        codec = _load_factory(args.codec_factory)()
    else:  # missing paths come from the SONAR registry / environment
        codec = load_sonar_codec(args.encoder, args.tokenizer, device, getattr(torch, args.encoder_dtype),
                                 lang=args.lang, batch_size=args.encoder_batch_size, decoder_path=args.decoder)
    preprocess(args.input, args.output, codec, shard_size_docs=args.shard_size_docs, dtype=args.dtype,
               end_of_doc_text=args.end_of_doc_text, max_sentences_per_doc=args.max_sentences_per_doc,
               batch_size=args.batch_size, text_field=args.text_field, doc_separator=args.doc_separator,
               file_format=args.file_format, max_sentence_chars=args.max_sentence_chars,
               min_doc_sentences=args.min_doc_sentences, doc_overflow=args.doc_overflow,
               overwrite=args.overwrite, log=lambda s: print(s, file=sys.stderr, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
