"""Perplexity-style numbers the SONAR-LLM and the token LLM can share: token NLL of true next sentences.

Both models score the SAME tokens of the SAME held-out sentences with the SAME SONAR tokenizer:

* every document's first `context_sentences` (2) sentences are context only and are not scored;
* every later sentence k (the end-of-document sentence included) is scored on its words and closing
  EOS, i.e. the target-mode ids `[3, lang, w1..wn, 3]` minus the leading `[3, lang]`: n + 1 tokens.

SONAR-LLM (`sonar_llm_token_nll`): the model reads the TRUE embeddings of sentences 0..k-1 (teacher
forcing at the concept level), predicts e^_k, and the frozen SONAR decoder, teacher-forced on sentence
k's tokens with e^_k as its only cross-attention key, gives per-token cross-entropies (the fused
kernel's `reduction="none"` losses of `PackedSonarDecoder.loss`). The decoder's first label, the
language tag predicted from EOS, is forced by the protocol and is not scored.

Token LLM (`token_llm_token_nll`): the document's token stream `2 w.. 3 w.. 3 ...` (as in training)
is run once; the cross-entropy of every token of sentences k >= context_sentences is summed.

What is comparable: the scored token set, the tokenizer and the sentences are identical, so the two
mean NLLs (nats per token) and perplexities are over the same events. What is not: the conditioning.
The token LLM sees the exact previous tokens; the SONAR-LLM sees the previous sentences only through
their SONAR embeddings (lossy) and sees the current sentence's earlier tokens only inside the frozen
decoder. The SONAR-LLM number is therefore an upper bound of what its concept-level prediction
"knows"; it is not a likelihood of its free-running generation (which decodes with beam search).

Bits per byte (`bits_per_byte`, given a `decode` function): the same summed NLL in bits divided by the
UTF-8 bytes of the scored CONTINUATION TEXT, i.e. " " + " ".join(sentences[context_sentences:]) of every
document (each scored story sentence counts its text, decoded from its ids, plus the one space joining it
to the sentence before). The end-of-document sentence is scored (the model must also predict that the
story stops) but adds no byte. The measure is -log2 P(continuation text, then stop | first sentences) per
byte, which does not depend on the tokenizer: token LLMs with other tokenizers score the same text the
same way, so the numbers compare across families and tokenizers on the same
held-out stories (what each family conditions on is the difference stated above; docs/evaluation.md).

Token LLM with its own tokenizer (`text_tokenizer`: whole-document streams, the paper's baseline): the
held-out data are its whole-document shards; each stream is decoded to text and split into sentences by
`sonar_llm.data.segment.split_sentences` (as the SONAR preprocessing splits the same stories), and each
story is scored as `[BOS] + ids(context) + ids(" " + continuation) + [EOS]`, context = the first
`context_sentences` sentences joined by " ": the continuation's tokens and the EOS are scored
(`whole_document_token_nll`). Its `token_nll` is per ITS OWN token (not comparable with SONAR-token
numbers); its `bits_per_byte` is over the same continuation bytes as above.
"""
from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from sonar_llm.models.family import FAMILIES, get_family
from sonar_llm.models.token_nll import scored_sentence_mask, sonar_llm_token_nll, token_llm_token_nll

from .metrics import token_nll_summary

__all__ = [
    "NLLConfig",
    "scored_sentence_mask",
    "sonar_llm_token_nll",
    "token_llm_token_nll",
    "batches_from_dataset",
    "dataset_token_nll",
    "scored_text_bytes",
    "bits_per_byte_summary",
]


@dataclass
class NLLConfig:
    """Which documents and sentences are scored, and how they are batched."""

    context_sentences: int = 2  # leading sentences of each document used as context only
    max_docs: int = 256  # documents of the held-out set to score (the first ones, in order)
    docs_per_batch: int = 16

    def __post_init__(self) -> None:
        if not isinstance(self.context_sentences, int) or self.context_sentences < 1:
            raise ValueError(f"NLLConfig.context_sentences must be an int >= 1, got {self.context_sentences!r}")
        for name in ("max_docs", "docs_per_batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"NLLConfig.{name} must be a positive int, got {v!r}")


def batches_from_dataset(dataset: Any, cfg: NLLConfig, dtype: torch.dtype = torch.float32,
                         device: torch.device | str = "cpu") -> Iterable[Any]:
    """ConceptBatches of the first `cfg.max_docs` documents of a `ShardedDataset`, `docs_per_batch` each."""
    from sonar_llm.data.batch import ConceptBatch

    n = min(int(dataset.num_docs), cfg.max_docs)
    if n == 0:
        raise ValueError("the held-out dataset has no documents")
    for start in range(0, n, cfg.docs_per_batch):
        embs, toks, sent_lens, doc_lens = [], [], [], []
        for i in range(start, min(n, start + cfg.docs_per_batch)):
            emb, tokens, offs = dataset.doc(i)
            embs.append(torch.as_tensor(emb).to(torch.float32))
            toks.append(np.asarray(tokens, dtype=np.int64))
            sent_lens.append(np.diff(np.asarray(offs, dtype=np.int64)))
            doc_lens.append(int(emb.shape[0]))
        lens = np.concatenate(sent_lens)
        yield ConceptBatch(
            embeddings=torch.cat(embs).to(device=device, dtype=dtype),
            doc_cu_seqlens=torch.from_numpy(np.concatenate([[0], np.cumsum(doc_lens)]).astype(np.int32)).to(device),
            tokens=torch.from_numpy(np.concatenate(toks)).to(device),
            tok_cu_seqlens=torch.from_numpy(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)).to(device),
            max_doc_len=max(doc_lens), max_sent_len=int(lens.max()),
        )


def _open_dataset(data: Any) -> Any:
    """A `ShardedDataset` from a path (FileNotFoundError when missing); a dataset passes through."""
    if isinstance(data, (str, bytes)) or hasattr(data, "__fspath__"):
        from pathlib import Path

        from sonar_llm.data.shards import ShardedDataset

        if not Path(data).exists():
            raise FileNotFoundError(f"held-out shard directory not found: {data}")
        return ShardedDataset(data)
    return data


def scored_text_bytes(batch: Any, context_sentences: int, decode: Callable[[list[list[int]]], list[str]],
                      end_of_doc_tokens: Sequence[int] | None) -> int:
    """UTF-8 bytes of the continuation text a `token_nll` scores in `batch`: every sentence at position >=
    `context_sentences` of its document except the end-of-document sentence (ids == `end_of_doc_tokens`),
    decoded from its ids, + 1 byte each for the space that joins it to the sentence before."""
    num_sent = int(batch.tok_cu_seqlens.numel()) - 1
    scored = scored_sentence_mask(batch.doc_cu_seqlens.cpu(), num_sent, context_sentences).tolist()
    tcu = batch.tok_cu_seqlens.to(torch.int64).cpu().tolist()
    tokens = batch.tokens.cpu().tolist()
    eod = [int(t) for t in end_of_doc_tokens] if end_of_doc_tokens is not None else None
    ids = [tokens[tcu[k]:tcu[k + 1]] for k in range(num_sent) if scored[k]]
    ids = [x for x in ids if x != eod]
    if not ids:
        return 0
    return sum(len(t.encode("utf-8")) + 1 for t in decode(ids))


def dataset_token_nll(model: nn.Module, family: str, data: Any | Sequence[Any], cfg: NLLConfig | None = None,
                      device: torch.device | str = "cpu",
                      decode: Callable[[list[list[int]]], list[str]] | None = None,
                      end_of_doc_tokens: Sequence[int] | None = None) -> dict[str, float]:
    """Mean token NLL / perplexity of `family` (a registry name whose spec has a `token_nll`) over a
    held-out `ShardedDataset` (or a path to one, or a list of ConceptBatches).

    With `decode` (the SONAR tokenizer's `decode`: id lists -> texts) also `bits_per_byte` and `num_bytes`
    (see the module docstring); `end_of_doc_tokens` defaults to the dataset manifest's."""
    cfg = cfg or NLLConfig()
    if getattr(getattr(model, "cfg", None), "whole_documents", False):
        return _whole_document_nll(model, data, cfg, device)
    fn = get_family(family).token_nll
    if fn is None:
        scorable = sorted(name for name in FAMILIES if get_family(name).token_nll is not None)
        raise ValueError(f"token NLL is defined for {scorable}, not for family {family!r}")
    if isinstance(data, (str, bytes)) or hasattr(data, "__fspath__"):
        data = _open_dataset(data)
    if end_of_doc_tokens is None and hasattr(data, "manifest"):
        end_of_doc_tokens = data.manifest.get("end_of_doc", {}).get("tokens")
    batches = data if isinstance(data, (list, tuple)) else batches_from_dataset(data, cfg, device=device)
    total, count, num_bytes = 0.0, 0, 0
    for batch in batches:
        s, n = fn(model, batch, cfg.context_sentences)
        total += s
        count += n
        if decode is not None:
            num_bytes += scored_text_bytes(batch, cfg.context_sentences, decode, end_of_doc_tokens)
    if count == 0:
        raise ValueError(f"no token was scored: every document has <= context_sentences="
                         f"{cfg.context_sentences} sentences")
    out = token_nll_summary(total, count)
    out["context_sentences"] = cfg.context_sentences
    out["total_nll"] = total
    if decode is not None:
        out.update(bits_per_byte_summary(total, num_bytes))
    return out


def bits_per_byte_summary(total_nll: float, num_bytes: int) -> dict[str, float]:
    """{"bits_per_byte": summed NLL (nats) / ln 2 / bytes, "num_bytes"}."""
    if num_bytes <= 0:
        raise ValueError("no byte of continuation text was scored (every scored sentence is the end-of-document one)")
    return {"bits_per_byte": total_nll / math.log(2.0) / num_bytes, "num_bytes": int(num_bytes)}


def _whole_document_nll(model: nn.Module, data: Any, cfg: NLLConfig, device: torch.device | str) -> dict[str, float]:
    """token NLL (its own tokens) and bits per byte of a whole-document token LLM (module docstring)."""
    from sonar_llm.data.segment import split_sentences
    from sonar_llm.models.token_nll import whole_document_token_nll

    if isinstance(data, (list, tuple)) and all(isinstance(s, list) for s in data):
        stories = [list(s) for s in data][: cfg.max_docs]
    else:
        ds = _open_dataset(data)
        tok = model.text_tokenizer()
        stories = []
        for i in range(min(int(ds.num_docs), cfg.max_docs)):
            ids = np.asarray(ds.doc(i)[1]).tolist()
            stories.append(split_sentences(tok.decode(ids)))
    if not stories:
        raise ValueError("the held-out dataset has no documents")
    total, count, num_bytes = 0.0, 0, 0
    for start in range(0, len(stories), cfg.docs_per_batch):
        s, n, b = whole_document_token_nll(model, stories[start:start + cfg.docs_per_batch],
                                           cfg.context_sentences, device)
        total, count, num_bytes = total + s, count + n, num_bytes + b
    out = token_nll_summary(total, count)
    out.update(context_sentences=cfg.context_sentences, total_nll=total, tokenizer=model.cfg.text_tokenizer)
    out.update(bits_per_byte_summary(total, num_bytes))
    return out
