"""Preprocess a corpus into whole-document token streams for the token LLM with the user's tokenizer.

    python -m sonar_llm.data.preprocess_tokens --input corpus/ --output data/tok/train --tokenizer tokenizer.json

The paper's token baseline (public `train_llm.py`, `LLMDataset`): every story is ONE stream
`[BOS] + tokenizer(text) + [EOS]` (no sentence splitting), cut to its first `--max-tokens` ids (the public
`block_size` 2048: `tokenized[:block_size]`, which drops the EOS of a longer story). The tokenizer is a
Hugging Face tokenizer.json or a SentencePiece model (`sonar_llm.data.text_tokenizer`).

Output: the project's shard format (`sonar_llm.data.shards`) read by the same loader and trainer: each
document is one segment (one "sentence" of the format) holding its whole stream, with no sentence
embeddings (`embed_dim` 0). The manifest's `config.token_stream` records the format ("whole_document"),
the tokenizer's identity (file name + sha256), kind, vocabulary size and BOS / EOS ids; the token LLM
checks them against its `text_tokenizer` at build time. Documents are read by `sonar_llm.data.ingest`
(text / JSONL / Parquet), `--shard-size-docs` per shard; a re-run resumes after the completed shards and
refuses other settings unless `--overwrite`.
"""
from __future__ import annotations

import itertools
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .ingest import IngestStats, iter_documents, list_input_files
from .shards import DatasetWriter, ShardArrays, ShardGroups, relative_inputs, shard_name, to_storage
from .text_tokenizer import TextTokenizer, load_text_tokenizer

__all__ = ["TokenStreamConfig", "STREAM_FORMAT", "preprocess_tokens", "token_stream_info", "main"]

STREAM_FORMAT = "whole_document"
PUBLIC_BLOCK_SIZE = 2048  # train_llm.py: LLMDataset(..., block_size=2048)


@dataclass
class TokenStreamConfig:
    """Settings that determine the dataset's content (a resumed run must use the same)."""

    max_tokens: int = PUBLIC_BLOCK_SIZE  # ids kept per document, BOS and EOS included (the public block_size)
    shard_size_docs: int = 1000  # source documents per shard
    text_field: str = "text"  # JSONL field / Parquet column of the text
    doc_separator: str = "blank_line"  # text files: blank_line | line
    file_format: str | None = None  # force text | jsonl | parquet (default: from the extension)

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 2:
            raise ValueError(f"max_tokens must be an int >= 2, got {self.max_tokens!r}")
        if not isinstance(self.shard_size_docs, int) or self.shard_size_docs < 1:
            raise ValueError(f"shard_size_docs must be a positive int, got {self.shard_size_docs!r}")


def token_stream_info(manifest: dict) -> dict | None:
    """The `config.token_stream` record of a dataset manifest (None: a SONAR sentence dataset)."""
    info = (manifest.get("config") or {}).get("token_stream")
    return info if isinstance(info, dict) else None


def _shard_arrays(streams: list[list[int]]) -> ShardArrays:
    lengths = np.array([len(s) for s in streams], dtype=np.int64)
    tokens = np.array([t for s in streams for t in s], dtype=np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**31):
        raise ValueError("the tokenizer returned ids outside [0, 2**31)")
    n = len(streams)
    return ShardArrays(to_storage(np.zeros((n, 0), dtype=np.float32), "fp16"), tokens.astype(np.int32),
                       np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                       np.arange(n + 1, dtype=np.int64))


def preprocess_tokens(inputs: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                      tokenizer: TextTokenizer, cfg: TokenStreamConfig | None = None, *, overwrite: bool = False,
                      log: Callable[[str], None] | None = print) -> dict:
    """Write the whole-document token shards of `inputs` to `out_dir`; returns the manifest."""
    cfg = cfg or TokenStreamConfig()
    log = log or (lambda s: None)
    files = [str(p) for p in list_input_files(inputs)]
    out = Path(out_dir)
    stats = IngestStats()
    docs = iter_documents(files, doc_separator=cfg.doc_separator, text_field=cfg.text_field,
                          file_format=cfg.file_format, stats=stats)
    first = next(docs, None)
    if first is None:
        raise ValueError(f"--input holds no documents: {', '.join(files)} ({stats.summary()}); nothing written")
    docs = itertools.chain([first], docs)
    config = asdict(cfg)
    config["inputs"] = relative_inputs(files, out)  # relative to the dataset folder (shards.relative_inputs)
    config["token_stream"] = {"format": STREAM_FORMAT, **tokenizer.describe()}
    writer = DatasetWriter(out, embed_dim=0, dtype="fp16", end_of_doc_text="", end_of_doc_tokens=[tokenizer.eos_id],
                           end_of_doc_embedding=np.zeros(0, dtype=np.float32), encoder="",
                           tokenizer=tokenizer.identity, config=config, overwrite=overwrite)
    if writer.complete:
        log(f"preprocess_tokens: already complete in {out}")
        return writer.manifest
    done = writer.completed
    t0 = time.time()
    cut = 0
    groups = ShardGroups(docs, cfg.shard_size_docs, skip=lambda k: k in done)
    for k, group in groups:
        streams = [[tokenizer.bos_id, *ids, tokenizer.eos_id]
                   for ids in tokenizer.encode_batch([text for _, text in group])]
        cut += sum(len(s) > cfg.max_tokens for s in streams)
        streams = [s[:cfg.max_tokens] for s in streams]
        entry = writer.add_shard(k, _shard_arrays(streams), doc_ids=[d for d, _ in group])
        log(f"preprocess_tokens: wrote {shard_name(k)} ({entry['num_docs']} documents, "
            f"{entry['num_tokens']} tokens) [{time.time() - t0:.1f}s]")
    manifest = writer.finish(groups.num_shards, stats.to_dict())
    log(f"preprocess_tokens: done: {groups.num_docs} documents in {out}; {cut} cut to {cfg.max_tokens} tokens; "
        f"{stats.summary()}")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; bad input exits 2 with one line (`sonar_llm.cli`)."""
    from sonar_llm.cli import parser, run

    def body(args: list[str]) -> int:
        p = parser("python -m sonar_llm.data.preprocess_tokens", description=__doc__.split("\n")[0])
        p.add_argument("--input", nargs="+", required=True, help="files, directories or glob patterns")
        p.add_argument("--output", required=True, help="dataset directory")
        p.add_argument("--tokenizer", required=True, help="a Hugging Face tokenizer.json or a SentencePiece model")
        p.add_argument("--bos-token", default=None, help="BOS token string (default: found by name)")
        p.add_argument("--eos-token", default=None, help="EOS token string (default: found by name)")
        p.add_argument("--max-tokens", type=int, default=PUBLIC_BLOCK_SIZE,
                       help="ids kept per document incl. BOS/EOS (public block_size 2048)")
        p.add_argument("--shard-size-docs", type=int, default=1000)
        p.add_argument("--text-field", default="text")
        p.add_argument("--doc-separator", default="blank_line", choices=["blank_line", "line"])
        p.add_argument("--format", default=None, choices=["text", "jsonl", "parquet"], dest="file_format")
        p.add_argument("--overwrite", action="store_true")
        a = p.parse_args(args)
        try:
            cfg = TokenStreamConfig(max_tokens=a.max_tokens, shard_size_docs=a.shard_size_docs,
                                    text_field=a.text_field, doc_separator=a.doc_separator, file_format=a.file_format)
        except ValueError as e:
            raise ValueError(f"--{str(e).split(' ')[0].replace('_', '-')}: {e}") from None
        try:
            tok = load_text_tokenizer(a.tokenizer, bos_token=a.bos_token, eos_token=a.eos_token)
        except (FileNotFoundError, ValueError, ImportError) as e:  # ImportError: a tokenizer.json without `tokenizers`
            raise ValueError(f"--tokenizer: {e}") from None
        preprocess_tokens(a.input, a.output, tok, cfg, overwrite=a.overwrite,
                          log=lambda s: print(s, file=sys.stderr, flush=True))
        return 0

    return run("preprocess_tokens", body, argv)


if __name__ == "__main__":
    sys.exit(main())
